"""LoRA applied to a mixed batch without merging weights or splitting the batch.

* Decode rows (one token per request, each request its own adapter) use the shrink/expand scheme:
  x @ [A of every active slot] gives every slot's rank-r projection at once; a per-row slot mask keeps
  each row's own slot; @ [B of every active slot] expands it. Two small GEMMs per projection read each
  active adapter's weights exactly once, whatever the mix of adapters in the batch.
* Prefill chunks belong to one request each, so each applies its own slot's A and B directly.

What every layer shares is computed once per step (`LoRAStepMetadata`) and passed with the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.runtime.engine.batch import StepBatch
from ember.runtime.lora.slots import DeviceSlots
from ember.runtime.model.projections import Projection


@dataclass(frozen=True)
class LoRAStepMetadata:
    # parts per projection → [num_decode, used slots * parts * rank] (the decode rows are the first rows;
    # their count is the masks' first size, not an int, so a compiled step does not specialise on it)
    decode_masks: dict[int, torch.Tensor]
    prefill_segments: list[tuple[slice, int]]  # (rows of one prefill chunk, its slot)
    # The projections some slot's adapter targets: a set, not the slots' counts, so a compiled step's graph
    # changes only when it does, not with every adapter loaded.
    targeted: frozenset[Projection | str]
    # each row's slot (-1: none), for the experts' LoRA, whose rows are whichever tokens the router sent
    row_slots: torch.Tensor | None = None


class BatchedLoRA:
    """The model's LoRA hook: adds each row's adapter delta to a fused projection's output, in place."""

    def __init__(self, slots: DeviceSlots):
        self.slots = slots

    def step_metadata(self, batch: StepBatch) -> LoRAStepMetadata | None:
        rows = batch.adapter_rows
        if rows is None:
            return None
        nd, slots = batch.num_decode, self.slots
        masks = {}
        if nd and bool((rows[:nd] >= 0).any()):
            used = int(rows[:nd].max()) + 1
            for parts in {len(p) for p in slots.parts.values()}:
                slot_of_row = torch.arange(used, device=slots.device).repeat_interleave(parts * slots.max_rank)
                masks[parts] = (rows[:nd, None] == slot_of_row[None, :]).to(slots.dtype)
        segments = [(slice(c.start, c.start + c.length), int(rows[c.start]))
                    for c in batch.prefills if int(rows[c.start]) >= 0]
        return LoRAStepMetadata(masks, segments, frozenset(p for p, count in slots.targeted.items() if count), rows)

    def __call__(self, layer: int, projection: Projection, x: torch.Tensor, out: torch.Tensor,
                 step: LoRAStepMetadata) -> torch.Tensor:
        if projection not in step.targeted:
            return out
        slots = self.slots
        a, bt = slots.a[layer][projection], slots.bt[layer][projection]
        if step.decode_masks:
            mask = step.decode_masks[len(slots.parts[projection])]
            nd, used = mask.shape
            out[:nd] += ((x[:nd] @ a[:used].t()) * mask) @ bt[:used]
        for rows, slot in step.prefill_segments:
            ranks = slots.rows(projection, slot)
            out[rows] += (x[rows] @ a[ranks].t()) @ bt[ranks]
        return out

    def experts(self, layer: int, parameter: str, expert: int, rows: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                step: LoRAStepMetadata) -> torch.Tensor:
        """One expert's product for the tokens routed to it (`rows` of the batch; `x` their inputs), with each
        token's adapter delta added (a few slots among a few rows: each slot's rows at once)."""
        if parameter not in step.targeted:
            return out
        a = self.slots.expert_a[layer][parameter][:, expert]  # [slots, rank, in]
        bt = self.slots.expert_bt[layer][parameter][:, expert]  # [slots, rank, out]
        row_slots = step.row_slots[rows]
        for slot in row_slots.unique().tolist():
            if slot >= 0:
                mine = (row_slots == slot).nonzero().squeeze(1)
                out.index_add_(0, mine, (x[mine] @ a[slot].t()) @ bt[slot])
        return out
