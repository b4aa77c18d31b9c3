"""GGUF files as a model source: the header checked at preview, and the conversion an upload makes.

llama.cpp's GGUF holds (often quantized) weights, the hyperparameters and the tokenizer as metadata. Ember
serves the Hugging Face layout, so everything downstream (runtime, addons, Kubernetes) sees one format: an
upload dequantizes the weights with the `gguf` library (llama.cpp's own reader) into safetensors, puts back
the Q/K rows that llama.cpp's converter permuted for its RoPE, and writes config.json, generation_config.json,
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

# GGML tensor types the `gguf` library dequantizes exactly and Ember converts.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                          "Q5_K", "Q6_K")


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    model_type: str
    permuted_qk: bool  # llama.cpp's converter interleaves Q/K rows for its RoPE kernel; put back on import
    qkv_bias: bool


# general.architecture → what Ember serves it as. Mistral 7B files say "llama": llama.cpp converts them as one.
ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", permuted_qk=True, qkv_bias=False),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", permuted_qk=False, qkv_bias=True),
}

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# GGUF tensor name (per layer) → Hugging Face module
_LAYER_MODULES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBALS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
SHARD_BYTES = 2 * 1024**3  # safetensors shards of the converted weights, as Hugging Face checkpoints are cut


@dataclass(frozen=True)
class GGUFTensor:
    gguf_name: str
    hf_name: str
    type_name: str
    shape: tuple[int, ...]  # Hugging Face order: [out, in]
    reader_tensor: object  # gguf.ReaderTensor: data memory-mapped, read only when converted

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
    if arch_name not in ARCHITECTURES:
        raise ModelFilesError(f"{source}: general.architecture {arch_name!r} is not supported; Ember converts "
                              f"{', '.join(ARCHITECTURES)} (Mistral 7B files are 'llama')")
    architecture = ARCHITECTURES[arch_name]
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

    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelFilesError(f"{source}: {arch_name}.rope.scaling.type {scaling!r} is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ModelFilesError(f"{source}: tensor rope_freqs.weight (Llama 3.1's RoPE frequency scaling) is not "
                              f"supported in GGUF imports; import the model's Hugging Face directory instead")
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
    if key("attention.sliding_window") is not None:  # refused by check_config, naming it
        config |= {"sliding_window": key("attention.sliding_window"), "use_sliding_window": True}
    if architecture.model_type == "qwen2":
        config["use_sliding_window"] = config.get("use_sliding_window", False)
    return {k: (int(v) if isinstance(v, np.integer) else v) for k, v in config.items()}


def _expected_shapes(config: dict, architecture: Architecture) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the config implies → its shape (lm_head only when untied)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    per_layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (inter, h),
                 "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    if architecture.qkv_bias:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    for layer in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBALS:
        return _GLOBALS[gguf_name]
    match = _LAYER.match(gguf_name)
    if match and match[2] in _LAYER_MODULES:
        return f"model.layers.{match[1]}.{_LAYER_MODULES[match[2]]}.{match[3]}"
    return None


def _tensors(reader, config: dict, architecture: Architecture, source: str) -> list[GGUFTensor]:
    expected = _expected_shapes(config, architecture)
    tensors = []
    for t in reader.tensors:
        hf_name = _hf_name(t.name)
        if hf_name not in expected:
            raise ModelFilesError(f"{source}: tensor {t.name} is not a weight of a {config['model_type']} model with "
                                  f"{config['num_hidden_layers']} layers as its metadata describes")
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise ModelFilesError(f"{source}: tensor {t.name} has type {type_name}; Ember converts "
                                  f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists the fastest dimension first
        if shape != expected[hf_name]:
            raise ModelFilesError(f"{source}: tensor {t.name} has shape {list(shape)}, but the metadata implies "
                                  f"{list(expected[hf_name])}")
        tensors.append(GGUFTensor(t.name, hf_name, type_name, shape, t))
    missing = sorted(set(expected) - {t.hf_name for t in tensors})
    if missing:
        raise ModelFilesError(f"{source}: {len(missing)} tensors the metadata implies are missing, e.g. {missing[0]}")
    return tensors


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`, which interleaves each head's two RoPE halves row by row."""
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def dequantized(model: GGUFModel, tensor: GGUFTensor) -> np.ndarray:
    """One tensor in the Hugging Face layout: dequantized, reshaped, Q/K rows put back."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = tensor.reader_tensor.data
    values = data if tensor.type_name == "F16" else dequantize(data, GGMLQuantizationType[tensor.type_name])
    values = values.reshape(tensor.shape)
    if model.architecture.permuted_qk and ".q_proj." in tensor.hf_name:
        values = _unpermute(values, model.config["num_attention_heads"])
    elif model.architecture.permuted_qk and ".k_proj." in tensor.hf_name:
        values = _unpermute(values, model.config["num_key_value_heads"])
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
