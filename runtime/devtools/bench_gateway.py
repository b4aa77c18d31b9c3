"""The gateway's cost and its balancing, over HTTP, in one invocation:

    ember import-gguf "$(python -c 'from ember.provider.tools import quickstart; print(quickstart.smollm2_gguf())')" \
        .ember/bench/smollm2                                             # SmolLM2-135M-Instruct, once
    python -m ember.runtime.devtools.bench_gateway --model .ember/bench/smollm2 --plot gateway.png

A store is written here with one deployment, whose replicas are started by hand (`serve`, registering in the store as
the clusters' replicas do) beside a gateway (`ember gateway`). The same streamed /v1/completions workload (token-id
prompts cut from a fixed English text, as bench_peer sends, greedy, EOS ignored) is then sent:

1. straight to one replica and through the gateway, at `--concurrency` (16), alternating `--repeat` times: the gateway's
   cost in time to first token (p50, milliseconds) and in throughput (a ratio). At that concurrency the time to first
   token is mostly queueing, which varies from run to run by more than the gateway adds; so the same is measured with
   one request at a time (short prompts, two tokens each), where the difference is the gateway's own time;
2. through the gateway to one replica and to two, at twice that concurrency: what balancing across replicas gains.
   Each replica has `--replica-threads` CPU threads in both, so two replicas have twice the cores where the machine
   has them (it says how many it has).

Replicas run without prefix caching: every run sends the same prompts, and a cached one would answer sooner.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ember.provider.domain.accounts import Accounts
from ember.provider.domain.records import DeploymentRecord
from ember.provider.domain.store_layout import StoreLayout
from ember.runtime.devtools.bench import http_run
from ember.runtime.devtools.bench_peer import free_port, wait_ready
from ember.runtime.devtools.bench_precisions import text_workload
from ember.runtime.devtools.workload import Workload, percentile, progress

DEPLOYMENT = "accounts/bench/deployments/gateway"
BASE_MODEL = "accounts/bench/models/base"


def write_store(root: Path) -> str:
    """A store with the deployment's record and a key of its account; the key."""
    layout = StoreLayout(str(root))
    record = Path(layout.deployment_record("bench", "gateway"))
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(DeploymentRecord(name=DEPLOYMENT, base_model=BASE_MODEL).to_json()))
    return Accounts.add_key(root / "keys.json", "bench")


