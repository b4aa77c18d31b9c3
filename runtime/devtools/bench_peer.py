"""Ember's server against llama.cpp's llama-server on the same model, the same HTTP workload, the same cores.

    python -m ember.runtime.devtools.bench_peer --model DIR --dtype fp32 \\
        --peer-server /path/to/llama-server --peer-gguf model-F32.gguf --plot peer.png

Both servers are started here (on loopback ports, with the same thread count) and driven one after the
other with the same streamed /v1/completions requests: token-id prompts cut from a fixed English text,
greedy, EOS ignored, so both do exactly the same work, at each concurrency in turn. Reported per server
and concurrency: output tokens/s, time to first token and inter-token latency p50/p99; `--plot` draws
them. llama-server is not a dependency: build it from llama.cpp's source (the README says how).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ember.provider.domain.accounts import Accounts
from ember.runtime.devtools.bench import http_run
from ember.runtime.devtools.bench_precisions import text_workload
from ember.runtime.devtools.workload import Workload, percentile, progress

BASE_MODEL = "accounts/bench/models/base"  # the name Ember serves the model under (llama-server ignores it)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx  # a dev dependency (the HTTP benchmark's client), not the runtime's

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready in {timeout:.0f} s: {log.read_text()[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ember(model_dir: Path, dtype: str, threads: int, root: Path,
                compile: bool = True) -> tuple[subprocess.Popen, str, str]:
    key = Accounts.add_key(root / "keys.json", "bench")
    port = free_port()
    args = [sys.executable, "-m", "ember.runtime", "serve", "--model-dir", str(model_dir),
            "--deployment", "accounts/bench/deployments/peer", "--base-model", BASE_MODEL,
            "--keys", str(root / "keys.json"), "--usage", str(root / "usage"), "--port", str(port),
            "--dtype", dtype, "--threads", str(threads), "--max-model-len", "2048", "--max-queue", "256",
            "--compile" if compile else "--no-compile"]
    log = root / "ember.log"
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, log)
    return process, url, key


def start_peer(server: Path, gguf: Path, threads: int, slots: int, root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [str(server), "-m", str(gguf), "-t", str(threads), "-np", str(slots), "-c", str(2048 * slots),
            "--host", "127.0.0.1", "--port", str(port)]
    log = root / "llama-server.log"
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, log)
    return process, url


def summarize(name: str, concurrency: int, result, gaps: list[float]) -> dict:
    return {"server": name, "concurrency": concurrency, "output_tokens": result.output_tokens,
            "output_tokens_per_s": round(result.tokens_per_s, 2),
            **{f"{metric}_p{q}_ms": round(percentile(values, q) * 1000, 2)
               for metric, values in (("ttft", result.ttfts), ("itl", gaps)) for q in (50, 99)}}


def drive(servers: dict[str, tuple[str, str, str]], workloads: list[Workload], concurrencies: list[int],
          rounds: int) -> list[dict]:
    """Each concurrency, each server (name → URL, API key, model) in turn, `rounds` times; keeps each server's
    best round by tokens/s. Every (concurrency, round) has its own workload from `workloads`, the same for
    every server: a prompt sent before would be answered from the servers' prompt caches."""
    rows = []
    fresh = iter(workloads)
    for concurrency in concurrencies:
        best: dict[str, dict] = {}
        for attempt in range(rounds):
            work = next(fresh)
            for name, (url, key, model) in servers.items():
                progress(f"{name}: concurrency {concurrency}, round {attempt + 1}/{rounds}")
                result, gaps = asyncio.run(http_run(url, key, model, work, concurrency))
                row = summarize(name, concurrency, result, gaps)
                if row["output_tokens"] != work.output_tokens:
                    raise RuntimeError(f"{name} produced {row['output_tokens']} tokens, not {work.output_tokens}")
                if name not in best or row["output_tokens_per_s"] > best[name]["output_tokens_per_s"]:
                    best[name] = row
        rows += best.values()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # pyplot is imported only once a backend without a display is chosen

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["server"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "time to first token p50 (ms)"),
              ("itl_p50_ms", "inter-token latency p50 (ms)")]
    for ax, (field, label) in zip(axes, panels):
        for name in names:
            mine = [r for r in rows if r["server"] == name]
            ax.plot([r["concurrency"] for r in mine], [r[field] for r in mine], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime.devtools.bench_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Ember's model directory (from ember import-gguf)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8", "int4", "fp8"])
    parser.add_argument("--peer-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    parser.add_argument("--peer-gguf", type=Path, required=True, help="the same model as a GGUF file for the peer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="Ember's decode steps compiled, as a replica's are by default (--no-compile: eager)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrencies")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server and concurrency; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="draw tokens/s, TTFT and inter-token latency to this PNG")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workloads = [text_workload(args.model, args.requests, tuple(args.prompt_len), tuple(args.output_len), args.seed + i)
                 for i in range(len(concurrencies) * args.rounds)]
    names = {"ember": f"ember {args.dtype}", "peer": f"llama-server {args.peer_gguf.stem.rsplit('-', 1)[-1]}"}
    with tempfile.TemporaryDirectory(prefix="ember-peer-") as tmp:
        root = Path(tmp)
        processes = []
        try:
            progress(f"starting Ember ({args.dtype}) and llama-server ({args.peer_gguf.name}), {args.threads} threads each")
            ember, ember_url, key = start_ember(args.model, args.dtype, args.threads, root, args.compile)
            processes.append(ember)
            peer, peer_url = start_peer(args.peer_server, args.peer_gguf, args.threads, max(concurrencies), root)
            processes.append(peer)
            servers = {names["ember"]: (ember_url, key, BASE_MODEL), names["peer"]: (peer_url, "none", BASE_MODEL)}
            rows = drive(servers, workloads, concurrencies, args.rounds)
        except Exception:
            for log in sorted(root.glob("*.log")):  # the temporary directory goes with them
                print(f"--- the end of {log.name}:\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
    print(f"{args.requests} requests a run, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs "
          f"{args.output_len[0]}-{args.output_len[1]}, new prompts each run, greedy, best of {args.rounds}")
    print(f"{'server':<22}{'conc':>5}{'tok/s':>9}{'ttft p50':>10}{'ttft p99':>10}{'itl p50':>9}{'itl p99':>9}")
    for r in rows:
        print(f"{r['server']:<22}{r['concurrency']:>5}{r['output_tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>10.0f}"
              f"{r['ttft_p99_ms']:>10.0f}{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>9.1f}")
    for concurrency in concurrencies:
        ours, theirs = (next(r for r in rows if r["server"] == names[k] and r["concurrency"] == concurrency)
                        for k in ("ember", "peer"))
        print(f"concurrency {concurrency}: ember / llama-server throughput "
              f"{ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
