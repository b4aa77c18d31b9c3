"""What a change costs in time on the local cluster, through the gateway, with the quickstart model:

    ember import-gguf "$(python -c 'from ember.provider.tools import quickstart; print(quickstart.smollm2_gguf())')" \
        .ember/bench/smollm2                                             # SmolLM2-135M-Instruct, once
    python -m ember.provider.tools.bench_changes --model .ember/bench/smollm2

A stack (the offline runner) with one deployment that scales to zero after `--idle` seconds and the gateway. Measured:

1. **Cold start**, `--repeat` times: once the deployment is at zero, a streamed request is sent through the gateway;
   from sending it to its first token, with its parts as the new replica logs them (interpreter and imports, weights,
   addons: "ready … after the process started") and the rest (the gateway noticing, the process being spawned, its
   registration being read, the first token computed).
2. **Replacement**: the deployment's precision is changed and `up` run; from `up` to the old replica gone, with its parts:
   the new replica ready, the `up` returning, the old one drained.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import httpx

from ember.provider.backends.processes import alive
from ember.provider.providers.base import ProviderConfig
from ember.provider.tools.runner import OfflineRunner

ACCOUNT, DEPLOYMENT = "bench", "cold"
PROGRAM = '''
import json
import pulumi
from ember.provider import Deployment, DeploymentArgs, Gateway, GatewayArgs, Model, ModelArgs

s = json.load(open("settings.json"))
base = Model("base", ModelArgs(account_id="bench", source=s["model"]))
Deployment("cold", DeploymentArgs(account_id="bench", deployment_id="cold", base_model=base, min_replicas=0,
                                  max_replicas=1, precision=s["precision"], max_loras=1,
                                  autoscaling={"scale_to_zero_window_s": s["idle"]}))
pulumi.export("gateway", Gateway("front", GatewayArgs(account_id="bench")).url)
'''
READY_LINE = re.compile(r"ready ([\d.]+) s after the process started: start-up ([\d.]+) s, weights ([\d.]+) s, "
                        r"compiling ([\d.]+) s, addons ([\d.]+) s")
REFRESH_S = 1.0  # how often the gateway reads the store
PARTS = ("ready", "start-up", "weights", "compiling", "addons")


def replica_pids(state: Path) -> list[int]:
    path = state / "replicas" / ACCOUNT / f"{DEPLOYMENT}.json"
    return [r["pid"] for r in json.loads(path.read_text()) if alive(r["pid"])] if path.exists() else []


def wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_changes: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.05)


def newest_ready_line(state: Path, since: float) -> dict[str, float]:
    """The parts of the start of the replica whose log was written last after `since` (a wall-clock time)."""
    logs = [p for p in (state / "logs" / ACCOUNT).glob(f"{DEPLOYMENT}-*.log") if p.stat().st_mtime >= since]
    for log in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        found = READY_LINE.findall(log.read_text())
        if found:
            return dict(zip(PARTS, map(float, found[-1])))
    return {}


def first_token_s(url: str, key: str, model: str) -> float:
    sent = time.perf_counter()
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=300) as response:
        if response.status_code != 200:
            raise SystemExit(f"bench_changes: the gateway answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text": ""' not in line:
                return time.perf_counter() - sent
    raise SystemExit("bench_changes: the stream ended without a token")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a Hugging Face model directory")
    parser.add_argument("--repeat", type=int, default=3, help="cold starts measured (default %(default)s)")
    parser.add_argument("--idle", type=int, default=5, help="scale_to_zero_window_s (default %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ember-bench-changes-") as tmp:
        program, state = Path(tmp) / "program", Path(tmp) / "state"
        program.mkdir()
        (program / "Pulumi.yaml").write_text("name: bench-changes\nruntime: python\n")
        (program / "__main__.py").write_text(PROGRAM)
        settings = {"model": str(args.model.resolve()), "precision": "fp32", "idle": args.idle}
        (program / "settings.json").write_text(json.dumps(settings))
        runner = OfflineRunner(program, config=ProviderConfig(state, f"file://{state / 'store'}", 600.0),
                               log=lambda line: None)
        try:
            url = runner.up()["gateway"]
            key = (state / "keys" / f"{ACCOUNT}.key").read_text().strip()
            model = f"accounts/{ACCOUNT}/models/base"
            print(f"cold start from zero through the gateway ({args.repeat} runs; parts as the replica logs them):")
            print(f"{'run':>4} {'first token s':>14} {'process→ready s':>16} {'start-up s':>11} {'weights s':>10} "
                  f"{'compiling s':>12} {'addons s':>9} {'rest s':>7}")
            for run in range(1, args.repeat + 1):
                running = replica_pids(state)
                wait(lambda: not replica_pids(state) and not any(alive(p) for p in running), args.idle + 180,
                     "scaling to zero")
                time.sleep(2 * REFRESH_S)  # the gateway has read that the replica is gone: a cold start from here
                began = time.time()
                ttft = first_token_s(url, key, model)
                parts = newest_ready_line(state, began)
                print(f"{run:>4} {ttft:>14.2f} {parts.get('ready', float('nan')):>16.2f} "
                      f"{parts.get('start-up', float('nan')):>11.2f} {parts.get('weights', float('nan')):>10.2f} "
                      f"{parts.get('compiling', float('nan')):>12.2f} {parts.get('addons', float('nan')):>9.2f} "
                      f"{ttft - parts.get('ready', float('nan')):>7.2f}")
            first_token_s(url, key, model)  # a replica running, for the replacement
            old = replica_pids(state)
            settings["precision"] = "bf16"
            (program / "settings.json").write_text(json.dumps(settings))
            began, wall = time.perf_counter(), time.time()
            runner.up()
            returned = time.perf_counter() - began
            wait(lambda: not any(alive(p) for p in old), 300, "the old replica's exit")
            gone = time.perf_counter() - began
            parts = newest_ready_line(state, wall)
            print(f"\nreplacement (precision fp32 → bf16), from `up` to the old replica gone: {gone:.2f} s "
                  f"(new replica ready {parts.get('ready', float('nan')):.2f} s after its process started: start-up "
                  f"{parts.get('start-up', float('nan')):.2f} s, weights {parts.get('weights', float('nan')):.2f} s, "
                  f"compiling {parts.get('compiling', float('nan')):.2f} s; `up` returned at {returned:.2f} s, the "
                  f"old one drained and stopped by then)")
        finally:
            runner.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
