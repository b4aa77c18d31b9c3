"""The local cluster (the embedded default): a deployment's replicas are runtime processes on this machine, and a
fine-tuning job trains in a child process.

Each replica is `python -m ember.runtime serve --replica-spec <state>/replica-specs/<account>/<deployment>.json` on a
free loopback port, detached from the provider (its own session, its log in the state directory), recorded in
`<state>/replicas/<account>/<deployment>.json`. Nothing restarts a replica behind the user's back: a dead one shows up
in `read` as drift and the next `up` starts it again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ember.provider.backends.cluster import Cluster, ClusterError, ReplicaStatus
from ember.provider.backends.local_training import TrainingError, run_training, training_job
from ember.provider.backends.processes import alive
from ember.provider.backends.records import BaseModelManifest
from ember.provider.backends.store import Store
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.replica_spec import replica_spec, serve_command, write_replica_spec
from ember.provider.domain.spec import AcceleratorType


@dataclass(frozen=True)
class ReplicaProcess:
    pid: int
    port: int
    log: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port(preferred: int = 0) -> int:
    """`preferred` if it can be bound now, else any free loopback port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the replica's server binds it
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, method: str = "GET", key: str | None = None, timeout: float = 5.0) -> dict:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class LocalCluster(Cluster):
    name = "local"
    restarts_replicas = False

    def _record(self, account: str, deployment: str) -> Path:
        return self.state_dir / "replicas" / account / f"{deployment}.json"

    def _spec_file(self, account: str, deployment: str) -> Path:
        return self.state_dir / "replica-specs" / account / f"{deployment}.json"

    def replicas(self, account: str, deployment: str) -> list[ReplicaProcess]:
        path = self._record(account, deployment)
        return [ReplicaProcess(**r) for r in json.loads(path.read_text())] if path.exists() else []

    def _save(self, account: str, deployment: str, replicas: list[ReplicaProcess]) -> None:
        path = self._record(account, deployment)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([r.__dict__ for r in replicas]))
        tmp.replace(path)

    @classmethod
    def check_supported(cls, spec: DeploymentSpec) -> None:
        if spec.accelerator_type is not AcceleratorType.CPU:
            raise ClusterError(f"accelerator_type: the local cluster runs CPU replicas only, not "
                               f"{spec.accelerator_type.value}; use the Kubernetes backend for GPUs")

    def health(self, replica: ReplicaProcess) -> dict | None:
        if not alive(replica.pid):
            return None
        try:
            return http_json(f"{replica.url}/health", timeout=2.0)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def scale(self, spec: DeploymentSpec, base: BaseModelManifest, store: Store) -> ReplicaStatus:
        """Write the replica spec, then start or stop replicas until `replica_count(spec)` healthy ones run; existing
        ones are kept (a changed spec replaces the deployment, so they serve the same one)."""
        request_log = self.state_dir / "request-logs" / spec.account_id / f"{spec.deployment_id}.jsonl"
        request_log.parent.mkdir(parents=True, exist_ok=True)
        spec_file = self._spec_file(spec.account_id, spec.deployment_id)
        write_replica_spec(replica_spec(spec, str(store.local_path(base.object)), store.urls, str(request_log)),
                           spec_file)
        self._run(spec, serve_command(str(spec_file)))
        return self.status(spec.account_id, spec.deployment_id)

    def _run(self, spec: DeploymentSpec, command: list[str]) -> None:
        account, deployment = spec.account_id, spec.deployment_id
        replicas = [r for r in self.replicas(account, deployment) if alive(r.pid)]
        wanted = self.replica_count(spec)
        while len(replicas) > wanted:
            self._stop(replicas.pop())
        started = []
        try:
            while len(replicas) + len(started) < wanted:
                started.append(self._start(spec, command, len(replicas) + len(started)))
                # recorded before the wait: an `up` killed meanwhile leaves no process the next one cannot see
                self._save(account, deployment, replicas + started)
            for replica in replicas + started:  # kept ones too: one an interrupted `up` started may still load
                self._wait_ready(replica)
        except Exception:
            for replica in started:
                self._stop(replica)
            self._save(account, deployment, replicas)
            raise
        self._save(account, deployment, replicas + started)

    def _ports(self, account: str, deployment: str) -> Path:
        # Kept when replicas stop: a restarted or replaced deployment keeps its endpoints.
        return self.state_dir / "ports" / account / f"{deployment}.json"

    def _port(self, spec: DeploymentSpec, index: int) -> int:
        path = self._ports(spec.account_id, spec.deployment_id)
        ports = json.loads(path.read_text()) if path.exists() else {}
        previous = ports.get(str(index))
        port = _free_port(previous or 0)
        if previous and port != previous:
            self.progress(f"port {previous} of replica {index} of {spec.account_id}/{spec.deployment_id} is taken by "
                          f"another process: its endpoint moves to port {port}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ports | {str(index): port}))
        return port

    def _start(self, spec: DeploymentSpec, command: list[str], index: int) -> ReplicaProcess:
        port = self._port(spec, index)
        log_dir = self.state_dir / "logs" / spec.account_id
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{spec.deployment_id}-{index}-{port}.log"
        with log.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "ember.runtime", *command, "--port", str(port)],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        self.progress(f"started replica {index} of {spec.account_id}/{spec.deployment_id} on port {port} (pid {process.pid})")
        return ReplicaProcess(process.pid, port, str(log))

    def _wait_ready(self, replica: ReplicaProcess) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not alive(replica.pid):
                raise ClusterError(f"replica on port {replica.port} exited while starting: {self._tail(replica)}")
            health = self.health(replica)
            if health and health.get("status") == "ready":
                self.progress(f"replica on port {replica.port} is ready")
                return
            if health is None:
                try:
                    http_json(f"{replica.url}/health", timeout=2.0)
                except urllib.error.HTTPError as exc:
                    # /health says only that; the reason is in the replica's own log
                    if json.loads(exc.read() or b"{}").get("status") == "failed":
                        raise ClusterError(f"replica on port {replica.port} failed to load: {self._tail(replica)}") from None
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            time.sleep(0.2)
        raise ClusterError(f"replica on port {replica.port} was not ready within {self.ready_timeout_s:.0f} s: "
                           f"{self._tail(replica)}")

    @staticmethod
    def _tail(replica: ReplicaProcess) -> str:
        try:
            return " | ".join(Path(replica.log).read_text().strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def _stop(self, replica: ReplicaProcess) -> None:
        if not alive(replica.pid):
            return
        try:
            os.killpg(replica.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 10
        while alive(replica.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(replica.pid):
            os.killpg(replica.pid, signal.SIGKILL)
        try:  # reap it if it is our child
            os.waitpid(replica.pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def stop(self, account: str, deployment: str) -> None:
        for replica in self.replicas(account, deployment):
            self._stop(replica)
        self._record(account, deployment).unlink(missing_ok=True)
        self._spec_file(account, deployment).unlink(missing_ok=True)

    def reconcile_addons(self, store: Store, account: str, deployment: str, wanted: set[str],
                         unwanted: set[str]) -> None:
        """Ask every replica to re-read the desired addons; check that `wanted` are served and `unwanted`
        are not (other addons may come and go meanwhile). Raises with the replica's reason if one of
        `wanted` was refused."""
        deadline = time.monotonic() + self.ready_timeout_s
        replicas = self.replicas(account, deployment)
        key = store.ensure_key(account, self.keys_dir) if replicas else None
        if replicas and wanted:
            self.progress(f"waiting for {account}/{deployment} to serve {', '.join(sorted(wanted))}")
        for replica in replicas:
            while True:
                try:
                    result = http_json(f"{replica.url}/admin/reconcile", method="POST", key=key, timeout=30)
                    break
                except (urllib.error.URLError, OSError) as exc:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"replica on port {replica.port} did not reconcile: {exc}") from None
                    time.sleep(0.2)
            refused = {n: why for n, why in result.get("failed", {}).items() if n in wanted}
            if refused:
                name, why = next(iter(refused.items()))
                raise ClusterError(f"addon {name} was refused by the replica on port {replica.port}: {why}")
            served = set(result.get("served", []))
            if not wanted <= served or served & unwanted:
                raise ClusterError(f"replica on port {replica.port} serves {sorted(served)}; wanted "
                                   f"{sorted(wanted)} and not {sorted(unwanted)}")

    def status(self, account: str, deployment: str, key: str | None = None) -> ReplicaStatus:
        healthy = [r for r in self.replicas(account, deployment) if (h := self.health(r)) and h.get("status") == "ready"]
        serving = set.intersection(*(self._served(r, key) for r in healthy)) if healthy and key else set()
        return ReplicaStatus(tuple(r.url for r in healthy), len(healthy), frozenset(serving))

    @staticmethod
    def _served(replica: ReplicaProcess, key: str) -> set[str]:
        try:
            return set(http_json(f"{replica.url}/admin/adapters", key=key, timeout=5.0).get("served", []))
        except (urllib.error.URLError, OSError, ValueError):
            return set()

    def train(self, spec: FineTuningJobSpec, base: BaseModelManifest, store: Store, workdir: Path,
              adapter: Path) -> dict:
        self.progress(f"{spec.name}: fine-tuning {spec.base_model} on {spec.dataset}")
        try:
            return run_training(training_job(spec, base, store, adapter), workdir, self.progress)
        except TrainingError as exc:
            raise ClusterError(f"{spec.name}: training failed: {exc}") from None
