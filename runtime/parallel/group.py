"""One tensor-parallel replica's ranks, joined by torch.distributed: NCCL between NVIDIA GPUs (RCCL on AMD, which
torch names nccl too), gloo between CPU processes.

The model calls two collectives per layer and one per step: the sum of o_proj's and down_proj's partial
outputs, and the gather of the LM head's vocabulary shares. Both are torch's functional collectives, which
torch.compile traces into the compiled step (and a CUDA graph captures), so the compiled step stays one graph.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives

from ember.provider.domain.tensor_parallel import Shard, shard_of
from ember.runtime.model.config import ModelConfig

# How long a collective may wait on a rank before it fails: a dead rank is noticed by its process exiting (see
# workers.py) long before this; the timeout is the last guard against a hang, and a step of a 405B model's
# prefill on slow GPUs must fit inside it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: GPU r of the node (each rank one accelerator), or the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


class RankGroup:
    """This process's place among the replica's ranks: its shard of the model and the collectives between them."""

    def __init__(self, config: ModelConfig, rank: int, size: int, address: str, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.shard: Shard = shard_of(config, size, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend(device), init_method=address, rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
        self.group = dist.group.WORLD
        # The vocabulary's shares differ by at most one row: each is padded to the largest so the gather is one
        # even collective, and the padding columns are dropped after.
        shares = [shard_of(config, size, r).vocab for r in range(size)]
        self.vocab_share = max(len(s) for s in shares)
        padded = [torch.arange(len(s)) + r * self.vocab_share for r, s in enumerate(shares)]
        self.vocab_columns = None if all(len(s) == self.vocab_share for s in shares) else torch.cat(padded).to(device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (row-parallel partial products)."""
        return collectives.all_reduce(x, "sum", self.group)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, this rank's vocabulary share] → [rows, vocabulary], on every rank."""
        rows, share = logits.shape
        if share != self.vocab_share:
            logits = torch.nn.functional.pad(logits, (0, self.vocab_share - share))
        # the functional all-gather stacks along dim 0: [size * rows, share] → [rows, size * share]
        gathered = collectives.all_gather_single(logits.contiguous(), 0, self.group)
        full = gathered.view(self.size, rows, self.vocab_share).transpose(0, 1).reshape(rows, -1)
        return full if self.vocab_columns is None else full.index_select(1, self.vocab_columns)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_address() -> str:
    """A TCP rendezvous on this host for the ranks' process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def threads_per_rank(size: int) -> int:
    """CPU ranks share the host's cores: each gets its part of them (at least one)."""
    return max(1, (os.cpu_count() or 1) // size)
