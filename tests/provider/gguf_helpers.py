"""GGUF files for tests: a tiny Hugging Face model written as llama.cpp's converter writes it.

The Q/K rows are permuted as llama.cpp's `LlamaModel.permute` does, tensors get the GGUF names and the
requested GGML types (quantized with the `gguf` library where it can; K-quants, which it cannot quantize, are
random blocks with sane scales), and the tokenizer goes in as vocabulary, merges and token types.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from safetensors.numpy import load_file

# Where each K-quant block keeps its float16 scale(s): random bytes there could be inf or NaN.
_K_SCALES = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}
_QUANTIZABLE = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv",
          "mlp.gate_up_proj": "ffn_up", "pre_feedforward_layernorm": "ffn_norm",
          "post_feedforward_layernorm": "post_ffw_norm", "block_sparse_moe.gate": "ffn_gate_inp",
          "mlp.gate": "ffn_gate_inp"}
# Gemma's norm after attention is a post-norm of its own; its pre-feedforward norm is the ffn_norm
_GEMMA_NAMES = _NAMES | {"post_attention_layernorm": "post_attention_norm"}
_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
# one expert's tensor in the checkpoint → the stacked tensor llama.cpp writes (Mixtral's w1/w3/w2, Qwen3-MoE's)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
            "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
                 "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    if hf_name in _GLOBALS:
        return _GLOBALS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_GEMMA_NAMES if arch.startswith('gemma') else _NAMES)[module]}.{kind}"


def _stack_experts(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama.cpp's converter stacks each layer's experts into one [experts, rows, columns] tensor."""
    stacks: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, values in weights.items():
        match = _EXPERT.match(name)
        if match:
            stacks.setdefault(f"blk.{match[1]}.{_STACKED[match[3]]}.weight", {})[int(match[2])] = values
        else:
            out[name] = values
    return out | {name: np.stack([experts[e] for e in sorted(experts)]) for name, experts in stacks.items()}


def _rope_theta(config: dict, layer_type: str = "full_attention") -> float:
    """rope_theta as transformers < 5 writes it, or from the rope_parameters transformers >= 5 writes."""
    rope = config.get("rope_parameters") or {}
    rope = rope.get(layer_type, rope)
    return float(config.get("rope_theta") or rope.get("rope_theta", 10000.0))


def _architecture_keys(config: dict, family: str, arch: str) -> dict:
    """The metadata llama.cpp's converter writes for this family besides the common keys (under `arch`)."""
    keys = {}
    if config.get("head_dim"):
        keys |= {f"{arch}.attention.key_length": config["head_dim"],
                 f"{arch}.attention.value_length": config["head_dim"]}
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        keys |= {f"{arch}.expert_count": experts, f"{arch}.expert_used_count": config["num_experts_per_tok"]}
    if config.get("moe_intermediate_size"):
        keys[f"{arch}.expert_feed_forward_length"] = config["moe_intermediate_size"]
    if family.startswith("gemma"):
        keys[f"{arch}.attention.sliding_window"] = config["sliding_window"]
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(name) is not None:
                keys[f"{arch}.{name}"] = float(config[name])
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3's global layers' (transformers >= 5 nests them)
    if rope.get("rope_type", rope.get("type")) == "linear":
        keys |= {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(rope["factor"])}
    if family == "phi3":
        keys[f"{arch}.rope.dimension_count"] = config["hidden_size"] // config["num_attention_heads"]
        if config.get("original_max_position_embeddings"):
            keys[f"{arch}.rope.scaling.original_context_length"] = config["original_max_position_embeddings"]
        if config.get("sliding_window"):
            keys[f"{arch}.attention.sliding_window"] = config["sliding_window"]
    return keys


