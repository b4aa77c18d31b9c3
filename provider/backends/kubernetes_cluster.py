"""The Kubernetes cluster: pods are pulumi-kubernetes resources declared beside the Ember resource
(ember.provider.kubernetes) and applied before it; they read the store themselves, and Kubernetes keeps them running.
What is left to the provider is to wait for a rollout (a deployment's or the gateway's) and to collect what a training
Job wrote."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec

from ember.provider.backends.cluster import Cluster, ClusterError, GatewayStatus, ReplicaStatus
from ember.provider.backends.kubernetes_rollout import RolloutError, Target, wait_for_rollout
from ember.provider.backends.store import Store
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.records import BaseModelManifest


class KubernetesCluster(Cluster):
    name = "kubernetes"

    def scale(self, spec: DeploymentSpec, base: BaseModelManifest, store: Store) -> ReplicaStatus:
        """READY once the workload's rollout completed (pulumi-kubernetes does not wait: its wait cannot say why pods
        are not scheduled). The replica spec is in the pods' ConfigMap, and the Deployment or its autoscaler holds
        the count."""
        if not spec.kubernetes_workload:
            return ReplicaStatus()
        accelerator = spec.accelerator_type
        count = spec.accelerator_count
        asks = (f"{count} x {accelerator.value} ({accelerator.vendor}.com/gpu: {count})" if accelerator.vendor
                else accelerator.value)
        return ReplicaStatus(ready=self._rollout(Target(spec.kubernetes_workload, spec.min_replicas, asks,
                                                        "accelerator_count")))

    def _rollout(self, target: Target) -> int:
        try:
            return wait_for_rollout(target, self.ready_timeout_s, self.progress).ready
        except RolloutError as exc:
            raise ClusterError(str(exc)) from None

    def status(self, account: str, deployment: str, key: str | None = None) -> ReplicaStatus:
        return ReplicaStatus()  # the last rollout's outputs stand; Kubernetes restarts what stops

    def reconcile_addons(self, store: Store, account: str, deployment: str, wanted: set[str],
                         unwanted: set[str]) -> None:
        """Nothing to ask: the pods poll the desired addon set in the store."""

    def stop(self, account: str, deployment: str) -> None:
        """Nothing to stop: the pods go with their pulumi-kubernetes Deployment."""

    def serve_gateway(self, spec: GatewaySpec, store: Store) -> GatewayStatus:
        """READY once the gateway pods' rollout completed: their readiness probe is the gateway's /health, which fails
        while the store cannot be read."""
        if not spec.kubernetes_workload:
            return GatewayStatus(spec.advertised_url)
        target = Target(spec.kubernetes_workload, spec.replicas, "the gateway's CPU and memory", "replicas")
        return GatewayStatus(spec.advertised_url, self._rollout(target))

    def gateway_status(self, spec: GatewaySpec) -> GatewayStatus:
        return GatewayStatus(spec.advertised_url)  # the last rollout's outputs stand; Kubernetes restarts what stops

    def stop_gateway(self, account: str, gateway_id: str) -> None:
        """Nothing to stop: the pods go with their pulumi-kubernetes Deployment."""

    def train(self, spec: FineTuningJobSpec, base: BaseModelManifest, store: Store, workdir: Path,
              adapter: Path) -> dict:
        """The metrics and adapter a KubernetesFineTuningJob's pod wrote (pulumi-kubernetes waited for the Job)."""
        fs, root = fsspec.core.url_to_fs(spec.training_url)
        if not fs.exists(f"{root}/result.json"):
            raise ClusterError(f"training_url: the Kubernetes Job wrote no result to {spec.training_url} (it failed or "
                               f"was cut short: see its pod's log)")
        adapter.mkdir(parents=True)
        for path in fs.ls(f"{root}/adapter", detail=False):
            fs.get_file(path, str(adapter / Path(path).name))
        return json.loads(fs.cat_file(f"{root}/result.json"))
