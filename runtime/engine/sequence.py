"""A request as the engine tracks it: its tokens, its place in the KV cache, and its output so far."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ember.runtime.model.sampling import LogitTensors, SamplingParams, TokenLogprob, make_generator


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # the LoRA addon version it runs on (`name#version`: LoRAManager.acquire), None for the base
    tokens: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    matcher: Any = None  # llguidance's matcher of a constrained request: its next allowed tokens
    logit_tensors: LogitTensors | None = None  # what its logits processors add and mask, built when it is added
    cache_namespace: bytes = b""  # whose K/V its blocks hold: the base model's, or one addon's
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, for prefix caching
    num_cached: int = 0  # prompt tokens whose K/V came from the prefix cache

    def __post_init__(self):
        self.tokens = list(self.prompt_ids)
        self.generator = make_generator(self.params.seed)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
