"""Decode steps through torch.compile: the layers' many small operations fused into a few kernels.

An eager decode step is about 45 PyTorch operations per layer, each 5–50 µs on a CPU and a kernel launch on
a GPU, so it costs far more than its matmuls. `Decoder.decode` traced by inductor turns the norms, RoPE,
residuals, SwiGLU and attention (which reads K/V through the block table, see `decode_attention`) into a
handful of fused loops around the matmuls, which stay the kernels `Matmul` measured at load. On CUDA the
step is replayed as a CUDA graph (`reduce-overhead`), one per shape bucket.

Which steps: only steps whose rows are all decodes, at most 64 of them (the default `max_num_seqs`, and
Matmul's middle row class). Prefill chunks and mixed steps stay eager: their matmuls are large and the
per-op cost is a small share of them.

Shapes: sizes vary per step (rows, block-table width, LoRA slots in use), so they are marked dynamic and
one graph serves all (torch gives a size of 1 a graph of its own: one for a single row, one for more;
the width is padded to at least 2). On CUDA a CUDA graph is recorded per concrete shape, so rows and
width are padded up to powers of two there: a bounded number of graphs. Padding rows write their K/V to the cache's scratch block and
attend to it alone.

Compile time is paid at start (`warm_up`, before the replica reports ready) and inductor's caches live
in the folder given (the replica's cache folder), so a restart reads them instead of compiling again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from ember.runtime.engine.batch import StepBatch
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.model.decoder import Decoder
from ember.runtime.model.matmul import COMPILED_MOST_ROWS

log = logging.getLogger("ember.runtime")


def use_cache_folder(folder: Path) -> None:
    """Keep inductor's compiled kernels (and, on CUDA, Triton's) in `folder`; set before the first compile.

    What is cached there is code this process will load and run, so the folder must be this user's alone.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"compile cache {folder}: must belong to this user and be writable by no one else "
                           f"(owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}); set EMBER_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tensors(model: Decoder) -> list[torch.Tensor]:
    """The model's own tensors a step reads (quantized weights' too)."""
    found, seen = [t for tables in model.rope for t in tables], set()
    pending = [model.weights]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return found


class CompiledDecode:
    def __init__(self, model: Decoder, cache: KVCache, max_rows: int = COMPILED_MOST_ROWS,
                 pad_to_buckets: bool | None = None):
        if max_rows > COMPILED_MOST_ROWS:  # Matmul.scales_rows is decided for the classes up to that
            raise ValueError(f"max_rows: {max_rows} is above the compiled step's {COMPILED_MOST_ROWS}")
        self.model, self.cache, self.max_rows = model, cache, max_rows
        self.device = model.weights.device
        on_cuda = self.device.type == "cuda"
        self.pad_to_buckets = on_cuda if pad_to_buckets is None else pad_to_buckets
        if on_cuda:
            # A CUDA graph replays fixed addresses: the weights and the cache (which the step writes) must
            # stay where they were recorded, or each replay would copy them in first.
            for t in _tensors(model) + cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        # Dynamo keeps one cache per code object, Decoder.decode's, and each model loaded in the process (tests,
        # benchmarks) adds entries to it: past the limit it would run eagerly without a word.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        self.fn = torch.compile(model.decode, mode="reduce-overhead" if on_cuda else None)
        self.compile_seconds = 0.0
        self.steps = 0  # steps run compiled (the rest ran eagerly)

    def takes(self, batch: StepBatch) -> bool:
        return 0 < batch.num_decode <= self.max_rows and not batch.prefills

    def __call__(self, batch: StepBatch, lora_step) -> torch.Tensor:
        rows = batch.num_decode
        ids, positions, slots = batch.input_ids, batch.positions, batch.slot_mapping
        blocks, lengths = batch.decode_blocks, batch.decode_lengths
        # torch gives a size of 1 a graph of its own: worth it for one row (a single sequence's decode padded to
        # two runs markedly slower), not for a block-table width of one (short contexts).
        width = max(2, blocks.shape[1])
        padded_rows = _bucket(rows) if self.pad_to_buckets else rows
        if self.pad_to_buckets:
            width = _bucket(width)
        if width != blocks.shape[1]:
            blocks = torch.nn.functional.pad(blocks, (0, width - blocks.shape[1]), value=self.cache.scratch_block)
        if padded_rows != rows:
            extra = padded_rows - rows
            scratch = self.cache.scratch_block * self.cache.block_size
            ids = torch.cat([ids, ids.new_zeros(extra)])
            positions = torch.cat([positions, positions.new_zeros(extra)])
            slots = torch.cat([slots, slots.new_full((extra,), scratch)])
            blocks = torch.cat([blocks, blocks.new_full((extra, width), self.cache.scratch_block)])
            lengths = torch.cat([lengths, lengths.new_ones(extra)])
        if lora_step is not None and lora_step.decode_masks and (padded_rows != rows or self.pad_to_buckets):
            lora_step = dataclasses.replace(lora_step, decode_masks={
                parts: self._pad_mask(mask, padded_rows, parts) for parts, mask in lora_step.decode_masks.items()})
        logits = self._run(ids, positions, slots, blocks, lengths, lora_step)
        self.steps += 1
        return logits[:rows]

    def _pad_mask(self, mask: torch.Tensor, rows: int, parts: int) -> torch.Tensor:
        """Zero rows for the padding rows; on CUDA, zero columns up to a power of two of slots (at most all of
        them), so the slots in use do not multiply the CUDA graphs."""
        columns = mask.shape[1]
        if self.pad_to_buckets:
            slots = self.model.lora.slots
            width = parts * slots.max_rank
            columns = min(_bucket(columns // width), slots.max_loras) * width
        return torch.nn.functional.pad(mask, (0, columns - mask.shape[1], 0, rows - mask.shape[0]))

    def _run(self, ids, positions, slots, blocks, lengths, lora_step) -> torch.Tensor:
        several = ids.shape[0] > 1
        if several:
            for t in (ids, positions, slots, blocks, lengths):
                torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(blocks, 1)
        if lora_step is not None:
            for mask in lora_step.decode_masks.values():
                torch._dynamo.mark_dynamic(mask, 1)
                if several:
                    torch._dynamo.mark_dynamic(mask, 0)
        with torch.no_grad():
            return self.fn(ids, positions, slots, blocks, lengths, self.cache.k, self.cache.v, lora_step)

    def warm_up(self) -> float:
        """Compile the step's graphs (one row, several) before any request, timing it (with a warm cache: the
        cache lookup). Steps with addons have graphs of their own, compiled at the first such step."""
        start = time.perf_counter()
        scratch = self.cache.scratch_block
        for rows in (1, 2):
            def tensor(value):
                return torch.full((rows,), value, dtype=torch.long, device=self.device)
            self._run(tensor(0), tensor(0), tensor(scratch * self.cache.block_size),
                      torch.full((rows, 2), scratch, dtype=torch.long, device=self.device), tensor(1), None)
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled decode step ready in %.1f s", self.compile_seconds)
        return self.compile_seconds
