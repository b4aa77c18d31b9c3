"""Shared helpers for provider tests: an isolated state directory and tiny model files."""

import json
from pathlib import Path

from ember.provider.backends import processes
from ember.provider.domain.kinds import BY_NAME
from ember.provider.providers.base import ProviderConfig
from ember.runtime.devtools import tinymodels


def config(tmp_path: Path, timeout: float = 120) -> ProviderConfig:
    state = tmp_path / "state"
    return ProviderConfig(state, f"file://{state / 'store'}", timeout)


def provider(kind: str, cfg: ProviderConfig):
    p = BY_NAME[kind].provider_class()
    p._config = cfg
    return p


def make_models(root: Path, seed: int = 0) -> dict[str, Path]:
    base = tinymodels.make_model(root / "base", "tiny", seed=seed)
    return {
        "base": base,
        "pirate": tinymodels.make_lora(base, root / "pirate", rank=4, seed=seed + 1),
        "poet": tinymodels.make_lora(base, root / "poet", rank=8, seed=seed + 2, target_modules=("q_proj", "down_proj")),
    }


def store_entries(cfg: ProviderConfig) -> list[str]:
    """Files a stack leaves in the store, apart from account data (keys, usage records, the audit log)."""
    root = cfg.state_dir / "store"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] not in ("keys.json", "usage", "audit"))


alive = processes.alive


def gateway_pid(cfg: ProviderConfig, account: str, gateway_id: str) -> int | None:
    path = cfg.state_dir / "gateways" / account / f"{gateway_id}.json"
    return json.loads(path.read_text())[0]["pid"] if path.exists() else None


def replica_pids(cfg: ProviderConfig, account: str, deployment: str) -> list[int]:
    path = cfg.state_dir / "replicas" / account / f"{deployment}.json"
    return [r["pid"] for r in json.loads(path.read_text())] if path.exists() else []


def served_addons(endpoint: str, cfg: ProviderConfig, account: str) -> set[str]:
    """The addons a replica serves, as its owner asks (/health names none: it is unauthenticated)."""
    import httpx

    key = (cfg.state_dir / "keys" / f"{account}.key").read_text().strip()
    response = httpx.get(f"{endpoint}/admin/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    response.raise_for_status()
    return set(response.json()["served"])
