"""The Model provider: a base model's weights uploaded content-addressed to the store, with a manifest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from ember.provider.backends.store import StoreError
from ember.provider.domain import file_kinds
from ember.provider.domain.gguf_model import convert_gguf, is_gguf, read_gguf
from ember.provider.domain.kinds.model import ModelSpec
from ember.provider.domain.model_files import ModelFilesError, inspect_base_model
from ember.provider.domain.names import parse_model_name
from ember.provider.domain.records import BaseModelManifest
from ember.provider.domain.spec import ModelState
from ember.provider.providers.base import EmberError, EmberProvider, progress, staged_source


class ModelProvider(EmberProvider):
    spec_cls = ModelSpec

    def interruption(self, replaces: list[str]) -> str | None:
        # Their names come from the model's: they are replaced with it, delete first (a model name is unique).
        return ("replacing the model replaces every deployment and addon on it: clients get model_not_found until "
                "the new ones are ready")

    def check_known(self, spec: ModelSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        if "source" in unknown or spec.source is None or "://" in spec.source:
            return []
        problem = file_kinds.problem(spec.source, "file" if is_gguf(spec.source) else "directory")
        if problem is not None:
            return [("source", f"{spec.source!r} {problem}")]
        try:  # headers and config.json only: what a replica would otherwise die on after `up` started it
            read_gguf(spec.source) if is_gguf(spec.source) else inspect_base_model(spec.source)
        except ModelFilesError as exc:
            return [("source", str(exc))]
        return []

    @contextmanager
    def _source(self, spec: ModelSpec) -> Iterator[Path]:
        """The Hugging Face directory an upload reads: the source itself, the catalog's copy, or a GGUF converted
        into a scratch directory that is gone afterwards."""
        if spec.catalog_id:
            source = self.store.local_path(self.store.urls.catalog(spec.catalog_id))
            if not source.is_dir():
                raise EmberError(f"catalog_id: the weights of {spec.catalog_id} are not in the store at {source}; an "
                                 f"operator puts them there once for every stack")
            yield source
        elif is_gguf(spec.source):
            with self.scratch() as tmp:
                try:
                    yield convert_gguf(_local_file(spec.source, tmp), tmp / "converted", progress)
                except ModelFilesError as exc:
                    raise EmberError(f"source: {exc}") from None
        else:
            yield staged_source(spec.source)

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: ModelSpec = self._spec(props)
        store = self.store
        if store.read_manifest(spec.account_id, spec.model_id) is not None:
            raise EmberError(f"model_id: {spec.name} already exists in the store (model IDs are globally unique)")
        with self._source(spec) as source:
            try:
                info = inspect_base_model(source)
            except ModelFilesError as exc:
                raise EmberError(f"source: {exc}") from None
            progress(f"uploading {spec.name} from {spec.source or source}")
            digest, _ = store.put_directory(source, progress)
        manifest = BaseModelManifest(name=spec.name, digest=digest, object=store.urls.object(digest),
                                     architecture=info.architecture, parameter_count=info.parameter_count,
                                     config=info.config, catalog_id=spec.catalog_id, created=time.time(),
                                     inputs=self._inputs(props))
        try:
            store.write_manifest(manifest)
        except Exception:
            store.delete_object(digest)  # ours alone unless another manifest shares the content
            raise
        return CreateResult(spec.name, props | self._outputs(manifest))

    @staticmethod
    def _outputs(manifest: BaseModelManifest) -> dict[str, Any]:
        return {"name": manifest.name, "state": manifest.state.value, "digest": manifest.digest,
                "architecture": manifest.architecture, "parameter_count": manifest.parameter_count,
                "message": manifest.message}

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return olds.get("state") == ModelState.FAILED.value  # a refresh found the stored weights damaged

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # Only descriptions and an unchanged-digest source path change in place; the weights stay, and are
        # uploaded again when a refresh found them damaged.
        spec: ModelSpec = self._spec(news)
        store = self.store
        manifest = store.read_manifest(spec.account_id, spec.model_id)
        if manifest is None:
            raise EmberError(f"{spec.name} is missing from the store; run `refresh` and `up` to recreate it")
        try:
            store.verify_object(manifest.digest)
        except StoreError as exc:
            progress(f"{spec.name}: {exc}; uploading it again")
            store.discard_object(manifest.digest)
            with self._source(spec) as source:
                digest, _ = store.put_directory(source, progress)
            if digest != manifest.digest:
                raise EmberError(f"source: {spec.source} now holds other weights ({digest}) than {spec.name} "
                                 f"({manifest.digest}); a change of weights is a replacement") from None
        manifest = manifest.model_copy(update={"inputs": self._inputs(news)})
        store.write_manifest(manifest)
        return UpdateResult(news | self._outputs(manifest))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        def load(name):
            manifest = self.store.read_manifest(name.account_id, name.resource_id)
            return manifest if isinstance(manifest, BaseModelManifest) else None

        return self._read_stored(id_, props, parse_model_name, load, self._outputs)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec = self._spec(props)
        manifest = self.store.read_manifest(spec.account_id, spec.model_id)
        self.store.delete_manifest(spec.account_id, spec.model_id)
        if manifest:
            self.store.delete_object(manifest.digest)


def _local_file(source: str, scratch: Path) -> Path:
    """A local path for a file source: itself, or a download of a remote (fsspec) URL into `scratch`."""
    if "://" not in source or source.startswith("file://"):
        return Path(source.removeprefix("file://"))
    target = scratch / Path(source.split("://", 1)[1]).name
    with fsspec.open(source, "rb") as remote, target.open("wb") as local:
        done = 0
        while chunk := remote.read(64 * 1024 * 1024):
            local.write(chunk)
            done += len(chunk)
            progress(f"downloading {source}: {done / 1e6:,.0f} MB")
    return target
