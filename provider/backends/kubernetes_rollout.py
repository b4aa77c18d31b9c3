"""Waiting for a Kubernetes deployment's rollout, and saying why it did not complete.

pulumi-kubernetes applies the apps/v1 Deployment without waiting (KubernetesDeployment asks it not to): its
own wait ends, on a pod no node can take, with "Minimum number of live Pods was not attained" and nothing
about why. The Ember Deployment waits here instead, through the same kubeconfig, and when the time is up
names what the pods asked for and what the scheduler or the API server said.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ember.provider.domain.kinds.deployment import KubernetesWorkload


class RolloutError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """A workload to wait for: what its pods are, as the Ember resource that declared them knows them."""

    workload: KubernetesWorkload
    minimum: int  # replicas it must reach (an autoscaler's floor, where the manifest leaves the count out)
    asks: str  # what each pod asks for, said as the user declared it ("1 x NVIDIA_H100_80GB (nvidia.com/gpu: 1)")
    unschedulable_field: str  # the input to change when no node can take a pod


@dataclass(frozen=True)
class Rollout:
    wanted: int
    updated: int
    ready: int
    old: int  # replicas of earlier templates still running

    @property
    def complete(self) -> bool:
        return self.updated >= self.wanted and self.ready >= self.wanted and self.old == 0

    def __str__(self) -> str:
        old = f", {self.old} old still running" if self.old else ""
        return f"{self.ready}/{self.wanted} replicas ready, {self.updated} updated{old}"


def api_client(workload: KubernetesWorkload):
    from kubernetes import client, config

    if workload.kubeconfig:
        return config.new_client_from_config(config_file=os.path.expanduser(workload.kubeconfig))
    try:
        return config.new_client_from_config()
    except config.ConfigException:
        config.load_incluster_config()  # the provider itself runs in a pod
        return client.ApiClient()


def observe(apps, target: Target) -> Rollout | None:
    """The rollout as the deployment controller reports it; None until it has seen the latest template."""
    workload = target.workload
    deployment = apps.read_namespaced_deployment(workload.name, workload.namespace)
    status = deployment.status
    if (status.observed_generation or 0) < deployment.metadata.generation:
        return None
    # With an autoscaler the manifest leaves replicas out, and the API server defaults it to 1: the autoscaler
    # raises it to min_replicas only on its next pass, so the rollout is complete at min_replicas, not before.
    wanted = max(deployment.spec.replicas if deployment.spec.replicas is not None else 1, target.minimum)
    updated, total = status.updated_replicas or 0, status.replicas or 0
    return Rollout(wanted=wanted, updated=updated, ready=min(status.ready_replicas or 0, updated),
                   old=max(total - updated, 0))


def why_not_ready(core, apps, target: Target) -> tuple[str, str]:
    """(the field to change, what stops the pods): unschedulable, refused by admission, or not starting."""
    workload = target.workload
    deployment = apps.read_namespaced_deployment(workload.name, workload.namespace)
    for condition in deployment.status.conditions or []:
        if condition.type == "ReplicaFailure" and condition.status == "True":
            return "kubernetes_workload", f"the API server refused its pods: {condition.message}"
    selector = ",".join(f"{k}={v}" for k, v in deployment.spec.selector.match_labels.items())
    reasons, unschedulable = [], False
    for pod in core.list_namespaced_pod(workload.namespace, label_selector=selector).items:
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False":
                reasons.append(f"no node can take it: {condition.message}")
                unschedulable = True
        for container in pod.status.container_statuses or []:
            waiting = container.state.waiting if container.state else None
            if waiting and waiting.reason not in (None, "ContainerCreating"):
                reasons.append(f"container {container.name}: {waiting.reason}: {waiting.message or ''}".rstrip(": "))
    detail = "; ".join(dict.fromkeys(reasons)) or "its pods are not ready"
    field = target.unschedulable_field if unschedulable else "kubernetes_workload"
    return field, f"each replica asks for {target.asks}; {detail}"


def wait_for_rollout(target: Target, timeout_s: float, progress: Callable[[str], None], poll_s: float = 1.0) -> Rollout:
    from kubernetes import client, config

    workload = target.workload
    try:
        with api_client(workload) as api:
            return _wait(target, client.AppsV1Api(api), client.CoreV1Api(api), timeout_s, progress, poll_s)
    except config.ConfigException as exc:
        raise RolloutError(f"kubernetes_workload.kubeconfig: {exc}") from None
    except client.ApiException as exc:
        raise RolloutError(f"kubernetes_workload: reading {workload.namespace}/{workload.name} from the API server "
                           f"failed: {exc.status} {exc.reason}") from None


def _wait(target: Target, apps, core, timeout_s: float, progress: Callable[[str], None], poll_s: float) -> Rollout:
    workload = target.workload
    deadline, shown = time.monotonic() + timeout_s, None
    name = f"{workload.namespace}/{workload.name}"
    while True:
        rollout = observe(apps, target)
        if rollout is not None and rollout.complete:
            return rollout
        if str(rollout) != shown:
            progress(f"waiting for the rollout of {name}: {rollout or 'not observed yet'}")
            shown = str(rollout)
        if time.monotonic() >= deadline:
            field, why = why_not_ready(core, apps, target)
            raise RolloutError(f"{field}: the rollout of {name} did not complete within {timeout_s:.0f} s "
                               f"({rollout or 'not observed'}): {why}")
        time.sleep(poll_s)