def _extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp computes from config.json: Llama 3's rope_freqs, Phi-3's LongRoPE factors."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_rope_freqs(config)}
    if kind in ("longrope", "su"):
        return {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}
    return {}


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permute: interleave each head's two RoPE halves."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def random_k_blocks(shape: tuple[int, ...], type_name: str, seed: int) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    start, end = _K_SCALES[type_name]
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, (end - start) // 2)).astype(np.float16)
    raw[..., start:end] = scales.view(np.uint8).reshape(rows, cols // block, end - start)
    return raw.reshape(rows, cols // block * size)


def encode(values: np.ndarray, type_name: str, seed: int = 0) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """(data, raw type) for GGUFWriter.add_tensor: F32/F16 as arrays, the rest as GGML blocks: quantized where the
    `gguf` library can, random K-quant blocks, and zero blocks of any other type (a valid tensor of all zeros)."""
    if type_name == "F32":
        return values.astype(np.float32), None
    if type_name == "F16":
        return values.astype(np.float16), None
    qtype = GGMLQuantizationType[type_name]
    if type_name in _K_SCALES:
        return random_k_blocks(values.shape, type_name, seed), qtype
    if type_name in _QUANTIZABLE:
        return quantize(values.astype(np.float32), qtype), qtype
    if type_name in RANDOM_BLOCKS:
        return random_blocks(values.shape, qtype, seed), qtype
    block, size = GGML_QUANT_SIZES[qtype]
    return np.zeros((*values.shape[:-1], values.shape[-1] // block * size), dtype=np.uint8), qtype


# Types the `gguf` library dequantizes but cannot quantize: random blocks, the ones that decode to inf, NaN or
# huge values (random scale bits) zeroed.
RANDOM_BLOCKS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
                 "TQ2_0", "MXFP4", "NVFP4")


def random_blocks(shape: tuple[int, ...], qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    from gguf.quants import dequantize

    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, size=(int(np.prod(shape)) // block, size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        values = dequantize(raw, qtype).reshape(len(raw), block)
    raw[~(np.isfinite(values) & (np.abs(values) < 1e3)).all(axis=1)] = 0
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def tokenizer_metadata(model_dir: Path) -> dict:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    return {"tokens": tokens, "types": [3 if t in special else 1 for t in tokens], "merges": merges,
            "bos": vocab[config["bos_token"]], "eos": vocab[config["eos_token"]], "pad": vocab[config["pad_token"]],
            "template": config.get("chat_template")}


def write_gguf(model_dir: Path, path: Path, types: dict[str, str] | None = None, *, architecture: str | None = None,
               metadata: dict | None = None, tokenizer_model: str = "gpt2", skip: tuple[str, ...] = (),
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """`model_dir` (a tiny Hugging Face model) as a GGUF file. `types` maps a substring of a GGUF tensor name to
    its GGML type (default F32; norms and biases stay F32 as llama.cpp keeps them); `metadata` overrides keys;
    `extra_tensors` adds or replaces tensors llama.cpp computes (rope_freqs.weight, written for llama3 rope_scaling)."""
    config = json.loads((model_dir / "config.json").read_text())
    family = ARCHITECTURES[config["architectures"][0]]
    arch = architecture or family
    writer = GGUFWriter(str(path), arch)
    keys = {f"{arch}.block_count": config["num_hidden_layers"], f"{arch}.context_length": config["max_position_embeddings"],
            f"{arch}.embedding_length": config["hidden_size"], f"{arch}.feed_forward_length": config["intermediate_size"],
            f"{arch}.attention.head_count": config["num_attention_heads"],
            f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
            f"{arch}.rope.freq_base": _rope_theta(config),
            f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            f"{arch}.vocab_size": config["vocab_size"]} | _architecture_keys(config, family, arch)
    tok = tokenizer_metadata(model_dir)
    keys |= {"tokenizer.ggml.model": tokenizer_model, "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tok["tokens"],
             "tokenizer.ggml.token_type": tok["types"], "tokenizer.ggml.merges": tok["merges"],
             "tokenizer.ggml.bos_token_id": tok["bos"], "tokenizer.ggml.eos_token_id": tok["eos"],
             "tokenizer.ggml.padding_token_id": tok["pad"], "tokenizer.ggml.add_bos_token": True}
    if tok["template"]:
        keys["tokenizer.chat_template"] = tok["template"]
    keys |= metadata or {}
    for key, value in keys.items():
        if value is None:
            continue
        _add(writer, key, value)
    weights = _stack_experts(load_file(str(model_dir / "model.safetensors")))
    for seed, (hf_name, values) in enumerate(sorted(weights.items())):
        name = hf_name if hf_name.startswith("blk.") else gguf_name(hf_name, family)
        if name in skip:
            continue
        if family == "llama" and ".q_proj." in hf_name:
            values = permute(values, config["num_attention_heads"])
        elif family == "llama" and ".k_proj." in hf_name:
            values = permute(values, config["num_key_value_heads"])
        elif family.startswith("gemma") and hf_name.endswith("norm.weight"):
            values = values + np.float32(1)  # llama.cpp's Gemma converters store 1 + weight
        wanted = next((t for part, t in (types or {}).items() if part in name), "F32")
        type_name = "F32" if values.ndim == 1 else wanted
        data, raw = encode(values, type_name, seed)
        writer.add_tensor(name, data, raw_dtype=raw)
    for name, values in (_extra_tensors(config) | (extra_tensors or {})).items():
        if name not in skip:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_rope_freqs(config: dict) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors, in float32 as it computes them. It reads the original
    context from config.json's top level (8192 when absent), not from rope_scaling."""
    scaling = config["rope_scaling"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = np.float32(1.0) / (np.float32(config["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    original = config.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < original / high:
            factors.append(1)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add(writer: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


# (token, type) that open a SentencePiece vocabulary, and the ids the metadata names among them
LLAMA2_SPECIALS = (("<unk>", 2), ("<s>", 3), ("</s>", 3)), {"unknown": 0, "bos": 1, "eos": 2}
GEMMA_SPECIALS = (("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3)), \
    {"padding": 0, "eos": 1, "bos": 2, "unknown": 3}


def sentencepiece_metadata(seed: int = 0, pieces: int = 300, spaces: str = "▁", specials=LLAMA2_SPECIALS) -> dict:
    """A SentencePiece vocabulary as llama.cpp writes it (`tokenizer.ggml.model` llama): Llama 2's <unk>, <s>,
    </s> (or Gemma's five), the 256 byte tokens <0x00>..<0xFF>, the merged pieces best first (score −rank), runs
    of spaces (Gemma's files spell them " ", others "▁"), a user-defined <tool>, then single characters; no
    merges. Newlines, tabs and emoji are left to byte fallback."""
    from tokenizers import SentencePieceBPETokenizer

    from ember.runtime.devtools.tinymodels import _corpus

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(_corpus(seed, 500) + SPM_EXTRA_TEXT, vocab_size=pieces, min_frequency=2,
                                show_progress=False)
    model = json.loads(trained.to_str())["model"]
    merged = ["".join(m if isinstance(m, list) else m.split(" ")) for m in model["merges"]]
    chars = [t for t in model["vocab"] if len(t) == 1 and t not in "\n\t" and t not in merged]
    normal = list(dict.fromkeys(merged + [spaces * n for n in (2, 3, 4)] + ["<tool>"] + chars))
    first, ids = specials
    tokens = [t for t, _ in first] + [f"<0x{b:02X}>" for b in range(256)] + normal
    types = [kind for _, kind in first] + [6] * 256 + [4 if t == "<tool>" else 1 for t in normal]
    scores = [0.0] * (len(first) + 256) + [-float(rank) for rank in range(len(normal))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": None,
            "tokenizer.ggml.padding_token_id": None, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False} | {f"tokenizer.ggml.{name}_token_id": i for name, i in ids.items()}


SPM_EXTRA_TEXT = ["Ünïcödé: 日本語のテキスト, русский текст, العربية"] * 5 + \
    ["def f(x):    return {'a': [1, 2, 3]}"] * 5
