"""A Hugging Face `config.json`, read into the dimensions the Llama-family model code needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ModelLoadError(ValueError):
    """A model or adapter directory that cannot be served; the message names the file and the problem."""


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
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path} is missing: a Hugging Face model directory needs config.json") from None
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
        generation = Path(directory) / "generation_config.json"
        extra_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
        return cls.from_dict(raw, source=str(path), extra_eos=extra_eos)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json", extra_eos=None) -> "ModelConfig":
        architectures = raw.get("architectures") or []
        architecture = architectures[0] if architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architectures {architectures!r} is not supported; Ember serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str, kind=int):
            value = raw.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or kind(value) != value:
                raise ModelLoadError(f"{source}: {key} must be a positive {kind.__name__}, got {value!r}")
            return kind(value)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = raw.get("head_dim") or hidden // heads
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        window = raw.get("sliding_window")
        uses_window = raw.get("use_sliding_window", architecture == "MistralForCausalLM")
        if uses_window and window is not None and window < raw.get("max_position_embeddings", 0):
            raise ModelLoadError(f"{source}: sliding_window {window} attention is not supported")

        # transformers >= 5 nests RoPE settings under rope_parameters; older configs keep them top-level.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = RopeScaling(
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "default":
            scaling = None
        else:
            raise ModelLoadError(f"{source}: rope_type {rope_type!r} is not supported (default or llama3)")

        eos: list[int] = []
        for value in (raw.get("eos_token_id"), extra_eos):
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in eos:
                    eos.append(token)
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(raw.get("attention_bias")),
            o_bias=architecture != "Qwen2ForCausalLM" and bool(raw.get("attention_bias")),
            eos_token_ids=tuple(eos),
            bos_token_id=raw.get("bos_token_id"),
        )
