"""One replica's spec: everything a runtime replica needs to know about the deployment it serves, as one typed
document that crosses the process boundary whole.

The provider builds it from a DeploymentSpec (`replica_spec`) and hands it to every cluster the same way: the local
cluster writes it to a file and starts `serve --replica-spec FILE`, Kubernetes puts it in a ConfigMap mounted into
the pod. `ember serve`'s hand flags build the same document, so there is one path from arguments to the runtime's
configs. What belongs to one process rather than to the deployment (its address, CPU threads, whether it compiles,
its per-client limits, its reconcile timer) stays a flag of that process.

Each default is named once: the LoRA ones in spec.py (a DeploymentSpec has them too), the rest on the fields here;
`None` on an engine knob means the engine's own default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.spec import (DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, MAX_LORA_RANK, MAX_RETENTION_DAYS,
                                        AcceleratorType, DeploymentName, DeploymentType, ModelName, Precision,
                                        SpecError, parse)
from ember.provider.domain.store_layout import StoreLayout

__all__ = ["DEFAULT_MAX_LORAS", "DEFAULT_MAX_LORA_RANK", "DEFAULT_MAX_QUEUE", "REPLICA_SPEC_VERSION", "ReplicaSpec",
           "RequestLogTarget", "read_replica_spec", "replica_spec", "serve_command", "write_replica_spec"]

DEFAULT_MAX_QUEUE = 64  # waiting requests a replica holds before it answers 429
# The document's version: a runtime refuses a spec of another by saying so, not by naming a field it does not know
# (on Kubernetes the runtime image and the provider that writes the spec are upgraded apart).
REPLICA_SPEC_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestLogTarget(_Frozen):
    """Where a deployment that opted in to request logging writes prompts and outputs, and for how long."""

    url: str = Field(min_length=1, description="a file path or fsspec URL")
    retention_days: int = Field(ge=1, le=MAX_RETENTION_DAYS)


class ReplicaSpec(_Frozen):
    """What one replica serves and how: written by the provider (or built from `serve`'s hand flags), read by
    `ember serve --replica-spec`. schema/replica_spec.json is its JSON Schema."""

    version: Literal[1] = Field(REPLICA_SPEC_VERSION, description="the document's version")
    # whom it serves, and what
    model: str = Field(min_length=1, description="the base weights: a Hugging Face directory's path or store URL")
    deployment: DeploymentName
    base_model: ModelName = Field(description="the name clients use for the base model")
    serverless: bool = Field(False, description="serve every account (addons only to their owners)")
    addons: dict[ModelName, str] = Field(default_factory=dict, description="served from the start: name → source")
    # where in the store it reads and writes
    keys: str = Field(min_length=1, description="the API keys file (hashes)")
    usage: str = Field(min_length=1, description="the usage folder: the records go in <usage>/<deployment>/")
    store: str | None = Field(None, description="the store's root: the admin API finds addons there by model name")
    desired_addons: str | None = Field(None, description="JSON {name: source}, reconciled on a timer and on demand")
    # on what, and how
    precision: Precision | None = Field(None, description="default: fp32 on CPU, bf16 on accelerators")
    max_loras: int = Field(DEFAULT_MAX_LORAS, ge=0, le=128, description="LoRA slots on the device; 0: base only")
    max_lora_rank: int = Field(DEFAULT_MAX_LORA_RANK, ge=1, le=MAX_LORA_RANK)
    accelerator_type: AcceleratorType = AcceleratorType.CPU
    accelerator_count: int = Field(1, ge=1)
    request_log: RequestLogTarget | None = Field(None, description="opt-in: prompts and outputs are logged only here")
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=1, description="waiting requests beyond this get 429")
    prefix_caching: bool = Field(True, description="reuse the K/V of shared prompt prefixes")
    max_model_len: int | None = Field(None, ge=1, description="prompt + output tokens (default: the model's)")
    kv_cache_tokens: int | None = Field(None, ge=1, description="KV cache size (default: the engine's)")
    max_num_seqs: int | None = Field(None, ge=1, description="requests in one step (default: the engine's)")
    device: str = Field("auto", min_length=1, description="a torch device; auto picks CUDA when present")

    def to_json(self) -> str:
        """The document as written: sorted, so one spec is always the same text (Kubernetes digests it)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1)


def replica_spec(deployment: DeploymentSpec, model: str, store: StoreLayout, request_log: str | None) -> ReplicaSpec:
    """The spec of `deployment`'s replicas: the base weights at `model`, the store's keys, usage and desired addon
    set, and (if the deployment opted in) its request log at `request_log`."""
    opt_in = deployment.request_logging
    if opt_in.enabled and not request_log:
        raise ValueError(f"request_log: {deployment.name} opts in to request logging, so its replicas need a place "
                         f"to write it (got {request_log!r})")
    return ReplicaSpec(
        model=model, deployment=deployment.name, base_model=deployment.base_model,
        serverless=deployment.deployment_type is DeploymentType.SERVERLESS,
        keys=store.keys, usage=store.usage, store=store.root,
        desired_addons=store.desired_addons(deployment.account_id, deployment.deployment_id),
        precision=deployment.precision, max_loras=deployment.max_loras, max_lora_rank=deployment.max_lora_rank,
        accelerator_type=deployment.accelerator_type, accelerator_count=deployment.accelerator_count,
        request_log=RequestLogTarget(url=request_log, retention_days=opt_in.retention_days) if opt_in.enabled else None)


def serve_command(spec_file: str) -> list[str]:
    """`python -m ember.runtime` arguments that serve the spec in `spec_file` (a cluster adds the address)."""
    return ["serve", "--replica-spec", spec_file]


def write_replica_spec(spec: ReplicaSpec, path: Path) -> None:
    """Written aside and renamed, so a replica starting meanwhile reads the old spec or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(spec.to_json())
    staged.replace(path)


def read_replica_spec(url: str) -> ReplicaSpec:
    """The spec in a file (a path or fsspec URL). Raises SpecError naming each bad field and its value, or OSError."""
    with fsspec.open(url, "r") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError("ReplicaSpec", [("", f"is not JSON: {exc}")]) from None
    version = data.get("version", REPLICA_SPEC_VERSION) if isinstance(data, dict) else REPLICA_SPEC_VERSION
    if version != REPLICA_SPEC_VERSION:
        raise SpecError("ReplicaSpec", [("version", f"this runtime reads replica spec version {REPLICA_SPEC_VERSION}, "
                                                    f"not {version!r}: run a runtime as new as the provider that wrote it")])
    return parse(ReplicaSpec, data)
