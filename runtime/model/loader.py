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
from ember.provider.domain.tensor_parallel import Shard, shard_of
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
    shard: Shard  # this rank's share of the model (its heads, features and vocabulary); all of it on one device

    @property
    def local(self) -> ModelConfig:
        """The config of this rank's share: its heads, KV heads and MLP features (the rest is the model's)."""
        return self.config.share(self.shard)

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

    def get(self, name: str, shape: tuple[int, ...], rows: slice = slice(None),
            columns: slice = slice(None)) -> torch.Tensor:
        """The tensor, or only its `rows` and `columns` (a tensor-parallel rank's share: only those are read)."""
        if name not in self.files:
            raise ModelFilesError(f"tensor {name} is missing from the checkpoint")
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = open_safetensors(path)
        try:
            part = self.handles[path].get_slice(name)
            found = tuple(part.get_shape())
            if found != shape:
                raise ModelFilesError(f"tensor {name} has shape {found}, but config.json needs {shape}")
            tensor = part[(rows, columns)[:len(shape)]]
        except ModelFilesError:
            raise
        except Exception as exc:  # a header that lies about offsets or sizes
            raise ModelFilesError(f"{path}: tensor {name} cannot be read: {exc}") from None
        self.used.add(name)
        return tensor.to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str, shape: tuple[int, ...], wanted: bool) -> torch.Tensor | None:
        return self.get(name, shape) if wanted else None

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not n.endswith(_IGNORED_SUFFIXES))


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               shard: Shard | None = None) -> ModelWeights:
    """The model's weights; with `shard`, only one tensor-parallel rank's share of them (tensor_parallel.py)."""
    directory = Path(directory)
    config = ModelConfig.from_dir(directory)
    shard = shard or shard_of(config, 1, 0)
    reader = _Reader(directory, dtype, torch.device(device))
    h, inter, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv_shapes = (("q", q), ("k", kv), ("v", kv))
        qkv = [reader.get(attn + f"{n}_proj.weight", (size, h), shard.rows(f"{n}_proj")) for n, size in qkv_shapes]
        qkv_bias = None
        if config.qkv_bias:
            qkv_bias = torch.cat([reader.get(attn + f"{n}_proj.bias", (size,), shard.rows(f"{n}_proj"))
                                  for n, size in qkv_shapes])
        mlp = [reader.get(p + f"mlp.{n}_proj.weight", (inter, h), shard.rows(f"{n}_proj")) for n in ("gate", "up")]
        layers.append(
            LayerWeights(
                input_norm=reader.get(p + "input_layernorm.weight", (h,)),
                qkv=torch.cat(qkv),
                qkv_bias=qkv_bias,
                o=reader.get(attn + "o_proj.weight", (h, q), columns=shard.columns("o_proj")),
                o_bias=reader.maybe(attn + "o_proj.bias", (h,), config.o_bias),
                post_norm=reader.get(p + "post_attention_layernorm.weight", (h,)),
                gate_up=torch.cat(mlp),
                down=reader.get(p + "mlp.down_proj.weight", (h, inter), columns=shard.columns("down_proj")),
            )
        )
    embed = reader.get("model.embed_tokens.weight", (config.vocab_size, h))  # whole on every rank
    head_rows = shard.rows("lm_head")
    if config.tie_word_embeddings:
        lm_head = embed[head_rows]
        reader.used.add("lm_head.weight")  # some tied checkpoints still carry a copy
    else:
        lm_head = reader.get("lm_head.weight", (config.vocab_size, h), head_rows)
    weights = ModelWeights(config, embed, layers, reader.get("model.norm.weight", (h,)), lm_head, shard)
    unused = reader.unused()
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ModelFilesError(f"{directory}: tensors {unused[:5]}{more} do not belong to a {config.architecture}")
    return weights
