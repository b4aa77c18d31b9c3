"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors` and check them against the
base model they will run on.

Every refusal names the file and the problem (a rank out of range, an unsupported module, a tensor whose
shape does not fit the base), so a bad addon fails alone while the deployment keeps serving the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ember.provider.spec import LoRAConfig, SpecError, parse

from .config import ModelConfig, ModelLoadError

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.default)?\.weight$"
)


class AdapterError(ModelLoadError):
    """An adapter that cannot be served on this base model."""


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """LoRA-targetable module → (in_features, out_features) on this base model."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


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

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def load_adapter(name: str, directory: str | Path, base: ModelConfig, max_rank: int | None = None) -> LoRAAdapter:
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.exists():
        raise AdapterError(f"{config_path} is missing: a PEFT adapter needs adapter_config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path} is not valid JSON: {exc}") from None
    try:
        config = parse(LoRAConfig, raw)
    except SpecError as exc:
        problems = "; ".join(f"{field}: {message}" for field, message in exc.errors)
        raise AdapterError(f"{config_path}: {problems}") from None
    for field in ("lora_bias", "use_dora"):
        if raw.get(field):
            raise AdapterError(f"{config_path}: {field}={raw[field]!r} is not supported")
    if max_rank is not None and config.r > max_rank:
        raise AdapterError(f"{config_path}: rank r={config.r} is above this deployment's max_lora_rank {max_rank}")
    if not weights_path.exists():
        raise AdapterError(f"{weights_path} is missing: a PEFT adapter needs adapter_model.safetensors")

    shapes = module_shapes(base)
    layers = base.num_hidden_layers
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    try:
        with safe_open(weights_path, "pt") as f:
            for key in f.keys():
                match = _KEY.match(key)
                if not match:
                    raise AdapterError(f"{weights_path}: tensor {key} is not a LoRA weight of a supported module")
                layer, module, which = int(match[1]), match[2], match[3]
                if layer >= layers:
                    raise AdapterError(f"{weights_path}: tensor {key} is for layer {layer}, but the base model has {layers}")
                if module not in config.target_modules:
                    raise AdapterError(f"{weights_path}: tensor {key} is for {module}, which target_modules does not list")
                fan_in, fan_out = shapes[module]
                expected = (config.r, fan_in) if which == "A" else (fan_out, config.r)
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != expected:
                    raise AdapterError(
                        f"{weights_path}: tensor {key} has shape {tuple(tensor.shape)}, but rank {config.r} on this "
                        f"base model needs {expected}: the adapter was made for another base model"
                    )
                found.setdefault((module, which), {})[layer] = tensor.float()
    except AdapterError:
        raise
    except Exception as exc:  # safetensors' own errors for truncated files and lying headers
        raise AdapterError(f"{weights_path} is not a readable safetensors file: {exc}") from None

    weights = {}
    for module in config.target_modules:
        parts = []
        for which in "AB":
            per_layer = found.get((module, which), {})
            missing = [i for i in range(layers) if i not in per_layer]
            if missing:
                raise AdapterError(f"{weights_path}: lora_{which} of {module} is missing for layers {missing[:8]}")
            parts.append(torch.stack([per_layer[i] for i in range(layers)]))
        weights[module] = (parts[0], parts[1])
    return LoRAAdapter(name, config, weights)
