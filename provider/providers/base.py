"""What the dynamic providers share: configuration, check (spec, references, derived digests), diff, and the store
and clusters they work on. One module per kind holds the rest.

check validates with the kind's spec (numbers arrive as floats and are normalised; unknown values during preview are
tolerated) and the rules that span resources (domain/rules.py), and touches neither network nor store; diff applies
the rules in `diff_rules`. create/update/delete write the store and run replicas or training through the resource's
cluster (`CLUSTERS`), waiting for readiness within the configured timeout. Every failure leaves nothing half-made.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulumi.dynamic import (CheckFailure, CheckResult, ConfigureRequest, CreateResult, DiffResult, ReadResult,
                            ResourceProvider, UpdateResult)
from pulumi.output import Unknown
from pulumi.runtime import rpc

from ember.provider.backends.cluster import Cluster, ClusterError
from ember.provider.backends.kubernetes_cluster import KubernetesCluster
from ember.provider.backends.local_cluster import LocalCluster
from ember.provider.backends.processes import abandoned, owner
from ember.provider.backends.store import Store, StoreError
from ember.provider.domain import catalog_lifecycle, file_kinds
from ember.provider.domain.accounts import foreign_model_refusal
from ember.provider.domain.digests import file_digests, file_sha256, tree_digest
from ember.provider.domain.kinds import BY_SPEC
from ember.provider.domain.kinds.model import ModelSpec
from ember.provider.domain.names import parse_model_name
from ember.provider.domain.records import BaseModelManifest
from ember.provider.domain.rules import base_model_refusal
from ember.provider.domain.spec import ModelState, parse, parse_known
from ember.provider.providers import diff_rules

PROVIDER_KEY = "__provider"
CLUSTERS: dict[str, type[Cluster]] = {cls.name: cls for cls in (LocalCluster, KubernetesCluster)}
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
    catalog_file: Path | None = None  # the serverless lifecycle's dates (domain/catalog_lifecycle.py); None: none

    @classmethod
    def load(cls, config=None, default_root: Path | None = None) -> "ProviderConfig":
        """Pulumi config (ember:stateDir, ember:storeUrl, ember:readyTimeout, ember:catalogFile), then EMBER_*
        variables, then defaults: the state directory is .ember beside the program (the working directory)."""

        def get(key: str, env: str) -> Any:
            value = config.get(f"ember:{key}") if config is not None else None
            return value if value not in (None, "") else os.environ.get(env)

        root = default_root or Path.cwd()
        state_dir = (root / Path(get("stateDir", "EMBER_STATE_DIR") or ".ember").expanduser()).resolve()
        store_url = get("storeUrl", "EMBER_STORE_URL") or f"file://{state_dir / 'store'}"
        timeout = float(get("readyTimeout", "EMBER_READY_TIMEOUT") or 180.0)
        return cls(state_dir, store_url, timeout, catalog_lifecycle.locate(get("catalogFile", catalog_lifecycle.ENV), root))


def progress(message: str) -> None:
    # The engine shows a dynamic provider's stderr; plain lines keep long uploads and waits visible.
    print(f"[ember] {message}", flush=True, file=sys.stderr)


def has_unknown(value: Any) -> bool:
    """A value the engine will only know after a dependency is created (preview)."""
    if isinstance(value, Unknown) or (isinstance(value, str) and value == rpc.UNKNOWN):
        return True
    if isinstance(value, dict):
        return any(has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(has_unknown(v) for v in value)
    return False


class EmberProvider(ResourceProvider):
    spec_cls: type = ModelSpec

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
        self.sweep_scratch()  # every create, update, refresh and delete: so a later `up` or `destroy` cleans up
        return Store(self.config.store_url, self.config.state_dir / "locks")

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private directory under the state directory, gone afterwards (conversions, downloads, training).
        Named for its owner (`processes.owner`), as the store's upload staging is, so that the folder of a run
        killed half-way (a GGUF conversion's `.converted.partial-*`) is swept by whoever comes next."""
        root = self.config.state_dir / "scratch"
        root.mkdir(parents=True, exist_ok=True)
        self.sweep_scratch()
        with tempfile.TemporaryDirectory(dir=root, prefix=f"{owner()}-") as tmp:
            yield Path(tmp)

    def sweep_scratch(self) -> None:
        """Remove the scratch folders whose process is gone (SIGKILL leaves them); a live one's stay."""
        root = self.config.state_dir / "scratch"
        for entry in root.iterdir() if root.is_dir() else ():
            if abandoned(entry.name):
                shutil.rmtree(entry, ignore_errors=True)

    def cluster_of(self, name: str) -> Cluster:
        """The cluster a resource's `cluster` input names."""
        return CLUSTERS[name](self.config.state_dir, self.config.ready_timeout_s, progress)

    # -- check -------------------------------------------------------------------------------------------

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        props = {k: v for k, v in news.items() if k != PROVIDER_KEY and v is not None}
        # Derived fields arrive only when the engine copied old values in (ignore_changes): those are kept.
        derived = {k: props.pop(k) for k in BY_SPEC[self.spec_cls].derived if k in props}
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
        if "base_model" in unknown or not isinstance(facts, dict):
            return []
        refusal = base_model_refusal(base_model, bool(facts.get("addon")), facts.get("declared"))
        return [("base_model", refusal)] if refusal else []

    def catalog_file(self, field: str) -> tuple[catalog_lifecycle.CatalogFile | None, list[tuple[str, str]]]:
        """The serverless lifecycle's dates, or (None, the failure of `field`, the input that made this resource read
        the file) naming the file, its field and the value."""
        try:
            return catalog_lifecycle.load(self.config.catalog_file), []
        except catalog_lifecycle.CatalogFileError as exc:
            return None, [(field, f"catalog file {exc}")]

    @staticmethod
    def _shut_down(catalog: catalog_lifecycle.CatalogFile, base_model: str, field: str,
                   instead: str) -> list[tuple[str, str]]:
        """A serverless use of a catalog base from its shutdown date on (the replicas answer 410 from that day)."""
        model_id = parse_model_name(base_model).resource_id
        lifecycle = catalog.lifecycle(model_id)
        on = catalog_lifecycle.today()
        if lifecycle is None or lifecycle.phase(on) != "shut_down":
            return []
        return [(field, f"{lifecycle.notice(model_id, on)}: {instead}")]

    def derive(self, spec, unknown: set[str]) -> dict[str, Any]:
        """The content digest of a local source (models and addons), which decides replacements."""
        source = getattr(spec, "source", None)
        if "source" in unknown or source is None:
            return {}
        digest = local_digest(source, self.config.state_dir / "digest-cache")
        return {"source_digest": digest} if digest else {}

    # -- diff ----------------------------------------------------------------------------------------------

    # A replacement deletes the old resource before it creates the new one, which takes its name (globally unique).
    delete_before_replace = True

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed, replaces = diff_rules.compare(self.spec_cls, olds, news, has_unknown)
        if replaces and (note := self.interruption(replaces)):
            progress(f"{olds.get('name') or _id}: {note}")  # the engine shows a provider's stderr with the preview
        drift = self.drifted(olds, news)
        return DiffResult(changes=bool(changed or drift), replaces=replaces,
                          delete_before_replace=self.delete_before_replace)

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return False

    def interruption(self, replaces: list[str]) -> str | None:
        """What a replacement for these changed inputs does to clients, where they see it (None: nothing)."""
        return None

    def _spec(self, props: dict[str, Any]):
        return parse(self.spec_cls, {k: v for k, v in props.items()
                                     if k in self.spec_cls.model_fields and v is not None})

    @staticmethod
    def _inputs(props: dict[str, Any]) -> dict[str, Any]:
        """The checked inputs as stored beside a resource, so that `get` and `import` can give them back."""
        return {k: v for k, v in props.items() if k not in (PROVIDER_KEY, REFERENCES) and v is not None}

    def _read_stored(self, id_: str, props: dict[str, Any], parse_name: Callable, load: Callable,
                     outputs: Callable) -> ReadResult:
        """refresh, get and import of a resource kept as a store record over a content-addressed object (a model,
        a dataset): its record's outputs, FAILED with the reason when the object is damaged; gone with the record."""
        spec, by_id = self._read_spec(id_, props)
        name = parse_name(id_) if by_id else parse_name(spec.name)
        record = load(name)
        if record is None:
            return ReadResult("", {})  # gone: the engine drops it from the state
        try:
            self.store.verify_object(record.digest)
        except StoreError as exc:
            record = record.model_copy(update={"state": ModelState.FAILED, "message": str(exc)})
        if by_id:
            return ReadResult(str(name), record.inputs | outputs(record), record.inputs)
        return ReadResult(id_, props | outputs(record))

    def _read_spec(self, id_: str, props: dict[str, Any]):
        """(spec, by ID): on refresh the spec of the resource's state (its outputs); on get and import, whose
        properties are the program's inputs or just the ID's parts, None: the stored inputs stand for them."""
        if props.get("name") is None:
            return None, True
        return self._spec(props), False


