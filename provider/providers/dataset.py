"""The Dataset provider: a JSONL file of chat examples, checked line by line and uploaded content-addressed."""

from __future__ import annotations

import time
from typing import Any

from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from ember.provider.backends.store import StoreError
from ember.provider.domain.datasets import DatasetError, parse_dataset_bytes, read_dataset, read_dataset_bytes
from ember.provider.domain.kinds.dataset import DatasetSpec
from ember.provider.domain.names import parse_dataset_name
from ember.provider.domain.records import DatasetRecord
from ember.provider.domain.spec import ModelState
from ember.provider.domain.store_layout import DATASET_FILE
from ember.provider.providers.base import EmberError, EmberProvider, progress


class DatasetProvider(EmberProvider):
    spec_cls = DatasetSpec

    def check_known(self, spec: DatasetSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        if "source" in unknown or "://" in spec.source:
            return []
        try:
            read_dataset(spec.source)
        except DatasetError as exc:
            return [("source", str(exc))]
        return []

    def _upload(self, spec: DatasetSpec):
        """(digest, dataset): the file read once, checked, and uploaded as it is, so its digest is its content's."""
        try:
            raw = read_dataset_bytes(spec.source)
            dataset = parse_dataset_bytes(raw, spec.source)
        except DatasetError as exc:
            raise EmberError(f"source: {exc}") from None
        progress(f"uploading {spec.name}: {len(dataset.examples)} examples from {spec.source}")
        with self.scratch() as tmp:
            (tmp / DATASET_FILE).write_bytes(raw)
            digest, _ = self.store.put_directory(tmp, progress)
        return digest, dataset

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: DatasetSpec = self._spec(props)
        store = self.store
        name = parse_dataset_name(spec.name)
        if store.read_dataset_record(name.account_id, name.resource_id) is not None:
            raise EmberError(f"dataset_id: {spec.name} already exists in the store")
        digest, dataset = self._upload(spec)
        record = DatasetRecord(name=spec.name, digest=digest, object=store.urls.object(digest),
                               example_count=len(dataset.examples), message_count=dataset.message_count,
                               character_count=dataset.character_count, created=time.time(), inputs=self._inputs(props))
        try:
            store.write_dataset_record(record)
        except Exception:
            store.delete_object(digest)
            raise
        return CreateResult(spec.name, props | self._outputs(record))

    @staticmethod
    def _outputs(record: DatasetRecord) -> dict[str, Any]:
        return {"name": record.name, "state": record.state.value, "message": record.message, "digest": record.digest,
                "example_count": record.example_count, "message_count": record.message_count,
                "character_count": record.character_count}

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return olds.get("state") == ModelState.FAILED.value

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # Descriptions change in place; content a refresh found damaged is uploaded again from the source.
        spec: DatasetSpec = self._spec(news)
        name = parse_dataset_name(spec.name)
        record = self.store.read_dataset_record(name.account_id, name.resource_id)
        if record is None:
            raise EmberError(f"{spec.name} is missing from the store; run `refresh` and `up` to recreate it")
        try:
            self.store.verify_object(record.digest)
        except StoreError as exc:
            progress(f"{spec.name}: {exc}; uploading it again")
            self.store.discard_object(record.digest)
            if self._upload(spec)[0] != record.digest:
                raise EmberError(f"source: {spec.source} now holds other content than {spec.name}; a change of "
                                 f"content is a replacement") from None
        record = record.model_copy(update={"inputs": self._inputs(news), "state": ModelState.READY, "message": None})
        self.store.write_dataset_record(record)
        return UpdateResult(news | self._outputs(record))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        return self._read_stored(id_, props, parse_dataset_name,
                                 lambda name: self.store.read_dataset_record(name.account_id, name.resource_id),
                                 self._outputs)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec = self._spec(props)
        name = parse_dataset_name(spec.name)
        record = self.store.read_dataset_record(name.account_id, name.resource_id)
        self.store.delete_document(self.store.paths.dataset(name.account_id, name.resource_id))
        if record:
            self.store.delete_object(record.digest)
