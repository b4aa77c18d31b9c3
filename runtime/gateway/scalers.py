"""What changes a deployment's replica count for the gateway's autoscaler, by the cluster that runs it.

- **Local**: the gateway runs beside the replicas (`--state-dir`, the provider's state directory) and starts or drains
  replica processes itself, as `up` does (`LocalCluster.resize`, under the same per-deployment lock: while an `up`
  changes a deployment, the autoscaler leaves it alone).
- **Kubernetes**: the gateway's pods patch the scale of the deployment's apps/v1 Deployment through the API
  (kubernetes_scaler.py), with a service account allowed only that.

Each call blocks (a file lock, an HTTP call): the autoscaler makes them on a worker thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from ember.provider.backends.local_processes import Busy
from ember.provider.domain.names import parse_deployment_name
from ember.runtime.gateway.directory import Deployment

log = logging.getLogger("ember.gateway")


class Scaler(Protocol):
    # Whether it moves the count with the load between 1 and max_replicas too; where the cluster has its own autoscaler
    # for that (Kubernetes: the HorizontalPodAutoscaler), the gateway only takes a deployment to zero and back.
    follows_load: bool

    def handles(self, deployment: Deployment) -> bool:
        """Whether this scaler can change the deployment's count."""

    def running(self, deployment: Deployment) -> int | None:
        """Replicas running or starting now; None when it cannot tell (busy, or not reachable)."""

    def resize(self, deployment: Deployment, count: int) -> int | None:
        """Start or drain replicas until `count` run (not waiting for new ones to be ready); the count now, or None when
        it could not change it this time (another change is under way)."""


class LocalScaler:
    follows_load = True

    def __init__(self, state_dir: str | Path):
        from ember.provider.backends.local_cluster import LocalCluster  # no pulumi, no torch: processes and files

        self.cluster = LocalCluster(Path(state_dir), ready_timeout_s=0.0, progress=log.info)

    def handles(self, deployment: Deployment) -> bool:
        return deployment.record is not None and deployment.record.cluster == "local"

    def running(self, deployment: Deployment) -> int | None:
        name = parse_deployment_name(deployment.name)
        return len(self.cluster.running(name.account_id, name.resource_id))

    def resize(self, deployment: Deployment, count: int) -> int | None:
        name = parse_deployment_name(deployment.name)
        try:
            return self.cluster.resize(name.account_id, name.resource_id, count)
        except Busy:
            return None

