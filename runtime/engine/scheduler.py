"""Continuous batching: which sequences run this step, and how many tokens each.

Every step, running sequences go first (a decode token each, or their next prompt chunk), in arrival
order, then waiting ones join while the token budget, the sequence limit and the KV cache allow. A
prompt longer than the remaining budget is prefilled in chunks across steps. When the cache runs out,
the latest-arrived running sequence is preempted: its blocks are freed and it waits at the front of the
queue to be recomputed (its generated tokens are kept), so earlier requests always make progress.

A sequence joining takes the cached blocks of its longest cached prefix first (prefix caching; a preempted
one usually finds its own), and after each step its newly filled blocks are made findable. One whose next
block is being computed this step by another sequence waits a step and takes it from the cache then, so a
burst of requests with one system prompt computes it once, not once per request.
"""

from __future__ import annotations

from collections import deque

from ember.runtime.engine.kv_cache import BlockAllocator, block_hashes
from ember.runtime.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 0):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens {max_num_batched_tokens} must be at least max_num_seqs {max_num_seqs}"
            )
        self.allocator = allocator
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_loras = max_loras  # distinct adapters one step may use (the device's LoRA slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # tokens whose K/V joining sequences took from the prefix cache

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.block_table)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.release(seq.block_table)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        adapters: set[str] = set()
        preempted = False
        pending: set[bytes] = set()  # hashes of the blocks this step fills
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0 or not self._adapter_fits(seq, adapters):
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            self.allocator.drop_behind_window(seq.block_table, seq.num_computed)
            while not self.allocator.can_grow(seq.block_table, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.allocator.grow(seq.block_table, seq.num_computed + n)
                pending.update(self._blocks_filled(seq, n))
                scheduled.append((seq, n))
                adapters.add(seq.adapter)
                budget -= n
        # Admitting new work right after preempting would only thrash the cache.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._adapter_fits(seq, adapters):
                break
            self._take_cached_prefix(seq)
            self.allocator.drop_behind_window(seq.block_table, seq.num_computed)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            filled = self._blocks_filled(seq, n)
            if (filled and filled[0] in pending) or not self.allocator.can_grow(seq.block_table, seq.num_computed + n):
                self.allocator.release(seq.block_table)
                seq.num_computed = 0
                break
            pending.update(filled)
            self.waiting.popleft()
            if seq.num_computed and not seq.num_cached:
                seq.num_cached = min(seq.num_computed, seq.num_prompt)
            self.prefix_hit_tokens += seq.num_computed
            self.allocator.grow(seq.block_table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            adapters.add(seq.adapter)
            budget -= n
        return scheduled

    def _take_cached_prefix(self, seq: Sequence) -> None:
        if not self.allocator.prefix_caching:  # no hashing at all when nothing is cached
            return
        block_size = self.allocator.block_size
        hashes = block_hashes(seq.tokens, len(seq.tokens), block_size, seq.cache_namespace, seq.block_hashes)
        usable = (len(seq.tokens) - 1) // block_size  # the last token is always computed: its logits are sampled
        seq.num_computed = self.allocator.match(hashes[:usable], seq.block_table) * block_size

    def _blocks_filled(self, seq: Sequence, n: int) -> list[bytes]:
        """The hashes of the blocks that computing `n` more of the sequence's tokens fills."""
        if not self.allocator.prefix_caching:
            return []
        block_size = self.allocator.block_size
        end = seq.num_computed + n
        hashes = block_hashes(seq.tokens, end, block_size, seq.cache_namespace, seq.block_hashes)
        return hashes[seq.num_computed // block_size: end // block_size]

    def computed(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """After a step: the blocks it filled are now findable by the next sequence with the same prefix."""
        if not self.allocator.prefix_caching:
            return
        block_size = self.allocator.block_size
        for seq, n in scheduled:
            before, full = (seq.num_computed - n) // block_size, seq.num_computed // block_size
            if full > before:
                hashes = block_hashes(seq.tokens, seq.num_computed, block_size, seq.cache_namespace, seq.block_hashes)
                self.allocator.register(seq.block_table[before:full], hashes[before:full])

    def _adapter_fits(self, seq: Sequence, adapters: set[str | None]) -> bool:
        if seq.adapter is None or seq.adapter in adapters:
            return True
        return len(adapters - {None}) < self.max_loras
