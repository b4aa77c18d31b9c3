"""A Hugging Face `config.json`, read into the dimensions and family switches the model code needs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ember.provider.domain import families
from ember.provider.domain.model_files import check_config, read_config, rope_settings
from ember.provider.domain.tensor_parallel import Shard


@dataclass(frozen=True)
class Rope:
    """One RoPE variant: its base and the scaling applied to its frequencies."""

    theta: float
    scaling: str = "default"  # default | linear | llama3 (Llama 3.1) | longrope (Phi-3)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    short_factor: tuple[float, ...] = ()  # LongRoPE: positions before original_max_position_embeddings
    long_factor: tuple[float, ...] = ()  # LongRoPE: the positions after
    attention_factor: float = 1.0  # LongRoPE scales cos and sin by it

    @classmethod
    def of(cls, rope: dict, raw: dict, theta: float) -> "Rope":
        kind = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta") or theta)
        if kind == "linear":
            return cls(theta, kind, factor=float(rope["factor"]))
        if kind == "llama3":
            return cls(theta, kind, float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        if kind == "longrope":
            original = int(rope.get("original_max_position_embeddings") or raw["original_max_position_embeddings"])
            factor = float(rope.get("factor") or raw["max_position_embeddings"] / original)
            attention = rope.get("attention_factor")
            if attention is None:  # as transformers (and the LongRoPE paper) derive it
                attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            return cls(theta, kind, factor, original_max_position_embeddings=original,
                       short_factor=tuple(map(float, rope["short_factor"])),
                       long_factor=tuple(map(float, rope["long_factor"])), attention_factor=float(attention))
        return cls(theta)


@dataclass(frozen=True)
class Experts:
    """A Mixture-of-Experts layer's shape and routing (softmax over the router, top k, renormalised or not)."""

    count: int
    per_token: int
    intermediate_size: int
    normalize: bool  # the top k's weights rescaled to sum to 1 (Mixtral always; Qwen3-MoE by norm_topk_prob)
    layout: str  # "mixtral" | "qwen3_moe": the checkpoint's names


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: Rope  # full-attention layers'
    local_rope: Rope  # sliding-window layers' (Gemma 3 gives them their own base)
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    eos_token_ids: tuple[int, ...]
    family: families.Family = families.Family()
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None for the whole context
    query_scale: float = 0.0  # attention scores' scale (1/√head_dim, or Gemma's 1/√query_pre_attn_scalar)
    attn_softcap: float | None = None  # Gemma 2: scores = cap·tanh(scores/cap)
    final_softcap: float | None = None  # Gemma 2 and 3: the same on the logits
    experts: Experts | None = None
    expert_layers: tuple[bool, ...] = ()  # per layer: a Mixture-of-Experts layer
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json itself

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_window(self) -> int | None:
        """The sliding window when every layer has the same one (the cache then keeps only its blocks), else None."""
        windows = set(self.layer_windows)
        return windows.pop() if len(windows) == 1 else None

    @property
    def num_experts(self) -> int:
        return self.experts.count if self.experts else 0

    @property
    def expert_intermediate_size(self) -> int:
        return self.experts.intermediate_size if self.experts else 0

    @property
    def expert_layer_count(self) -> int:
        return sum(self.expert_layers)

    def share(self, shard: Shard) -> "ModelConfig":
        """The dimensions of a tensor-parallel rank's share: its attention heads, KV heads and MLP features."""
        experts = self.experts and dataclasses.replace(self.experts, intermediate_size=len(shard.expert_intermediate))
        return dataclasses.replace(self, num_attention_heads=len(shard.heads), num_key_value_heads=len(shard.kv_heads),
                                   intermediate_size=len(shard.intermediate), experts=experts)

    def as_json(self) -> dict:
        """The config.json of these dimensions (a rank's share's, after `share`): what the adapter checks read."""
        raw = self.raw | {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                          "num_attention_heads": self.num_attention_heads, "head_dim": self.head_dim,
                          "num_key_value_heads": self.num_key_value_heads, "num_hidden_layers": self.num_hidden_layers}
        return raw | {"architectures": [self.architecture]}

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ModelConfig":
        raw = read_config(directory)
        generation = Path(directory) / "generation_config.json"
        extra_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
        return cls.from_dict(raw, source=str(Path(directory) / "config.json"), extra_eos=extra_eos)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json", extra_eos=None) -> "ModelConfig":
        check_config(raw, source)
        architecture = raw["architectures"][0]
        family = families.family(raw)
        heads = raw["num_attention_heads"]
        head_dim = families.head_dim(raw)
        rope = rope_settings(raw)
        theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        # Gemma 3: rope_parameters per layer type (transformers >= 5), or rope_local_base_freq beside rope_scaling
        full = Rope.of(rope.get("full_attention", rope), raw, theta)
        local = Rope(float(raw["rope_local_base_freq"])) if raw.get("rope_local_base_freq") else full
        if "sliding_attention" in rope:
            local = Rope.of(rope["sliding_attention"], raw, theta)

        eos: list[int] = []
        for value in (raw.get("eos_token_id"), extra_eos):
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in eos:
                    eos.append(token)
        experts = None
        if family.experts is not None:
            experts = Experts(families.expert_count(raw), raw["num_experts_per_tok"],
                              families.expert_intermediate_size(raw),
                              family.experts == "mixtral" or bool(raw.get("norm_topk_prob", False)), family.experts)
        return cls(
            architecture=architecture,
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=raw["vocab_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=full,
            local_rope=local,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", family.gemma)),
            qkv_bias=family.qkv_bias or bool(raw.get("attention_bias")),
            o_bias=not family.qkv_bias and bool(raw.get("attention_bias")),
            eos_token_ids=tuple(eos),
            family=family,
            layer_windows=families.layer_windows(raw),
            query_scale=(raw.get("query_pre_attn_scalar") or head_dim) ** -0.5 if family.gemma else head_dim ** -0.5,
            # Gemma 3's configs carry attn_logit_softcapping (null in the published ones), which transformers ignores
            attn_softcap=raw.get("attn_logit_softcapping") if architecture == "Gemma2ForCausalLM" else None,
            final_softcap=raw.get("final_logit_softcapping") if family.gemma else None,
            experts=experts,
            expert_layers=families.expert_layers(raw),
            raw=raw,
        )
