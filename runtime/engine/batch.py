"""One engine step's input: the scheduled sequences flattened into token tensors plus attention metadata.

Decode tokens (one per sequence) come first so their attention runs as one batched call; prefill
chunks follow, each attending to its own context. Everything here is built once per step and shared
by all layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flat token tensors
    length: int  # tokens in this chunk
    context: int  # tokens the chunk attends to (earlier chunks included)
    context_blocks: torch.Tensor | None  # KV blocks holding all `context` tokens; None when the chunk is the whole context


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int
    decode_blocks: torch.Tensor | None  # [num_decode, W]: KV blocks each decode row attends to (padded)
    decode_len: int  # L: the longest decode context; shorter rows are masked
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, L]: True where a position holds context
    decode_lengths: torch.Tensor | None  # [num_decode]: each decode row's context length (L is the longest)
    prefills: list[PrefillChunk]
    sample_rows: torch.Tensor  # [S]: rows whose logits are sampled
    sampled_chunks: list[int]  # [S]: for each sampled row, its index in the chunks given to build()
    adapter_rows: torch.Tensor | None = None  # [T]: LoRA adapter slot per token (-1 for the base model)

    def to(self, device: torch.device) -> "StepBatch":
        """The same batch on `device` (a tensor-parallel rank's, after it crossed from rank 0)."""
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=True)
            if isinstance(value, PrefillChunk):
                return dataclasses.replace(value, context_blocks=move(value.context_blocks))
            if isinstance(value, list):
                return [move(v) for v in value]
            return value
        return StepBatch(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class ScheduledChunk:
    """What the scheduler asks of one sequence this step."""

    tokens: list[int]  # the sequence's tokens so far (prompt + generated)
    num_computed: int  # how many already have K/V in the cache
    num_new: int  # how many to compute now
    block_table: list[int]
    adapter_slot: int = -1

    @property
    def samples(self) -> bool:
        return self.num_computed + self.num_new == len(self.tokens)


def build(chunks: list[ScheduledChunk], block_size: int, device: torch.device) -> StepBatch:
    is_decode = [c.num_new == 1 and c.num_computed > 0 for c in chunks]
    decode_ids = [i for i, d in enumerate(is_decode) if d]
    prefill_ids = [i for i, d in enumerate(is_decode) if not d]
    decodes, prefills = [chunks[i] for i in decode_ids], [chunks[i] for i in prefill_ids]
    ordered = decodes + prefills
    ids, positions, slots, adapters = [], [], [], []
    for c in ordered:
        start, end = c.num_computed, c.num_computed + c.num_new
        ids += c.tokens[start:end]
        positions += range(start, end)
        slots += [c.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        adapters += [c.adapter_slot] * c.num_new

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    decode_blocks = decode_mask = decode_lengths = None
    longest = 0
    if decodes:
        lengths = [c.num_computed + 1 for c in decodes]
        longest = max(lengths)
        width = -(-longest // block_size)
        decode_blocks = tensor([c.block_table[:width] + [0] * (width - len(c.block_table[:width])) for c in decodes])
        decode_lengths = tensor(lengths)
        decode_mask = (torch.arange(longest, device=device)[None, :] < decode_lengths[:, None])[:, None, None, :]

    chunks_out, row, sample_rows, sampled = [], len(decodes), list(range(len(decodes))), list(decode_ids)
    for index, c in zip(prefill_ids, prefills):
        context = c.num_computed + c.num_new
        blocks = tensor(c.block_table[: -(-context // block_size)]) if c.num_computed else None
        chunks_out.append(PrefillChunk(row, c.num_new, context, blocks))
        row += c.num_new
        if c.samples:
            sample_rows.append(row - 1)
            sampled.append(index)
    return StepBatch(
        input_ids=tensor(ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        num_decode=len(decodes),
        decode_blocks=decode_blocks,
        decode_len=longest,
        decode_mask=decode_mask,
        decode_lengths=decode_lengths,
        prefills=chunks_out,
        sample_rows=tensor(sample_rows),
        sampled_chunks=sampled,
        adapter_rows=tensor(adapters) if any(a >= 0 for a in adapters) else None,
    )