def start(arguments: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ember.runtime", *arguments, "--port", str(port)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, log)
    return process, url


def start_replica(model_dir: Path, store: Path, index: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    return start(["serve", "--model-dir", str(model_dir), "--deployment", DEPLOYMENT, "--base-model", BASE_MODEL,
                  "--keys", str(store / "keys.json"), "--usage", str(store / "usage"), "--store", str(store),
                  "--host", "127.0.0.1", "--threads", str(args.replica_threads), "--no-prefix-caching",
                  "--max-queue", "512", "--compile" if args.compile else "--no-compile",
                  *(["--dtype", args.dtype] if args.dtype else [])], store.parent / f"replica-{index}.log")


def wait_routed(store: Path, gateway: str, key: str, replicas: int) -> None:
    """Until that many replicas are registered in the store, and the gateway has read them."""
    import httpx  # the benchmark's client

    deadline = time.monotonic() + 60
    while len(list((store / "replicas" / "bench" / "gateway").glob("*.json"))) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {replicas} replicas registered in the store within 60 s")
        time.sleep(0.2)
    time.sleep(1.5)  # the gateway's next periodic read of the store
    httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).raise_for_status()


def run(url: str, key: str, work: Workload, concurrency: int) -> dict:
    result, _ = asyncio.run(http_run(url, key, BASE_MODEL, work, concurrency))
    return {"tokens_per_s": round(result.tokens_per_s, 2), "ttft_p50_ms": round(percentile(result.ttfts, 50) * 1000, 2),
            "ttft_p90_ms": round(percentile(result.ttfts, 90) * 1000, 2), "seconds": round(result.seconds, 2)}


def overhead(replica: str, gateway: str, key: str, work: Workload, args: argparse.Namespace) -> dict:
    runs = []
    for attempt in range(args.repeat):
        pair = {}
        for name, url in (("direct", replica), ("gateway", gateway))[:: 1 if attempt % 2 == 0 else -1]:
            progress(f"round {attempt + 1}/{args.repeat}: {name}, concurrency {args.concurrency}")
            pair[name] = run(url, key, work, args.concurrency)
        runs.append(pair)
    ttft = [r["gateway"]["ttft_p50_ms"] - r["direct"]["ttft_p50_ms"] for r in runs]
    ratio = [r["gateway"]["tokens_per_s"] / r["direct"]["tokens_per_s"] for r in runs]
    return {"runs": runs, "ttft_p50_added_ms": round(statistics.median(ttft), 2),
            "throughput_ratio": round(statistics.median(ratio), 4)}


def alone(replica: str, gateway: str, key: str, work: Workload, args: argparse.Namespace) -> dict:
    """Time to first token of one request at a time, straight and through the gateway, alternating."""
    direct, through = [], []
    for attempt in range(args.repeat):
        progress(f"round {attempt + 1}/{args.repeat}: one request at a time")
        for url, ttfts in ((replica, direct), (gateway, through))[:: 1 if attempt % 2 == 0 else -1]:
            ttfts.append(run(url, key, work, 1)["ttft_p50_ms"])
    return {"direct_ttft_p50_ms": direct, "gateway_ttft_p50_ms": through,
            "ttft_p50_added_ms": round(statistics.median(t - d for t, d in zip(through, direct)), 2)}


def scaling(gateway: str, key: str, work: Workload, args: argparse.Namespace, start_second) -> dict:
    concurrency = 2 * args.concurrency
    progress(f"one replica through the gateway, concurrency {concurrency}")
    one = run(gateway, key, work, concurrency)
    start_second()
    progress(f"two replicas through the gateway, concurrency {concurrency}")
    two = run(gateway, key, work, concurrency)
    return {"concurrency": concurrency, "one": one, "two": two,
            "ratio": round(two["tokens_per_s"] / one["tokens_per_s"], 3)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = report["overhead"]["runs"][-1]
    scale = report["scaling"]
    bars = {f"direct c={report['concurrency']}": last["direct"], f"gateway c={report['concurrency']}": last["gateway"],
            f"gateway, 1 replica c={scale['concurrency']}": scale["one"],
            f"gateway, 2 replicas c={scale['concurrency']}": scale["two"]}
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    throughput.bar(range(len(bars)), [b["tokens_per_s"] for b in bars.values()], color="tab:orange")
    ttft.bar(range(len(bars)), [b["ttft_p50_ms"] for b in bars.values()], color="tab:blue")
    for axis, title in ((throughput, "output tokens/s"), (ttft, "time to first token, p50 (ms)")):
        axis.set_xticks(range(len(bars)), list(bars), rotation=20, ha="right", fontsize=8)
        axis.set_title(title)
    figure.suptitle(f"Ember's gateway: {report['model']} on {report['cores']} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime.devtools.bench_gateway")
    parser.add_argument("--model", type=Path, required=True,
                        help="a Hugging Face model directory (SmolLM2's, from ember import-gguf: see above)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--concurrency", type=int, default=16, help="of the direct/gateway runs; the scaling runs "
                                                                     "send twice this")
    parser.add_argument("--repeat", type=int, default=3, help="direct and gateway runs, alternating; medians reported")
    parser.add_argument("--replica-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="replicas compile their decode steps (their default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", type=Path, help="draw throughput and time to first token to this PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = args.model
    work = text_workload(model_dir, args.requests, tuple(args.prompt_len), tuple(args.output_len), args.seed)
    warm_up = [text_workload(model_dir, n, (8, 16), (4, 4), args.seed + n) for n in (4, 8)]
    singles = text_workload(model_dir, 16, (8, 16), (2, 2), args.seed + 16)
    processes = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-gateway-") as tmp:
        store = Path(tmp) / "store"
        key = write_store(store)
        try:
            progress(f"starting a replica ({args.replica_threads} threads) and the gateway")
            replica, replica_url = start_replica(model_dir, store, 0, args)
            gateway, gateway_url = start(["gateway", "--store", str(store)], Path(tmp) / "gateway.log")
            processes += [replica, gateway]
            wait_routed(store, gateway_url, key, 1)
            run(gateway_url, key, warm_up[0], 4)

            def start_second():
                progress("starting a second replica")
                processes.append(start_replica(model_dir, store, 1, args)[0])
                wait_routed(store, gateway_url, key, 2)
                run(gateway_url, key, warm_up[1], 8)  # both warm

            report = {"model": str(model_dir), "cores": os.cpu_count(), "replica_threads": args.replica_threads,
                      "requests": args.requests, "concurrency": args.concurrency,
                      "alone": alone(replica_url, gateway_url, key, singles, args),
                      "overhead": overhead(replica_url, gateway_url, key, work, args),
                      "scaling": scaling(gateway_url, key, work, args, start_second)}
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
        print(f"plotted {args.plot}")
    return 0


def print_report(report: dict) -> None:
    print(f"model: {report['model']}; {report['cores']} cores, {report['replica_threads']} threads a replica; "
          f"{report['requests']} streamed requests a run")
    print(f"{'round':<7}{'run':<10}{'tok/s':>10}{'p50 TTFT ms':>14}{'p90 TTFT ms':>14}")
    for i, pair in enumerate(report["overhead"]["runs"], start=1):
        for name, r in pair.items():
            print(f"{i:<7}{name:<10}{r['tokens_per_s']:>10.1f}{r['ttft_p50_ms']:>14.1f}{r['ttft_p90_ms']:>14.1f}")
    overhead_ = report["overhead"]
    print(f"through the gateway at concurrency {report['concurrency']}: p50 TTFT "
          f"{overhead_['ttft_p50_added_ms']:+.1f} ms, throughput {overhead_['throughput_ratio']:.3f}x direct (medians)")
    print(f"through the gateway, one request at a time: p50 TTFT {report['alone']['ttft_p50_added_ms']:+.2f} ms "
          f"(median of the rounds' differences)")
    scale = report["scaling"]
    print(f"through the gateway at concurrency {scale['concurrency']}: one replica {scale['one']['tokens_per_s']:.1f} "
          f"tok/s, two {scale['two']['tokens_per_s']:.1f} tok/s: {scale['ratio']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
