"""The local cluster (the embedded default): a deployment's replicas and the store's gateway are runtime processes on
this machine, and a fine-tuning job trains in a child process.

Each replica is `python -m ember.runtime serve --replica-spec <state>/replica-specs/<account>/<deployment>.json` on a
free loopback port, detached from the provider (its own session, its log in the state directory), recorded in
`<state>/replicas/<account>/<deployment>.json`. The gateway is `python -m ember.runtime gateway --store URL --gateway
NAME` on its own port, recorded in `<state>/gateways/<account>/<gateway>.json`. Nothing restarts a process behind the
user's back: a dead one shows up in `read` as drift and the next `up` starts it again.
"""

from __future__ import annotations

import json
import time
import urllib.error
from pathlib import Path

from ember.provider.backends import local_processes
from ember.provider.backends.cluster import Cluster, ClusterError, GatewayStatus, ReplicaStatus
from ember.provider.backends.local_processes import LocalProcess, ProcessError, free_port, http_json
from ember.provider.backends.local_training import TrainingError, run_training, training_job
from ember.provider.backends.processes import alive
from ember.provider.backends.store import Store
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.records import BaseModelManifest
from ember.provider.domain.replica_spec import replica_spec, serve_command, write_replica_spec
from ember.provider.domain.spec import AcceleratorType


def _replica_failed(health: dict) -> str | None:
    # /health says only that; the reason is in the replica's own log
    return "failed to load" if health.get("status") == "failed" else None


def _gateway_failing(health: dict) -> str | None:
    return f"cannot serve: {health['reason']}" if health.get("status") == "failing" and health.get("reason") else None


