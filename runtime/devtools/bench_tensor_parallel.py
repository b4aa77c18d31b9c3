"""What tensor parallelism costs and gives on this machine's CPU: one replica's engine with N ranks of
cores/N threads against one rank of all the cores, same model and workload, in one run.

    python -m ember.runtime.devtools.bench_tensor_parallel --model .ember/bench/smollm2 [--ranks 2] [--json tp.json]

Printed: batch-1 decode tokens/s and the throughput of 8 concurrent requests for each, their ratios, and the
collectives' share of a decode step on rank 0 (all-reduces and the logits' gather, from torch's profiler: the
time rank 0 spends in them, waiting for the slower rank included). Both run eagerly (compiled steps are
measured by the compiled-step benchmark); on the CPU the ranks talk through gloo over loopback TCP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ember.runtime.devtools.bench_precisions import decode_tokens_per_s
from ember.runtime.devtools.workload import make_workload, progress, run_ember
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.engine.sequence import SamplingParams

COLLECTIVES = ("all_reduce", "allreduce", "all_gather", "allgather", "wait_tensor")


def collective_share(engine: Engine, prompt: list[int], steps: int = 32) -> float:
    """The share of rank 0's decode steps spent in collectives, from a profile of `steps` of them."""
    from torch.profiler import ProfilerActivity, profile, record_function

    engine.add_request(prompt, SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True))
    engine.step()  # the prefill
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        while engine.has_unfinished:
            with record_function("ember.step"):
                engine.step()
    events = trace.key_averages()
    steps_us = sum(e.cpu_time_total for e in events if e.key == "ember.step")
    # self times: the c10d ops nest inside the functional ones, and the wait is where rank 0 blocks
    collective_us = sum(e.self_cpu_time_total for e in events if any(c in e.key for c in COLLECTIVES))
    return collective_us / steps_us


def measure(model: Path, size: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    engine = Engine.from_dir(model, EngineConfig(kv_cache_tokens=16384, tensor_parallel_size=size))
    try:
        vocab = engine.model.config.vocab_size
        prompt = make_workload(1, (128, 128), (1, 1), vocab, seed=3).prompts[0]
        decode = decode_tokens_per_s(engine, prompt, tokens=64)
        run_ember(engine, make_workload(4, (32, 32), (8, 8), vocab, seed=1), name="warm-up")
        concurrent = run_ember(engine, make_workload(8, (64, 256), (64, 64), vocab, seed=0), name="8 concurrent")
        report = {"ranks": size, "threads_per_rank": torch.get_num_threads(),
                  "batch1_decode_tokens_per_s": round(decode, 2),
                  "concurrent_8_tokens_per_s": round(concurrent.tokens_per_s, 2)}
        if size > 1:
            report["collective_share_of_a_decode_step"] = round(collective_share(engine, prompt), 3)
        return report
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime.devtools.bench_tensor_parallel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model directory")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cores = torch.get_num_threads()
    progress(f"1 rank of {cores} threads")
    one = measure(args.model, 1, cores)
    progress(f"{one}")
    progress(f"{args.ranks} ranks of {max(1, cores // args.ranks)} threads")
    split = measure(args.model, args.ranks, cores)
    progress(f"{split}")
    report = {"model": str(args.model), "one_rank": one, "split": split,
              "decode_ratio": round(split["batch1_decode_tokens_per_s"] / one["batch1_decode_tokens_per_s"], 3),
              "throughput_ratio": round(split["concurrent_8_tokens_per_s"] / one["concurrent_8_tokens_per_s"], 3)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
