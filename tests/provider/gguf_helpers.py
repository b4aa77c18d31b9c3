"""GGUF files for tests: a tiny Hugging Face model written as llama.cpp's converter writes it.

The Q/K rows are permuted as llama.cpp's `LlamaModel.permute` does, tensors get the GGUF names and the
requested GGML types (quantized with the `gguf` library where it can; K-quants, which it cannot quantize, are
random blocks with sane scales), and the tokenizer goes in as vocabulary, merges and token types.
"""

from __future__ import annotations

import json
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
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBALS:
        return _GLOBALS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_NAMES[module]}.{kind}"


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
    block, size = GGML_QUANT_SIZES[qtype]
    return np.zeros((values.shape[0], values.shape[1] // block * size), dtype=np.uint8), qtype


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
               metadata: dict | None = None, tokenizer_model: str = "gpt2", skip: tuple[str, ...] = ()) -> Path:
    """`model_dir` (a tiny Hugging Face model) as a GGUF file. `types` maps a substring of a GGUF tensor name to
    its GGML type (default F32; norms and biases stay F32 as llama.cpp keeps them); `metadata` overrides keys."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture or {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                            "Qwen2ForCausalLM": "qwen2"}[config["architectures"][0]]
    writer = GGUFWriter(str(path), arch)
    keys = {f"{arch}.block_count": config["num_hidden_layers"], f"{arch}.context_length": config["max_position_embeddings"],
            f"{arch}.embedding_length": config["hidden_size"], f"{arch}.feed_forward_length": config["intermediate_size"],
            f"{arch}.attention.head_count": config["num_attention_heads"],
            f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
            f"{arch}.rope.freq_base": float(config["rope_theta"]),
            f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            f"{arch}.vocab_size": config["vocab_size"]}
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
    weights = load_file(str(model_dir / "model.safetensors"))
    for seed, (hf_name, values) in enumerate(sorted(weights.items())):
        name = gguf_name(hf_name)
        if name in skip:
            continue
        if arch == "llama" and ".q_proj." in hf_name:
            values = permute(values, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf_name:
            values = permute(values, config["num_key_value_heads"])
        wanted = next((t for part, t in (types or {}).items() if part in name), "F32")
        type_name = "F32" if values.ndim == 1 else wanted
        data, raw = encode(values, type_name, seed)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
