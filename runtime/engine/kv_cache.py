"""The paged KV cache: a fixed pool of blocks, handed to sequences as they grow and reused when they end.

Memory is bounded by construction: the pool is allocated once, and a sequence that cannot get a block
waits or is preempted by the scheduler; nothing grows with the backlog.
"""

from __future__ import annotations

from collections import deque

import torch


class BlockAllocator:
    """Hands out block numbers; a sequence's block table is the list it holds."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= len(self.free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` so it holds `num_tokens` tokens; the caller checked can_grow."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.append(self.free.popleft())

    def release(self, table: list[int]) -> None:
        self.free.extend(table)
        table.clear()


class KVCache:
    """Per layer, K and V pools of shape [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.allocator = BlockAllocator(num_blocks, block_size)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
