"""The runtime benchmark: Ember's engine against transformers' batched generate() on the same requests.

    python -m ember.runtime.devtools.bench                    # ~100M-parameter model, 16 requests, both engines
    python -m ember.runtime.devtools.bench --requests 4 --preset tiny --no-baseline
    python -m ember.runtime.devtools.bench --shared-prefix 512 # prefix caching on against off, one system prompt
    python -m ember.runtime.devtools.bench --model DIR --precisions fp32,bf16,int8,int4   # accuracy, speed, bytes

Requests get prompt and output lengths drawn with a fixed seed; both engines decode greedily and ignore
EOS so they do exactly the same work. transformers pads the batch and runs every row to the longest
output, so its throughput counts only the tokens that were asked for. The figures are ratios from one
run in one process, so they hold on a noisy, shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ember.runtime.devtools.bench_precisions import precision_report, print_precisions, text_workload
from ember.runtime.devtools.tinymodels import FAMILY_PRESETS, TinyLoRA, make_family_model, make_lora, make_model
from ember.runtime.devtools.workload import Result, Workload, make_workload, percentile, progress, run_ember
from ember.runtime.engine.engine import Engine, EngineConfig

DEFAULT_MODEL_DIR = Path(".ember/bench")


def run_transformers(model_dir: Path, work: Workload, dtype: torch.dtype, device: torch.device,
                     adapters: dict[str, Path] | None = None, adapter_names: list[str] | None = None) -> Result:
    """transformers' batched generate(): left-padded prompts, one batch, every row to the longest output.

    With adapters, PEFT serves them unmerged and each row names its own (`adapter_names`)."""
    from transformers import AutoModelForCausalLM  # a benchmark reference only; the runtime never needs it

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    extra = {}
    if adapters:
        from peft import PeftModel  # a benchmark reference too

        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        model.eval()
        extra["adapter_names"] = adapter_names
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
                             pad_token_id=pad, **extra)
    seconds = time.perf_counter() - start
    outputs = [row[longest_prompt : longest_prompt + n].tolist() for row, n in zip(out, work.output_lens)]
    # Every row finishes with the batch, and nothing streams out before the batch is done.
    return Result("transformers+peft" if adapters else "transformers", seconds, work.output_tokens, [seconds] * len(outputs), [seconds] * len(outputs), outputs)


async def http_run(url: str, api_key: str, model: str, work: Workload, concurrency: int) -> tuple[Result, list[float]]:
    import httpx  # a dev dependency (the HTTP benchmark's client), not the runtime's

    gate = asyncio.Semaphore(concurrency)
    gaps: list[float] = []
    latencies, ttfts, counts = [0.0] * len(work.prompts), [0.0] * len(work.prompts), [0] * len(work.prompts)
    streamed = [0] * len(work.prompts)  # token chunks, for servers that send no usage (one token a chunk)
    start = time.perf_counter()

    async def one(i: int, http) -> None:
        body = {"model": model, "prompt": work.prompts[i], "max_tokens": work.output_lens[i], "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with gate:
            sent = time.perf_counter()
            last = None
            async with http.stream("POST", f"{url}/v1/completions", json=body,
                                   headers={"Authorization": f"Bearer {api_key}"}) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"request {i}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        counts[i] = chunk["usage"]["completion_tokens"]
                    # llama-server ends with an empty chunk carrying only the finish reason: not a token.
                    if not chunk.get("choices") or all(c.get("finish_reason") and not c.get("text") for c in chunk["choices"]):
                        continue
                    streamed[i] += 1
                    now = time.perf_counter()
                    if last is None:
                        ttfts[i] = now - sent
                    else:
                        gaps.append(now - last)
                    last = now
            latencies[i] = time.perf_counter() - sent

    # A new connection per request: llama-server closes streamed connections that a pool would reuse.
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        await asyncio.gather(*[one(i, http) for i in range(len(work.prompts))])
    seconds = time.perf_counter() - start
    produced = sum(c or s for c, s in zip(counts, streamed))
    return Result("ember over HTTP", seconds, produced, latencies, ttfts, []), gaps


def http_main(args: argparse.Namespace) -> int:
    """Drive a running server: the same workload, streamed, `--concurrency` requests at a time."""
    work = make_workload(args.requests, tuple(args.prompt_len), tuple(args.output_len), 256, args.seed)
    progress(f"{args.requests} requests to {args.url} as {args.served_model}, {args.concurrency} at a time")
    result, gaps = asyncio.run(http_run(args.url, args.api_key, args.served_model, work, args.concurrency))

    report = {"url": args.url, "model": args.served_model, "concurrency": args.concurrency,
              "output_tokens": result.output_tokens, "seconds": round(result.seconds, 3),
              "output_tokens_per_s": round(result.tokens_per_s, 2)}
    for name, values in (("ttft", result.ttfts), ("itl", gaps), ("latency", result.latencies)):
        for q in (50, 90, 99):
            report[f"{name}_p{q}_ms"] = round(percentile(values, q) * 1000, 2)
    print(f"throughput: {report['output_tokens_per_s']:.1f} output tokens/s ({result.output_tokens} tokens in "
          f"{result.seconds:.2f} s, concurrency {args.concurrency})")
    for name in ("ttft", "itl", "latency"):
        print(f"{name:<8} p50 {report[name + '_p50_ms']:>9.1f} ms   p90 {report[name + '_p90_ms']:>9.1f} ms   "
              f"p99 {report[name + '_p99_ms']:>9.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def ensure_adapters(model_dir: Path, count: int, rank: int, targets: tuple[str, ...]) -> dict[str, Path]:
    """`count` PEFT adapters for the model, named as addons are (accounts/<account>/models/<id>)."""
    root = model_dir.parent / f"{model_dir.name}-loras-r{rank}-{'-'.join(t.removesuffix('_proj') for t in targets)}"
    adapters = {}
    for i in range(count):
        directory = root / f"addon-{i}"
        if not (directory / "adapter_model.safetensors").exists():
            progress(f"generating LoRA adapter {i + 1}/{count} in {directory}")
            make_lora(model_dir, directory, TinyLoRA(rank=rank, alpha=2.0 * rank, target_modules=targets), seed=100 + i)
        adapters[f"accounts/bench/models/addon-{i}"] = directory
    return adapters


def lora_report(engine: Engine, model_dir: Path, work: Workload, args: argparse.Namespace) -> dict:
    """Base-only, then 1, 4 and 16 distinct adapters over the same requests, then transformers+PEFT."""
    adapters = ensure_adapters(model_dir, 16, args.lora_rank, tuple(args.lora_targets.split(",")))
    for name, path in adapters.items():
        engine.lora.add(name, path)
    names = list(adapters)
    n = len(work.prompts)
    # Untimed: the first run at the workload's sizes pays one-off costs (oneDNN kernels built for new
    # shapes, memory first touched) that would otherwise be charged to base-only alone; and with --compile,
    # a short run with every adapter compiles the addon steps' graphs, as a replica's first such step does.
    run_ember(engine, work, name="warm-up")
    if args.compile:
        lora_warm_up = make_workload(n, (8, 16), (2, 6), engine.model.config.vocab_size, args.seed + 2)
        run_ember(engine, lora_warm_up, [names[i % 16] for i in range(n)], name="warm-up with adapters")
    results = [run_ember(engine, work, name="ember base-only")]
    for distinct in (1, 4, 16):
        assignment = [names[i % distinct] for i in range(n)]
        results.append(run_ember(engine, work, assignment, name=f"ember {distinct} adapters"))
    mixed = [names[i % 16] for i in range(n)]
    if not args.no_baseline:
        results.append(run_transformers(model_dir, work, engine.model.weights.dtype, engine.device, adapters, mixed))
    report = {"results": [r.summary() for r in results]}
    base, sixteen = results[0], results[3]
    report["cost_of_16_adapters"] = round(1 - sixteen.tokens_per_s / base.tokens_per_s, 3)
    if not args.no_baseline:
        report["ratio_16_adapters_vs_peft"] = round(sixteen.tokens_per_s / results[-1].tokens_per_s, 3)
        report["identical_greedy_outputs_vs_peft"] = sum(a == b for a, b in zip(sixteen.outputs, results[-1].outputs))
    return report | {"_results": results}


def with_shared_prefix(work: Workload, length: int, vocab: int, seed: int) -> Workload:
    rng = random.Random(seed + 1000)
    system = [rng.randrange(16, vocab) for _ in range(length)]
    return Workload([system + p for p in work.prompts], work.output_lens)


def lone_ttfts(engine: Engine, work: Workload) -> list[float]:
    """Each request alone, one after the other, for its first token only: time to first token without
    queueing behind other requests."""
    firsts = []
    for i, prompt in enumerate(work.prompts):
        firsts += run_ember(engine, Workload([prompt], [1]), name="lone", cold=i == 0).ttfts
    return firsts


def prefix_report(engine: Engine, work: Workload, args: argparse.Namespace) -> dict:
    """The same shared-prefix workload with prefix caching off and on, alternating: all requests at once,
    then each alone. Every run starts with a cold cache (a fresh engine on the same weights), so the first
    request computes the prefix."""
    runs, lone = [], []
    for attempt in range(args.repeat):
        progress(f"run {attempt + 1}/{args.repeat}")
        engines = [Engine(engine.model, engine.tokenizer, replace(engine.config, prefix_caching=cached))
                   for cached in (False, True)]
        runs.append([run_ember(e, work, name=f"ember, prefix cache {'on' if e.config.prefix_caching else 'off'}")
                     for e in engines])
        engines = [Engine(engine.model, engine.tokenizer, e.config) for e in engines]
        lone.append([statistics.median(lone_ttfts(e, work)) for e in engines])
    ttft = [off.summary()["ttft_p50_s"] / max(on.summary()["ttft_p50_s"], 1e-9) for off, on in runs]
    lone_ratios = [off / on for off, on in lone]
    throughput = [on.tokens_per_s / off.tokens_per_s for off, on in runs]
    off, on = runs[-1]
    return {"runs": [[r.summary() for r in results] for results in runs],
            "ttft_p50_ratio": round(statistics.median(ttft), 3), "ttft_p50_ratios": [round(r, 3) for r in ttft],
            "lone_ttft_p50_s": [[round(s, 4) for s in pair] for pair in lone],
            "lone_ttft_p50_ratio": round(statistics.median(lone_ratios), 3),
            "throughput_ratio": round(statistics.median(throughput), 3),
            "throughput_ratios": [round(r, 3) for r in throughput],
            "identical_greedy_outputs": sum(a == b for a, b in zip(off.outputs, on.outputs))}


def _print_prefix(report: dict, args: argparse.Namespace) -> int:
    print(f"{'run':<5}{'engine':<26}{'tok/s':>10}{'seconds':>10}{'p50 ttft':>10}{'p90 ttft':>10}")
    for attempt, summaries in enumerate(report["runs"], start=1):
        for r in summaries:
            print(f"{attempt:<5}{r['engine']:<26}{r['output_tokens_per_s']:>10.1f}{r['seconds']:>10.2f}"
                  f"{r['ttft_p50_s']:>10.3f}{r['ttft_p90_s']:>10.3f}")
    print(f"p50 time to first token, all at once, off / on: {report['ttft_p50_ratio']:.2f}x "
          f"(runs {', '.join(f'{r:.2f}' for r in report['ttft_p50_ratios'])})")
    print(f"p50 time to first token, one at a time, off / on: {report['lone_ttft_p50_ratio']:.2f}x "
          f"(runs, s: {', '.join(f'{off:.3f} / {on:.3f}' for off, on in report['lone_ttft_p50_s'])})")
    print(f"throughput, on / off: {report['throughput_ratio']:.2f}x "
          f"(runs {', '.join(f'{r:.2f}' for r in report['throughput_ratios'])})")
    print(f"greedy outputs identical with and without the cache: {report['identical_greedy_outputs']}/{args.requests}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _print_and_save_precisions(model_dir: Path, args: argparse.Namespace) -> int:
    # Natural text, not random ids: on noise every logit is a near-tie and agreement would measure nothing.
    work = text_workload(model_dir, args.requests, tuple(args.prompt_len), tuple(args.output_len), args.seed)
    report = precision_report(model_dir, work, args.precisions.split(","), EngineConfig(device=args.device), progress)
    print_precisions(report, args.requests)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def ensure_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    directory = DEFAULT_MODEL_DIR / args.preset
    if not (directory / "config.json").exists():
        progress(f"generating the {args.preset} model in {directory} (once)")
        if args.preset in FAMILY_PRESETS:
            family, shape = FAMILY_PRESETS[args.preset]
            make_family_model(directory, family, seed=0, init_std=0.02, **shape)
        else:
            make_model(directory, args.preset, seed=0)
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime.devtools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: generate --preset)")
    parser.add_argument("--preset", default="bench-100m", help="tiny-model preset to generate when --model is not "
                        "given (tinymodels.PRESETS, or FAMILY_PRESETS: mixtral-170m for the Mixture-of-Experts path)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "int8", "int4", "fp8"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' generate()")
    parser.add_argument("--lora", action="store_true",
                        help="multi-LoRA mode: base-only, 1, 4 and 16 distinct adapters, and transformers+PEFT")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="decode steps through torch.compile (as replicas run)")
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="prefix-cache mode: every prompt starts with the same TOKENS-token system prompt; "
                             "prefix caching off against on")
    parser.add_argument("--precisions", help="precision mode: comma-separated precisions, the first the reference "
                                             "(e.g. fp32,bf16,int8,int4): perplexity, greedy agreement, speed, bytes")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the engines this many times; report medians")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--url", help="HTTP mode: drive the server at this URL instead of an in-process engine")
    parser.add_argument("--api-key", default="", help="HTTP mode: the API key")
    parser.add_argument("--served-model", help="HTTP mode: the model (or addon) name to request")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP mode: requests in flight at once")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url:
        if not args.served_model:
            parser.error("--url needs --served-model")
        return http_main(args)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model_dir = ensure_model(args)
    if args.precisions:
        return _print_and_save_precisions(model_dir, args)
    config = EngineConfig(device=args.device, precision=args.dtype, max_loras=16 if args.lora else 0,
                          max_lora_rank=args.lora_rank, compile=args.compile)
    progress(f"loading {model_dir}")
    engine = Engine.from_dir(model_dir, config)
    weights = engine.model.weights
    vocab = engine.model.config.vocab_size
    work = make_workload(args.requests, tuple(args.prompt_len), tuple(args.output_len), vocab, args.seed)
    if args.shared_prefix:
        work = with_shared_prefix(work, args.shared_prefix, vocab, args.seed)
    print(f"model: {model_dir} ({weights.parameter_count / 1e6:.1f}M parameters, {weights.dtype}, {weights.device}); "
          f"threads: {torch.get_num_threads()}")
    print(f"work: {args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens "
          f"({sum(map(len, work.prompts))} in all), outputs {args.output_len[0]}-{args.output_len[1]} "
          f"({work.output_tokens} in all), seed {args.seed}, greedy")

    run_ember(engine, make_workload(2, (8, 16), (4, 4), engine.model.config.vocab_size, args.seed + 1))  # warm-up
    if args.lora:
        return _print_lora(lora_report(engine, model_dir, work, args), args)
    if args.shared_prefix:
        return _print_prefix(prefix_report(engine, work, args), args)
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


def _print_lora(report: dict, args: argparse.Namespace) -> int:
    results = report.pop("_results")
    print(f"{'engine':<22}{'tok/s':>10}{'seconds':>10}{'p50 lat':>10}{'p90 lat':>10}")
    for r in results:
        s = r.summary()
        print(f"{r.name:<22}{s['output_tokens_per_s']:>10.1f}{s['seconds']:>10.2f}{s['latency_p50_s']:>10.2f}{s['latency_p90_s']:>10.2f}")
    print(f"16 distinct adapters cost {report['cost_of_16_adapters'] * 100:.1f}% of base-only throughput")
    if "ratio_16_adapters_vs_peft" in report:
        print(f"throughput ratio ember / transformers+peft (16 distinct adapters): {report['ratio_16_adapters_vs_peft']:.2f}x")
        print(f"greedy outputs identical to transformers+peft: {report['identical_greedy_outputs_vs_peft']}/{len(results[0].outputs)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
