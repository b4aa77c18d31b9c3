"""`max_loras` adapter slots on the device: stacked A and B weights per layer and fused projection.

Per layer and fused projection with P parts: A as [slots * P * rank, in] and B transposed as
[slots * P * rank, out], slot-major so the active slots are a prefix. The A of q, k and v sit side by
side and B is block-diagonal, so one shrink and one expand serve all three. Slots are padded to
`max_rank`; the LoRA scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) is folded into B. A projection's
stacks are allocated when the first adapter targeting it arrives (q/v-only adapters need no MLP stacks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from ember.provider.domain.spec import LORA_EXPERT_PARAMETERS
from ember.provider.domain.tensor_parallel import Shard, shard_of
from ember.runtime.lora.adapters import LoRAAdapter
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.projections import Projection, fan_in, lora_parts


class DeviceSlots:
    def __init__(self, config: ModelConfig, max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 shard: Shard | None = None):
        """`shard`: a tensor-parallel rank's share of the model, whose slots hold the matching share of each adapter,
        as S-LoRA and vLLM split them: B's rows on column-parallel projections (q, k, v, gate, up), A's columns on
        row-parallel ones (o, down), whose partial deltas the model sums with the partial products."""
        self.config, self.max_loras, self.max_rank, self.device, self.dtype = config, max_loras, max_rank, device, dtype
        self.shard = shard or shard_of(config, 1, 0)
        self.local = local = config.share(self.shard)
        self.parts = lora_parts(local)
        self.fan_in = fan_in(local)  # projection → its input features on this rank
        # What the replica's other ranks must do to their slots to match these: (slot, adapter or None to empty
        # it), in order; the model runner takes them each step (tensor parallelism only).
        self.changes: list[tuple[int, LoRAAdapter | None]] = []
        self.a: list[dict[Projection, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.bt: list[dict[Projection, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        # A Mixture of Experts' expert LoRA, per layer and expert parameter: A [slots, experts, rank, in] and B
        # transposed [slots, experts, rank, out] (an expert's rows are few and mixed, so each slot is applied apart)
        self.expert_a: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.expert_bt: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.names: list[str | None] = [None] * max_loras
        # the projections (and expert parameters) each slot's adapter targets
        self.touched: list[tuple[Projection | str, ...]] = [()] * max_loras
        self.last_used: list[int] = [0] * max_loras  # the step that last used each slot, for LRU eviction
        self.targeted: Counter[Projection | str] = Counter()  # projection or expert parameter → slots targeting it
        self._step = 0

    def activate(self, names: set[str], adapter: Callable[[str], LoRAAdapter]) -> dict[str, int]:
        """Put every adapter of this step in a slot (evicting the least recently used others)."""
        if len(names) > self.max_loras:
            raise ValueError(f"a step may use at most max_loras={self.max_loras} adapters, got {len(names)}")
        self._step += 1
        slots = {name: self.names.index(name) for name in names if name in self.names}
        for name in names - slots.keys():
            free = [i for i, s in enumerate(self.names) if s is None]
            candidates = free or [i for i, s in enumerate(self.names) if s not in names]
            slot = min(candidates, key=lambda i: (self.names[i] is not None, self.last_used[i]))
            self._fill(slot, adapter(name))
            slots[name] = slot
        for slot in slots.values():
            self.last_used[slot] = self._step
        return slots

    def evict(self, name: str) -> None:
        """Empty the slot holding `name`, if any (the adapter left, or its weights changed)."""
        if name in self.names:
            self._clear(self.names.index(name))

    def rows(self, projection: Projection, slot: int) -> slice:
        width = len(self.parts[projection]) * self.max_rank
        return slice(slot * width, (slot + 1) * width)

    def _stacks(self, projection: Projection, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if projection not in self.a[layer]:
            parts = self.parts[projection]
            height = self.max_loras * len(parts) * self.max_rank
            fan_out = sum(part.width for part in parts)
            self.a[layer][projection] = torch.zeros(height, self.fan_in[projection], device=self.device, dtype=self.dtype)
            self.bt[layer][projection] = torch.zeros(height, fan_out, device=self.device, dtype=self.dtype)
            if self.device.type == "cuda":  # a compiled step's CUDA graphs then read them in place, not copied in
                torch._dynamo.mark_static_address(self.a[layer][projection])
                torch._dynamo.mark_static_address(self.bt[layer][projection])
        return self.a[layer][projection], self.bt[layer][projection]

    def _expert_stacks(self, parameter: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if parameter not in self.expert_a[layer]:
            local = self.local  # this rank's share of every expert
            h, inter = local.hidden_size, local.expert_intermediate_size
            fan_in, fan_out = (h, 2 * inter) if parameter == "experts.gate_up_proj" else (inter, h)
            shape = (self.max_loras, local.num_experts, self.max_rank)
            self.expert_a[layer][parameter] = torch.zeros(*shape, fan_in, device=self.device, dtype=self.dtype)
            self.expert_bt[layer][parameter] = torch.zeros(*shape, fan_out, device=self.device, dtype=self.dtype)
        return self.expert_a[layer][parameter], self.expert_bt[layer][parameter]

    def _fill_experts(self, slot: int, adapter: LoRAAdapter) -> tuple[str, ...]:
        """The adapter's expert LoRA into the slot (this rank's share: gate's and up's features, down's inputs)."""
        share = self.shard.rows("expert_gate_proj")
        inter = self.config.expert_intermediate_size
        touched = tuple(p for p in LORA_EXPERT_PARAMETERS if p in adapter.weights)
        for parameter in touched:
            a_all, b_all = adapter.weights[parameter]  # [layers, experts, r, in], [layers, experts, out, r]
            if parameter == "experts.gate_up_proj":  # column-parallel: gate's rows, then up's
                b_all = torch.cat([b_all[:, :, :inter][:, :, share], b_all[:, :, inter:][:, :, share]], dim=2)
            else:  # row-parallel: its share of the inputs
                a_all = a_all[..., self.shard.columns("expert_down_proj")]
            for layer, sparse in enumerate(self.config.expert_layers):
                if sparse:
                    a_stack, bt_stack = self._expert_stacks(parameter, layer)
                    a_stack[slot, :, :adapter.rank] = a_all[layer].to(self.device, self.dtype)
                    bt_stack[slot, :, :adapter.rank] = (b_all[layer] * adapter.scaling).transpose(-1, -2).to(
                        self.device, self.dtype)
            self.targeted[parameter] += 1
        return touched

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        if self.names[slot] is not None:
            self._clear(slot)
        touched = tuple(p for p, parts in self.parts.items() if any(part.module in adapter.weights for part in parts))
        for projection in touched:
            self.targeted[projection] += 1
            base = self.rows(projection, slot).start
            for layer in range(self.config.num_hidden_layers):
                a_stack, bt_stack = self._stacks(projection, layer)
                for p, part in enumerate(self.parts[projection]):
                    if part.module not in adapter.weights:
                        continue
                    a, b = adapter.weights[part.module]
                    a, b = a[layer][:, self.shard.columns(part.module)], b[layer][self.shard.rows(part.module)]
                    rows = slice(base + p * self.max_rank, base + p * self.max_rank + adapter.rank)
                    a_stack[rows] = a.to(self.device, self.dtype)
                    bt_stack[rows, part.first : part.first + part.width] = (b * adapter.scaling).t().to(self.device, self.dtype)
        touched += self._fill_experts(slot, adapter)
        self.names[slot], self.touched[slot] = adapter.name, touched
        self._changed(slot, adapter)

    def _clear(self, slot: int) -> None:
        for projection in self.touched[slot]:
            if projection in LORA_EXPERT_PARAMETERS:
                for stacks in self.expert_a + self.expert_bt:
                    if projection in stacks:
                        stacks[projection][slot] = 0
            else:
                rows = self.rows(projection, slot)
                for layer in range(self.config.num_hidden_layers):
                    self.a[layer][projection][rows] = 0
                    self.bt[layer][projection][rows] = 0
            self.targeted[projection] -= 1
        self.names[slot], self.touched[slot] = None, ()
        self._changed(slot, None)

    def _changed(self, slot: int, adapter: LoRAAdapter | None) -> None:
        if self.shard.size > 1:
            self.changes.append((slot, adapter))

    def take_changes(self) -> list[tuple[int, LoRAAdapter | None]]:
        changes, self.changes = self.changes, []
        return changes

    def replay(self, changes: list[tuple[int, LoRAAdapter | None]]) -> None:
        """Make the same changes as another rank's slots made (see `changes`)."""
        for slot, adapter in changes:
            if adapter is None:
                self._clear(slot)
            else:
                self._fill(slot, adapter)
        self.changes.clear()
