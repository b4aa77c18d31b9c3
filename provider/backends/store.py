"""The model store: weights, manifests and each deployment's desired addon set, on any fsspec URL.

Where each thing lives is `StoreLayout`'s (in the domain, which replicas share).

Writes are atomic: an object is uploaded under a temporary name and renamed into place only once every
file is there and its digest checks out; a manifest is written last, so a half-written model is never
visible, and readers verify digests. Desired addon sets are changed under a lock, so LoRAAddons created in
parallel on one deployment all land.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec

from ember.provider.backends.processes import abandoned, owner
from ember.provider.domain.accounts import IMPLICIT_KEY_ID, Accounts, KeyRecord
from ember.provider.domain.audit import AuditLog
from ember.provider.domain.digests import OBJECT_MARKER, file_digests, tree_digest
from ember.provider.domain.names import (api_key_name, parse_dataset_name, parse_deployment_name, parse_fine_tuning_job_name,
                                         parse_gateway_name, parse_model_name)
from ember.provider.domain.records import (MANIFEST, DatasetRecord, DeploymentRecord, FineTuningJobRecord,
                                           GatewayRecord, Manifest)
from ember.provider.domain.store_layout import StoreLayout


class StoreError(RuntimeError):
    pass


class Store:
    def __init__(self, url: str, lock_dir: str | Path):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.lock_dir = Path(lock_dir)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = protocol in ("file", "local")
        self.paths = StoreLayout(root)  # for this process's fsspec calls
        self.urls = StoreLayout(root if self.is_local else f"{protocol}://{root}")  # for replicas and manifests

    def local_path(self, url: str) -> Path:
        """A directory the runtime can read; only file stores are readable in place."""
        if "://" in url and not url.startswith("file://"):
            raise StoreError(f"{url}: replicas on the local cluster read file:// stores only")
        return Path(url.removeprefix("file://"))

    # -- objects -----------------------------------------------------------------------------------------

    def put_directory(self, source: Path, progress: Callable[[str], None] = lambda _: None) -> tuple[str, dict[str, str]]:
        """Upload a directory content-addressed; returns (digest, file digests). Idempotent."""
        digests = file_digests(source)
        digest = tree_digest(digests)
        final = self.paths.object(digest)
        if self.fs.exists(f"{final}/{OBJECT_MARKER}"):
            return digest, digests
        self._sweep_abandoned_uploads()
        staging = self.paths.uploads(f"{owner()}-{uuid.uuid4().hex}")
        total = len(digests)
        for i, name in enumerate(sorted(digests), start=1):
            self.fs.makedirs(os.path.dirname(f"{staging}/{name}"), exist_ok=True)
            self.fs.put_file(str(source / name), f"{staging}/{name}")
            progress(f"uploaded {i}/{total} files ({name})")
        self.fs.pipe_file(f"{staging}/{OBJECT_MARKER}", json.dumps(digests).encode())
        try:
            self.fs.mv(staging, final, recursive=True)
        except (FileExistsError, OSError):
            if not self.fs.exists(f"{final}/{OBJECT_MARKER}"):  # someone else's upload of the same digest won
                raise
            self.fs.rm(staging, recursive=True)
        return digest, digests

    def _sweep_abandoned_uploads(self) -> None:
        """Remove the staging folders of uploads whose process died (a killed `up`) on this host."""
        for path in self.fs.glob(self.paths.uploads()):
            if abandoned(path.rsplit("/", 1)[-1], ".upload-"):
                self.fs.rm(path, recursive=True)

    def verify_object(self, digest: str) -> None:
        """Raise unless every file of an object is present with its recorded digest."""
        path = self.paths.object(digest)
        if not self.fs.exists(f"{path}/{OBJECT_MARKER}"):
            raise StoreError(f"object {digest} is not in the store (or its upload never finished)")
        recorded = json.loads(self.fs.cat_file(f"{path}/{OBJECT_MARKER}"))
        if tree_digest(recorded) != digest:
            raise StoreError(f"object {digest}: its file list does not match its digest")
        actual = file_digests(self.local_path(self.urls.object(digest))) if self.is_local else None
        if actual is not None:
            if actual != recorded:
                bad = sorted(n for n in recorded if actual.get(n) != recorded[n])
                raise StoreError(f"object {digest}: files {bad[:5]} do not match their digests (corrupt store?)")

    def delete_object(self, digest: str) -> None:
        """Remove an object nobody's manifest refers to any more."""
        if not digest.startswith("sha256:"):
            return
        # Two addons of the same weights deleted side by side (one `destroy`) both find the object unreferenced:
        # one removes it, the other then finds nothing to remove.
        with self._locked(f"object {digest}"):
            if any(m.digest == digest for m in self.manifests()) or \
                    any(d.digest == digest for d in self.dataset_records()):
                return
            self.discard_object(digest)

    def discard_object(self, digest: str) -> None:
        """Remove an object's files whoever refers to it: a damaged object, before it is uploaded again."""
        path = self.paths.object(digest)
        if digest.startswith("sha256:") and self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- manifests ---------------------------------------------------------------------------------------

    def _write_json(self, path: str, data: Any) -> None:
        # Written aside and moved into place: a reader running beside the writer sees the old or the new
        # document, never a half-written one.
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, json.dumps(data, indent=2, sort_keys=True).encode())
        self.fs.mv(tmp, path)

    def _read_json(self, path: str, parse: Callable[[Any], Any] = lambda raw: raw) -> Any:
        # Resources are created and deleted in parallel (by the engine, and by the offline runner's SDK threads):
        # a document listed a moment ago may be gone by the time it is read.
        try:
            return parse(json.loads(self.fs.cat_file(path)))
        except FileNotFoundError:
            return None

    def _read_all(self, pattern: str, parse: Callable[[Any], Any]) -> Iterator[Any]:
        for path in self.fs.glob(pattern):
            if (document := self._read_json(path, parse)) is not None:
                yield document

    def write_manifest(self, manifest: Manifest) -> None:
        name = parse_model_name(manifest.name)
        self._write_json(self.paths.manifest(name.account_id, name.resource_id), manifest.to_json())

    def read_manifest(self, account: str, model_id: str) -> Manifest | None:
        return self._read_json(self.paths.manifest(account, model_id), MANIFEST.validate_python)

    def delete_manifest(self, account: str, model_id: str) -> None:
        self.delete_document(self.paths.manifest(account, model_id))

    def manifests(self) -> Iterator[Manifest]:
        return self._read_all(self.paths.manifest("*", "*"), MANIFEST.validate_python)

    # -- desired addon sets --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        # The provider runs on one machine; an OS lock serialises its parallel resource operations.
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_dir / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def desired_addons(self, account: str, deployment: str) -> dict[str, str]:
        return self._read_json(self.paths.desired_addons(account, deployment)) or {}

    def desired_addon_sets(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        """(account, deployment, {addon: object URL}) of every deployment with a desired addon set."""
        for path in self.fs.glob(self.paths.desired_addons("*", "*")):
            account, deployment = path.split("/")[-3:-1]
            yield account, deployment, self.desired_addons(account, deployment)

    def change_desired_addons(self, account: str, deployment: str, change: Callable[[dict[str, str]], None]) -> dict[str, str]:
        path = self.paths.desired_addons(account, deployment)
        with self._locked(path):
            desired = self.desired_addons(account, deployment)
            change(desired)
            if desired or self.read_deployment_record(account, deployment) is not None:
                self._write_json(path, desired)
            elif self.fs.exists(path):  # the last addon of a deleted deployment left: nothing of it remains
                self.fs.rm(self.paths.deployment(account, deployment), recursive=True)
            return desired

    # -- deployment records: what each deployment serves, for the addons that target it -------------------

    def read_deployment_record(self, account: str, deployment: str) -> DeploymentRecord | None:
        return self._read_json(self.paths.deployment_record(account, deployment), DeploymentRecord.model_validate)

    def deployment_records(self) -> Iterator[DeploymentRecord]:
        return self._read_all(self.paths.deployment_record("*", "*"), DeploymentRecord.model_validate)

    def write_deployment_record(self, record: DeploymentRecord) -> None:
        name = parse_deployment_name(record.name)
        self._write_json(self.paths.deployment_record(name.account_id, name.resource_id), record.to_json())

    def delete_deployment(self, account: str, deployment: str) -> None:
        """Remove a deployment's record. Its desired addon set belongs to the addons declared on it and
        stays while it names any: a deployment that is replaced (deleted, then created again) serves them
        again, and the last addon to leave removes the set."""
        path = self.paths.deployment(account, deployment)
        with self._locked(self.paths.desired_addons(account, deployment)):  # the lock change_desired_addons takes
            record = self.paths.deployment_record(account, deployment)
            if self.desired_addons(account, deployment):
                if self.fs.exists(record):
                    self.fs.rm(record)
            elif self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def delete_registrations(self, account: str, deployment: str) -> None:
        """Remove the registrations of a deployment's replicas, once they are stopped: one that was killed cannot."""
        path = self.paths.replicas(account, deployment)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- gateways ------------------------------------------------------------------------------------------

    def read_gateway_record(self, account: str, gateway_id: str) -> GatewayRecord | None:
        return self._read_json(self.paths.gateway(account, gateway_id), GatewayRecord.model_validate)

    def gateway_records(self) -> Iterator[GatewayRecord]:
        return self._read_all(self.paths.gateway("*", "*"), GatewayRecord.model_validate)

    def write_gateway_record(self, record: GatewayRecord) -> None:
        name = parse_gateway_name(record.name)
        self._write_json(self.paths.gateway(name.account_id, name.resource_id), record.to_json())

    @contextmanager
    def gateway_lock(self) -> Iterator[None]:
        """Held while a gateway is created, so that two creates side by side cannot both find the store without one."""
        with self._locked("gateway"):
            yield

    # -- datasets and fine-tuning jobs ---------------------------------------------------------------------

    def read_dataset_record(self, account: str, dataset_id: str) -> DatasetRecord | None:
        return self._read_json(self.paths.dataset(account, dataset_id), DatasetRecord.model_validate)

    def dataset_records(self) -> Iterator[DatasetRecord]:
        return self._read_all(self.paths.dataset("*", "*"), DatasetRecord.model_validate)

    def write_dataset_record(self, record: DatasetRecord) -> None:
        name = parse_dataset_name(record.name)
        self._write_json(self.paths.dataset(name.account_id, name.resource_id), record.to_json())

    def read_job_record(self, account: str, job_id: str) -> FineTuningJobRecord | None:
        return self._read_json(self.paths.fine_tuning_job(account, job_id), FineTuningJobRecord.model_validate)

    def write_job_record(self, record: FineTuningJobRecord) -> None:
        name = parse_fine_tuning_job_name(record.name)
        self._write_json(self.paths.fine_tuning_job(name.account_id, name.resource_id), record.to_json())

    def delete_document(self, path: str) -> None:
        """Remove a record (a dataset's, a job's) if it is there."""
        if self.fs.exists(path):
            self.fs.rm(path)

    # -- API keys ------------------------------------------------------------------------------------------

    @staticmethod
    def local_key(account: str, key_dir: Path) -> str | None:
        """The account's local API key if this state directory has one (reading never makes one)."""
        key_file = key_dir / f"{account}.key"
        return key_file.read_text().strip() if key_file.exists() else None

    def ensure_key(self, account: str, key_dir: Path) -> str:
        """The account's implicit API key (created once, kept mode 600 outside the store; only its hash inside)."""
        key_file = key_dir / f"{account}.key"
        with self._locked(self.urls.keys):
            if key_file.exists():
                return key_file.read_text().strip()
            key = Accounts.add_key(self.urls.keys, account)
            key_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key)
        AuditLog(self.url).record(account=account, actor="provider", action="key.created",
                                  target=api_key_name(account, IMPLICIT_KEY_ID), result="ok", detail="implicit key")
        return key

    def api_keys(self) -> list[KeyRecord]:
        """Every key's record (hashes, roles, expiries; never a key)."""
        return Accounts.load(self.urls.keys).records if self.fs.exists(self.paths.keys) else []

    def change_api_keys(self, edit: Callable[[list[KeyRecord]], list[KeyRecord]]) -> list[KeyRecord]:
        """Rewrite the keys file under the store's keys lock (ApiKeys created and deleted in parallel all land)."""
        with self._locked(self.urls.keys):
            return Accounts.change(self.urls.keys, edit)
