"""The tiny-model kit: Hugging Face-format Llama-family models and PEFT LoRA adapters, made locally.

Tests, examples and benchmarks cannot reach a model hub, so they generate what they need here: a model
directory exactly as a real one is laid out (config.json, safetensors — single or sharded with an
index — tokenizer.json, tokenizer_config.json with a chat template, generation_config.json) and adapter
directories exactly as PEFT saves them. Everything is a pure function of its arguments and seed.
Nothing generated is committed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ember.provider.domain.families import expert_count, expert_layers, expert_parameter_shapes, module_shapes

# ---------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class TinyConfig:
    architecture: str = "llama"  # llama | qwen2 | mistral
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    llama3_rope_scaling: bool = False  # Llama 3.1's long-context RoPE frequencies
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02


PRESETS: dict[str, TinyConfig] = {
    # ~0.1M parameters: unit tests.
    "tiny": TinyConfig(),
    # ~4M parameters: server and provider tests that want a little more realism.
    "small": TinyConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024),
    # ~100M parameters (tied embeddings): the CPU benchmark size.
    "bench-100m": TinyConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                             tie_word_embeddings=True, rope_theta=500000.0, llama3_rope_scaling=True),
    # Llama-3.1-8B's shapes (8.0B parameters, 16 GB in bf16): the GPU benchmark (runtime/devtools/gpu_check.py).
    "bench-8b": TinyConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                           rope_theta=500000.0, llama3_rope_scaling=True),
}

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# ---------------------------------------------------------------------------------------------------
# Tokenizer

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, HEADER_START, HEADER_END]

# Llama 3's template shape, so chat formatting is exercised as it is for real models.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to in and or is are was be it this that with for on as by at from model models serve serving "
    "token tokens request requests deploy deployment deployments base addon addons lora rank weight weights "
    "batch batches cache memory replica replicas account accounts gpu gpus cpu latency throughput stream "
    "prompt prompts answer answers ember pulumi cluster clusters kubernetes store stores digest manifest "
    "fast slow small large tiny many few one two three four five six seven eight nine ten hello world "
    "please thank you what why how when where who which can could would should will may might must "
    "run runs ran running build builds built test tests tested check checks checked load loads loaded "
    "user users engineer engineers infra code program programs data file files path paths name names "
    "sky blue red green sea ship pirate poem poet rhyme verse song sing sings sang river mountain tree "
    "i you he she we they me him her us them my your his our their yes no not never always sometimes"
).split()


def _corpus(seed: int, sentences: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ".", "?", "!", ","]) + rng.choice(["", " 42", " 2024", " (x)"]))
    return lines


def make_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` entries (Llama-3 style reserved tokens pad it)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs ≥ {vocab_size - missing})")
    tokenizer.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(missing)])
    # As in Llama 3: encoding with special tokens prepends BOS.
    bos = (BOS, tokenizer.token_to_id(BOS))
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos])
    return tokenizer


def _write_tokenizer(directory: Path, config: TinyConfig, seed: int, chat_template_file: bool) -> Tokenizer:
    tokenizer = make_tokenizer(config.vocab_size, seed)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": EOS,
        "add_bos_token": True,
        "model_max_length": config.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    # transformers >= 5 writes the template beside the config; older models carry it inside. Both occur.
    if chat_template_file:
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    else:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Model


def hf_config(config: TinyConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    head_dim = config.hidden_size // config.num_attention_heads
    hf = {
        "architectures": [_HF_CLASSES[config.architecture]],
        "model_type": config.architecture,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.architecture == "qwen2",
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": [tokenizer.token_to_id(EOS), tokenizer.token_to_id(EOT)],
        "torch_dtype": str(dtype).removeprefix("torch."),
        "initializer_range": config.init_std,
    }
    if config.architecture == "mistral":
        hf["sliding_window"] = None
    if config.llama3_rope_scaling:
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(config.max_position_embeddings // 8, 16),
        }
    return hf


def random_weights(config: TinyConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names → random tensors; norms are perturbed so their weights matter."""
    g = torch.Generator().manual_seed(seed)
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * config.init_std).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)

    weights = {"model.embed_tokens.weight": normal(config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        for name, (out, inp) in {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h), "o_proj": (h, q_out)}.items():
            weights[p + f"self_attn.{name}.weight"] = normal(out, inp)
            if config.architecture == "qwen2" and name != "o_proj":
                weights[p + f"self_attn.{name}.bias"] = normal(out)
        weights[p + "post_attention_layernorm.weight"] = norm()
        weights[p + "mlp.gate_proj.weight"] = normal(inter, h)
        weights[p + "mlp.up_proj.weight"] = normal(inter, h)
        weights[p + "mlp.down_proj.weight"] = normal(h, inter)
    weights["model.norm.weight"] = norm()
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = normal(config.vocab_size, h)
    return weights


def _save_weights(directory: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    metadata = {"format": "pt"}
    if shards <= 1:
        save_file(weights, str(directory / "model.safetensors"), metadata=metadata)
        return
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[index * per_shard : (index + 1) * per_shard]}
        save_file(part, str(directory / file), metadata=metadata)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_model(
    directory: str | Path,
    config: TinyConfig | str = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    chat_template_file: bool = False,
    **overrides,
) -> Path:
    """Write a Hugging Face model directory of random weights; returns its path."""
    config = PRESETS[config] if isinstance(config, str) else config
    config = replace(config, **overrides)
    if config.architecture not in _HF_CLASSES:
        raise ValueError(f"architecture {config.architecture!r} is not one of {', '.join(_HF_CLASSES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(directory, config, seed, chat_template_file)
    hf = hf_config(config, tokenizer, dtype)
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"], "do_sample": False})
    )
    _save_weights(directory, random_weights(config, seed, dtype), shards)
    return directory


# ---------------------------------------------------------------------------------------------------
# LoRA adapters


def projection_shapes(hf: dict) -> dict[str, tuple[int, int]]:
    """Module name → (in_features, out_features) for every LoRA-targetable projection of a config.json."""
    return module_shapes(hf)


_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "qkv_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "gate_up_proj": "mlp"}


@dataclass(frozen=True)
class TinyLoRA:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    target_parameters: tuple[str, ...] = ()  # a Mixture of Experts' experts: mlp.experts.gate_up_proj, .down_proj
    use_rslora: bool = False
    init_std: float = 0.05
    extra_config: dict = field(default_factory=dict)  # merged into adapter_config.json (to make bad ones)


def make_lora(
    base: str | Path | dict,
    directory: str | Path,
    lora: TinyLoRA | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a PEFT-format LoRA adapter for a base model (its directory, or its config.json as a dict); returns
    its path.

    Both A and B are random (PEFT starts B at zero), so the adapter visibly changes the model's output.
    """
    lora = replace(lora or TinyLoRA(), **overrides)
    hf = base if isinstance(base, dict) else json.loads((Path(base) / "config.json").read_text())
    shapes = projection_shapes(hf)
    unknown = [m for m in lora.target_modules if m not in shapes]
    if unknown:
        raise ValueError(f"target_modules {unknown!r} are not projections of this model; use any of {', '.join(shapes)}")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf["num_hidden_layers"]):
        for module in lora.target_modules:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{_MODULE_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(lora.rank, fan_in, generator=g) * lora.init_std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, lora.rank, generator=g) * lora.init_std).to(dtype)
    # PEFT nests one wrapper per expert parameter, in sorted order, each a level (`base_layer.`) deeper than the last
    expert_shapes, experts = expert_parameter_shapes(hf), expert_count(hf)
    for layer, sparse in enumerate(expert_layers(hf)):
        for level, name in enumerate(sorted(lora.target_parameters)):
            fan_in, fan_out = expert_shapes[name.removeprefix("mlp.")]
            if not sparse:
                continue
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{'base_layer.' * level}"
            width = experts * lora.rank
            tensors[f"{prefix}lora_A.weight"] = (torch.randn(width, fan_in, generator=g) * lora.init_std).to(dtype)
            tensors[f"{prefix}lora_B.weight"] = (torch.randn(fan_out, width, generator=g) * lora.init_std).to(dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if isinstance(base, dict) else str(base),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(lora.target_modules),
        "target_parameters": sorted(lora.target_parameters) or None,
        "use_rslora": lora.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    } | lora.extra_config
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return directory



# ---------------------------------------------------------------------------------------------------
# Other families, built by transformers itself from configs shaped like the real ones (every switch on)

_SLIDE = 16  # a window far shorter than the tests' sequences, so it changes what each token sees
FAMILIES: dict[str, dict] = {
    "qwen3": {"head_dim": 32, "use_sliding_window": True, "sliding_window": _SLIDE, "max_window_layers": 1},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": _SLIDE, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": _SLIDE, "num_hidden_layers": 3,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "final_logit_softcapping": 3.0,
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "phi3": {"sliding_window": 48, "max_position_embeddings": 512, "original_max_position_embeddings": 128,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                 "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                 "long_factor": [2.0 + 0.5 * i for i in range(8)]}},
    "mistral": {"sliding_window": _SLIDE},
    "qwen2": {"use_sliding_window": True, "sliding_window": _SLIDE, "max_window_layers": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": True,
                  "mlp_only_layers": [1], "head_dim": 16},
}


def make_family_model(directory: str | Path, family: str, *, seed: int = 0, init_std: float = 0.1,
                      **overrides) -> Path:
    """A tiny random model of one of FAMILIES (a transformers model_type), saved by transformers' own
    save_pretrained, with this kit's tokenizer; norms are perturbed so their weights matter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = TinyConfig(init_std=init_std, vocab_size=overrides.get("vocab_size", TinyConfig.vocab_size))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(directory, base, seed, chat_template_file=False)
    ids = {"bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOT),
           "pad_token_id": tokenizer.token_to_id(EOS)}
    settings = {"hidden_size": base.hidden_size, "intermediate_size": base.intermediate_size,
                "num_hidden_layers": base.num_hidden_layers, "num_attention_heads": base.num_attention_heads,
                "num_key_value_heads": base.num_key_value_heads, "vocab_size": base.vocab_size,
                "max_position_embeddings": base.max_position_embeddings, "initializer_range": init_std,
                "tie_word_embeddings": family.startswith("gemma")} | ids | FAMILIES[family] | overrides
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name:  # Gemma's norms scale by 1 + weight, the others by weight
                parameter.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.1 * torch.randn(parameter.shape, generator=g))
            elif name.endswith(".gate.weight"):  # a router: sharp, so no near-tie flips its choice between dtypes
                parameter.copy_(torch.randn(parameter.shape, generator=g))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * init_std)
    model.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps(ids | {"do_sample": False}))
    return directory


# Benchmark shapes of other families (runtime/devtools/bench.py --preset): (family, transformers config values)
FAMILY_PRESETS: dict[str, tuple[str, dict]] = {
    # Mixtral 8x7B's proportions (8 experts, 2 a token, experts 3.5x hidden, 4 query heads per KV head) at ~170M
    "mixtral-170m": ("mixtral", {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 6,
                                 "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8,
                                 "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 2048}),
}
