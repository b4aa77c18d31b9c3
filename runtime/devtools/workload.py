"""What a benchmark runs and what a run measures: a workload of requests, the in-process Ember run of it, and
its timings. bench, bench_precisions, bench_peer and gpu_check share these."""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass

from ember.runtime.engine.engine import Engine
from ember.runtime.model.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int) -> Workload:
    rng = random.Random(seed)
    lengths = [(rng.randint(*prompt_range), rng.randint(*output_range)) for _ in range(n)]
    # Ids below 16 are the tokenizer's special tokens; prompts avoid them.
    prompts = [[rng.randrange(16, vocab) for _ in range(p)] for p, _ in lengths]
    return Workload(prompts, [o for _, o in lengths])


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for one, 0 for none."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


@dataclass
class Result:
    name: str
    seconds: float
    output_tokens: int
    latencies: list[float]  # per request, from submission to its last token
    ttfts: list[float]  # per request, from submission to its first token
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def summary(self) -> dict:
        return {
            "engine": self.name,
            "seconds": round(self.seconds, 3),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.tokens_per_s, 2),
            "latency_p50_s": round(percentile(self.latencies, 50), 3),
            "latency_p90_s": round(percentile(self.latencies, 90), 3),
            "ttft_p50_s": round(percentile(self.ttfts, 50), 3),
            "ttft_p90_s": round(percentile(self.ttfts, 90), 3),
        }


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_ember(engine: Engine, work: Workload, adapters: list[str | None] | None = None, name: str = "ember",
              cold: bool = True) -> Result:
    """`cold`: start with an empty prefix cache (an earlier run's prompts must not be answered from it)."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    adapters = adapters or [None] * len(work.prompts)
    if cold:
        engine.cache.allocator.forget_cached()
    start = time.perf_counter()
    ids = [engine.add_request(p, sp, adapter=a) for p, sp, a in zip(work.prompts, params, adapters)]
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    steps = 0
    while engine.has_unfinished:
        for out in engine.step():
            now = time.perf_counter() - start
            first.setdefault(out.request_id, now)
            tokens[out.request_id] += out.token_ids
            if out.finished:
                done[out.request_id] = now
        steps += 1
        if steps % 25 == 0:
            progress(f"{name}: step {steps}, {len(done)}/{len(ids)} requests done")
    seconds = time.perf_counter() - start
    produced = sum(len(t) for t in tokens.values())
    return Result(name, seconds, produced, [done[i] for i in ids], [first[i] for i in ids], [tokens[i] for i in ids])
