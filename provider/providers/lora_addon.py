"""The LoRAAddon provider: an adapter uploaded to the store as a model of its account, put in the desired
addon set of every deployment it targets, and waited for until their replicas serve it."""

from __future__ import annotations

import time
from typing import Any

from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from ember.provider.backends.cluster import ClusterError
from ember.provider.backends.store import StoreError
from ember.provider.domain import file_kinds
from ember.provider.domain.gguf_model import source_config
from ember.provider.domain.kinds.lora_addon import LoRAAddonSpec
from ember.provider.domain.model_files import ModelFilesError, inspect_adapter
from ember.provider.domain.names import parse_deployment_name, parse_model_name
from ember.provider.domain.records import AddonManifest, DeploymentRecord
from ember.provider.domain.rules import DeploymentFacts, addon_misfits
from ember.provider.domain.spec import DEFAULT_MAX_LORA_RANK
from ember.provider.providers.base import EmberError, EmberProvider, base_manifest, has_unknown, progress, staged_source


class LoRAAddonProvider(EmberProvider):
    spec_cls = LoRAAddonSpec

    def check_known(self, spec: LoRAAddonSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references) + self._serverless_failures(spec, unknown)
        job = references.get("source")  # a fine-tuning job's facts, when the source is the adapter it trains
        if isinstance(job, dict) and type(job.get("rank")) in (int, float):  # numbers may arrive as floats
            rank = int(job["rank"])
            trained_on = job.get("base_model")
            if "base_model" not in unknown and isinstance(trained_on, str) and trained_on != spec.base_model:
                failures.append(("source", f"the fine-tuning job trains on {trained_on}, not this addon's base "
                                           f"{spec.base_model}"))
        elif "source" in unknown or "://" in spec.source:
            return failures
        elif (problem := file_kinds.problem(spec.source, "directory")) is not None:
            return failures + [("source", f"{spec.source!r} {problem}")]
        else:
            try:  # headers only; against the base model's config.json when its files are here too
                base = (references.get("base_model") or {}).get("source") if "base_model" not in unknown else None
                base_config = source_config(base) if isinstance(base, str) else None
                rank = inspect_adapter(spec.source, base_config).rank
            except (ModelFilesError, ValueError, KeyError, OSError) as exc:
                return failures + [("source", str(exc))]
        targets = references.get("deployments") if "deployments" not in unknown else None
        addon_base = None if "base_model" in unknown else spec.base_model
        for i, name in enumerate(spec.deployments):
            facts = (targets or {}).get(name)
            if not isinstance(facts, dict) or has_unknown(facts):
                continue
            max_rank = int(facts.get("max_lora_rank") or DEFAULT_MAX_LORA_RANK)
            deployment = DeploymentFacts(name, facts.get("base_model"), max_rank)
            failures += [(f"deployments[{i}]" if field == "deployments" else field, message)
                         for field, message in addon_misfits(addon_base, rank, deployment)]
        return failures

    def _serverless_failures(self, spec: LoRAAddonSpec, unknown: set[str]) -> list[tuple[str, str]]:
        """No serverless addon on a model shut down for serverless use (the catalog file's dates)."""
        if "serverless" in unknown or not spec.serverless:
            return []
        catalog, failures = self.catalog_file("serverless")
        if catalog is None or "base_model" in unknown:
            return failures
        return self._shut_down(catalog, spec.base_model, "serverless", "a serverless addon on it is refused; put it "
                               "on another catalog model that takes serverless addons, or on a dedicated deployment")

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        # A refresh found the addon not served on a deployment it is declared on: the next `up` loads it again.
        deployed, wanted = olds.get("deployed_on"), news.get("deployments")
        return isinstance(deployed, list) and isinstance(wanted, list) and not has_unknown(wanted) and \
            not set(wanted) <= set(deployed)

    def _targets(self, spec: LoRAAddonSpec) -> list[tuple[str, str, DeploymentRecord]]:
        """(account, deployment id, record) of every deployment this addon must be served on."""
        store = self.store
        targets = []
        for name in spec.deployments:
            parsed = parse_deployment_name(name)
            record = store.read_deployment_record(parsed.account_id, parsed.resource_id)
            if record is None:
                raise EmberError(f"deployments: {name} does not exist; create the Deployment first")
            misfits = addon_misfits(spec.base_model, None, DeploymentFacts(name, record.base_model, None))
            if misfits:
                raise EmberError(f"deployments: {misfits[0][1]}")
            targets.append((parsed.account_id, parsed.resource_id, record))
        if spec.serverless:
            for record in store.deployment_records():
                if record.serverless and record.base_model == spec.base_model:
                    parsed = parse_deployment_name(record.name)
                    targets.append((parsed.account_id, parsed.resource_id, record))
        return targets

    def _apply(self, spec: LoRAAddonSpec, manifest: AddonManifest, previous: list[tuple[str, str, DeploymentRecord]]
               ) -> list[str]:
        """Put the addon in the desired set of exactly its target deployments and wait until replicas agree."""
        store = self.store
        targets = self._targets(spec)
        for _, _, record in targets:
            for field, message in addon_misfits(None, manifest.rank, DeploymentFacts(record.name, None,
                                                                                     record.max_lora_rank)):
                raise EmberError(f"{field}: {message}")
        if targets:  # the addon's own account calls it with its key (a serverless tenant has no other resource)
            store.ensure_key(spec.account_id, self.config.state_dir / "keys")
        keep = {(a, d) for a, d, _ in targets}
        for account, deployment, _ in previous:
            if (account, deployment) not in keep:
                self._withdraw(spec.name, account, deployment)
        for account, deployment, record in targets:
            store.change_desired_addons(account, deployment, lambda d: d.__setitem__(spec.name, manifest.object))
            self.cluster_of(record.cluster).reconcile_addons(store, account, deployment, {spec.name}, set())
        return sorted(record.name for _, _, record in targets)

    def _withdraw(self, name: str, account: str, deployment: str) -> None:
        store = self.store
        store.change_desired_addons(account, deployment, lambda d: d.pop(name, None))
        record = store.read_deployment_record(account, deployment)
        if record is None:
            return  # the deployment is gone, and its replicas with it
        try:
            self.cluster_of(record.cluster).reconcile_addons(store, account, deployment, set(), {name})
        except ClusterError as exc:
            progress(f"could not unload {name} from {account}/{deployment}: {exc}")

    def _upload(self, spec: LoRAAddonSpec, props: dict[str, Any]) -> AddonManifest:
        """The adapter's files in the store, checked against its base, as the manifest of one version (not written)."""
        store = self.store
        base = base_manifest(store, spec.base_model, spec.account_id)
        source = staged_source(spec.source)
        try:
            info = inspect_adapter(source, base.config)
        except ModelFilesError as exc:
            raise EmberError(f"source: {exc}") from None
        digest, _ = store.put_directory(source, progress)
        return AddonManifest(name=spec.name, digest=digest, object=store.urls.object(digest), base_model=spec.base_model,
                             rank=info.rank, target_modules=list(info.target_modules), created=time.time(),
                             inputs=self._inputs(props))

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: LoRAAddonSpec = self._spec(props)
        store = self.store
        base_manifest(store, spec.base_model, spec.account_id)
        if store.read_manifest(spec.account_id, spec.model_id) is not None:
            raise EmberError(f"model_id: {spec.name} already exists in the store (model IDs are globally unique)")
        manifest = self._upload(spec, props)
        store.write_manifest(manifest)
        try:
            deployed = self._apply(spec, manifest, [])
        except (EmberError, ClusterError, StoreError) as exc:
            self._undo(spec, manifest.digest)
            raise EmberError(str(exc)) from None
        return CreateResult(spec.name, props | self._outputs(manifest, deployed))

    def _undo(self, spec: LoRAAddonSpec, digest: str) -> None:
        for account, deployment, desired in list(self.store.desired_addon_sets()):
            if spec.name in desired:
                self._withdraw(spec.name, account, deployment)
        self.store.delete_manifest(spec.account_id, spec.model_id)
        self.store.delete_object(digest)

    @staticmethod
    def _outputs(manifest: AddonManifest, deployed: list[str]) -> dict[str, Any]:
        return {"name": manifest.name, "state": manifest.state.value, "digest": manifest.digest, "rank": manifest.rank,
                "target_modules": manifest.target_modules, "deployed_on": deployed, "message": manifest.message}

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        old_spec, spec = self._spec(olds), self._spec(news)
        store = self.store
        manifest = store.read_manifest(spec.account_id, spec.model_id)
        if manifest is None:
            raise EmberError(f"{spec.name} is missing from the store; run `refresh` and `up` to recreate it")
        try:
            previous = self._targets(old_spec)
        except EmberError:  # an old target was deleted meanwhile: nothing to withdraw from it
            previous = []
        old_version = manifest
        if news.get("source_digest") != olds.get("source_digest") or spec.source != old_spec.source:
            manifest = self._upload(spec, news)  # new weights: a new version, under the same name
        manifest = manifest.model_copy(update={"inputs": self._inputs(news)})
        # The manifest names the new object first: a replica loads only the object its addon's manifest names.
        store.write_manifest(manifest)
        try:
            deployed = self._apply(spec, manifest, previous)
        except (EmberError, ClusterError, StoreError) as exc:
            if manifest.digest != old_version.digest:
                self._restore(spec, old_version, manifest.digest, previous)
            raise EmberError(str(exc)) from None
        if manifest.digest != old_version.digest:
            # Every replica now serves the new version (those running a request on the old one finish it from memory).
            store.delete_object(old_version.digest)
        return UpdateResult(news | self._outputs(manifest, deployed))

    def _restore(self, spec: LoRAAddonSpec, old_version: AddonManifest, new_digest: str,
                 previous: list[tuple[str, str, DeploymentRecord]]) -> None:
        """A new version refused (by a deployment's rank, or a replica): the old one serves where it served."""
        store = self.store
        store.write_manifest(old_version)
        was = {(a, d) for a, d, _ in previous}
        for account, deployment, desired in list(store.desired_addon_sets()):
            if spec.name in desired and (account, deployment) not in was:  # a target this update added
                self._withdraw(spec.name, account, deployment)
        for account, deployment, record in previous:
            store.change_desired_addons(account, deployment, lambda d: d.__setitem__(spec.name, old_version.object))
            try:
                self.cluster_of(record.cluster).reconcile_addons(store, account, deployment, {spec.name}, set())
            except ClusterError as exc:
                progress(f"could not restore the previous version of {spec.name} on {account}/{deployment}: {exc}")
        store.delete_object(new_digest)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_model_name(id_ if by_id else spec.name)
        manifest = self.store.read_manifest(name.account_id, name.resource_id)
        if not isinstance(manifest, AddonManifest):
            return ReadResult("", {})
        if by_id:
            props = manifest.inputs
            spec = self._spec(props)
        deployed = []
        for account, deployment, record in self._safe_targets(spec):
            key = self.store.local_key(account, self.config.state_dir / "keys")
            if self.cluster_of(record.cluster).status(account, deployment, key).serves(spec.name):
                deployed.append(record.name)
        return ReadResult(spec.name, props | self._outputs(manifest, sorted(deployed)), props if by_id else None)

    def _safe_targets(self, spec: LoRAAddonSpec) -> list[tuple[str, str, DeploymentRecord]]:
        try:
            return self._targets(spec)
        except EmberError:
            return []

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec: LoRAAddonSpec = self._spec(props)
        manifest = self.store.read_manifest(spec.account_id, spec.model_id)
        self._undo(spec, manifest.digest if manifest else props.get("digest") or "")