class ClusterProvider(EmberProvider):
    """A resource its cluster runs (a deployment's replicas, the gateway): create runs it and, when that fails, removes
    what it made; update runs it again; delete removes it. Each kind says how (`_run`, `_remove`)."""

    def _run(self, spec, props: dict[str, Any], creating: bool = False) -> dict[str, Any]:
        """Write the resource's records to the store and have its cluster run it; its outputs."""
        raise NotImplementedError

    def _remove(self, spec) -> None:
        raise NotImplementedError

    def _create(self, spec, props: dict[str, Any]) -> CreateResult:
        try:
            outputs = self._run(spec, props, creating=True)
        except (ClusterError, StoreError, EmberError) as exc:
            self._remove(spec)  # only what this create (or the interrupted one it resumes) made, under its own name
            raise EmberError(str(exc)) from None
        return CreateResult(spec.name, props | outputs)

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        try:
            outputs = self._run(self._spec(news), news)
        except (ClusterError, StoreError) as exc:
            raise EmberError(str(exc)) from None
        return UpdateResult(news | outputs)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        self._remove(self._spec(props))


def local_digest(source: str, cache_dir: Path) -> str | None:
    """Content digest of a local source (a directory, or one file such as a GGUF), cached by file sizes and
    times (preview stays fast)."""
    path = Path(source)
    if "://" in source or not (path.is_dir() or file_kinds.problem(path) is None):
        return None  # check names what is wrong; a FIFO would block the read below forever
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    # a file is named by a constant, so that renaming it is no change of weights
    stats = sorted((p.relative_to(path).as_posix() if p != path else "file", p.stat().st_size, p.stat().st_mtime_ns)
                   for p in files)
    key = tree_digest({name: f"{size}:{mtime}" for name, size, mtime in stats}).removeprefix("sha256:")
    cached = cache_dir / key
    if cached.exists():
        return cached.read_text()
    digest = tree_digest(file_digests(path) if path.is_dir() else {"file": file_sha256(path)})
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(digest)
    return digest


def staged_source(source: str) -> Path:
    """The directory an upload reads: the local cluster's providers upload from this machine."""
    if "://" in source and not source.startswith("file://"):
        raise EmberError(f"source: {source!r}: the local cluster uploads from local directories or file:// URLs")
    return Path(source.removeprefix("file://"))


def base_manifest(store: Store, base_model: str, account_id: str) -> BaseModelManifest:
    """The manifest of a READY base model in the store, which a deployment, an addon or a fine-tuning job of
    `account_id` is built on: one of its own account's models, or a catalog model (so says the manifest)."""
    name = parse_model_name(base_model)
    manifest = store.read_manifest(name.account_id, name.resource_id)
    is_catalog = isinstance(manifest, BaseModelManifest) and manifest.catalog_id is not None
    refusal = foreign_model_refusal(account_id, base_model, is_catalog)
    if refusal:  # the same words whether or not that account has such a model
        raise EmberError(f"base_model: {refusal}")
    if not isinstance(manifest, BaseModelManifest):
        raise EmberError(f"base_model: {base_model} is not a base model in the store; declare it as a Model first")
    if manifest.state is not ModelState.READY:
        raise EmberError(f"base_model: {base_model} is {manifest.state.value}, not READY")
    return manifest
