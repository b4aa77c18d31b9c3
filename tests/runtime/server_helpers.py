"""Start real runtime servers on loopback ports for tests, with a tiny model, two addons and two accounts."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ember.provider.domain.accounts import Accounts
from ember.runtime.devtools import tinymodels

BASE = "accounts/acme/models/tiny-llama"
# A serverless deployment serves a catalog base (the operator's weights; tiny ones here), never a custom one.
SERVERLESS_BASE = "accounts/platform/models/llama-v3p1-8b-instruct"
PIRATE = "accounts/acme/models/pirate"
POET = "accounts/acme/models/poet"


@dataclass
class Server:
    url: str
    root: Path
    model_dir: Path
    keys: dict[str, str]  # account → plain key
    log: Path
    process: subprocess.Popen
    adapters: dict[str, Path] = field(default_factory=dict)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(root: Path) -> tuple[Path, dict[str, Path]]:
    base = tinymodels.make_model(root / "models" / "tiny-llama", "tiny", seed=3, init_std=0.1)
    adapters = {
        PIRATE: tinymodels.make_lora(base, root / "models" / "pirate", rank=4, seed=1, init_std=0.1),
        POET: tinymodels.make_lora(base, root / "models" / "poet", rank=8, seed=2, init_std=0.1,
                                   target_modules=("q_proj", "v_proj", "down_proj")),
    }
    return base, adapters


def write_addon_manifest(store: Path, name: str, directory: Path, base_model: str = BASE) -> Path:
    """An addon's manifest in a store (the fields a replica reads), its object the adapter directory itself."""
    _, account, _, model_id = name.split("/")
    path = store / "models" / account / f"{model_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "HF_PEFT_ADDON", "name": name, "base_model": base_model,
                                "object": str(directory), "digest": "sha256:" + "0" * 64}))
    return path


def start(root: Path, *, deployment: str = "accounts/acme/deployments/tiny", serverless: bool = False,
          max_queue: int = 64, extra: list[str] = (), accounts=("acme", "other"),
          models: tuple[Path, dict[str, Path]] | None = None) -> Server:
    """A replica of `models` (a base directory and its addons; the tiny ones by default), serving them as BASE
    (SERVERLESS_BASE when serverless) and its addons."""
    root.mkdir(parents=True, exist_ok=True)
    base, adapters = models or make_models(root)
    keys_file = root / "keys.json"
    keys = {account: Accounts.add_key(keys_file, account) for account in accounts}
    base_model = SERVERLESS_BASE if serverless else BASE
    store = root / "store"  # where the admin API finds addons by name: a manifest per addon, as the provider writes
    for name, directory in adapters.items():
        write_addon_manifest(store, name, directory, base_model)
    port = free_port()
    log = root / "server.log"
    args = [sys.executable, "-m", "ember.runtime", "serve", "--model-dir", str(base), "--deployment", deployment,
            "--base-model", base_model, "--keys", str(keys_file), "--usage", str(root / "usage"), "--port", str(port),
            "--max-queue", str(max_queue), "--max-loras", "4", "--max-lora-rank", "8", "--threads", "1",
            "--max-model-len", "512", "--store", str(store), *[f"--addon={n}={p}" for n, p in adapters.items()],
            *extra]
    if serverless:
        args.append("--serverless")
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=root,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", root, base, keys, log, process, adapters)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not ready in time: {log.read_text()[-2000:]}")


def usage_records(server: Server) -> list[dict]:
    records = []
    for path in sorted((server.root / "usage").rglob("requests-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def metrics_text(server: Server) -> str:
    """/metrics as the deployment's operator reads it (with its own account's key)."""
    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.keys['acme']}"}, timeout=10)
    response.raise_for_status()
    return response.text
