"""The Deployment provider: a deployment's record and desired addon set in the store, and its replicas run through
its cluster (backends/cluster.py): started, scaled and waited for locally, a rollout waited for on Kubernetes."""

from __future__ import annotations

from typing import Any

from pulumi.dynamic import CreateResult, ReadResult

from ember.provider.backends.cluster import ClusterError, ReplicaStatus
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.names import parse_deployment_name
from ember.provider.domain.records import DeploymentRecord
from ember.provider.domain.spec import DeploymentState, DeploymentType
from ember.provider.providers.base import CLUSTERS, ClusterProvider, EmberError, base_manifest, has_unknown, progress


class DeploymentProvider(ClusterProvider):
    spec_cls = DeploymentSpec

    def check_known(self, spec: DeploymentSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references)
        if not unknown & {"cluster", "accelerator_type"}:
            try:
                CLUSTERS[spec.cluster].check_supported(spec)
            except ClusterError as exc:
                failures.append(("accelerator_type", str(exc).removeprefix("accelerator_type: ")))
        return failures

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        # A refresh that found replicas down makes the next `up` start them again, where the cluster does not.
        ready, wanted = olds.get("ready_replicas"), news.get("min_replicas")
        if ready is None or has_unknown(wanted) or has_unknown(news.get("cluster")):
            return False
        return not CLUSTERS[news.get("cluster") or "local"].restarts_replicas and ready < max(int(wanted or 1), 1)

    def _run(self, spec: DeploymentSpec, props: dict[str, Any], creating: bool = False) -> dict[str, Any]:
        store, cluster = self.store, self.cluster_of(spec.cluster)
        base = base_manifest(store, spec.base_model, spec.account_id)
        store.ensure_key(spec.account_id, self.config.state_dir / "keys")  # the account's own, to call its deployment
        record = DeploymentRecord(name=spec.name, base_model=spec.base_model, max_lora_rank=spec.max_lora_rank,
                                  serverless=spec.deployment_type is DeploymentType.SERVERLESS, cluster=spec.cluster,
                                  created=not creating, inputs=self._inputs(props))
        store.write_deployment_record(record)
        store.change_desired_addons(spec.account_id, spec.deployment_id, lambda desired: None)  # replicas read it
        status = cluster.scale(spec, base, store)
        # The desired addon set outlives a replacement of the deployment (the addons own it): the new replicas
        # load it as they start, and the deployment is ready only once they serve all of it.
        desired = set(store.desired_addons(spec.account_id, spec.deployment_id))
        if desired:
            cluster.reconcile_addons(store, spec.account_id, spec.deployment_id, desired, set())
        if creating:
            store.write_deployment_record(record.model_copy(update={"created": True}))
        return self._outputs(spec, base.digest, status)

    @staticmethod
    def _outputs(spec: DeploymentSpec, base_digest: str | None, status: ReplicaStatus) -> dict[str, Any]:
        wanted = CLUSTERS[spec.cluster].replica_count(spec)
        short = status.ready is not None and status.ready < wanted
        return {"name": spec.name, "state": (DeploymentState.FAILED if short else DeploymentState.READY).value,
                "message": f"{status.ready} of {wanted} replicas are ready" if short else None,
                "endpoints": list(status.endpoints), "ready_replicas": status.ready, "serving_digest": base_digest}

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: DeploymentSpec = self._spec(props)
        # Refusals come before anything is touched: a taken name belongs to someone else's live deployment.
        try:
            CLUSTERS[spec.cluster].check_supported(spec)
        except ClusterError as exc:
            raise EmberError(str(exc)) from None
        existing = self.store.read_deployment_record(spec.account_id, spec.deployment_id)
        if existing and existing.created:
            raise EmberError(f"deployment_id: {spec.name} already exists")
        if existing:
            progress(f"resuming the interrupted create of {spec.name}")
        return self._create(spec, props)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_deployment_name(id_ if by_id else spec.name)
        record = self.store.read_deployment_record(name.account_id, name.resource_id)
        if not record or not record.created:
            return ReadResult("", {})
        if by_id:
            spec, props = self._spec(record.inputs), record.inputs
        status = self.cluster_of(spec.cluster).status(spec.account_id, spec.deployment_id)
        # a cluster that does not count replicas here leaves the last rollout's outputs as they are
        outputs = props if status.ready is None else props | self._outputs(spec, props.get("serving_digest"), status)
        return ReadResult(spec.name, outputs, props if by_id else None)

    def _remove(self, spec: DeploymentSpec) -> None:
        self.cluster_of(spec.cluster).stop(spec.account_id, spec.deployment_id)
        # A replica stopped cleanly removed its own registration; one that was killed could not.
        self.store.delete_registrations(spec.account_id, spec.deployment_id)
        self.store.delete_deployment(spec.account_id, spec.deployment_id)
