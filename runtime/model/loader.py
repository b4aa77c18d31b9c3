"""Load a Hugging Face model directory's safetensors into the runtime's weight layout.

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`) checkpoints; every
tensor's shape is checked against config.json; q/k/v and gate/up are fused so a layer runs two
matmuls where the checkpoint has five.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ember.provider.domain.model_files import ModelFilesError
from ember.runtime.model.config import ModelConfig

# Checkpoints from older transformers versions carry these buffers; they are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class ModelWeights:
    config: ModelConfig
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor | Any  # the embedding itself when tied; a QuantizedWeight (quantized.py) when quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def parameter_count(self) -> int:
        tensors = [self.embed, self.norm] + ([] if self.config.tie_word_embeddings else [self.lm_head])
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() for t in tensors)


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFilesError(f"{index} is not a safetensors index (needs a weight_map): {exc}") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.exists():
                raise ModelFilesError(f"{path} is missing: {index.name} lists it as a shard")
        return files
    if single.exists():
        return dict.fromkeys(open_safetensors(single).keys(), single)
    raise ModelFilesError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def open_safetensors(path: Path):
    try:
        return safe_open(path, "pt")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFilesError(f"{path} is not a readable safetensors file: {exc}") from None


class _Reader:
    """Reads tensors by name across shards, checking shapes and tracking what was used."""

    def __init__(self, directory: Path, dtype: torch.dtype, device: torch.device):
        self.files = checkpoint_files(directory)
        self.dtype, self.device = dtype, device
        self.handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.files:
            raise ModelFilesError(f"tensor {name} is missing from the checkpoint")
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = open_safetensors(path)
        try:
            tensor = self.handles[path].get_tensor(name)
        except Exception as exc:  # a header that lies about offsets or sizes
            raise ModelFilesError(f"{path}: tensor {name} cannot be read: {exc}") from None
        if tuple(tensor.shape) != shape:
            raise ModelFilesError(f"tensor {name} has shape {tuple(tensor.shape)}, but config.json needs {shape}")
        self.used.add(name)
        return tensor.to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str, shape: tuple[int, ...], wanted: bool) -> torch.Tensor | None:
        return self.get(name, shape) if wanted else None

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not n.endswith(_IGNORED_SUFFIXES))


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ModelWeights:
    directory = Path(directory)
    config = ModelConfig.from_dir(directory)
    reader = _Reader(directory, dtype, torch.device(device))
    h, inter, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv = [reader.get(attn + f"{n}_proj.weight", (size, h)) for n, size in (("q", q), ("k", kv), ("v", kv))]
        qkv_bias = None
        if config.qkv_bias:
            qkv_bias = torch.cat([reader.get(attn + f"{n}_proj.bias", (size,)) for n, size in (("q", q), ("k", kv), ("v", kv))])
        layers.append(
            LayerWeights(
                input_norm=reader.get(p + "input_layernorm.weight", (h,)),
                qkv=torch.cat(qkv),
                qkv_bias=qkv_bias,
                o=reader.get(attn + "o_proj.weight", (h, q)),
                o_bias=reader.maybe(attn + "o_proj.bias", (h,), config.o_bias),
                post_norm=reader.get(p + "post_attention_layernorm.weight", (h,)),
                gate_up=torch.cat([reader.get(p + "mlp.gate_proj.weight", (inter, h)), reader.get(p + "mlp.up_proj.weight", (inter, h))]),
                down=reader.get(p + "mlp.down_proj.weight", (h, inter)),
            )
        )
    embed = reader.get("model.embed_tokens.weight", (config.vocab_size, h))
    if config.tie_word_embeddings:
        lm_head = embed
        reader.used.add("lm_head.weight")  # some tied checkpoints still carry a copy
    else:
        lm_head = reader.get("lm_head.weight", (config.vocab_size, h))
    weights = ModelWeights(config, embed, layers, reader.get("model.norm.weight", (h,)), lm_head)
    unused = reader.unused()
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ModelFilesError(f"{directory}: tensors {unused[:5]}{more} do not belong to a {config.architecture}")
    return weights
