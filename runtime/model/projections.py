"""The model's fused projections, and the LoRA-targetable modules inside each.

The weights keep q, k and v side by side in one `qkv` matrix (and gate and up in `gate_up`), so one
matmul serves them; LoRA stacks follow the same fusion. This is the one place that names them.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from ember.runtime.model.config import ModelConfig


class Projection(str, Enum):
    QKV = "qkv"
    O = "o"
    GATE_UP = "gate_up"
    DOWN = "down"


class Part(NamedTuple):
    module: str  # the PEFT module name, e.g. "k_proj"
    first: int  # its first output column in the fused projection
    width: int


def lora_parts(config: ModelConfig) -> dict[Projection, tuple[Part, ...]]:
    q, kv, i = config.q_size, config.kv_size, config.intermediate_size
    return {
        Projection.QKV: (Part("q_proj", 0, q), Part("k_proj", q, kv), Part("v_proj", q + kv, kv)),
        Projection.O: (Part("o_proj", 0, config.hidden_size),),
        Projection.GATE_UP: (Part("gate_proj", 0, i), Part("up_proj", i, i)),
        Projection.DOWN: (Part("down_proj", 0, config.hidden_size),),
    }


def fan_in(config: ModelConfig) -> dict[Projection, int]:
    """Each fused projection's input features."""
    return {Projection.QKV: config.hidden_size, Projection.O: config.q_size,
            Projection.GATE_UP: config.hidden_size, Projection.DOWN: config.intermediate_size}
