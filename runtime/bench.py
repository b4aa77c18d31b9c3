"""The runtime benchmark: Ember's engine against transformers' batched generate() on the same requests.

    python -m ember.runtime.bench                    # ~100M-parameter model, 16 requests, both engines
    python -m ember.runtime.bench --requests 4 --preset tiny --no-baseline

Requests get prompt and output lengths drawn with a fixed seed; both engines decode greedily and ignore
EOS so they do exactly the same work. transformers pads the batch and runs every row to the longest
output, so its throughput counts only the tokens that were asked for. The figures are ratios from one
run in one process, so they hold on a noisy, shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .engine import Engine, EngineConfig
from .sampling import SamplingParams
from .tinymodels import make_model

DEFAULT_MODEL_DIR = Path(".ember/bench")


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
        def pct(values: list[float], q: float) -> float:
            return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

        return {
            "engine": self.name,
            "seconds": round(self.seconds, 3),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.tokens_per_s, 2),
            "latency_p50_s": round(pct(self.latencies, 50), 3),
            "latency_p90_s": round(pct(self.latencies, 90), 3),
            "ttft_p50_s": round(pct(self.ttfts, 50), 3),
            "ttft_p90_s": round(pct(self.ttfts, 90), 3),
        }


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_ember(engine: Engine, work: Workload) -> Result:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(work.prompts, params)]
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
            progress(f"ember: step {steps}, {len(done)}/{len(ids)} requests done")
    seconds = time.perf_counter() - start
    produced = sum(len(t) for t in tokens.values())
    return Result("ember", seconds, produced, [done[i] for i in ids], [first[i] for i in ids], [tokens[i] for i in ids])


def run_transformers(model_dir: Path, work: Workload, dtype: torch.dtype, device: torch.device) -> Result:
    """transformers' batched generate(): left-padded prompts, one batch, every row to the longest output."""
    from transformers import AutoModelForCausalLM  # a benchmark reference only; the runtime never needs it

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # No EOS, so every row runs to max_new_tokens like Ember's ignore_eos (min_new_tokens would instead
    # mask EOS logits and change the greedy tokens).
    model.generation_config.eos_token_id = None
    longest_prompt, longest_output = max(map(len, work.prompts)), max(work.output_lens)
    pad = 0
    ids = torch.tensor([[pad] * (longest_prompt - len(p)) + p for p in work.prompts], device=device)
    mask = torch.tensor([[0] * (longest_prompt - len(p)) + [1] * len(p) for p in work.prompts], device=device)
    progress(f"transformers: generate() on a batch of {len(work.prompts)} x {longest_prompt} prompt tokens")
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest_output, do_sample=False,
                             pad_token_id=pad)
    seconds = time.perf_counter() - start
    outputs = [row[longest_prompt : longest_prompt + n].tolist() for row, n in zip(out, work.output_lens)]
    # Every row finishes with the batch, and nothing streams out before the batch is done.
    return Result("transformers", seconds, work.output_tokens, [seconds] * len(outputs), [seconds] * len(outputs), outputs)


def ensure_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    directory = DEFAULT_MODEL_DIR / args.preset
    if not (directory / "config.json").exists():
        progress(f"generating the {args.preset} model in {directory} (once)")
        make_model(directory, args.preset, seed=0)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: generate --preset)")
    parser.add_argument("--preset", default="bench-100m", help="tiny-model preset to generate when --model is not given")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' generate()")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the engines this many times; report medians")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model_dir = ensure_model(args)
    config = EngineConfig(device=args.device, dtype=args.dtype)
    progress(f"loading {model_dir}")
    engine = Engine.from_dir(model_dir, config)
    weights = engine.model.weights
    work = make_workload(args.requests, tuple(args.prompt_len), tuple(args.output_len), engine.model.config.vocab_size, args.seed)
    print(f"model: {model_dir} ({weights.parameter_count / 1e6:.1f}M parameters, {weights.dtype}, {weights.device}); "
          f"threads: {torch.get_num_threads()}")
    print(f"work: {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens "
          f"({sum(map(len, work.prompts))} in all), outputs {args.output_len[0]}-{args.output_len[1]} "
          f"({work.output_tokens} in all), seed {args.seed}, greedy")

    run_ember(engine, make_workload(2, (8, 16), (4, 4), engine.model.config.vocab_size, args.seed + 1))  # warm-up
    runs: list[list[Result]] = []
    for attempt in range(args.repeat):
        if args.repeat > 1:
            progress(f"run {attempt + 1}/{args.repeat}")
        results = [run_ember(engine, work)]
        if not args.no_baseline:
            results.append(run_transformers(model_dir, work, weights.dtype, weights.device))
        runs.append(results)

    report = {"model": str(model_dir), "parameters": weights.parameter_count, "device": str(weights.device),
              "threads": torch.get_num_threads(), "work": asdict(work) | {"prompts": list(map(len, work.prompts))},
              "runs": [[r.summary() for r in results] for results in runs]}
    print(f"{'run':<5}{'engine':<14}{'tok/s':>10}{'seconds':>10}{'p50 lat':>10}{'p90 lat':>10}{'p50 ttft':>10}{'p90 ttft':>10}")
    for attempt, summaries in enumerate(report["runs"], start=1):
        for r in summaries:
            print(f"{attempt:<5}{r['engine']:<14}{r['output_tokens_per_s']:>10.1f}{r['seconds']:>10.2f}"
                  f"{r['latency_p50_s']:>10.2f}{r['latency_p90_s']:>10.2f}{r['ttft_p50_s']:>10.2f}{r['ttft_p90_s']:>10.2f}")
    if not args.no_baseline:
        ratios = [ours.tokens_per_s / theirs.tokens_per_s for ours, theirs in runs]
        ours, theirs = runs[-1]
        same = sum(a == b for a, b in zip(ours.outputs, theirs.outputs))
        report |= {"throughput_ratios": [round(r, 3) for r in ratios],
                   "throughput_ratio": round(statistics.median(ratios), 3), "identical_greedy_outputs": same}
        print(f"throughput ratio ember / transformers: {report['throughput_ratio']:.2f}x"
              + (f" (median of {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""))
        print(f"greedy outputs identical to transformers': {same}/{len(ours.outputs)} requests")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
