"""The paged KV cache: a fixed pool of blocks, handed to sequences as they grow and reused when they end,
with prefix caching: a full block is addressed by a hash of every token up to its end, so a request whose
prompt starts like an earlier one's takes that one's blocks instead of computing them again.

Memory is bounded by construction: the pool is allocated once, and a sequence that cannot get a block
waits or is preempted by the scheduler; nothing grows with the backlog. Cached blocks nobody holds count
as free: they are evicted least recently used first when a block is needed.

A model whose every layer attends through the same sliding window (Mistral, Phi-3) needs only the blocks that
window reaches: the blocks behind it go back to the pool as a sequence grows, and their places in its block
table point at the scratch block (`hole`), which attention reads there only under a mask.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

import torch


def block_hashes(tokens: list[int], count: int, block_size: int, namespace: bytes, known: list[bytes]) -> list[bytes]:
    """Extend `known` with the hashes of the full blocks among the first `count` tokens. Each hash covers the
    namespace and every token before the block's end, so equal hashes mean equal K/V (one model, one addon)."""
    parent = known[-1] if known else hashlib.blake2b(namespace, digest_size=16).digest()
    for start in range(len(known) * block_size, count - block_size + 1, block_size):
        block = array("q", tokens[start:start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        known.append(parent)
    return known


class BlockAllocator:
    """Hands out block numbers; a sequence's block table is the list it holds. A block held by several
    sequences (a shared prefix) is freed when the last one lets go."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, window: int | None = None):
        """`window`: the tokens every layer attends to (a sliding window all layers share), None for all."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one token, got {num_blocks} x {block_size}")
        self.window, self.hole = window, num_blocks  # the hole: the scratch block, never handed out
        # Whether the scheduler hashes blocks to find and register them (match/register go unused when not).
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # blocks holding nothing reusable
        self.refs = [0] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` so it holds `num_tokens` tokens; the caller checked can_grow."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.append(self._take())

    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        for block in table:
            if block != self.hole:
                self._let_go(block)
        table.clear()

    def _let_go(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None  # still a cached prefix: a later request may take it
            else:
                self.free.append(block)

    def drop_behind_window(self, table: list[int], computed: int) -> None:
        """Give back the blocks of `table` that no token from position `computed` on can see through the window:
        a token at p sees p - window + 1 on, so a block is done once it ends at or before computed - window."""
        if self.window is None:
            return
        done = min(max(0, computed - self.window + 1) // self.block_size, len(table))
        for index in range(done - 1, -1, -1):  # newest first: the older ones were dropped before
            if table[index] == self.hole:
                break
            self._let_go(table[index])
            table[index] = self.hole

    def forget_cached(self) -> None:
        """Drop every cached block nobody holds (a benchmark's runs must not answer each other's prompts)."""
        for block in self.evictable:
            del self.by_hash[self.hash_of.pop(block)]
            self.free.append(block)
        self.evictable.clear()

    def match(self, hashes: list[bytes], table: list[int]) -> int:
        """Put the cached blocks of the longest cached prefix of `hashes` in the empty `table`, holding them;
        returns how many."""
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            table.append(block)
        return len(table)

    def register(self, table: list[int], hashes: list[bytes]) -> None:
        """Make the table's full blocks findable by their hashes (a block already cached under its hash, or
        a hash another block already answers for, is left as it is)."""
        for block, h in zip(table, hashes):
            if block != self.hole and block not in self.hash_of and h not in self.by_hash:
                self.by_hash[h], self.hash_of[block] = block, h


class KVCache:
    """Per layer, K and V pools of shape [num_blocks + 1, block_size, kv_heads, head_dim]. The last block is
    never handed out: a compiled step's padding rows write their K/V there (`scratch_block`)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, prefix_caching: bool = True, window: int | None = None):
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_caching, window)
        self.scratch_block = self.allocator.hole
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
