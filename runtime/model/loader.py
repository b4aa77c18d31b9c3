"""Load a Hugging Face model directory's safetensors into the runtime's weight layout.

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`) checkpoints; every
tensor's shape is checked against config.json; q/k/v and gate/up are fused so a layer runs two
matmuls where the checkpoint has five.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
    post_norm: torch.Tensor  # the norm before the MLP (Gemma's pre_feedforward_layernorm)
    gate_up: torch.Tensor | None  # [2 * intermediate, hidden]; None in a Mixture-of-Experts layer
    down: torch.Tensor | None  # [hidden, intermediate]
    q_norm: torch.Tensor | None = None  # [head_dim]: Qwen3, Gemma 3
    k_norm: torch.Tensor | None = None
    attention_out_norm: torch.Tensor | None = None  # Gemma: on the attention's output, before the residual
    mlp_out_norm: torch.Tensor | None = None  # Gemma: on the MLP's output
    router: torch.Tensor | None = None  # [experts, hidden]: a Mixture-of-Experts layer's
    expert_gate_up: list = field(default_factory=list)  # per expert [2 * expert intermediate, hidden]
    expert_down: list = field(default_factory=list)  # per expert [hidden, expert intermediate]


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
            for value in vars(layer).values():
                tensors += value if isinstance(value, list) else [] if value is None else [value]
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
            columns: slice = slice(None), dtype: torch.dtype | None = None) -> torch.Tensor:
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
        return tensor.to(device=self.device, dtype=dtype or self.dtype)

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
    h = config.hidden_size
    gemma = config.family.gemma

    def norm(name: str, size: int = h) -> torch.Tensor:
        if gemma:  # Gemma scales by 1 + weight, in float32 whatever the model's dtype (as transformers does)
            return 1.0 + reader.get(name, (size,), dtype=torch.float32)
        return reader.get(name, (size,))

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layer = LayerWeights(input_norm=norm(p + "input_layernorm.weight"), **_attention(reader, config, shard, attn),
                             post_norm=norm(p + ("pre_feedforward_layernorm" if gemma else "post_attention_layernorm")
                                            + ".weight"),
                             **_mlp(reader, config, shard, p, config.expert_layers[i]))
        if config.family.qk_norm:
            layer.q_norm, layer.k_norm = norm(attn + "q_norm.weight", config.head_dim), norm(attn + "k_norm.weight",
                                                                                             config.head_dim)
        if gemma:
            layer.attention_out_norm = norm(p + "post_attention_layernorm.weight")
            layer.mlp_out_norm = norm(p + "post_feedforward_layernorm.weight")
        layers.append(layer)
    embed = reader.get("model.embed_tokens.weight", (config.vocab_size, h))  # whole on every rank
    head_rows = shard.rows("lm_head")
    if config.tie_word_embeddings:
        lm_head = embed[head_rows]
        reader.used.add("lm_head.weight")  # some tied checkpoints still carry a copy
    else:
        lm_head = reader.get("lm_head.weight", (config.vocab_size, h), head_rows)
    weights = ModelWeights(config, embed, layers, norm("model.norm.weight"), lm_head, shard)
    unused = reader.unused()
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ModelFilesError(f"{directory}: tensors {unused[:5]}{more} do not belong to a {config.architecture}")
    return weights


def _within(share: slice, first: int, size: int) -> slice:
    """A rank's `share` of one part of a fused tensor (the part's rows start at `first`, `size` of them)."""
    return slice(first + (share.start or 0), first + (size if share.stop is None else share.stop))


def _attention(reader: _Reader, config: ModelConfig, shard: Shard, attn: str) -> dict:
    """q, k and v fused (read from Phi-3's own fused qkv_proj where the checkpoint keeps them so), and o."""
    h, q, kv = config.hidden_size, config.q_size, config.kv_size
    parts = (("q", 0, q), ("k", q, kv), ("v", q + kv, kv))
    if config.family.fused_checkpoint:
        qkv = [reader.get(attn + "qkv_proj.weight", (q + 2 * kv, h), _within(shard.rows(f"{n}_proj"), first, size))
               for n, first, size in parts]
    else:
        qkv = [reader.get(attn + f"{n}_proj.weight", (size, h), shard.rows(f"{n}_proj")) for n, _, size in parts]
    qkv_bias = None
    if config.qkv_bias:
        qkv_bias = torch.cat([reader.get(attn + f"{n}_proj.bias", (size,), shard.rows(f"{n}_proj"))
                              for n, _, size in parts])
    return {"qkv": torch.cat(qkv), "qkv_bias": qkv_bias,
            "o": reader.get(attn + "o_proj.weight", (h, q), columns=shard.columns("o_proj")),
            "o_bias": reader.maybe(attn + "o_proj.bias", (h,), config.o_bias)}


def _mlp(reader: _Reader, config: ModelConfig, shard: Shard, p: str, experts: bool) -> dict:
    """gate and up fused, and down; or, in a Mixture-of-Experts layer, the router and every expert's."""
    h = config.hidden_size
    if experts:
        e = config.experts
        inter = e.intermediate_size
        if e.layout == "mixtral":  # Mixtral names its experts' gate, down and up w1, w2 and w3
            prefix, names = p + "block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"}
        else:
            prefix, names = p + "mlp.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        gate_up, down = [], []
        for x in range(e.count):
            expert = f"{prefix}experts.{x}."
            gate_up.append(torch.cat([reader.get(expert + f"{names[n]}.weight", (inter, h), shard.rows("expert_gate_proj"))
                                      for n in ("gate", "up")]))
            down.append(reader.get(expert + f"{names['down']}.weight", (h, inter), columns=shard.columns("expert_down_proj")))
        return {"gate_up": None, "down": None, "router": reader.get(prefix + "gate.weight", (e.count, h)),
                "expert_gate_up": gate_up, "expert_down": down}
    inter = config.intermediate_size
    if config.family.fused_checkpoint:
        share = shard.rows("gate_proj")
        gate_up = [reader.get(p + "mlp.gate_up_proj.weight", (2 * inter, h), _within(share, first, inter))
                   for first in (0, inter)]
    else:
        gate_up = [reader.get(p + f"mlp.{n}_proj.weight", (inter, h), shard.rows(f"{n}_proj")) for n in ("gate", "up")]
    return {"gate_up": torch.cat(gate_up),
            "down": reader.get(p + "mlp.down_proj.weight", (h, inter), columns=shard.columns("down_proj"))}
