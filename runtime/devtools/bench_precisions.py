"""Precisions side by side on one model: what each costs in accuracy and what it buys in speed and bytes.

    python -m ember.runtime.devtools.bench --model DIR --precisions fp32,bf16,int8,int4

For each precision, in one process: perplexity on a fixed English text (teacher-forced, every position),
greedy agreement with fp32 on requests whose prompts are windows of that text (share of output tokens equal up to the first
difference, and requests entirely equal), batch-1 decode speed, throughput on the whole workload, and the
bytes of weights a decode step reads. The ratios are against fp32 in the same run.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ember.runtime.devtools.workload import Workload, run_ember
from ember.runtime.engine.batch import ScheduledChunk
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.model.tokenizer import TextTokenizer

# A fixed text (public domain: the opening of Jerome K. Jerome's "Three Men in a Boat", 1889).
TEXT = (
    "There were four of us—George, and William Samuel Harris, and myself, and Montmorency. We were sitting in my "
    "room, smoking, and talking about how bad we were—bad from a medical point of view I mean, of course. We were "
    "all feeling seedy, and we were getting quite nervous about it. Harris said he felt such extraordinary fits of "
    "giddiness come over him at times, that he hardly knew what he was doing; and then George said that he had fits "
    "of giddiness too, and hardly knew what he was doing. With me, it was my liver that was out of order. I knew it "
    "was my liver that was out of order, because I had just been reading a patent liver-pill circular, in which "
    "were detailed the various symptoms by which a man could tell when his liver was out of order. I had them all. "
    "It is a most extraordinary thing, but I never read a patent medicine advertisement without being impelled to "
    "the conclusion that I am suffering from the particular disease therein dealt with in its most virulent form. "
    "The diagnosis seems in every case to correspond exactly with all the sensations that I have ever felt."
)


def text_workload(model_dir: Path, requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  seed: int) -> Workload:
    """Prompts of real text (windows of the fixed text, repeated as needed) so neither server sees noise; each
    seed starts its windows elsewhere."""
    text = TextTokenizer.from_dir(model_dir).encode(TEXT)
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(requests):
        length, start = rng.randint(*prompt_range), rng.randrange(len(text))
        prompts.append([text[(start + i) % len(text)] for i in range(length)])
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)


def prompt_logits(engine: Engine, tokens: list[int], adapter: str | None = None) -> torch.Tensor:
    """Teacher-forced logits of every position of `tokens` [len, vocab], through the engine's paged cache (and
    the addon's LoRA slot), with the cache blocks given back afterwards."""
    table: list[int] = []
    allocator = engine.cache.allocator
    allocator.grow(table, len(tokens))
    slots = engine.lora.activate({adapter}) if adapter else {}
    chunk = ScheduledChunk(tokens, 0, len(tokens), table, slots.get(adapter, -1))
    try:
        return engine.runner.logits([chunk], every_row=True)[1]
    finally:
        allocator.release(table)


def perplexity(engine: Engine, tokens: list[int]) -> float:
    """exp of the mean negative log-likelihood of each token given the ones before it (the first
    max_model_len tokens)."""
    tokens = tokens[: engine.max_model_len]
    logits = prompt_logits(engine, tokens)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(tokens[1:], device=logprobs.device)
    return math.exp(-logprobs.gather(1, targets[:, None]).mean().item())


def decode_tokens_per_s(engine: Engine, prompt: list[int], tokens: int = 64) -> float:
    run_ember(engine, Workload([prompt], [8]), name="warm-up")
    result = run_ember(engine, Workload([prompt], [tokens]), name="batch-1 decode")
    return (tokens - 1) / (result.latencies[0] - result.ttfts[0])


def weight_bytes(engine: Engine) -> int:
    """Bytes of the weights a decode step reads: projections, LM head and norms (not the embedding table)."""
    w = engine.model.weights
    projections = engine.model.matmul.weights  # every layer's, then the LM head
    norms = [w.norm] + [t for layer in w.layers for t in (layer.input_norm, layer.post_norm)]
    return sum(t.nbytes for t in projections + norms)


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """Share of reference tokens matched before the first difference, and requests matched entirely."""
    prefix = 0
    for a, b in zip(ours, reference):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return prefix / sum(map(len, reference)), sum(a == b for a, b in zip(ours, reference))


def precision_report(model_dir, work, precisions: list[str], base: EngineConfig, progress) -> dict:
    text = TextTokenizer.from_dir(model_dir).encode(TEXT)
    rows, reference = [], None
    for precision in precisions:
        progress(f"{precision}: loading")
        engine = Engine.from_dir(model_dir, replace(base, precision=precision))
        progress(f"{precision}: perplexity, batch-1 decode, then the workload")
        ppl = perplexity(engine, text)
        decode = statistics.median(decode_tokens_per_s(engine, work.prompts[0]) for _ in range(3))
        run_ember(engine, work, name="warm-up")
        start = time.perf_counter()
        result = run_ember(engine, work, name=precision)
        seconds = time.perf_counter() - start
        reference = reference or result.outputs
        share, equal = agreement(result.outputs, reference)
        rows.append({"precision": precision, "perplexity": round(ppl, 3), "weight_bytes": weight_bytes(engine),
                     "decode_tokens_per_s": round(decode, 2), "throughput_tokens_per_s": round(work.output_tokens / seconds, 2),
                     "greedy_token_agreement": round(share, 4), "greedy_requests_equal": equal,
                     "kernels": engine.model.matmul.choice})
    fp32 = rows[0]
    for row in rows:
        row["decode_vs_first"] = round(row["decode_tokens_per_s"] / fp32["decode_tokens_per_s"], 3)
        row["throughput_vs_first"] = round(row["throughput_tokens_per_s"] / fp32["throughput_tokens_per_s"], 3)
    return {"model": str(model_dir), "text_tokens": min(len(text), engine.max_model_len), "precisions": rows}


def print_precisions(report: dict, requests: int) -> None:
    first = report["precisions"][0]["precision"]
    print(f"perplexity on a fixed {report['text_tokens']}-token text; greedy agreement with {first} on {requests} requests")
    print(f"{'precision':<10}{'ppl':>8}{'weights MB':>12}{'decode tok/s':>14}{'vs ' + first:>9}{'tok/s (all)':>13}"
          f"{'vs ' + first:>9}{'agree':>8}{'equal':>7}  kernels (1-2 rows, <=64, more)")
    for r in report["precisions"]:
        print(f"{r['precision']:<10}{r['perplexity']:>8.3f}{r['weight_bytes'] / 1e6:>12.1f}{r['decode_tokens_per_s']:>14.1f}"
              f"{r['decode_vs_first']:>8.2f}x{r['throughput_tokens_per_s']:>13.1f}{r['throughput_vs_first']:>8.2f}x"
              f"{r['greedy_token_agreement']:>8.1%}{r['greedy_requests_equal']:>4}/{requests:<3} {', '.join(r['kernels'])}")
