"""GGUF files as a model source: the header checked at preview, and the conversion an upload makes.

llama.cpp's GGUF holds (often quantized) weights, the hyperparameters and the tokenizer as metadata. Ember
serves the Hugging Face layout, so everything downstream (runtime, addons, Kubernetes) sees one format: an
upload dequantizes the weights with the `gguf` library (llama.cpp's own reader) into safetensors, undoes what
llama.cpp's converter changed (the Q/K rows it permuted for its RoPE, the 1 it added to Gemma's norms, the experts
it stacked into one tensor per layer, the RoPE factors it computed from config.json as tensors), and writes
config.json (Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Phi-3, Gemma 2, Gemma 3), generation_config.json,
tokenizer.json (rebuilt by `gguf_tokenizer`) and tokenizer_config.json with the chat template. Quantized
tensors become float32 (exact: every quantized value is a float32), F16 stays F16. The output is a function
of the file alone, so the converted model's digest is deterministic. No torch: numpy and safetensors.numpy.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.provider.domain.gguf_tokenizer import GGUFVocabulary
from ember.provider.domain.model_files import ModelFilesError, check_config, read_config, require_file

# GGML tensor types the `gguf` library dequantizes exactly and Ember converts: every one gguf 0.19's
# `quants.dequantize` implements (not Q8_1, Q8_K, which llama.cpp only uses for activations, nor the integer types).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                          "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                          "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    model_type: str
    permuted_qk: bool = False  # llama.cpp's converter interleaves Q/K rows for its RoPE kernel; put back on import
    qkv_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head of q and k (attn_q_norm, attn_k_norm)
    gemma: bool = False  # post-norms, GeGLU, soft-capping; llama.cpp stores every norm weight as 1 + weight
    fused: bool = False  # Phi-3: attn_qkv and ffn_up (gate and up) stay fused, as the checkpoint keeps them
    experts: str | None = None  # the Hugging Face checkpoint's Mixture-of-Experts layout: "mixtral" or "qwen3_moe"


# general.architecture → what Ember serves it as. Mistral 7B files say "llama": llama.cpp converts them as one, and
# Mixtral too (a "llama" with llama.expert_count).
ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True),
    "qwen3": Architecture("Qwen3ForCausalLM", "qwen3", qk_norm=True),
    "qwen3moe": Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=True, experts="qwen3_moe"),
    "phi3": Architecture("Phi3ForCausalLM", "phi3", fused=True),
    "gemma2": Architecture("Gemma2ForCausalLM", "gemma2", gemma=True),
    "gemma3": Architecture("Gemma3ForCausalLM", "gemma3_text", qk_norm=True, gemma=True),
}
MIXTRAL = Architecture("MixtralForCausalLM", "mixtral", permuted_qk=True, experts="mixtral")
# Refused by name, with what to do instead.
NOT_SERVED = {"gemma": "Gemma 1 (GemmaForCausalLM) is not served; Gemma 2 and Gemma 3 files are"}

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+\.(?:weight|bias))$")
_GLOBALS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
# Tensors llama.cpp computes from config.json (RoPE frequency factors): read back into config.json, not weights
ROPE_FREQS, ROPE_LONG, ROPE_SHORT = "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"
CONFIG_TENSORS = (ROPE_FREQS, ROPE_LONG, ROPE_SHORT)
# Gemma's query scale is 1/√head_dim, except in the 27B models, which scale by 1/√(hidden/heads); llama.cpp
# recognises them by their layer count (Gemma 2 27B: 46, Gemma 3 27B: 62) and Ember does the same.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
SHARD_BYTES = 2 * 1024**3  # safetensors shards of the converted weights, as Hugging Face checkpoints are cut


@dataclass(frozen=True)
class GGUFTensor:
    gguf_name: str
    hf_name: str
    type_name: str
    shape: tuple[int, ...]  # Hugging Face order: [out, in]
    reader_tensor: object  # gguf.ReaderTensor: data memory-mapped, read only when converted
    expert: int | None = None  # llama.cpp stacks a layer's experts in one tensor; the checkpoint has one per expert

    @property
    def converted_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.type_name == "F16" else np.dtype(np.float32)

    @property
    def converted_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.converted_dtype.itemsize


@dataclass(frozen=True)
class GGUFModel:
    path: Path
    architecture: Architecture
    config: dict  # config.json
    vocabulary: GGUFVocabulary
    tensors: list[GGUFTensor]

    @property
    def parameter_count(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)


def is_gguf(source: str | Path) -> bool:
    """A GGUF source is a file named *.gguf (a Hugging Face source is a directory)."""
    return str(source).lower().endswith(".gguf")


def source_config(source: str) -> dict | None:
    """The config.json of a local model source, a directory or a GGUF file; None when it is not here to read."""
    if "://" in source and not source.startswith("file://"):
        return None
    path = Path(source.removeprefix("file://"))
    if is_gguf(path) and path.is_file():
        return read_gguf(path).config
    return read_config(path) if (path / "config.json").is_file() else None


def read_gguf(path: str | Path) -> GGUFModel:
    """The header of a GGUF file, checked: everything Ember cannot serve is refused, naming the field."""
    path = Path(path).absolute()
    require_file(path, "is not a file: it does not exist")
    stat = path.stat()
    return _read_gguf(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: Path, _size: int, _mtime_ns: int) -> GGUFModel:
    # Parsing a large vocabulary takes seconds; one provider process checks a model, the addons on it and
    # then converts it, so the header is read once per file version.
    metadata, reader = _open(path)
    source = str(path)
    arch_name = metadata.get("general.architecture")
    if arch_name in NOT_SERVED:
        raise ModelFilesError(f"{source}: general.architecture {arch_name!r}: {NOT_SERVED[arch_name]}")
    if arch_name not in ARCHITECTURES:
        raise ModelFilesError(f"{source}: general.architecture {arch_name!r} is not supported; Ember converts "
                              f"{', '.join(ARCHITECTURES)} (Mistral 7B and Mixtral files are 'llama')")
    architecture = ARCHITECTURES[arch_name]
    if arch_name == "llama" and metadata.get("llama.expert_count"):
        architecture = MIXTRAL
    vocabulary = GGUFVocabulary.from_metadata(metadata, source)
    config = _config(metadata, arch_name, architecture, vocabulary, reader, source)
    check_config(config, f"{source} (its metadata as config.json)")
    tensors = _tensors(reader, config, architecture, source)
    return GGUFModel(path, architecture, config, vocabulary, tensors)


def _open(path: Path) -> tuple[dict, object]:
    import gguf  # imported when a GGUF is read: the rest of the provider never needs it

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFilesError(f"{path} is not a GGUF file: it does not start with the magic bytes 'GGUF'")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors … on a damaged file
        raise ModelFilesError(f"{path} is not a readable GGUF file (truncated or damaged?): "
                              f"{type(exc).__name__}: {exc}") from None
    return metadata, reader


def _config(metadata: dict, arch_name: str, architecture: Architecture, vocabulary: GGUFVocabulary, reader,
            source: str) -> dict:
    def key(name: str, default=None, required: bool = False):
        value = metadata.get(f"{arch_name}.{name}", default)
        if required and value is None:
            raise ModelFilesError(f"{source}: metadata {arch_name}.{name} is missing")
        return value

    heads = key("attention.head_count", required=True)
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": [architecture.hf_name], "model_type": architecture.model_type, "hidden_act": "silu",
        "hidden_size": key("embedding_length", required=True),
        "intermediate_size": key("feed_forward_length", required=True),
        "num_hidden_layers": key("block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": key("vocab_size", len(vocabulary.tokens)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": architecture.qkv_bias,
    } | vocabulary.generation_config()
    if key("attention.key_length") is not None:
        config["head_dim"] = key("attention.key_length")
    config = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in config.items()}
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rotary = key("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:  # refused by check_config, naming it
        config["partial_rotary_factor"] = int(rotary) / head_dim
    config |= _rope_config(metadata, arch_name, reader, config, head_dim, key, source)
    config |= _window_config(arch_name, architecture, key)
    if architecture.experts is not None:
        config |= _experts_config(architecture, key)
    if architecture.gemma:
        config |= _gemma_config(arch_name, config, head_dim, key)
    return config


def _rope_config(metadata: dict, arch_name: str, reader, config: dict, head_dim: int, key: Callable,
                 source: str) -> dict:
    """rope_scaling (and what goes with it) from the metadata and the tensors llama.cpp computed from it."""
    tensors = {t.name: t for t in reader.tensors if t.name in CONFIG_TENSORS}
    scaling = key("rope.scaling.type")
    if ROPE_FREQS in tensors:
        if scaling not in (None, "none", "llama3"):
            raise ModelFilesError(f"{source}: {arch_name}.rope.scaling.type {scaling!r} does not go with tensor "
                                  f"{ROPE_FREQS} (Llama 3's RoPE scaling)")
        return {"rope_scaling": _llama3_rope_scaling(tensors[ROPE_FREQS], head_dim, config["rope_theta"], key, source)}
    if ROPE_LONG in tensors or ROPE_SHORT in tensors:
        return _longrope_config(tensors, head_dim, key, source)
    if scaling == "linear":  # Llama 2's long-context variants; Gemma 3's global layers
        return {"rope_scaling": {"rope_type": "linear", "factor": float(key("rope.scaling.factor", required=True))}}
    if scaling not in (None, "none"):
        raise ModelFilesError(f"{source}: {arch_name}.rope.scaling.type {scaling!r} is not supported")
    return {}


def _longrope_config(tensors: dict, head_dim: int, key: Callable, source: str) -> dict:
    """Phi-3's LongRoPE: llama.cpp keeps config.json's long_factor and short_factor as two tensors, and its
    original_max_position_embeddings as metadata."""
    factors = {}
    for name, field in ((ROPE_LONG, "long_factor"), (ROPE_SHORT, "short_factor")):
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelFilesError(f"{source}: tensor {name} is missing: LongRoPE needs both "
                                  f"{ROPE_LONG} and {ROPE_SHORT}")
        if tensor.tensor_type.name != "F32" or tuple(int(d) for d in tensor.shape) != (head_dim // 2,):
            raise ModelFilesError(f"{source}: tensor {name} has type {tensor.tensor_type.name} and shape "
                                  f"{[int(d) for d in tensor.shape]}; LongRoPE's factors are F32 [{head_dim // 2}]")
        factors[field] = [float(x) for x in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]
    return {"rope_scaling": {"type": "longrope", **factors},
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length", required=True))}


def _window_config(arch_name: str, architecture: Architecture, key: Callable) -> dict:
    window = key("attention.sliding_window")
    if architecture.gemma:  # every other layer (Gemma 2), five of six (Gemma 3)
        config = {"sliding_window": None if window is None else int(window)}
        if arch_name == "gemma3":
            config["sliding_window_pattern"] = int(key("attention.sliding_window_pattern", 6))
        return config
    if architecture.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        return {"sliding_window": None if window is None else int(window), "use_sliding_window": window is not None}
    if window is None and arch_name != "phi3":
        return {}
    return {"sliding_window": None if window is None else int(window)}


def _experts_config(architecture: Architecture, key: Callable) -> dict:
    experts, used = key("expert_count", required=True), key("expert_used_count", required=True)
    if architecture.experts == "mixtral":
        return {"num_local_experts": int(experts), "num_experts_per_tok": int(used)}
    # Qwen3-MoE: every layer sparse (llama.cpp has no dense layers for it), top-k weights renormalised as
    # llama.cpp always does
    return {"num_experts": int(experts), "num_experts_per_tok": int(used), "norm_topk_prob": True,
            "moe_intermediate_size": int(key("expert_feed_forward_length", required=True)),
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def _gemma_config(arch_name: str, config: dict, head_dim: int, key: Callable) -> dict:
    big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch_name]
    gemma = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim,
             "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if big else head_dim,
             "attn_logit_softcapping": _float_or_none(key("attn_logit_softcapping")),
             "final_logit_softcapping": _float_or_none(key("final_logit_softcapping"))}
    if arch_name == "gemma3":  # its local layers' RoPE base, which llama.cpp fixes at 10000 unless it says
        gemma["rope_local_base_freq"] = float(key("rope.freq_base_swa", 10000.0))
    return gemma


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


# What llama.cpp's converter assumes for Llama 3's original context when config.json has no top-level
# original_max_position_embeddings (Llama 3.1 and 3.2 keep theirs, 8192, inside rope_scaling).
LLAMA3_ORIGINAL_CONTEXT = 8192


def llama3_rope_factors(head_dim: int, theta: float, rope_scaling: dict) -> np.ndarray:
    """The divisor of each RoPE frequency that Llama 3's rope_scaling implies: llama.cpp's rope_freqs tensor, as its
    converter computes it (LlamaModel.generate_extra_tensors) and transformers applies it (llama3 rope_type): the
    factor for wavelengths longer than original / low_freq_factor, 1 below original / high_freq_factor, and a
    smooth blend of the two in between."""
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    original = rope_scaling["original_max_position_embeddings"]
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (original / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, blended))


def _llama3_rope_scaling(tensor, head_dim: int, theta: float, key: Callable, source: str) -> dict:
    """The rope_scaling a rope_freqs tensor was computed from, checked by computing the tensor again from it.

    llama.cpp writes no rope_scaling keys for Llama 3 (some other converters write its factor and original
    context), only the tensor. Its long-wavelength plateau is the factor; in the band between, the inverse
    of each value is linear in the frequency, a line whose slope and intercept give low_freq_factor and
    high_freq_factor once the original context is known (the tensor only fixes the two band edges, original /
    low and original / high). When the band holds fewer than two frequencies, Llama 3.1's 1 and 4 are tried."""
    if tensor.tensor_type.name != "F32" or tuple(int(d) for d in tensor.shape) != (head_dim // 2,):
        raise ModelFilesError(f"{source}: tensor {ROPE_FREQS} has type {tensor.tensor_type.name} and shape "
                              f"{[int(d) for d in tensor.shape]}; Llama 3's RoPE scaling is F32 [{head_dim // 2}] "
                              f"(one factor per frequency of a {head_dim}-wide head)")
    values = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    original = int(key("rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
    factor = float(key("rope.scaling.factor") or values.max())
    frequencies = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (values > 1 + 1e-6) & (values < factor * (1 - 1e-6))
    candidates = []
    if factor > 1 and band.sum() >= 2:
        smooth = (1 / values[band] - 1 / factor) / (1 - 1 / factor)  # (original·freq/2π − low) / (high − low)
        slope, intercept = np.polyfit(frequencies[band], smooth, 1)
        width = original / (2 * np.pi * slope)
        candidates.append((-intercept * width, -intercept * width + width))
    candidates.append((1.0, 4.0))
    for low, high in candidates:
        for digits in (2, 4, 6, None):  # the round numbers configs are written with, when they reproduce the tensor
            rope_scaling = {"rope_type": "llama3", "factor": _rounded(factor, digits),
                            "low_freq_factor": _rounded(low, digits), "high_freq_factor": _rounded(high, digits),
                            "original_max_position_embeddings": original}
            if rope_scaling["low_freq_factor"] >= rope_scaling["high_freq_factor"]:
                continue
            if np.allclose(llama3_rope_factors(head_dim, theta, rope_scaling), values, rtol=1e-5, atol=1e-6):
                return rope_scaling
    raise ModelFilesError(f"{source}: tensor {ROPE_FREQS} is not Llama 3's RoPE scaling: no factor, low_freq_factor "
                          f"and high_freq_factor (with original_max_position_embeddings {original}) give back its "
                          f"values {np.round(values, 4).tolist()}")


def _rounded(value: float, digits: int | None) -> float:
    return float(value) if digits is None else round(float(value), digits)


def _layer_layout(config: dict, architecture: Architecture) -> dict[str, tuple[tuple[int, ...], list]]:
    """Each tensor of a layer, by its GGUF name (after `blk.N.`) → (its shape in Hugging Face order, the Hugging
    Face tensors it becomes: (name after `model.layers.N.`, expert index or None))."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layout = {}

    def one(gguf: str, hf: str, shape: tuple[int, ...]) -> None:
        layout[gguf] = (shape, [(hf, None)])

    one("attn_norm.weight", "input_layernorm.weight", (h,))
    if architecture.fused:
        one("attn_qkv.weight", "self_attn.qkv_proj.weight", (q + 2 * kv, h))
    else:
        for gguf, hf, rows in (("attn_q", "q_proj", q), ("attn_k", "k_proj", kv), ("attn_v", "v_proj", kv)):
            one(f"{gguf}.weight", f"self_attn.{hf}.weight", (rows, h))
            if architecture.qkv_bias:
                one(f"{gguf}.bias", f"self_attn.{hf}.bias", (rows,))
    one("attn_output.weight", "self_attn.o_proj.weight", (h, q))
    if architecture.qk_norm:
        one("attn_q_norm.weight", "self_attn.q_norm.weight", (head_dim,))
        one("attn_k_norm.weight", "self_attn.k_norm.weight", (head_dim,))
    if architecture.gemma:
        one("post_attention_norm.weight", "post_attention_layernorm.weight", (h,))
        one("ffn_norm.weight", "pre_feedforward_layernorm.weight", (h,))
        one("post_ffw_norm.weight", "post_feedforward_layernorm.weight", (h,))
    else:
        one("ffn_norm.weight", "post_attention_layernorm.weight", (h,))
    if architecture.experts is not None:
        layout |= _experts_layout(config, architecture)
    elif architecture.fused:
        one("ffn_up.weight", "mlp.gate_up_proj.weight", (2 * inter, h))
        one("ffn_down.weight", "mlp.down_proj.weight", (h, inter))
    else:
        one("ffn_gate.weight", "mlp.gate_proj.weight", (inter, h))
        one("ffn_up.weight", "mlp.up_proj.weight", (inter, h))
        one("ffn_down.weight", "mlp.down_proj.weight", (h, inter))
    return layout


def _experts_layout(config: dict, architecture: Architecture) -> dict:
    """llama.cpp's router and stacked experts → the checkpoint's router and one tensor per expert (Mixtral's
    block_sparse_moe.experts.E.w1/w3/w2, Qwen3-MoE's mlp.experts.E.gate_proj/up_proj/down_proj)."""
    h = config["hidden_size"]
    if architecture.experts == "mixtral":
        experts, inter, prefix = config["num_local_experts"], config["intermediate_size"], "block_sparse_moe"
        gate, up, down = "w1", "w3", "w2"
    else:
        experts, inter, prefix = config["num_experts"], config["moe_intermediate_size"], "mlp"
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    stacked = {"ffn_gate_exps": (gate, (experts, inter, h)), "ffn_up_exps": (up, (experts, inter, h)),
               "ffn_down_exps": (down, (experts, h, inter))}
    layout = {"ffn_gate_inp.weight": ((experts, h), [(f"{prefix}.gate.weight", None)])}
    for gguf, (hf, shape) in stacked.items():
        layout[f"{gguf}.weight"] = (shape, [(f"{prefix}.experts.{e}.{hf}.weight", e) for e in range(experts)])
    return layout


def _tensors(reader, config: dict, architecture: Architecture, source: str) -> list[GGUFTensor]:
    layout, layers = _layer_layout(config, architecture), config["num_hidden_layers"]
    globals_ = {"token_embd.weight": (config["vocab_size"], config["hidden_size"]),
                "output_norm.weight": (config["hidden_size"],)}
    if not config["tie_word_embeddings"]:
        globals_["output.weight"] = (config["vocab_size"], config["hidden_size"])
    tensors, seen = [], set()
    for t in reader.tensors:
        if t.name in CONFIG_TENSORS:
            continue
        match = _LAYER.match(t.name)
        if t.name in globals_:
            expected, outputs = globals_[t.name], [(_GLOBALS[t.name], None)]
        elif match and int(match[1]) < layers and match[2] in layout:
            expected, parts = layout[match[2]]
            outputs = [(f"model.layers.{match[1]}.{hf}", expert) for hf, expert in parts]
        else:
            raise ModelFilesError(f"{source}: tensor {t.name} is not a weight of a {config['model_type']} model with "
                                  f"{layers} layers as its metadata describes")
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise ModelFilesError(f"{source}: tensor {t.name} has type {type_name}; Ember converts "
                                  f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists the fastest dimension first
        if shape != expected:
            raise ModelFilesError(f"{source}: tensor {t.name} has shape {list(shape)}, but the metadata implies "
                                  f"{list(expected)}")
        for hf_name, expert in outputs:
            tensors.append(GGUFTensor(t.name, hf_name, type_name, shape if expert is None else shape[1:], t, expert))
        seen.add(t.name)
    expected_names = set(globals_) | {f"blk.{i}.{name}" for i in range(layers) for name in layout}
    missing = sorted(expected_names - seen, key=_natural)
    if missing:
        hf = _GLOBALS.get(missing[0]) or _missing_hf_name(missing[0], layout)
        raise ModelFilesError(f"{source}: {len(missing)} tensors the metadata implies are missing, e.g. {missing[0]} "
                              f"({hf})")
    return tensors


def _missing_hf_name(gguf_name: str, layout: dict) -> str:
    match = _LAYER.match(gguf_name)
    return f"model.layers.{match[1]}.{layout[match[2]][1][0][0]}"


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`, which interleaves each head's two RoPE halves row by row."""
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def dequantized(model: GGUFModel, tensor: GGUFTensor) -> np.ndarray:
    """One tensor in the Hugging Face layout: dequantized, reshaped, Q/K rows put back."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = tensor.reader_tensor.data
    if tensor.expert is not None:  # one expert's rows only: an MoE layer's stack is never dequantized whole
        data = data[tensor.expert]
    values = data if tensor.type_name == "F16" else dequantize(data, GGMLQuantizationType[tensor.type_name])
    values = values.reshape(tensor.shape)
    if model.architecture.permuted_qk and ".q_proj." in tensor.hf_name:
        values = _unpermute(values, model.config["num_attention_heads"])
    elif model.architecture.permuted_qk and ".k_proj." in tensor.hf_name:
        values = _unpermute(values, model.config["num_key_value_heads"])
    elif model.architecture.gemma and tensor.gguf_name.endswith("norm.weight"):
        values = values.astype(np.float32) - np.float32(1)  # llama.cpp adds Gemma's 1 to the stored weight
    return np.ascontiguousarray(values, dtype=tensor.converted_dtype)


def _shards(tensors: list[GGUFTensor]) -> list[list[GGUFTensor]]:
    shards: list[list[GGUFTensor]] = [[]]
    size = 0
    for tensor in sorted(tensors, key=lambda t: t.hf_name):
        if shards[-1] and size + tensor.converted_bytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.converted_bytes
    return shards


def convert_gguf(source: str | Path, directory: str | Path, progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write the Hugging Face directory of a GGUF file to `directory` (which must not exist yet), all or nothing."""
    from safetensors.numpy import save_file

    model = read_gguf(source)
    directory = Path(directory)
    if directory.exists():
        raise ModelFilesError(f"{directory} already exists; give a new directory for the converted model")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.partial-{os.getpid()}"  # renamed into place when complete
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_json(staging / "config.json", model.config)
        _write_json(staging / "generation_config.json", model.vocabulary.generation_config())
        _write_json(staging / "tokenizer_config.json",
                    model.vocabulary.tokenizer_config(model.config["max_position_embeddings"]))
        model.vocabulary.build().save(str(staging / "tokenizer.json"))
        shards = _shards(model.tensors)
        weight_map, done = {}, 0
        for number, shard in enumerate(shards, start=1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for tensor in shard:
                tensors[tensor.hf_name] = dequantized(model, tensor)
                weight_map[tensor.hf_name] = name
                done += 1
                if done % 50 == 0 or done == len(model.tensors):
                    progress(f"converting {model.path.name}: {done}/{len(model.tensors)} tensors")
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
            # safetensors writes its files private; give them the mode (umask) the other files got
            os.chmod(staging / name, (staging / "config.json").stat().st_mode & 0o777)
        if len(shards) > 1:
            total = sum(t.converted_bytes for t in model.tensors)
            _write_json(staging / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
