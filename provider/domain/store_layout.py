"""Where each thing lives in the model store: string arithmetic only, so a Kubernetes program can name the URLs
its pods will read without reaching the store, and a replica can find a model's manifest by its name.

Layout under the store root:

    objects/<digest>/...                        a model or adapter directory, content-addressed
    models/<account>/<model_id>.json            its manifest: kind, digest, architecture, parameters …
    deployments/<account>/<deployment>/addons.json   {addon name: object URL}: what replicas must serve
    deployments/<account>/<deployment>/deployment.json   its record: base model, max_lora_rank, cluster …
    replicas/<account>/<deployment>/<replica>.json   a running replica's registration: its URL, the addons it holds
    gateways/<account>/<gateway_id>.json        the store's gateway: its settings (rate limits, retries)
    datasets/<account>/<dataset_id>.json        a dataset's record: digest of its object (holding DATASET_FILE), counts
    fine-tuning-jobs/<account>/<job_id>.json    a finished job's record: the addon it trained, its metrics
    fine-tuning-runs/<account>/<job_id>/<key>/  what a Kubernetes training pod wrote: adapter/, result.json
    catalog/<model_id>/...                      catalog weights an operator put there
    keys.json, usage/                           API key hashes; usage records the replicas write
    audit/<account>/<YYYY-MM-DD>/<time>-<hex>.json   one admin action each (audit.py): metadata only
"""

from __future__ import annotations

DATASET_FILE = "dataset.jsonl"  # the one file of a dataset's object


class StoreLayout:
    """Where each thing lives under a store root (a URL or an fsspec path)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def object(self, digest: str) -> str:
        return self._join("objects", digest.removeprefix("sha256:"))

    def uploads(self, name: str = "*") -> str:
        return self._join("objects", f".upload-{name}")

    def catalog(self, catalog_id: str) -> str:
        return self._join("catalog", catalog_id)

    def manifest(self, account: str, model_id: str) -> str:
        return self._join("models", account, f"{model_id}.json")

    def deployment(self, account: str, deployment: str) -> str:
        return self._join("deployments", account, deployment)

    def desired_addons(self, account: str, deployment: str) -> str:
        return f"{self.deployment(account, deployment)}/addons.json"

    def deployment_record(self, account: str, deployment: str) -> str:
        return f"{self.deployment(account, deployment)}/deployment.json"

    def replicas(self, account: str, deployment: str) -> str:
        """The registrations of a deployment's running replicas (beside its record, not under it: a replica that
        drains after its deployment was deleted must not bring the deployment's folder back)."""
        return self._join("replicas", account, deployment)

    def replica(self, account: str, deployment: str, replica: str) -> str:
        return f"{self.replicas(account, deployment)}/{replica}.json"

    def gateway(self, account: str, gateway_id: str) -> str:
        return self._join("gateways", account, f"{gateway_id}.json")

    def dataset(self, account: str, dataset_id: str) -> str:
        return self._join("datasets", account, f"{dataset_id}.json")

    def fine_tuning_job(self, account: str, job_id: str) -> str:
        return self._join("fine-tuning-jobs", account, f"{job_id}.json")

    def fine_tuning_run(self, account: str, job_id: str, key: str) -> str:
        """Where a Kubernetes training pod writes the adapter (adapter/) and its metrics (result.json)."""
        return self._join("fine-tuning-runs", account, job_id, key)

    @property
    def usage(self) -> str:
        """The usage folder: each deployment's replicas write `<deployment>/` in it; fine-tuning runs `fine-tuning/`."""
        return self._join("usage")

    @property
    def audit(self) -> str:
        """The audit folder: one object per admin action, by account and day (domain/audit.py)."""
        return self._join("audit")

    @property
    def keys(self) -> str:
        return self._join("keys.json")
