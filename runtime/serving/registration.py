"""A replica's registration in the store, which is how the gateway finds it: written once the replica is ready, again
every REGISTRATION_INTERVAL_S (with the addons it holds, so the gateway prefers a replica that has a request's addon
in a device slot), as draining when it is told to stop, and removed as it exits. A replica killed without a word leaves its
registration to go stale: the gateway ignores one older than REGISTRATION_TTL_S, and the next replica of the deployment
to start removes those long dead.

Only a replica that knows where it is reached registers: one that listens on a given address (the local cluster's
127.0.0.1), or was told its address (`--advertise-url`; Kubernetes gives a pod's IP)."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import fsspec

from ember.provider.domain.names import parse_deployment_name
from ember.provider.domain.records import REGISTRATION_TTL_S, ReplicaRegistration
from ember.provider.domain.store_layout import StoreLayout

log = logging.getLogger("ember.server")
# Registrations this stale are of replicas that will never come back; a starting replica sweeps its deployment's.
SWEEP_AFTER_S = 20 * REGISTRATION_TTL_S


def advertised_url(host: str, port: int, given: str | None) -> str | None:
    """Where the gateway reaches this replica: the given URL, else its own address when it listens on one (not on every
    interface, whose address it cannot know)."""
    if given:
        return given.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        return None
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class Registration:
    def __init__(self, store_url: str, deployment: str, replica: str, url: str):
        self.fs, root = fsspec.core.url_to_fs(store_url)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # A file is written in place and could be read half-written; an object store's put is whole or nothing.
        self._stage = protocol in ("file", "local")
        name = parse_deployment_name(deployment)
        self.folder = StoreLayout(root).replicas(name.account_id, name.resource_id)
        self.path = StoreLayout(root).replica(name.account_id, name.resource_id, replica)
        self.document = ReplicaRegistration(replica=replica, deployment=deployment, url=url)
        self._lock = threading.Lock()  # a refresh in flight never lands after the drain

    def write(self, served: list[str], slots: list[str | None], last_request: float = 0.0, in_flight: int = 0) -> None:
        with self._lock:
            if self.document.state == "draining":
                return
            self.document = self.document.model_copy(update={
                "served": tuple(served), "slots": tuple(s for s in slots if s), "last_seen": time.time(),
                "last_request": last_request, "in_flight": in_flight})
            self._put()

    def drain(self) -> None:
        """Told to stop: the gateway sends it nothing new (what it runs, it finishes)."""
        with self._lock:
            self.document = self.document.model_copy(update={"state": "draining", "last_seen": time.time()})
            self._put()

    def remove(self) -> None:
        self._remove(self.path)

    def sweep(self) -> None:
        """Remove the registrations of this deployment's replicas that died long ago without a word."""
        now = time.time()
        for path in self.fs.glob(f"{self.folder}/*.json"):
            try:
                stale = now - json.loads(self.fs.cat_file(path)).get("last_seen", 0) > SWEEP_AFTER_S
            except (FileNotFoundError, ValueError):
                continue  # gone meanwhile, or being written
            if stale:
                self._remove(path)

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def _put(self) -> None:
        data = json.dumps(self.document.to_json()).encode()
        self.fs.makedirs(self.folder, exist_ok=True)
        if not self._stage:
            self.fs.pipe_file(self.path, data)
            return
        staged = f"{self.path}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(staged, data)
        self.fs.mv(staged, self.path)
