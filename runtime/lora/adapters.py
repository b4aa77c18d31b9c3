"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors` and check them against the
base model they will run on.

Every refusal names the file and the problem (a rank out of range, an unsupported module, a tensor whose
shape does not fit the base), so a bad addon fails alone while the deployment keeps serving the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ember.provider.domain.model_files import ModelFilesError, inspect_adapter
from ember.provider.domain.spec import FUSED_LORA_TARGET_MODULES, LoRAConfig
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.projections import Projection, lora_parts


class AdapterError(ModelFilesError):
    """An adapter that cannot be served on this base model."""


def base_config(config: ModelConfig) -> dict:
    """The config.json fields the adapter checks read."""
    return config.as_json()


@dataclass
class LoRAAdapter:
    """An adapter in host memory: per target module, A [layers, r, in] and B [layers, out, r]."""

    name: str
    config: LoRAConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return self.config.r

    @property
    def scaling(self) -> float:
        return self.config.scaling


def load_adapter(name: str, directory: str | Path, base: ModelConfig, max_rank: int | None = None) -> LoRAAdapter:
    try:
        info = inspect_adapter(directory, base_config(base), max_rank)
    except ModelFilesError as exc:
        raise AdapterError(str(exc)) from None
    weights = {}
    try:
        with safe_open(info.weights, "pt") as f:
            for module in info.target_modules:
                a, b = (torch.stack([f.get_tensor(info.keys[(layer, module, which)]).float()
                                     for layer in range(base.num_hidden_layers)]) for which in "AB")
                weights |= _unfused(module, a, b, base)
            for parameter in info.config.target_parameters:
                weights[parameter] = _experts(f, info, parameter, base)
    except Exception as exc:  # a header that lies about the data behind it
        raise AdapterError(f"{info.weights} is not a readable safetensors file: {exc}") from None
    return LoRAAdapter(name, info.config, weights)


def _experts(f, info, parameter: str, base: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's LoRA of a layer's experts (A [experts * r, in] expert-major, B [out, r * experts] expert-minor) as
    A [layers, experts, r, in] and B [layers, experts, out, r]; zeros in layers without experts."""
    count, r = base.num_experts, info.config.r
    a_layers, b_layers = [], []
    for layer, sparse in enumerate(base.expert_layers):
        if sparse:
            a = f.get_tensor(info.keys[(layer, parameter, "A")]).float()
            b = f.get_tensor(info.keys[(layer, parameter, "B")]).float()
            a_layers.append(a.reshape(count, r, a.shape[-1]))
            b_layers.append(b.reshape(b.shape[0], r, count).permute(2, 0, 1))
        else:
            a_layers.append(None)
            b_layers.append(None)
    shape_a = next(a for a in a_layers if a is not None).shape
    shape_b = next(b for b in b_layers if b is not None).shape
    return (torch.stack([torch.zeros(shape_a) if a is None else a for a in a_layers]),
            torch.stack([torch.zeros(shape_b) if b is None else b for b in b_layers]))


def _unfused(module: str, a: torch.Tensor, b: torch.Tensor, base: ModelConfig) -> dict:
    """A LoRA on a fused module (Phi-3's qkv_proj, gate_up_proj) as one per part, sharing A: the runtime's slots and
    tensor-parallel shares then know one set of modules. x·Aᵀ·Bᵀ split by B's rows is the same product."""
    if module not in FUSED_LORA_TARGET_MODULES:
        return {module: (a, b)}
    parts = lora_parts(base)[Projection(module.removesuffix("_proj"))]
    return {part.module: (a, b[:, part.first:part.first + part.width]) for part in parts}
