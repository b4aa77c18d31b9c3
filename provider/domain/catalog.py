"""The built-in catalog of well-known base models.

Catalog model IDs are reserved: only a catalog model may use one, and only catalog models may be
deployed serverless. Weights are not shipped: an operator puts them in the model store, under
`catalog/<model_id>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.provider.domain import families


@dataclass(frozen=True)
class Architecture:
    """The dimensions of a Llama-family decoder, as in a Hugging Face `config.json`."""

    architecture: str  # config.json "architectures"[0]
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    explicit_head_dim: int | None = None  # config.json's head_dim, where it is not hidden_size / heads
    num_experts: int = 0  # Mixture of Experts: experts per expert layer (0: a dense model)
    expert_intermediate_size: int = 0
    expert_layer_count: int = 0
    experts_per_token: int = 0
    gemma_norms: bool = False  # Gemma's two more norms a layer (after attention, after the MLP)
    qk_norm: bool = False  # Qwen3's and Gemma 3's norm weights on q and k

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def of(cls, config: dict) -> "Architecture":
        """A config.json's dimensions (a custom base model's, from its manifest)."""
        heads, f = config["num_attention_heads"], families.family(config)
        experts = families.expert_count(config) if f.experts else 0
        return cls(config["architectures"][0], config["hidden_size"], config["intermediate_size"],
                   config["num_hidden_layers"], heads, config.get("num_key_value_heads") or heads, config["vocab_size"],
                   config.get("max_position_embeddings", 2048), bool(config.get("tie_word_embeddings", f.gemma)),
                   f.qkv_bias or bool(config.get("attention_bias", False)), config.get("head_dim"), experts,
                   families.expert_intermediate_size(config) if experts else 0,
                   sum(families.expert_layers(config)), config.get("num_experts_per_tok", 0) if experts else 0,
                   f.gemma, f.qk_norm)

    @property
    def parameter_count(self) -> int:
        return self._count(self.num_experts)

    @property
    def active_parameter_count(self) -> int:
        """The parameters one token's forward pass reads: a Mixture of Experts' routed experts only."""
        return self._count(self.experts_per_token)

    def _count(self, experts: int) -> int:
        h, kv, q = self.hidden_size, self.num_key_value_heads * self.head_dim, self.num_attention_heads * self.head_dim
        attention = 2 * h * q + 2 * h * kv + (q + 2 * kv if self.attention_bias else 0)
        norms = (4 if self.gemma_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = attention + norms
        dense = self.num_hidden_layers - self.expert_layer_count
        mlp = 3 * h * (dense * self.intermediate_size + self.expert_layer_count * experts * self.expert_intermediate_size)
        routers = self.expert_layer_count * self.num_experts * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + mlp + routers + h  # final norm


@dataclass(frozen=True)
class CatalogModel:
    model_id: str
    display_name: str
    dims: Architecture
    serverless: bool  # may be deployed serverless
    serverless_addons: bool  # its serverless deployments accept LoRA addons (popular bases only)

    @property
    def parameter_count(self) -> int:
        return self.dims.parameter_count


def _llama3(hidden: int, inter: int, layers: int, heads: int, tied: bool = False) -> Architecture:
    return Architecture("LlamaForCausalLM", hidden, inter, layers, heads, 8, 128256, 131072, tie_word_embeddings=tied)


CATALOG: dict[str, CatalogModel] = {
    m.model_id: m
    for m in [
        CatalogModel("llama-v3p1-8b-instruct", "Llama 3.1 8B Instruct", _llama3(4096, 14336, 32, 32), True, True),
        CatalogModel("llama-v3p1-70b-instruct", "Llama 3.1 70B Instruct", _llama3(8192, 28672, 80, 64), True, True),
        CatalogModel("llama-v3p1-405b-instruct", "Llama 3.1 405B Instruct", _llama3(16384, 53248, 126, 128), True, False),
        CatalogModel("llama-v3p2-1b-instruct", "Llama 3.2 1B Instruct", _llama3(2048, 8192, 16, 32, True), True, False),
        CatalogModel("llama-v3p2-3b-instruct", "Llama 3.2 3B Instruct", _llama3(3072, 8192, 28, 24, True), True, False),
        CatalogModel(
            "qwen2p5-7b-instruct",
            "Qwen 2.5 7B Instruct",
            Architecture("Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152064, 32768, attention_bias=True),
            True,
            True,
        ),
        CatalogModel(
            "mistral-7b-instruct-v0p3",
            "Mistral 7B Instruct v0.3",
            Architecture("MistralForCausalLM", 4096, 14336, 32, 32, 8, 32768, 32768),
            True,
            False,
        ),
        CatalogModel("qwen3-8b", "Qwen3 8B",
                     Architecture("Qwen3ForCausalLM", 4096, 12288, 36, 32, 8, 151936, 40960, explicit_head_dim=128,
                                  qk_norm=True), True, False),
        CatalogModel("gemma2-9b-it", "Gemma 2 9B Instruct",
                     Architecture("Gemma2ForCausalLM", 3584, 14336, 42, 16, 8, 256000, 8192, tie_word_embeddings=True,
                                  explicit_head_dim=256, gemma_norms=True), True, False),
        CatalogModel("phi-3-mini-4k-instruct", "Phi-3 Mini 4K Instruct",
                     Architecture("Phi3ForCausalLM", 3072, 8192, 32, 32, 32, 32064, 4096), True, False),
        CatalogModel("mixtral-8x7b-instruct", "Mixtral 8x7B Instruct v0.1",
                     Architecture("MixtralForCausalLM", 4096, 14336, 32, 32, 8, 32000, 32768, num_experts=8,
                                  expert_intermediate_size=14336, expert_layer_count=32, experts_per_token=2),
                     True, False),
        CatalogModel("qwen3-30b-a3b", "Qwen3 30B-A3B",
                     Architecture("Qwen3MoeForCausalLM", 2048, 6144, 48, 32, 4, 151936, 40960, explicit_head_dim=128,
                                  num_experts=128, expert_intermediate_size=768, expert_layer_count=48,
                                  experts_per_token=8, qk_norm=True), True, False),
    ]
}


def lookup(model_id: str) -> CatalogModel | None:
    return CATALOG.get(model_id)
