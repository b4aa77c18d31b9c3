"""The dynamic providers: check · diff · create · read · update · delete for Model, LoRAAddon, Deployment.

check validates with the spec (numbers arrive as floats and are normalised; unknown values during
preview are tolerated) and touches neither network nor store; diff applies the rules in `diff_rules`.
create/update/delete write the store and, on the local cluster, start and stop replicas, waiting for
readiness within the configured timeout. Every failure leaves nothing half-made behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulumi.dynamic import CheckFailure, CheckResult, ConfigureRequest, CreateResult, DiffResult, ReadResult, \
    ResourceProvider, UpdateResult
from pulumi.output import Unknown
from pulumi.runtime import rpc

from ember.provider.domain import catalog

from ember.provider.providers import diff_rules
from ember.provider.backends.local_cluster import ClusterError, LocalCluster, serve_command
from ember.provider.domain.model_files import ModelFilesError, inspect_adapter, inspect_base_model
from ember.provider.domain.names import parse_deployment_name, parse_model_name
from ember.provider.domain.spec import (DeploymentArgs, DeploymentState, DeploymentType, LoRAAddonArgs, ModelArgs, ModelKind, ModelState,
                   parse, parse_known)
from ember.provider.backends.store import Store, StoreError
from ember.provider.domain.digests import file_digests, tree_digest

PROVIDER_KEY = "__provider"
# Facts a resource carries about the resources it references (base model, target deployments), computed by
# the program from their inputs: a dynamic provider's check sees one resource, and these let it refuse at
# preview what create would refuse. Diff ignores them.
REFERENCES = "references"


class EmberError(RuntimeError):
    """A create/update/delete that could not be done; the message says why and what to change."""


@dataclass(frozen=True)
class ProviderConfig:
    state_dir: Path
    store_url: str
    ready_timeout_s: float = 180.0

    @classmethod
    def load(cls, config=None, default_root: Path | None = None) -> "ProviderConfig":
        """Pulumi config (ember:stateDir, ember:storeUrl, ember:readyTimeout), then EMBER_* variables, then
        defaults: the state directory is .ember beside the program (the working directory)."""

        def get(key: str, env: str) -> Any:
            value = config.get(f"ember:{key}") if config is not None else None
            return value if value not in (None, "") else os.environ.get(env)

        root = default_root or Path.cwd()
        state_dir = (root / Path(get("stateDir", "EMBER_STATE_DIR") or ".ember").expanduser()).resolve()
        store_url = get("storeUrl", "EMBER_STORE_URL") or f"file://{state_dir / 'store'}"
        timeout = float(get("readyTimeout", "EMBER_READY_TIMEOUT") or 180.0)
        return cls(state_dir, store_url, timeout)


def _progress(message: str) -> None:
    # The engine shows a dynamic provider's stderr; plain lines keep long uploads and waits visible.
    print(f"[ember] {message}", flush=True, file=__import__("sys").stderr)


def has_unknown(value: Any) -> bool:
    """A value the engine will only know after a dependency is created (preview)."""
    if isinstance(value, Unknown) or (isinstance(value, str) and value == rpc.UNKNOWN):
        return True
    if isinstance(value, dict):
        return any(has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(has_unknown(v) for v in value)
    return False


class _Provider(ResourceProvider):
    spec_cls: type = ModelArgs
    # inputs the provider derives or receives from other resources, not part of the user's spec
    derived: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._config: ProviderConfig | None = None

    def configure(self, req: ConfigureRequest) -> None:
        self._config = ProviderConfig.load(req.config)

    @property
    def config(self) -> ProviderConfig:
        if self._config is None:
            self._config = ProviderConfig.load()
        return self._config

    @property
    def store(self) -> Store:
        return Store(self.config.store_url, self.config.state_dir / "locks")

    @property
    def cluster(self) -> LocalCluster:
        return LocalCluster(self.config.state_dir, self.config.ready_timeout_s, _progress)

    # -- check -------------------------------------------------------------------------------------------

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        props = {k: v for k, v in news.items() if k != PROVIDER_KEY and v is not None}
        # Derived fields arrive only when the engine copied old values in (ignore_changes): those are kept.
        derived = {k: props.pop(k) for k in self.derived if k in props}
        references = props.pop(REFERENCES, None)
        references = references if isinstance(references, dict) else {}
        unknown = {k for k, v in props.items() if has_unknown(v)}
        inputs = dict(props)
        spec, errors = parse_known(self.spec_cls, props, unknown)  # rules on unknowns: checked once known
        failures = [CheckFailure(field or "(resource)", message) for field, message in errors]
        if spec is not None:
            normalised = spec.model_dump(mode="json", exclude_none=True)
            inputs = {k: (props[k] if k in unknown else v) for k, v in normalised.items()}
            failures += [CheckFailure(f, m) for f, m in self.check_known(spec, unknown, references)]
            inputs |= self.derive(spec, unknown)
        inputs |= derived
        if references:
            inputs[REFERENCES] = references
        inputs[PROVIDER_KEY] = news.get(PROVIDER_KEY)
        return CheckResult(inputs, failures)

    def check_known(self, spec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        """Rules on the resource's own files and on the facts it carries about the resources it references."""
        return []

    @staticmethod
    def _base_failures(base_model: str, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        facts = references.get("base_model")
        if "base_model" in unknown or not isinstance(facts, dict) or catalog.lookup(parse_model_name(base_model).resource_id):
            return []
        if facts.get("addon"):
            return [("base_model", f"{base_model} is a LoRA addon, not a base model")]
        if facts.get("declared") is False:
            return [("base_model", f"{base_model} is neither a catalog model nor a Model declared in this program; "
                                   f"declare it before its users (or adopt it with Model.get)")]
        return []

    def derive(self, spec, unknown: set[str]) -> dict[str, Any]:
        """The content digest of a local source (models and addons), which decides replacements."""
        source = getattr(spec, "source", None)
        if "source" in unknown or source is None:
            return {}
        digest = _local_digest(source, self.config.state_dir / "digest-cache")
        return {"source_digest": digest} if digest else {}

    # -- diff ----------------------------------------------------------------------------------------------

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed, replaces = diff_rules.compare(self.spec_cls, olds, news, has_unknown)
        drift = self.drifted(olds, news)
        return DiffResult(changes=bool(changed or drift), replaces=replaces, delete_before_replace=True)

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return False

    def _spec(self, props: dict[str, Any]):
        return parse(self.spec_cls, {k: v for k, v in props.items()
                                     if k in self.spec_cls.model_fields and v is not None})

    @staticmethod
    def _inputs(props: dict[str, Any]) -> dict[str, Any]:
        """The checked inputs as stored beside a resource, so that `get` and `import` can give them back."""
        return {k: v for k, v in props.items() if k not in (PROVIDER_KEY, REFERENCES) and v is not None}

    def _read_spec(self, id_: str, props: dict[str, Any]):
        """(spec, by ID): on refresh the spec of the resource's state (its outputs); on get and import, whose
        properties are the program's inputs or just the ID's parts, None: the stored inputs stand for them."""
        if props.get("name") is None:
            return None, True
        return self._spec(props), False


def _local_digest(source: str, cache_dir: Path) -> str | None:
    """Content digest of a local source directory, cached by file sizes and times (preview stays fast)."""
    path = Path(source)
    if "://" in source or not path.is_dir():
        return None
    stats = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.rglob("*") if p.is_file())
    key = tree_digest({name: f"{size}:{mtime}" for name, size, mtime in stats}).removeprefix("sha256:")
    cached = cache_dir / key
    if cached.exists():
        return cached.read_text()
    digest = tree_digest(file_digests(path))
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(digest)
    return digest


