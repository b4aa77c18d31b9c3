"""A Hugging Face `config.json`, read into the dimensions the Llama-family model code needs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ember.provider.domain.model_files import check_config, read_config, rope_settings, rope_type
from ember.provider.domain.tensor_parallel import Shard


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def share(self, shard: Shard) -> "ModelConfig":
        """The dimensions of a tensor-parallel rank's share: its attention heads, KV heads and MLP features."""
        return dataclasses.replace(self, num_attention_heads=len(shard.heads), num_key_value_heads=len(shard.kv_heads),
                                   intermediate_size=len(shard.intermediate))

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
        heads = raw["num_attention_heads"]
        rope = rope_settings(raw)
        scaling = None
        if rope_type(raw) == "llama3":
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                                  int(rope["original_max_position_embeddings"]))

        eos: list[int] = []
        for value in (raw.get("eos_token_id"), extra_eos):
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in eos:
                    eos.append(token)
        return cls(
            architecture=architecture,
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            vocab_size=raw["vocab_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(raw.get("attention_bias")),
            o_bias=architecture != "Qwen2ForCausalLM" and bool(raw.get("attention_bias")),
            eos_token_ids=tuple(eos),
        )
