"""The decoder families Ember serves, and what in a config.json tells them apart.

One table, read by the provider (what preview accepts, the LoRA-targetable modules and their shapes) and by the
runtime (its one forward pass switches on these facts, not on architecture names), so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    gemma: bool = False  # GeGLU, √hidden embedding scale, `1 + weight` norms, pre- and post-norms, soft-capping
    qk_norm: bool = False  # an RMSNorm over each head of q and k (Qwen3, Gemma 3)
    qkv_bias: bool = False  # q/k/v biases whatever attention_bias says (Qwen2)
    fused_checkpoint: bool = False  # the checkpoint keeps qkv_proj and gate_up_proj fused (Phi-3)
    experts: str | None = None  # the checkpoint's Mixture-of-Experts layout: "mixtral" or "qwen3_moe"
    all_layers_slide: bool = True  # sliding_window applies to every layer unless layer_types says otherwise


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(),
    "Qwen2ForCausalLM": Family(qkv_bias=True, all_layers_slide=False),
    "Qwen3ForCausalLM": Family(qk_norm=True, all_layers_slide=False),
    "Gemma2ForCausalLM": Family(gemma=True, all_layers_slide=False),
    "Gemma3ForCausalLM": Family(gemma=True, qk_norm=True, all_layers_slide=False),
    "Phi3ForCausalLM": Family(fused_checkpoint=True),
    "MixtralForCausalLM": Family(experts="mixtral"),
    "Qwen3MoeForCausalLM": Family(qk_norm=True, experts="qwen3_moe", all_layers_slide=False),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# Refused by name, with what to do instead.
NOT_SERVED = {
    "GemmaForCausalLM": "Gemma 1 is not served; Gemma 2 and Gemma 3 are",
    "Gemma3ForConditionalGeneration": "Gemma 3's image-and-text models are not served; its text-only "
                                      "Gemma3ForCausalLM (gemma-3-1b) is",
    "Phi3SmallForCausalLM": "Phi-3-small's block-sparse attention is not served; Phi3ForCausalLM is",
    "PhiMoEForCausalLM": "Phi-3.5-MoE is not served; MixtralForCausalLM and Qwen3MoeForCausalLM are",
}


def family(config: dict) -> Family:
    return FAMILIES[config["architectures"][0]]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def layer_types(config: dict) -> list[str]:
    """"sliding_attention" or "full_attention" for each layer, as transformers' config classes derive them."""
    layers = config["num_hidden_layers"]
    if config.get("layer_types"):
        return list(config["layer_types"])
    arch = config["architectures"][0]
    if arch == "Gemma2ForCausalLM":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if arch == "Gemma3ForCausalLM":
        pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    window = config.get("sliding_window")
    if family(config).all_layers_slide:
        return ["sliding_attention" if window is not None else "full_attention"] * layers
    # Qwen: the window only when use_sliding_window, and only from layer max_window_layers on
    slides = window is not None and config.get("use_sliding_window", False)
    first = config.get("max_window_layers", 0)
    return ["sliding_attention" if slides and i >= first else "full_attention" for i in range(layers)]


def layer_windows(config: dict) -> tuple[int | None, ...]:
    """Each layer's sliding window (tokens it sees, itself included), None where it sees the whole context."""
    window = config.get("sliding_window")
    return tuple(window if kind == "sliding_attention" and window else None for kind in layer_types(config))


def expert_layers(config: dict) -> tuple[bool, ...]:
    """Which layers are Mixture-of-Experts layers (Qwen3-MoE can keep some dense)."""
    layers, f = config["num_hidden_layers"], family(config)
    if f.experts is None:
        return (False,) * layers
    if f.experts == "mixtral":
        return (True,) * layers
    step, dense = config.get("decoder_sparse_step", 1) or 1, set(config.get("mlp_only_layers") or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))


def expert_count(config: dict) -> int:
    return config.get("num_local_experts") or config.get("num_experts") or 0


def expert_intermediate_size(config: dict) -> int:
    """The features of one expert's MLP (Mixtral's experts are its intermediate_size)."""
    return config.get("moe_intermediate_size") or config["intermediate_size"]


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Every LoRA-targetable module of a config.json → (in_features, out_features), as PEFT names them: Phi-3
    keeps qkv_proj and gate_up_proj fused; Mixture-of-Experts models' attention only (the experts are not
    LoRA targets here)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * head_dim(config)
    kv = (config.get("num_key_value_heads") or config["num_attention_heads"]) * head_dim(config)
    f = family(config) if config.get("architectures") else Family()
    attention = {"o_proj": (q, h)}
    if f.fused_checkpoint:
        return {"qkv_proj": (h, q + 2 * kv)} | attention | {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
    attention = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv)} | attention
    if f.experts is not None:
        return attention
    return attention | {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def expert_parameter_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """A Mixture of Experts' LoRA-targetable expert parameters (PEFT's `target_parameters`) → one expert's
    (in_features, out_features); none for a dense model."""
    if not config.get("architectures") or family(config).experts is None:
        return {}
    h, inter = config["hidden_size"], expert_intermediate_size(config)
    return {"experts.gate_up_proj": (h, 2 * inter), "experts.down_proj": (inter, h)}
