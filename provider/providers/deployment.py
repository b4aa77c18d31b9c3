"""The Deployment provider: a deployment's record and desired addon set in the store and, on the local
cluster, its replicas started, scaled and waited for."""

from __future__ import annotations

from typing import Any

from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from ember.provider.backends.kubernetes_rollout import RolloutError, wait_for_rollout
from ember.provider.backends.local_cluster import ClusterError, LocalCluster
from ember.provider.backends.records import DeploymentRecord
from ember.provider.backends.store import StoreError
from ember.provider.domain.names import parse_deployment_name
from ember.provider.domain.replica_spec import replica_spec, serve_command, write_replica_spec
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.spec import DeploymentState, DeploymentType
from ember.provider.providers.base import EmberError, EmberProvider, base_manifest, has_unknown, progress


class DeploymentProvider(EmberProvider):
    spec_cls = DeploymentSpec
    derived = ("base_model_digest",)

    def check_known(self, spec: DeploymentSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references)
        if spec.cluster == "local" and not unknown & {"cluster", "accelerator_type"}:
            try:
                LocalCluster.check_supported(spec)
            except ClusterError as exc:
                failures.append(("accelerator_type", str(exc).removeprefix("accelerator_type: ")))
        return failures

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        # A refresh that found replicas down makes the next `up` start them again (Kubernetes does that itself).
        if news.get("cluster") == "kubernetes":
            return False
        ready = olds.get("ready_replicas")
        return ready is not None and not has_unknown(news.get("min_replicas")) and \
            ready < max(int(news.get("min_replicas") or 1), 1)

    def _run(self, spec: DeploymentSpec, props: dict[str, Any], creating: bool = False) -> dict[str, Any]:
        store, cluster = self.store, self.cluster
        base = base_manifest(store, spec.base_model, spec.account_id)
        key = store.ensure_key(spec.account_id, self.config.state_dir / "keys")
        record = DeploymentRecord(name=spec.name, base_model=spec.base_model, max_lora_rank=spec.max_lora_rank,
                                  serverless=spec.deployment_type is DeploymentType.SERVERLESS, cluster=spec.cluster,
                                  created=not creating, inputs=self._inputs(props))
        store.write_deployment_record(record)
        store.change_desired_addons(spec.account_id, spec.deployment_id, lambda desired: None)  # replicas read it
        if spec.cluster == "kubernetes":
            # Pods are pulumi-kubernetes resources declared beside this one (applied before it); they read this
            # store themselves. READY once their rollout completed.
            ready = None
            if spec.kubernetes_workload:
                try:
                    ready = wait_for_rollout(spec, self.config.ready_timeout_s, progress).ready
                except RolloutError as exc:
                    raise EmberError(str(exc)) from None
            if creating:
                store.write_deployment_record(record.model_copy(update={"created": True}))
            return {"name": spec.name, "state": DeploymentState.READY.value, "message": None, "endpoints": [],
                    "ready_replicas": ready, "serving_digest": base.digest}
        request_log = self.config.state_dir / "request-logs" / spec.account_id / f"{spec.deployment_id}.jsonl"
        request_log.parent.mkdir(parents=True, exist_ok=True)
        spec_file = self.config.state_dir / "replica-specs" / spec.account_id / f"{spec.deployment_id}.json"
        write_replica_spec(replica_spec(spec, str(store.local_path(base.object)), store.urls, str(request_log)),
                           spec_file)
        cluster.scale(spec, serve_command(str(spec_file)), key)
        # The desired addon set outlives a replacement of the deployment (the addons own it): the new replicas
        # load it as they start, and the deployment is ready only once they serve all of it.
        desired = set(store.desired_addons(spec.account_id, spec.deployment_id))
        if desired:
            progress(f"waiting for {spec.name} to serve its {len(desired)} addons")
            cluster.reconcile_addons(spec.account_id, spec.deployment_id, key, desired, set())
        if creating:
            store.write_deployment_record(record.model_copy(update={"created": True}))
        return self._status(spec, base.digest)

    def _status(self, spec: DeploymentSpec, base_digest: str | None) -> dict[str, Any]:
        endpoints, ready, _ = self.cluster.status(spec.account_id, spec.deployment_id)
        wanted = LocalCluster.replica_count(spec)
        state = DeploymentState.READY if ready >= wanted else DeploymentState.FAILED
        message = None if ready >= wanted else f"{ready} of {wanted} replicas are ready"
        return {"name": spec.name, "state": state.value, "message": message, "endpoints": endpoints,
                "ready_replicas": ready, "serving_digest": base_digest}

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: DeploymentSpec = self._spec(props)
        # Refusals come before anything is touched: a taken name belongs to someone else's live deployment.
        if spec.cluster == "local":
            try:
                LocalCluster.check_supported(spec)
            except ClusterError as exc:
                raise EmberError(str(exc)) from None
        existing = self.store.read_deployment_record(spec.account_id, spec.deployment_id)
        if existing and existing.created:
            raise EmberError(f"deployment_id: {spec.name} already exists")
        if existing:
            progress(f"resuming the interrupted create of {spec.name}")
        try:
            outputs = self._run(spec, props, creating=True)
        except (ClusterError, StoreError, EmberError) as exc:
            self._remove(spec)  # only what this create (or the interrupted one it resumed) made
            raise EmberError(str(exc)) from None
        return CreateResult(spec.name, props | outputs)

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        spec: DeploymentSpec = self._spec(news)
        try:
            outputs = self._run(spec, news)
        except (ClusterError, StoreError) as exc:
            raise EmberError(str(exc)) from None
        return UpdateResult(news | outputs)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_deployment_name(id_ if by_id else spec.name)
        record = self.store.read_deployment_record(name.account_id, name.resource_id)
        if not record or not record.created:
            return ReadResult("", {})
        if by_id:
            spec, props = self._spec(record.inputs), record.inputs
        outputs = props if spec.cluster == "kubernetes" else props | self._status(spec, props.get("serving_digest"))
        return ReadResult(spec.name, outputs, props if by_id else None)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        self._remove(self._spec(props))

    def _remove(self, spec: DeploymentSpec) -> None:
        self.cluster.stop_all(spec.account_id, spec.deployment_id)
        self.store.delete_deployment(spec.account_id, spec.deployment_id)
