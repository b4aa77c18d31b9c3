"""A tensor-parallel replica's processes: rank 0 is the replica (HTTP server, scheduler, sampling), ranks 1..N-1
are workers it starts, one per device, that run every step with it.

Each step rank 0 sends every worker what the step needs (the flattened batch and the LoRA slot changes since the
last) down a pipe of its own, then all ranks run the same forward pass, meeting in its collectives; only rank 0
samples. The pipes, not a collective, carry the steps: a worker waits on its pipe between requests for as long as
the replica idles, where a collective would time out.

A rank that dies takes the replica down, never hangs it: rank 0 watches the workers' processes and, when one
exits, fails the replica (`on_failure`: its health turns to failed and it stops, so its cluster starts it again);
a worker whose rank 0 is gone finds its pipe closed, or its collective broken, and exits.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.provider.domain.tensor_parallel import refusal
from ember.runtime.engine.batch import StepBatch
from ember.runtime.engine.engine import compile_decode, load_weights, make_cache
from ember.runtime.engine.model_runner import Forward
from ember.runtime.lora.adapters import LoRAAdapter
from ember.runtime.lora.slots import DeviceSlots
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.decoder import Decoder
from ember.runtime.parallel.group import RankGroup, free_address, rank_device, threads_per_rank

log = logging.getLogger("ember.runtime")

# How long a rank's start (reading its shard, compiling its step) may take before the replica gives up on it.
START_TIMEOUT_S = 1800.0


class RankFailed(RuntimeError):
    """Another rank of this replica died or failed: the replica cannot run a step."""


@dataclass(frozen=True)
class _Begin:
    """Rank 0 has sized the KV cache: the workers build theirs (and compile their step) alike."""

    num_blocks: int


@dataclass(frozen=True)
class _Step:
    changes: list[tuple[int, LoRAAdapter | None]]  # LoRA slot changes since the last step (DeviceSlots.changes)
    batch: StepBatch  # on the CPU; each rank moves it to its device


class Peers:
    """Rank 0's handle on the replica's other ranks."""

    def __init__(self, directory: Path, config, size: int):
        """Start ranks 1..size-1 and join them as rank 0 (`config`: the EngineConfig every rank runs)."""
        model = ModelConfig.from_dir(directory)
        why = refusal(model, size)
        if why:
            raise ValueError(f"tensor_parallel_size: {why}")
        self.size, self.failed, self.closing = size, None, False
        self.on_failure: Callable[[str], None] | None = None  # the replica's: fail health and stop
        address = free_address()
        device = rank_device(config.resolved_device(), 0)
        self._threads = torch.get_num_threads()
        # CPU ranks share the host's cores: each its part of them, or of the threads this process was given
        threads = min(self._threads, threads_per_rank(size))
        if device.type == "cpu":
            torch.set_num_threads(threads)
        context = multiprocessing.get_context("spawn")  # a fork would copy rank 0's threads and CUDA state
        self.pipes, self.processes = [], []
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(rank, size, address, str(directory), config, threads, theirs),
                                      name=f"ember-rank-{rank}")
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        threading.Thread(target=self._watch, name="ember-ranks", daemon=True).start()
        # before multiprocessing's own exit handler, which would wait for the workers while their pipes stay open
        atexit.register(self.close)
        try:
            self.group = RankGroup(model, 0, size, address, device)
        except Exception:
            self.close()
            raise

    def _watch(self) -> None:
        """Fail the replica the moment a worker's process ends (unless rank 0 is closing them)."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        ended = multiprocessing.connection.wait(list(sentinels))
        if self.closing:
            return
        rank = sentinels[ended[0]]
        self.processes[rank - 1].join()
        self.failed = (f"tensor-parallel rank {rank} of {self.size} exited (code "
                       f"{self.processes[rank - 1].exitcode}): the replica cannot run without it")
        log.error("%s", self.failed)
        if self.on_failure is not None:
            self.on_failure(self.failed)

    def begin(self, num_blocks: int) -> None:
        self._send(_Begin(num_blocks))

    def wait_ready(self) -> None:
        """Until every worker has built its cache and step; raises RankFailed with the first failure."""
        pending = dict(zip(self.pipes, range(1, self.size)))
        while pending:
            ready = multiprocessing.connection.wait(list(pending) + [p.sentinel for p in self.processes],
                                                    timeout=START_TIMEOUT_S)
            if not ready:
                raise RankFailed(f"tensor-parallel ranks {sorted(pending.values())} were not ready within "
                                 f"{START_TIMEOUT_S:.0f} s")
            for pipe in [r for r in ready if r in pending]:
                rank = pending.pop(pipe)
                try:
                    message = pipe.recv()
                except EOFError:
                    message = "its process ended"
                if message != "ready":
                    raise RankFailed(f"tensor-parallel rank {rank} failed to start: {message}")
            if self.failed:
                raise RankFailed(self.failed)

    def step(self, changes: list, batch: StepBatch) -> None:
        self._send(_Step(changes, batch))

    def _send(self, message) -> None:
        if self.failed:
            raise RankFailed(self.failed)
        try:
            for pipe in self.pipes:
                pipe.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise RankFailed(self.failed or "a tensor-parallel rank's pipe closed") from None

    def close(self) -> None:
        """Stop the workers (they finish with the pipe closing) and leave the process group."""
        if self.closing:
            return
        self.closing = True
        for pipe in self.pipes:
            pipe.close()
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        if getattr(self, "group", None) is not None:
            self.group.close()
        torch.set_num_threads(self._threads)


def _worker(rank: int, size: int, address: str, directory: str, config, threads: int, pipe) -> None:
    """Rank `rank`'s process: its shard of the model, stepped by rank 0 until the pipe closes."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s rank {rank}: %(message)s")
    device = rank_device(config.resolved_device(), rank)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    group = None
    try:
        group = RankGroup(ModelConfig.from_dir(directory), rank, size, address, device)
        weights = load_weights(Path(directory), config, device, group.shard)
        model = Decoder(weights, max_positions=config.max_positions(weights.config), group=group)
        begin = pipe.recv()
        cache = make_cache(model, config, begin.num_blocks)
        slots = (DeviceSlots(weights.config, config.max_loras, config.max_lora_rank, device, weights.dtype, group.shard)
                 if config.max_loras else None)
        compiled, _ = compile_decode(model, cache, config)
        forward = Forward(model, cache, slots, compiled)
        pipe.send("ready")
    except EOFError:
        return
    except Exception as exc:  # told to rank 0, which fails the replica's start with it
        log.exception("rank %d failed to start", rank)
        try:
            pipe.send(f"{type(exc).__name__}: {exc}")
        finally:
            raise SystemExit(1)
    try:
        while True:
            step = pipe.recv()
            if slots is not None:
                slots.replay(step.changes)
            forward(step.batch.to(device))
    except EOFError:  # rank 0 closed the pipe (it stopped, or died): so does this rank
        pass
    finally:
        group.close()
