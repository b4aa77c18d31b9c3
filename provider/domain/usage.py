"""Usage records: metadata only, for per-token and per-GPU-second billing.

Each finished request appends one JSON line — time, account, model, deployment, token counts, latency,
status — to a file of this replica under the usage URL (an fsspec URL: a local directory by default, the
model store in a cluster). A replica also writes its own record: when it started, what accelerators it
holds, whether it is serverless (billed per token) or dedicated (billed per GPU-second), its base model
(serverless prices go by its size), and when it was last seen. A fine-tuning run writes one record of the
tokens it trained on (billed per training token). Never any prompt, output or dataset text. Billing also reads
each serverless deployment's shutdown date from its record: no token is billed from that day on.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import date

import fsspec

from ember.provider.domain.records import DeploymentRecord
from ember.provider.domain.store_layout import StoreLayout


@dataclass(frozen=True)
class UsageRecord:
    time: float
    account_id: str
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: str  # "ok" | "aborted" | "error"
    replica: str
    response_id: str = ""  # the response's id (cmpl-…, chatcmpl-…): a bill line matched to a response
    user: str = ""  # the request's `user` field: the caller's own label for its end user, kept as metadata


class Meter:
    def __init__(self, url: str, deployment: str, accelerator_type: str = "CPU", accelerator_count: int = 1,
                 base_model: str = "", serverless: bool = False):
        """`url` is the usage folder (the store's `usage/`): this deployment's records go in `<url>/<deployment>/`."""
        self.fs, root = fsspec.core.url_to_fs(url)
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.deployment = deployment
        safe = deployment.replace("/", "_")
        self.dir = f"{root.rstrip('/')}/{safe}"
        self.fs.makedirs(self.dir, exist_ok=True)
        self.requests_path = f"{self.dir}/requests-{self.replica}.jsonl"
        self.replica_path = f"{self.dir}/replica-{self.replica}.json"
        self.started = time.time()
        self.accelerator_type, self.accelerator_count = accelerator_type, accelerator_count
        self.base_model, self.deployment_type = base_model, "serverless" if serverless else "dedicated"
        self._lock = threading.Lock()
        self.heartbeat()

    def record(self, account_id: str, model: str, prompt_tokens: int, completion_tokens: int, latency_s: float,
               status: str, response_id: str = "", user: str = "") -> UsageRecord:
        record = UsageRecord(time.time(), account_id, model, self.deployment, prompt_tokens, completion_tokens,
                             round(latency_s, 6), status, self.replica, response_id, user)
        line = json.dumps(asdict(record)) + "\n"
        with self._lock, self.fs.open(self.requests_path, "a") as f:
            f.write(line)
        return record

    def heartbeat(self) -> None:
        data = {"replica": self.replica, "deployment": self.deployment, "started": self.started,
                "last_seen": time.time(), "accelerator_type": self.accelerator_type,
                "accelerator_count": self.accelerator_count, "base_model": self.base_model,
                "deployment_type": self.deployment_type}
        with self._lock:
            self.fs.pipe_file(self.replica_path, json.dumps(data).encode())

    def read(self, account_id: str) -> list[dict]:
        """One account's usage records on this deployment, from every replica's file."""
        return [r for r in _read_records(self.fs, f"{self.dir}/requests-*.jsonl") if r["account_id"] == account_id]


def read_usage(url: str) -> list[dict]:
    """Every usage record under a usage URL (all deployments, all replicas)."""
    fs, root = fsspec.core.url_to_fs(url)
    return _read_records(fs, f"{root}/usage/*/requests-*.jsonl")


def _read_records(fs, pattern: str) -> list[dict]:
    records = []
    for path in sorted(fs.glob(pattern)):
        # A replica may be appending right now: a last line without its newline is not a record yet.
        *lines, _partial = fs.cat_file(path).decode().split("\n")
        records += [json.loads(line) for line in lines if line]
    return records


def read_replicas(url: str) -> list[dict]:
    """Every replica record under a usage URL: what ran, on what, from when to when."""
    fs, root = fsspec.core.url_to_fs(url)
    return [json.loads(fs.cat_file(path)) for path in sorted(fs.glob(f"{root}/usage/*/replica-*.json"))]


def read_shutdowns(url: str) -> dict[str, date]:
    """Each serverless deployment's shutdown date (by its name), from the deployment records under a store URL: its
    tokens from that day on are not billed."""
    fs, root = fsspec.core.url_to_fs(url)
    shutdowns = {}
    for path in sorted(fs.glob(StoreLayout(root).deployment_record("*", "*"))):
        try:
            record = DeploymentRecord.model_validate(json.loads(fs.cat_file(path)))
        except FileNotFoundError:  # deleted meanwhile
            continue
        except ValueError as exc:  # a bill must not quietly charge what a record it cannot read says not to
            raise ValueError(f"{path}: {exc}") from None
        if record.serverless and record.shutdown_date is not None:
            shutdowns[record.name] = record.shutdown_date
    return shutdowns


def record_training(url: str, account_id: str, job: str, base_model: str, parameter_count: int, trained_tokens: int,
                    duration_s: float) -> dict:
    """One record per finished fine-tuning run (a replaced job that trains again is billed again)."""
    fs, root = fsspec.core.url_to_fs(url)
    record = {"time": time.time(), "account_id": account_id, "job": job, "base_model": base_model,
              "parameter_count": parameter_count, "trained_tokens": trained_tokens, "duration_s": duration_s}
    directory = f"{root}/usage/fine-tuning"
    fs.makedirs(directory, exist_ok=True)
    fs.pipe_file(f"{directory}/{job.replace('/', '_')}-{uuid.uuid4().hex[:8]}.json", json.dumps(record).encode())
    return record


def read_training(url: str) -> list[dict]:
    """Every fine-tuning record under a usage URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return [json.loads(fs.cat_file(path)) for path in sorted(fs.glob(f"{root}/usage/fine-tuning/*.json"))]
