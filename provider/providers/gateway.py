"""The Gateway provider: the store's one gateway, its settings written to the store (where the running gateway re-reads
them: new rate limits need no restart) and its process or pods run and waited for through its cluster."""

from __future__ import annotations

from typing import Any

from pulumi.dynamic import CreateResult, ReadResult

from ember.provider.backends.cluster import GatewayStatus
from ember.provider.backends.store import Store
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.names import parse_gateway_name
from ember.provider.domain.records import GatewayRecord
from ember.provider.domain.spec import DeploymentState
from ember.provider.providers.base import CLUSTERS, ClusterProvider, EmberError, has_unknown


class GatewayProvider(ClusterProvider):
    spec_cls = GatewaySpec

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        # A refresh that found the gateway down makes the next `up` start it again, where the cluster does not.
        ready = olds.get("ready_replicas")
        if ready is None or has_unknown(news.get("cluster")):
            return False
        return not CLUSTERS[news.get("cluster") or "local"].restarts_replicas and ready < 1

    def _record(self, store: Store, spec: GatewaySpec, props: dict[str, Any], created: bool) -> GatewayRecord:
        record = GatewayRecord(name=spec.name, spec=spec.model_dump(mode="json"), created=created,
                               inputs=self._inputs(props))
        store.write_gateway_record(record)
        return record

    def _run(self, spec: GatewaySpec, props: dict[str, Any], creating: bool = False) -> dict[str, Any]:
        store, cluster = self.store, self.cluster_of(spec.cluster)
        with store.gateway_lock():  # a store has one gateway: two creates side by side cannot both take it
            other = next((r.name for r in store.gateway_records() if r.name != spec.name), None)
            if other is not None:
                raise EmberError(f"gateway_id: the store {store.url} has a gateway already, {other}: a store has one, "
                                 f"in front of all of its deployments (use Gateway.get to name it)")
            self._record(store, spec, props, created=not creating)
        store.ensure_key(spec.account_id, self.config.state_dir / "keys")  # the platform's own: reads /metrics
        status = cluster.serve_gateway(spec, store)
        if creating:
            self._record(store, spec, props, created=True)
        return self._outputs(spec, status)

    @staticmethod
    def _outputs(spec: GatewaySpec, status: GatewayStatus) -> dict[str, Any]:
        down = status.ready is not None and status.ready < 1
        return {"name": spec.name, "state": (DeploymentState.FAILED if down else DeploymentState.READY).value,
                "message": "the gateway is not running" if down else None, "url": status.url,
                "ready_replicas": spec.replicas if status.ready is None else status.ready}

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: GatewaySpec = self._spec(props)
        name = parse_gateway_name(spec.name)
        existing = self.store.read_gateway_record(name.account_id, name.resource_id)
        if existing and existing.created:  # another stack's: refused before anything is touched
            raise EmberError(f"gateway_id: {spec.name} already exists")
        return self._create(spec, props)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_gateway_name(id_ if by_id else spec.name)
        record = self.store.read_gateway_record(name.account_id, name.resource_id)
        if not record or not record.created:
            return ReadResult("", {})
        if by_id:
            spec, props = self._spec(record.inputs), record.inputs
        status = self.cluster_of(spec.cluster).gateway_status(spec)
        return ReadResult(spec.name, props | self._outputs(spec, status), props if by_id else None)

    def _remove(self, spec: GatewaySpec) -> None:
        self.cluster_of(spec.cluster).stop_gateway(spec.account_id, spec.gateway_id)
        name = parse_gateway_name(spec.name)
        self.store.delete_document(self.store.paths.gateway(name.account_id, name.resource_id))