class LocalCluster(Cluster):
    name = "local"
    restarts_replicas = False

    def _record(self, account: str, deployment: str) -> Path:
        return self.state_dir / "replicas" / account / f"{deployment}.json"

    def _spec_file(self, account: str, deployment: str) -> Path:
        return self.state_dir / "replica-specs" / account / f"{deployment}.json"

    def replicas(self, account: str, deployment: str) -> list[LocalProcess]:
        return local_processes.load(self._record(account, deployment))

    def _save(self, account: str, deployment: str, replicas: list[LocalProcess]) -> None:
        local_processes.save(self._record(account, deployment), replicas)

    @classmethod
    def check_supported(cls, spec: DeploymentSpec) -> None:
        if spec.accelerator_type is not AcceleratorType.CPU:
            raise ClusterError(f"accelerator_type: the local cluster runs CPU replicas only, not "
                               f"{spec.accelerator_type.value}; use the Kubernetes backend for GPUs")

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
            local_processes.stop(replicas.pop())
        started = []
        try:
            while len(replicas) + len(started) < wanted:
                started.append(self._start(spec, command, len(replicas) + len(started)))
                # recorded before the wait: an `up` killed meanwhile leaves no process the next one cannot see
                self._save(account, deployment, replicas + started)
            for replica in replicas + started:  # kept ones too: one an interrupted `up` started may still load
                local_processes.wait_ready(replica, "replica", self.ready_timeout_s, self.progress, _replica_failed)
        except ProcessError as exc:
            self._abandon(spec, replicas, started)
            raise ClusterError(str(exc)) from None
        except Exception:
            self._abandon(spec, replicas, started)
            raise
        self._save(account, deployment, replicas + started)

    def _abandon(self, spec: DeploymentSpec, kept: list[LocalProcess], started: list[LocalProcess]) -> None:
        for replica in started:
            local_processes.stop(replica)
        self._save(spec.account_id, spec.deployment_id, kept)

    def _port(self, path: Path, index: str, what: str, fixed: int | None = None) -> int:
        """A process's port: `fixed` (the user's), else the one it had (kept across restarts and replacements, so its
        endpoint stays) while that is free, else any free one. The choice is kept in `path`."""
        ports = json.loads(path.read_text()) if path.exists() else {}
        previous = fixed or ports.get(index)
        port = free_port(previous or 0)
        if fixed and port != fixed:
            raise ClusterError(f"port: {fixed} is taken by another process on this machine")
        if previous and port != previous:
            self.progress(f"port {previous} of {what} is taken by another process: its endpoint moves to port {port}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ports | {index: port}))
        return port

    def _start(self, spec: DeploymentSpec, command: list[str], index: int) -> LocalProcess:
        what = f"replica {index} of {spec.account_id}/{spec.deployment_id}"
        port = self._port(self.state_dir / "ports" / spec.account_id / f"{spec.deployment_id}.json", str(index), what)
        log = self.state_dir / "logs" / spec.account_id / f"{spec.deployment_id}-{index}-{port}.log"
        replica = local_processes.spawn(command, port, log)
        self.progress(f"started {what} on port {port} (pid {replica.pid})")
        return replica

    def stop(self, account: str, deployment: str) -> None:
        for replica in self.replicas(account, deployment):
            local_processes.stop(replica)
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
                    if not alive(replica.pid):  # a dead replica never answers: the drift a refresh reports
                        result = None
                        break
                    if time.monotonic() > deadline:
                        raise ClusterError(f"replica on port {replica.port} did not reconcile: {exc}") from None
                    time.sleep(0.2)
            if result is None:
                continue
            refused = {n: why for n, why in result.get("failed", {}).items() if n in wanted}
            if refused:
                name, why = next(iter(refused.items()))
                raise ClusterError(f"addon {name} was refused by the replica on port {replica.port}: {why}")
            served = set(result.get("served", []))
            if not wanted <= served or served & unwanted:
                raise ClusterError(f"replica on port {replica.port} serves {sorted(served)}; wanted "
                                   f"{sorted(wanted)} and not {sorted(unwanted)}")

    def status(self, account: str, deployment: str, key: str | None = None) -> ReplicaStatus:
        healthy = [r for r in self.replicas(account, deployment) if local_processes.ready(r)]
        serving = set.intersection(*(self._served(r, key) for r in healthy)) if healthy and key else set()
        return ReplicaStatus(tuple(r.url for r in healthy), len(healthy), frozenset(serving))

    @staticmethod
    def _served(replica: LocalProcess, key: str) -> set[str]:
        try:
            return set(http_json(f"{replica.url}/admin/adapters", key=key, timeout=5.0).get("served", []))
        except (urllib.error.URLError, OSError, ValueError):
            return set()

    # -- the gateway -------------------------------------------------------------------------------------------

    def _gateway_record(self, account: str, gateway_id: str) -> Path:
        return self.state_dir / "gateways" / account / f"{gateway_id}.json"

    def _gateway(self, account: str, gateway_id: str) -> LocalProcess | None:
        found = local_processes.load(self._gateway_record(account, gateway_id))
        return found[0] if found else None

    def serve_gateway(self, spec: GatewaySpec, store: Store) -> GatewayStatus:
        """One process on a loopback port: the user's `port`, else the one it had, else a free one (kept). A running
        one on that port is kept: it re-reads its settings from the store."""
        account, gateway_id = spec.account_id, spec.gateway_id
        running = self._gateway(account, gateway_id)
        if running and alive(running.pid) and spec.port in (None, running.port) and local_processes.ready(running):
            return self.gateway_status(spec)
        if running:
            local_processes.stop(running)
        what = f"gateway {spec.name}"
        port = self._port(self.state_dir / "gateway-ports" / f"{account}.json", gateway_id, what, spec.port)
        process = local_processes.spawn(["gateway", "--store", store.url, "--gateway", spec.name], port,
                                        self.state_dir / "logs" / account / f"gateway-{gateway_id}-{port}.log")
        local_processes.save(self._gateway_record(account, gateway_id), [process])
        self.progress(f"started {what} on port {port} (pid {process.pid})")
        try:
            local_processes.wait_ready(process, "the gateway", self.ready_timeout_s, self.progress, _gateway_failing)
        except ProcessError as exc:
            self.stop_gateway(account, gateway_id)
            raise ClusterError(str(exc)) from None
        return self.gateway_status(spec)

    def gateway_status(self, spec: GatewaySpec) -> GatewayStatus:
        process = self._gateway(spec.account_id, spec.gateway_id)
        if process is None or not local_processes.ready(process):
            return GatewayStatus(process.url if process else None, 0)
        return GatewayStatus(process.url, 1)

    def stop_gateway(self, account: str, gateway_id: str) -> None:
        process = self._gateway(account, gateway_id)
        if process:
            local_processes.stop(process)
        self._gateway_record(account, gateway_id).unlink(missing_ok=True)

    def train(self, spec: FineTuningJobSpec, base: BaseModelManifest, store: Store, workdir: Path,
              adapter: Path) -> dict:
        self.progress(f"{spec.name}: fine-tuning {spec.base_model} on {spec.dataset}")
        try:
            return run_training(training_job(spec, base, store, adapter), workdir, self.progress)
        except TrainingError as exc:
            raise ClusterError(f"{spec.name}: training failed: {exc}") from None
