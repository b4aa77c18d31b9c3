"""A trainable LoRA on the runtime's own model: the base weights frozen, each targeted module's A and B learned.

The forward pass is the serving model's math (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied
embeddings) on padded whole sequences with autograd, instead of the paged KV cache: training reads every
position at once. The delta of a module is PEFT's, `scaling · B(A x)` with `scaling = alpha / r`, and the
adapter is saved under PEFT's names, so PEFT, transformers and Ember's server all load what this trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ember.provider.domain.families import module_shapes
from ember.runtime.model.decoder import rms_norm, rope, rope_tables
from ember.runtime.model.loader import ModelWeights

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class LoRATrainingModel(torch.nn.Module):
    def __init__(self, weights: ModelWeights, hf_config: dict, rank: int, alpha: float, target_modules: tuple[str, ...],
                 generator: torch.Generator):
        super().__init__()
        self.weights, self.config = weights, weights.config
        self.rank, self.alpha, self.target_modules = rank, alpha, tuple(target_modules)
        self.scaling = alpha / rank
        shapes = module_shapes(hf_config)
        self.out_features = {module: fan_out for module, (_, fan_out) in shapes.items()}
        self.lora_a, self.lora_b = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for layer in range(self.config.num_hidden_layers):
            for module in self.target_modules:
                fan_in, fan_out = shapes[module]
                bound = 1 / math.sqrt(fan_in)  # PEFT's init: kaiming_uniform_(a=sqrt(5)) on A, zeros on B
                a = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound
                self.lora_a[f"{layer}_{module}"] = torch.nn.Parameter(a.to(weights.device))
                self.lora_b[f"{layer}_{module}"] = torch.nn.Parameter(
                    torch.zeros(fan_out, rank, dtype=torch.float32, device=weights.device))
        c = self.config
        f = c.family
        if f.gemma or f.qk_norm or f.fused_checkpoint or f.experts or any(c.layer_windows) or c.rope.scaling == "longrope":
            raise ValueError(f"fine-tuning serves Llama-family models (Llama, Mistral, Qwen2) without sliding windows; "
                             f"{c.architecture} is not one yet")
        self.cos, self.sin = rope_tables(c.rope, c.head_dim, c.max_position_embeddings, weights.dtype, weights.device)

    def _delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        key = f"{layer}_{module}"
        if key not in self.lora_a:
            return None
        a, b = self.lora_a[key].to(x.dtype), self.lora_b[key].to(x.dtype)
        return (x @ a.t()) @ b.t() * self.scaling

    def _project(self, layer: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 modules: tuple[str, ...]) -> list[torch.Tensor]:
        """A fused projection split into its modules, each with its LoRA delta added."""
        parts = list(F.linear(x, weight, bias).split([self.out_features[m] for m in modules], dim=-1))
        for i, module in enumerate(modules):
            delta = self._delta(layer, module, x)
            if delta is not None:
                parts[i] = parts[i] + delta
        return parts

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] (float32)."""
        return self.logits(self.hidden(input_ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weights.lm_head).float()

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [batch, length, hidden] of right-padded sequences: the causal mask
        keeps every real token from seeing the padding after it."""
        c, w = self.config, self.weights
        batch, length = input_ids.shape
        cos, sin = self.cos[:length][None, None], self.sin[:length][None, None]
        x = w.embed[input_ids]
        for i, layer in enumerate(w.layers):
            h = self._norm(x, layer.input_norm)
            q, k, v = self._project(i, h, layer.qkv, layer.qkv_bias, ("q_proj", "k_proj", "v_proj"))
            q = rope(q.view(batch, length, c.num_attention_heads, c.head_dim).transpose(1, 2), cos, sin)
            k = rope(k.view(batch, length, c.num_key_value_heads, c.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=c.num_key_value_heads != c.num_attention_heads)
            attn = attn.transpose(1, 2).reshape(batch, length, c.q_size)
            [o] = self._project(i, attn, layer.o, layer.o_bias, ("o_proj",))
            x = x + o
            h = self._norm(x, layer.post_norm)
            gate, up = self._project(i, h, layer.gate_up, None, ("gate_proj", "up_proj"))
            [down] = self._project(i, F.silu(gate) * up, layer.down, None, ("down_proj",))
            x = x + down
        return self._norm(x, w.norm)

    def save_peft(self, directory: Path, base_model: str) -> Path:
        """The adapter in PEFT's format: adapter_config.json and adapter_model.safetensors (float32)."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key in self.lora_a:
            layer, module = key.split("_", 1)
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = self.lora_a[key].detach().float().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = self.lora_b[key].detach().float().cpu().contiguous()
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                  "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": 0.0,
                  "target_modules": sorted(self.target_modules), "bias": "none", "use_rslora": False,
                  "use_dora": False, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory
