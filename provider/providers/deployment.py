"""The Deployment provider: a deployment's record and desired addon set in the store, and its replicas run through
its cluster (backends/cluster.py): started, scaled and waited for locally, a rollout waited for on Kubernetes."""

from __future__ import annotations

import uuid
from typing import Any

from pulumi.dynamic import CreateResult, ReadResult

from ember.provider.backends.cluster import ClusterError, ReplicaStatus
from ember.provider.backends.store import StoreError
from ember.provider.domain.catalog import Architecture
from ember.provider.domain.catalog_lifecycle import Lifecycle
from ember.provider.domain.kinds.deployment import KIND, DeploymentSpec, check_split
from ember.provider.domain.names import parse_deployment_name, parse_model_name
from ember.provider.domain.records import BaseModelManifest, DeploymentRecord
from ember.provider.domain.spec import DeploymentState, DeploymentType, FieldError
from ember.provider.providers.base import (CLUSTERS, REFERENCES, ClusterProvider, EmberError, base_manifest, has_unknown,
                                           progress)


def _identity(inputs: dict[str, Any]) -> dict[str, Any]:
    """What a replacement changes: the spec's fields and the digests derived from what it references."""
    return {k: inputs.get(k) for k in (*DeploymentSpec.model_fields, *KIND.derived)}


def _owner(props: dict[str, Any]) -> str | None:
    references = props.get(REFERENCES)
    owner = references.get("owner") if isinstance(references, dict) else None
    return owner if isinstance(owner, str) else None


class DeploymentProvider(ClusterProvider):
    spec_cls = DeploymentSpec

    def check_known(self, spec: DeploymentSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references)
        if not unknown & {"base_model", "accelerator_count"}:
            name = parse_model_name(spec.base_model)
            try:
                failures += self._split_failures(spec, self.store.read_manifest(name.account_id, name.resource_id))
            except StoreError:  # the base's own check says what is wrong with it
                pass
        if not unknown & {"cluster", "accelerator_type"}:
            try:
                CLUSTERS[spec.cluster].check_supported(spec)
            except ClusterError as exc:
                failures.append(("accelerator_type", str(exc).removeprefix("accelerator_type: ")))
        if "deployment_type" not in unknown and spec.deployment_type is DeploymentType.SERVERLESS:
            failures += self._serverless_failures(spec, unknown)
        return failures

    def _serverless_failures(self, spec: DeploymentSpec, unknown: set[str]) -> list[tuple[str, str]]:
        """The catalog file's rules: no serverless deployment of a shut-down model, and no capacity promise (no SLA)
        on a serverless deployment outside the platform account, whose capacity it is."""
        catalog, failures = self.catalog_file("deployment_type")
        if catalog is None:
            return failures
        if "base_model" not in unknown:
            failures += self._shut_down(catalog, spec.base_model, "base_model", "a serverless deployment of it is "
                                        "refused; declare another catalog model, or a dedicated deployment")
        if "account_id" in unknown or spec.account_id == catalog.platform_account:
            return failures
        # only what the program sets: the defaults are the platform's best effort, not a promise
        promised = {"min_replicas": spec.min_replicas,
                    "autoscaling": spec.autoscaling.model_dump(mode="json", exclude_unset=True)}
        for field, value in promised.items():
            if field in spec.model_fields_set and value != {}:
                failures.append((field, f"{value!r} is set on a serverless deployment of account {spec.account_id!r}: "
                                        f"serverless is best-effort with no SLA, and its capacity belongs to the platform "
                                        f"account {catalog.platform_account!r}; for guaranteed capacity declare a "
                                        f"dedicated deployment"))
        return failures

    def derive(self, spec: DeploymentSpec, unknown: set[str]) -> dict[str, Any]:
        derived = super().derive(spec, unknown)
        try:
            lifecycle = None if unknown & {"base_model", "deployment_type"} else self._lifecycle(spec)
        except EmberError:  # check_known names what is wrong with the catalog file
            lifecycle = None
        return derived | ({"base_model_shutdown_date": lifecycle.shutdown_date.isoformat()} if lifecycle else {})

    def _lifecycle(self, spec: DeploymentSpec) -> Lifecycle | None:
        """A serverless deployment's base model's dates in the catalog file; None for a dedicated one, or no dates."""
        if spec.deployment_type is not DeploymentType.SERVERLESS:
            return None
        catalog, failures = self.catalog_file("deployment_type")
        if catalog is None:
            raise EmberError("; ".join(f"{field}: {message}" for field, message in failures))
        return catalog.lifecycle(parse_model_name(spec.base_model).resource_id)

    @staticmethod
    def _split_failures(spec: DeploymentSpec, manifest) -> list[tuple[str, str]]:
        """Whether accelerator_count splits a custom base model, by its manifest in the store (the spec itself checks
        catalog models, whose shapes it knows)."""
        if not isinstance(manifest, BaseModelManifest) or manifest.catalog_id is not None:
            return []
        try:
            check_split(Architecture.of(manifest.config), spec.accelerator_count, spec.accelerator_type, spec.precision,
                        spec.base_model)
        except FieldError as exc:
            return [(exc.field, exc.message)]
        except (KeyError, TypeError, IndexError):  # a config the model's own checks refuse, with its own words
            return []
        return []

    # A replacement starts the new replicas before the old ones drain (the gateway always has one to send to): the
    # engine creates the new resource under the same name, then deletes the old one, which leaves the new one be.
    delete_before_replace = False

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        # A refresh that found replicas down makes the next `up` start them again, where the cluster does not. Fewer
        # than declared only: the autoscaler's count (zero included, for a deployment that may reach it) is no drift.
        ready, wanted = olds.get("ready_replicas"), news.get("min_replicas")
        if ready is None or has_unknown(wanted) or has_unknown(news.get("cluster")):
            return False
        floor = DeploymentSpec.model_fields["min_replicas"].default if wanted is None else int(wanted)
        return not CLUSTERS[news.get("cluster") or "local"].restarts_replicas and ready < floor

    def _run(self, spec: DeploymentSpec, props: dict[str, Any], creating: bool = False,
             generation: str | None = None) -> dict[str, Any]:
        """`generation`: a create's or a replacement's new one; an update keeps the record's."""
        store, cluster = self.store, self.cluster_of(spec.cluster)
        lifecycle = self._lifecycle(spec)  # its replicas answer 410 from the shutdown date the record carries
        base = base_manifest(store, spec.base_model, spec.account_id)
        if failures := self._split_failures(spec, base):
            raise EmberError("; ".join(f"{field}: {message}" for field, message in failures))
        store.ensure_key(spec.account_id, self.config.state_dir / "keys")  # the account's own, to call its deployment
        previous = store.read_deployment_record(spec.account_id, spec.deployment_id)
        generation = generation or (previous.generation if previous else None) or uuid.uuid4().hex
        record = DeploymentRecord(name=spec.name, base_model=spec.base_model, max_lora_rank=spec.max_lora_rank,
                                  serverless=spec.deployment_type is DeploymentType.SERVERLESS, cluster=spec.cluster,
                                  created=not creating, inputs=self._inputs(props), owner=_owner(props),
                                  min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
                                  autoscaling=spec.autoscaling, traffic_weight=spec.traffic_weight,
                                  kubernetes_workload=spec.kubernetes_workload, generation=generation,
                                  shutdown_date=lifecycle.shutdown_date if lifecycle else None)
        store.write_deployment_record(record)
        store.change_desired_addons(spec.account_id, spec.deployment_id, lambda desired: None)  # replicas read it
        try:
            status = cluster.scale(spec, base, store)
        except ClusterError:
            if previous is not None and previous.created:  # what still runs is what the record said before
                store.write_deployment_record(previous)
            raise
        # The desired addon set outlives a replacement of the deployment (the addons own it): the new replicas
        # load it as they start, and the deployment is ready only once they serve all of it.
        desired = set(store.desired_addons(spec.account_id, spec.deployment_id))
        if desired:
            cluster.reconcile_addons(store, spec.account_id, spec.deployment_id, desired, set())
        if creating:
            store.write_deployment_record(record.model_copy(update={"created": True}))
        return self._outputs(spec, base.digest, status) | {"generation": generation}

    @staticmethod
    def _outputs(spec: DeploymentSpec, base_digest: str | None, status: ReplicaStatus) -> dict[str, Any]:
        short = status.ready is not None and status.ready < spec.min_replicas
        message = f"{status.ready} of {spec.min_replicas} replicas are ready" if short else \
            "scaled to zero: the gateway starts a replica for the next request" if status.ready == 0 else None
        return {"name": spec.name, "state": (DeploymentState.FAILED if short else DeploymentState.READY).value,
                "message": message, "endpoints": list(status.endpoints), "ready_replicas": status.ready,
                "serving_digest": base_digest}

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: DeploymentSpec = self._spec(props)
        # Refusals come before anything is touched: a taken name belongs to someone else's live deployment.
        try:
            CLUSTERS[spec.cluster].check_supported(spec)
        except ClusterError as exc:
            raise EmberError(str(exc)) from None
        existing = self.store.read_deployment_record(spec.account_id, spec.deployment_id)
        if existing and existing.created and (existing.owner is None or existing.owner != _owner(props)):
            raise EmberError(f"deployment_id: {spec.name} already exists")
        if existing and existing.created:
            progress(f"replacing {spec.name}: new replicas start beside the old ones, which drain once they are ready")
            return self._replace(spec, props, existing)
        if existing:
            progress(f"resuming the interrupted create of {spec.name}")
        return self._create(spec, props)

    def _replace(self, spec: DeploymentSpec, props: dict[str, Any], old: DeploymentRecord) -> CreateResult:
        # What fails leaves the old replicas serving and the old record: nothing is undone but the new replicas.
        try:
            outputs = self._run(spec, props, generation=uuid.uuid4().hex)
        except (ClusterError, StoreError) as exc:
            raise EmberError(str(exc)) from None
        if old.cluster != spec.cluster:  # moved to another cluster: the old one's replicas stop once the new serve
            progress(f"{spec.name}: stopping its replicas on the {old.cluster} cluster")
            self.cluster_of(old.cluster).stop(spec.account_id, spec.deployment_id)
        return CreateResult(spec.name, props | outputs)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_deployment_name(id_ if by_id else spec.name)
        record = self.store.read_deployment_record(name.account_id, name.resource_id)
        if not record or not record.created:
            return ReadResult("", {})
        if by_id:
            spec, props = self._spec(record.inputs), record.inputs
        status = self.cluster_of(spec.cluster).status(spec.account_id, spec.deployment_id)
        # A cluster that does not count replicas here leaves the last rollout's outputs as they are, and so does a
        # count the autoscaler chose within the range (it moves with the load; it is no drift).
        within = status.ready is not None and spec.min_replicas <= status.ready <= spec.max_replicas
        outputs = props if status.ready is None or within and not by_id else \
            props | self._outputs(spec, props.get("serving_digest"), status)
        return ReadResult(spec.name, outputs, props if by_id else None)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec: DeploymentSpec = self._spec(props)
        record = self.store.read_deployment_record(spec.account_id, spec.deployment_id)
        if record is not None and record.created and self._replaced(record, props):
            # The old resource of a replacement: its replicas were drained as the new ones became ready; the name and
            # what runs under it are the new resource's.
            progress(f"{spec.name}: the replaced deployment's replicas have drained; the new ones serve")
            return
        self._remove(spec)

    @staticmethod
    def _replaced(record: DeploymentRecord, props: dict[str, Any]) -> bool:
        """Whether a newer resource took over the name since `props` were this one's outputs."""
        mine = props.get("generation")
        if mine is None:  # state written before generations: its inputs tell
            return _identity(record.inputs) != _identity(props)
        return record.generation != mine

    def _remove(self, spec: DeploymentSpec) -> None:
        self.cluster_of(spec.cluster).stop(spec.account_id, spec.deployment_id)
        # A replica stopped cleanly removed its own registration; one that was killed could not.
        self.store.delete_registrations(spec.account_id, spec.deployment_id)
        self.store.delete_deployment(spec.account_id, spec.deployment_id)