def _staged_source(store: Store, source: str) -> Path:
    if "://" in source and not source.startswith("file://"):
        raise EmberError(f"source: {source!r}: the local cluster uploads from local directories or file:// URLs")
    return Path(source.removeprefix("file://"))


# ------------------------------------------------------------------------------------------------------
# Model


class ModelProvider(_Provider):
    spec_cls = ModelArgs
    derived = ("source_digest",)

    def check_known(self, spec: ModelArgs, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        if "source" in unknown or spec.source is None or "://" in spec.source:
            return []
        if not Path(spec.source).exists():
            return [("source", f"{spec.source!r} does not exist")]
        try:  # headers and config.json only: what a replica would otherwise die on after `up` started it
            inspect_base_model(spec.source)
        except ModelFilesError as exc:
            return [("source", str(exc))]
        return []

    def _source(self, spec: ModelArgs) -> Path:
        store = self.store
        if not spec.catalog_id:
            return _staged_source(store, spec.source)
        source = store.local_path(store._url(catalog.lookup(spec.catalog_id).store_path))
        if not source.is_dir():
            raise EmberError(f"catalog_id: the weights of {spec.catalog_id} are not in the store at {source}; an "
                             f"operator puts them there once for every stack")
        return source

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: ModelArgs = self._spec(props)
        store = self.store
        if store.read_manifest(spec.account_id, spec.model_id) is not None:
            raise EmberError(f"model_id: {spec.name} already exists in the store (model IDs are globally unique)")
        source = self._source(spec)
        try:
            info = inspect_base_model(source)
        except ModelFilesError as exc:
            raise EmberError(f"source: {exc}") from None
        _progress(f"uploading {spec.name} from {source}")
        digest, _ = store.put_directory(source, _progress)
        manifest = {"name": spec.name, "kind": ModelKind.HF_BASE_MODEL.value, "state": ModelState.READY.value,
                    "digest": digest, "architecture": info.architecture, "parameter_count": info.parameter_count,
                    "config": info.config, "object": store.object_url(digest), "catalog_id": spec.catalog_id,
                    "created": time.time(), "inputs": self._inputs(props)}
        try:
            store.write_manifest(spec.account_id, spec.model_id, manifest)
        except Exception:
            store.delete_object(digest)  # ours alone unless another manifest shares the content
            raise
        return CreateResult(spec.name, props | self._outputs(manifest))

    @staticmethod
    def _outputs(manifest: dict) -> dict[str, Any]:
        return {"name": manifest["name"], "state": manifest["state"], "digest": manifest["digest"],
                "architecture": manifest["architecture"], "parameter_count": manifest["parameter_count"],
                "message": manifest.get("message")}

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return olds.get("state") == ModelState.FAILED.value  # a refresh found the stored weights damaged

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # Only descriptions and an unchanged-digest source path change in place; the weights stay, and are
        # uploaded again when a refresh found them damaged.
        spec: ModelArgs = self._spec(news)
        store = self.store
        manifest = store.read_manifest(spec.account_id, spec.model_id)
        if manifest is None:
            raise EmberError(f"{spec.name} is missing from the store; run `refresh` and `up` to recreate it")
        try:
            store.verify_object(manifest["digest"])
        except StoreError as exc:
            _progress(f"{spec.name}: {exc}; uploading it again")
            store.discard_object(manifest["digest"])
            digest, _ = store.put_directory(self._source(spec), _progress)
            if digest != manifest["digest"]:
                raise EmberError(f"source: {spec.source} now holds other weights ({digest}) than {spec.name} "
                                 f"({manifest['digest']}); a change of weights is a replacement") from None
        manifest |= {"inputs": self._inputs(news)}
        store.write_manifest(spec.account_id, spec.model_id, manifest)
        return UpdateResult(news | self._outputs(manifest))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_model_name(id_) if by_id else parse_model_name(spec.name)
        manifest = self.store.read_manifest(name.account_id, name.resource_id)
        if manifest is None or manifest.get("kind") != ModelKind.HF_BASE_MODEL.value:
            return ReadResult("", {})  # gone: the engine drops it from the state
        try:
            self.store.verify_object(manifest["digest"])
        except StoreError as exc:
            manifest = manifest | {"state": ModelState.FAILED.value, "message": str(exc)}
        if by_id:
            inputs = manifest.get("inputs", {})
            return ReadResult(str(name), inputs | self._outputs(manifest), inputs)
        return ReadResult(id_, props | self._outputs(manifest))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec = self._spec(props)
        manifest = self.store.read_manifest(spec.account_id, spec.model_id)
        self.store.delete_manifest(spec.account_id, spec.model_id)
        if manifest:
            self.store.delete_object(manifest["digest"])


def _base_manifest(store: Store, base_model: str) -> dict:
    name = parse_model_name(base_model)
    manifest = store.read_manifest(name.account_id, name.resource_id)
    if manifest is None or manifest.get("kind") != ModelKind.HF_BASE_MODEL.value:
        raise EmberError(f"base_model: {base_model} is not a base model in the store; declare it as a Model first")
    if manifest.get("state") != ModelState.READY.value:
        raise EmberError(f"base_model: {base_model} is {manifest.get('state')}, not READY")
    return manifest


# ------------------------------------------------------------------------------------------------------
# Deployment


class DeploymentProvider(_Provider):
    spec_cls = DeploymentArgs
    derived = ("base_model_digest",)

    def check_known(self, spec: DeploymentArgs, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
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

    def _run(self, spec: DeploymentArgs, props: dict[str, Any], creating: bool = False) -> dict[str, Any]:
        store, cluster = self.store, self.cluster
        base = _base_manifest(store, spec.base_model)
        key = store.ensure_key(spec.account_id, self.config.state_dir / "keys")
        # "created" stays False until a create has finished: a create cut short (a killed `up`) is resumed by
        # the next one, while a deployment another stack finished creating is never taken over.
        record = {"name": spec.name, "base_model": spec.base_model, "serverless": spec.deployment_type is DeploymentType.SERVERLESS,
                  "max_lora_rank": spec.max_lora_rank, "cluster": spec.cluster, "created": not creating,
                  "inputs": self._inputs(props)}
        store.write_deployment_record(spec.account_id, spec.deployment_id, record)
        store.change_desired_addons(spec.account_id, spec.deployment_id, lambda desired: None)  # replicas read it
        if spec.cluster == "kubernetes":
            # Pods are pulumi-kubernetes resources declared beside this one; they read this store themselves.
            store.write_deployment_record(spec.account_id, spec.deployment_id, record | {"created": True})
            return {"name": spec.name, "state": DeploymentState.READY.value, "message": None, "endpoints": [],
                    "ready_replicas": 0, "serving_digest": base["digest"]}
        request_log = self.config.state_dir / "request-logs" / spec.account_id / f"{spec.deployment_id}.jsonl"
        request_log.parent.mkdir(parents=True, exist_ok=True)
        command = serve_command(spec, store.local_path(base["object"]), spec.base_model, store.keys_url, store.url,
                                store.desired_addons_url(spec.account_id, spec.deployment_id), request_log)
        cluster.scale(spec, command, key)
        # The desired addon set outlives a replacement of the deployment (the addons own it): the new replicas
        # load it as they start, and the deployment is ready only once they serve all of it.
        desired = set(store.desired_addons(spec.account_id, spec.deployment_id))
        if desired:
            _progress(f"waiting for {spec.name} to serve its {len(desired)} addons")
            cluster.reconcile_addons(spec.account_id, spec.deployment_id, key, desired, set())
        if creating:
            store.write_deployment_record(spec.account_id, spec.deployment_id, record | {"created": True})
        return self._status(spec, base["digest"])

    def _status(self, spec: DeploymentArgs, base_digest: str | None) -> dict[str, Any]:
        endpoints, ready, _ = self.cluster.status(spec.account_id, spec.deployment_id)
        wanted = LocalCluster.replica_count(spec)
        state = DeploymentState.READY if ready >= wanted else DeploymentState.FAILED
        message = None if ready >= wanted else f"{ready} of {wanted} replicas are ready"
        return {"name": spec.name, "state": state.value, "message": message, "endpoints": endpoints,
                "ready_replicas": ready, "serving_digest": base_digest}

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: DeploymentArgs = self._spec(props)
        # Refusals come before anything is touched: a taken name belongs to someone else's live deployment.
        if spec.cluster == "local":
            try:
                LocalCluster.check_supported(spec)
            except ClusterError as exc:
                raise EmberError(str(exc)) from None
        existing = self.store.read_deployment_record(spec.account_id, spec.deployment_id)
        if existing and existing.get("created", True):
            raise EmberError(f"deployment_id: {spec.name} already exists")
        if existing:
            _progress(f"resuming the interrupted create of {spec.name}")
        try:
            outputs = self._run(spec, props, creating=True)
        except (ClusterError, StoreError, EmberError) as exc:
            self._remove(spec)  # only what this create (or the interrupted one it resumed) made
            raise EmberError(str(exc)) from None
        return CreateResult(spec.name, props | outputs)

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        spec: DeploymentArgs = self._spec(news)
        try:
            outputs = self._run(spec, news)
        except (ClusterError, StoreError) as exc:
            raise EmberError(str(exc)) from None
        return UpdateResult(news | outputs)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_deployment_name(id_ if by_id else spec.name)
        record = self.store.read_deployment_record(name.account_id, name.resource_id)
        if not record or not record.get("created", True):
            return ReadResult("", {})
        if by_id:
            inputs = record.get("inputs", {})
            spec, props = self._spec(inputs), inputs
        outputs = props if spec.cluster == "kubernetes" else props | self._status(spec, props.get("serving_digest"))
        return ReadResult(spec.name, outputs, props if by_id else None)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        self._remove(self._spec(props))

    def _remove(self, spec: DeploymentArgs) -> None:
        self.cluster.stop_all(spec.account_id, spec.deployment_id)
        self.store.delete_deployment(spec.account_id, spec.deployment_id)


# ------------------------------------------------------------------------------------------------------
# LoRA addon


class LoRAAddonProvider(_Provider):
    spec_cls = LoRAAddonArgs
    derived = ("base_model_digest", "source_digest")

    def check_known(self, spec: LoRAAddonArgs, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references)
        if "source" in unknown or "://" in spec.source:
            return failures
        if not Path(spec.source).exists():
            return failures + [("source", f"{spec.source!r} does not exist")]
        try:  # headers only; against the base model's config.json when its files are here too
            base = (references.get("base_model") or {}).get("source") if "base_model" not in unknown else None
            base_config = None
            if isinstance(base, str) and (Path(base) / "config.json").is_file():
                base_config = json.loads((Path(base) / "config.json").read_text())
            rank = inspect_adapter(spec.source, base_config).rank
        except (ModelFilesError, ValueError, KeyError, OSError) as exc:
            return failures + [("source", str(exc))]
        targets = references.get("deployments") if "deployments" not in unknown else None
        for i, name in enumerate(spec.deployments):
            facts = (targets or {}).get(name)
            if not isinstance(facts, dict) or has_unknown(facts):
                continue
            if "base_model" not in unknown and facts.get("base_model") != spec.base_model:
                failures.append((f"deployments[{i}]", f"{name} serves base model {facts.get('base_model')}, not "
                                                      f"this addon's base {spec.base_model}"))
            if rank > int(facts.get("max_lora_rank") or 64):
                failures.append(("source", f"rank {rank} is above {name}'s max_lora_rank "
                                           f"{int(facts.get('max_lora_rank') or 64)}"))
        return failures

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        # A refresh found the addon not served on a deployment it is declared on: the next `up` loads it again.
        deployed, wanted = olds.get("deployed_on"), news.get("deployments")
        return isinstance(deployed, list) and isinstance(wanted, list) and not has_unknown(wanted) and \
            not set(wanted) <= set(deployed)

    def _targets(self, spec: LoRAAddonArgs) -> list[tuple[str, str, dict]]:
        """(account, deployment id, record) of every deployment this addon must be served on."""
        store = self.store
        targets = []
        for name in spec.deployments:
            parsed = parse_deployment_name(name)
            record = store.read_deployment_record(parsed.account_id, parsed.resource_id)
            if record is None:
                raise EmberError(f"deployments: {name} does not exist; create the Deployment first")
            if record["base_model"] != spec.base_model:
                raise EmberError(f"deployments: {name} serves base model {record['base_model']}, not this addon's "
                                 f"base {spec.base_model}")
            targets.append((parsed.account_id, parsed.resource_id, record))
        if spec.serverless:
            for record in store.deployment_records():
                if record.get("serverless") and record["base_model"] == spec.base_model:
                    parsed = parse_deployment_name(record["name"])
                    targets.append((parsed.account_id, parsed.resource_id, record))
        return targets

    def _apply(self, spec: LoRAAddonArgs, manifest: dict, previous: list[tuple[str, str, dict]]) -> list[str]:
        """Put the addon in the desired set of exactly its target deployments and wait until replicas agree."""
        store, cluster = self.store, self.cluster
        targets = self._targets(spec)
        for account, deployment, record in targets:
            if manifest["rank"] > record.get("max_lora_rank", 64):
                raise EmberError(f"source: rank {manifest['rank']} is above {record['name']}'s max_lora_rank "
                                 f"{record.get('max_lora_rank')}")
        if targets:  # the addon's own account calls it with its key (a serverless tenant has no other resource)
            store.ensure_key(spec.account_id, self.config.state_dir / "keys")
        keep = {(a, d) for a, d, _ in targets}
        for account, deployment, _ in previous:
            if (account, deployment) not in keep:
                self._withdraw(spec.name, account, deployment)
        for account, deployment, record in targets:
            store.change_desired_addons(account, deployment, lambda d: d.__setitem__(spec.name, manifest["object"]))
            if record.get("cluster") == "kubernetes":
                continue  # pods poll the desired set in the store
            key = store.ensure_key(account, self.config.state_dir / "keys")
            _progress(f"loading {spec.name} on {record['name']}")
            cluster.reconcile_addons(account, deployment, key, {spec.name}, set())
        return sorted(record["name"] for _, _, record in targets)

    def _withdraw(self, name: str, account: str, deployment: str) -> None:
        store = self.store
        store.change_desired_addons(account, deployment, lambda d: d.pop(name, None))
        try:
            self.cluster.reconcile_addons(account, deployment, store.ensure_key(account, self.config.state_dir / "keys"),
                                          set(), {name})
        except ClusterError as exc:
            _progress(f"could not unload {name} from {account}/{deployment}: {exc}")

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: LoRAAddonArgs = self._spec(props)
        store = self.store
        base = _base_manifest(store, spec.base_model)
        if store.read_manifest(spec.account_id, spec.model_id) is not None:
            raise EmberError(f"model_id: {spec.name} already exists in the store (model IDs are globally unique)")
        source = _staged_source(store, spec.source)
        try:
            info = inspect_adapter(source, base["config"])
        except ModelFilesError as exc:
            raise EmberError(f"source: {exc}") from None
        digest, _ = store.put_directory(source, _progress)
        manifest = {"name": spec.name, "kind": ModelKind.HF_PEFT_ADDON.value, "state": ModelState.READY.value,
                    "digest": digest, "base_model": spec.base_model, "rank": info.rank,
                    "target_modules": list(info.target_modules), "object": store.object_url(digest),
                    "created": time.time(), "inputs": self._inputs(props)}
        store.write_manifest(spec.account_id, spec.model_id, manifest)
        try:
            deployed = self._apply(spec, manifest, [])
        except (EmberError, ClusterError, StoreError) as exc:
            self._undo(spec, manifest)
            raise EmberError(str(exc)) from None
        return CreateResult(spec.name, props | self._outputs(manifest, deployed))

    def _undo(self, spec: LoRAAddonArgs, manifest: dict) -> None:
        for path in self.store.fs.glob(self.store._path("deployments", "*", "*", "addons.json")):
            account, deployment = path.split("/")[-3:-1]
            if spec.name in self.store.desired_addons(account, deployment):
                self._withdraw(spec.name, account, deployment)
        self.store.delete_manifest(spec.account_id, spec.model_id)
        self.store.delete_object(manifest["digest"])

    @staticmethod
    def _outputs(manifest: dict, deployed: list[str]) -> dict[str, Any]:
        return {"name": manifest["name"], "state": manifest["state"], "digest": manifest["digest"],
                "rank": manifest["rank"], "target_modules": manifest["target_modules"], "deployed_on": deployed,
                "message": manifest.get("message")}

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        old_spec, spec = self._spec(olds), self._spec(news)
        manifest = self.store.read_manifest(spec.account_id, spec.model_id)
        if manifest is None:
            raise EmberError(f"{spec.name} is missing from the store; run `refresh` and `up` to recreate it")
        try:
            previous = self._targets(old_spec)
        except EmberError:  # an old target was deleted meanwhile: nothing to withdraw from it
            previous = []
        try:
            deployed = self._apply(spec, manifest, previous)
        except (ClusterError, StoreError) as exc:
            raise EmberError(str(exc)) from None
        manifest |= {"inputs": self._inputs(news)}
        self.store.write_manifest(spec.account_id, spec.model_id, manifest)
        return UpdateResult(news | self._outputs(manifest, deployed))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_model_name(id_ if by_id else spec.name)
        manifest = self.store.read_manifest(name.account_id, name.resource_id)
        if manifest is None or manifest.get("kind") != ModelKind.HF_PEFT_ADDON.value:
            return ReadResult("", {})
        if by_id:
            props = manifest.get("inputs", {})
            spec = self._spec(props)
        deployed = []
        for account, deployment, record in self._safe_targets(spec):
            _, ready, loaded = self.cluster.status(account, deployment)
            if record.get("cluster") == "kubernetes" or (ready and spec.name in loaded):
                deployed.append(record["name"])
        return ReadResult(spec.name, props | self._outputs(manifest, sorted(deployed)), props if by_id else None)

    def _safe_targets(self, spec: LoRAAddonArgs) -> list[tuple[str, str, dict]]:
        try:
            return self._targets(spec)
        except EmberError:
            return []

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec: LoRAAddonArgs = self._spec(props)
        manifest = self.store.read_manifest(spec.account_id, spec.model_id)
        self._undo(spec, manifest or {"digest": props.get("digest") or ""})


PROVIDERS: dict[str, type[_Provider]] = {"Model": ModelProvider, "LoRAAddon": LoRAAddonProvider,
                                          "Deployment": DeploymentProvider}
