"""The cluster a deployment's replicas, a fine-tuning job's training and the store's gateway run on, behind the one
interface the providers call: the local cluster (processes on this machine, the default) or Kubernetes (pods that
pulumi-kubernetes resources declare beside the Ember resource, and that read the store themselves).

A provider picks the implementation by the resource's `cluster` input (providers/base.py: `CLUSTERS`) and never asks
which one it has: what one cluster does itself (Kubernetes restarts pods, its pods poll the store's desired addon
set) is a no-op in its implementation, not a branch in the provider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ember.provider.backends.store import Store
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.records import BaseModelManifest


class ClusterError(RuntimeError):
    """The cluster could not do what was asked; the message says why (a replica's own words included)."""


@dataclass(frozen=True)
class ReplicaStatus:
    """What a cluster observed of a deployment's replicas."""

    endpoints: tuple[str, ...] = ()
    ready: int | None = None  # None: the cluster does not count them here (Kubernetes between rollouts)
    serving: frozenset[str] | None = None  # addons every ready replica serves; None: not observed (pods poll)

    def serves(self, addon: str) -> bool:
        """Whether the replicas serve `addon`, as far as this cluster can tell (unobserved: the store says)."""
        return self.serving is None or bool(self.ready) and addon in self.serving


@dataclass(frozen=True)
class GatewayStatus:
    """What a cluster observed of a gateway."""

    url: str | None = None
    ready: int | None = None  # None: the cluster does not count them here (Kubernetes between rollouts)


class Cluster(ABC):
    name: ClassVar[str]  # the `cluster` input that selects it
    # Whether the cluster itself restarts a replica that stops (Kubernetes does); where it does not, a refresh that
    # found fewer replicas than declared is drift, which the next `up` mends.
    restarts_replicas: ClassVar[bool] = True

    def __init__(self, state_dir: Path, ready_timeout_s: float, progress: Callable[[str], None] = lambda _: None):
        self.state_dir = Path(state_dir)
        self.ready_timeout_s = ready_timeout_s
        self.progress = progress

    @property
    def keys_dir(self) -> Path:
        """Where the provider keeps the API keys it calls replicas with (never in Pulumi state)."""
        return self.state_dir / "keys"

    @classmethod
    def check_supported(cls, spec: DeploymentSpec) -> None:
        """Raise ClusterError, naming the field, for a deployment this cluster cannot run (judged at preview)."""

    @classmethod
    def replica_count(cls, spec: DeploymentSpec, running: int | None = None) -> int:
        """The replicas an `up` leaves running: those `running` (the autoscaler's count, zero included) brought within
        the deployment's range; when none ran before (a create), the floor of the range and at least one, so that a
        create proves the replicas load."""
        if running is None:
            return max(spec.min_replicas, 1)
        return min(max(running, spec.min_replicas), spec.max_replicas)

    @abstractmethod
    def scale(self, spec: DeploymentSpec, base: BaseModelManifest, store: Store) -> ReplicaStatus:
        """Hand the deployment's replica spec to its replicas, run `replica_count` of them, and wait until they are
        ready (within the timeout), or raise ClusterError saying why not."""

    @abstractmethod
    def status(self, account: str, deployment: str, key: str | None = None) -> ReplicaStatus:
        """What runs now. Which addons the replicas serve is the owner's to ask (`key`, the deployment account's)."""

    @abstractmethod
    def reconcile_addons(self, store: Store, account: str, deployment: str, wanted: set[str],
                         unwanted: set[str]) -> None:
        """Have the replicas re-read the store's desired addon set, and check that `wanted` are served and `unwanted`
        are not; raise ClusterError with a replica's reason when one of `wanted` was refused. A cluster that asks its
        replicas does so with a key of the deployment's account (`keys_dir`), made if there is none yet."""

    @abstractmethod
    def stop(self, account: str, deployment: str) -> None:
        """Stop every replica of the deployment."""

    @abstractmethod
    def serve_gateway(self, spec: GatewaySpec, store: Store) -> GatewayStatus:
        """Run the gateway (the process or pods it already has are kept while they serve the same address; its settings
        are in the store, which it re-reads) and wait until it answers ready, or raise ClusterError saying why not: a
        gateway that cannot read the store says so."""

    @abstractmethod
    def gateway_status(self, spec: GatewaySpec) -> GatewayStatus:
        """What serves the gateway now."""

    @abstractmethod
    def stop_gateway(self, account: str, gateway_id: str) -> None:
        """Stop the gateway's processes."""

    @abstractmethod
    def train(self, spec: FineTuningJobSpec, base: BaseModelManifest, store: Store, workdir: Path,
              adapter: Path) -> dict:
        """Run (or collect) a fine-tuning job's training: the PEFT adapter lands in `adapter`; returns its metrics
        (losses, token counts, duration). Raises ClusterError saying why it failed."""

