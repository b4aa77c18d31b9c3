"""The local cluster (the embedded default): a deployment's replicas and the store's gateway are runtime processes on
this machine, and a fine-tuning job trains in a child process.

Each replica is `python -m ember.runtime serve --replica-spec <state>/replica-specs/<account>/<deployment>.json` on a
free loopback port, detached from the provider (its own session, its log in the state directory), recorded in
`<state>/replicas/<account>/<deployment>.json`. The gateway is `python -m ember.runtime gateway --store URL --gateway
NAME` on its own port, recorded in `<state>/gateways/<account>/<gateway>.json`. Nothing restarts a process behind the
user's back: a dead one shows up in `read` as drift and the next `up` starts it again.
"""

from __future__ import annotations

import dataclasses
import json
import threading
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
from ember.provider.domain.digests import tree_digest
from ember.provider.domain.records import BaseModelManifest
from ember.provider.domain.replica_spec import replica_spec, serve_command, write_replica_spec
from ember.provider.domain.spec import AcceleratorType

# How long a replica that is scaled down or replaced may take to finish what it runs before it is killed.
DRAIN_GRACE_S = 120.0


def _generation(replica_spec_json: str) -> str:
    """Which replicas serve the same spec: `up` compares it to tell a replacement's old replicas, the autoscaler tags
    those it starts with it."""
    return tree_digest({"spec": replica_spec_json})


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

    def running(self, account: str, deployment: str) -> list[LocalProcess]:
        """Its replicas whose process is alive (ready or still loading)."""
        return [r for r in self.replicas(account, deployment) if alive(r.pid)]

    def _save(self, account: str, deployment: str, replicas: list[LocalProcess]) -> None:
        local_processes.save(self._record(account, deployment), replicas)

    @classmethod
    def check_supported(cls, spec: DeploymentSpec) -> None:
        if spec.accelerator_type is not AcceleratorType.CPU:
            raise ClusterError(f"accelerator_type: the local cluster runs CPU replicas only, not "
                               f"{spec.accelerator_type.value}; use the Kubernetes backend for GPUs")

    def _lock(self, account: str, deployment: str) -> Path:
        return self.state_dir / "replicas" / account / f"{deployment}.lock"

    def scale(self, spec: DeploymentSpec, base: BaseModelManifest, store: Store) -> ReplicaStatus:
        """Write the replica spec, then run `replica_count` healthy replicas of it. Those already serving this spec are
        kept; those serving another (the deployment was replaced) are drained and stopped only once the new ones are
        ready, so that the gateway always has a replica to send requests to."""
        request_log = self.state_dir / "request-logs" / spec.account_id / f"{spec.deployment_id}.jsonl"
        request_log.parent.mkdir(parents=True, exist_ok=True)
        served = replica_spec(spec, str(store.local_path(base.object)), store.urls, str(request_log))
        spec_file = self._spec_file(spec.account_id, spec.deployment_id)
        with local_processes.locked(self._lock(spec.account_id, spec.deployment_id)):
            before = spec_file.read_text() if spec_file.exists() else None
            write_replica_spec(served, spec_file)
            try:
                self._roll(spec, serve_command(str(spec_file)), _generation(served.to_json()))
            except BaseException:
                if before is not None:  # the replicas still running serve the old spec: the autoscaler starts those
                    spec_file.write_text(before)
                raise
        return self.status(spec.account_id, spec.deployment_id)

    def _roll(self, spec: DeploymentSpec, command: list[str], generation: str) -> None:
        account, deployment = spec.account_id, spec.deployment_id
        record = self._record(account, deployment)
        running = self.running(account, deployment)
        current = [r for r in running if r.generation == generation]
        old = [r for r in running if r.generation != generation]
        # an autoscaler may have moved the count: kept within the range (a replacement keeps the old one's count)
        wanted = self.replica_count(spec, len(running) if record.exists() else None)
        while len(current) > wanted:
            self._drain(current.pop())
        started = []
        try:
            while len(current) + len(started) < wanted:
                taken = {r.port for r in running + started}
                started.append(self._spawn(account, deployment, command, len(current) + len(started), generation,
                                           taken))
                # recorded before the wait: an `up` killed meanwhile leaves no process the next one cannot see
                self._save(account, deployment, old + current + started)
            for replica in current + started:  # kept ones too: one an interrupted `up` started may still load
                local_processes.wait_ready(replica, "replica", self.ready_timeout_s, self.progress, _replica_failed)
        except ProcessError as exc:
            self._abandon(spec, old + current, started)
            raise ClusterError(str(exc)) from None
        except Exception:
            self._abandon(spec, old + current, started)
            raise
        self._save(account, deployment, current + started)
        for replica in old:  # the new generation serves: the old one finishes what it runs, then stops
            self.progress(f"draining the replaced replica on port {replica.port} of {account}/{deployment}")
            self._drain(replica)

    @staticmethod
    def _drain(replica: LocalProcess) -> None:
        local_processes.stop(replica, DRAIN_GRACE_S)

    def _abandon(self, spec: DeploymentSpec, kept: list[LocalProcess], started: list[LocalProcess]) -> None:
        for replica in started:
            local_processes.stop(replica)
        self._save(spec.account_id, spec.deployment_id, kept)

    def _port(self, path: Path, index: str, what: str, fixed: int | None = None, taken: frozenset[int] = frozenset()
              ) -> int:
        """A process's port: `fixed` (the user's), else the one it had (kept across restarts, so its endpoint stays)
        while that is free and not `taken` by a replica it starts beside, else any free one. The choice is kept in
        `path`."""
        ports = json.loads(path.read_text()) if path.exists() else {}
        previous = fixed or ports.get(index)
        port = free_port(0 if previous in taken else previous or 0)
        if fixed and port != fixed:
            raise ClusterError(f"port: {fixed} is taken by another process on this machine")
        if previous and port != previous and previous not in taken:
            self.progress(f"port {previous} of {what} is taken by another process: its endpoint moves to port {port}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ports | {index: port}))
        return port

    def _spawn(self, account: str, deployment: str, command: list[str], index: int, generation: str,
               taken: set[int]) -> LocalProcess:
        what = f"replica {index} of {account}/{deployment}"
        port = self._port(self.state_dir / "ports" / account / f"{deployment}.json", str(index), what,
                          taken=frozenset(taken))
        log = self.state_dir / "logs" / account / f"{deployment}-{index}-{port}.log"
        replica = dataclasses.replace(local_processes.spawn(command, port, log), generation=generation)
        self.progress(f"started {what} on port {port} (pid {replica.pid})")
        return replica

    def resize(self, account: str, deployment: str, count: int) -> int:
        """The autoscaler's change (the gateway's, between `up`s): start or drain replicas of the deployment's current
        spec until `count` run, without waiting for new ones to get ready (the gateway routes to them once they
        register). Returns the count now running. Raises Busy while an `up` is changing the deployment."""
        spec_file = self._spec_file(account, deployment)
        with local_processes.locked(self._lock(account, deployment), wait=False):
            if not spec_file.exists():
                return 0  # deleted meanwhile
            generation = _generation(spec_file.read_text())
            running = self.running(account, deployment)
            leaving = []
            while len(running) > count:
                leaving.append(running.pop())  # the newest first
            while len(running) < count:
                running.append(self._spawn(account, deployment, serve_command(str(spec_file)), len(running),
                                           generation, {r.port for r in running}))
            self._save(account, deployment, running)
        for replica in leaving:  # outside the lock and in the background: a drain may take a while
            self.progress(f"draining the replica on port {replica.port} of {account}/{deployment}")
            threading.Thread(target=self._drain, args=(replica,), name="ember-drain", daemon=True).start()
        return len(running)

    def stop(self, account: str, deployment: str) -> None:
        with local_processes.locked(self._lock(account, deployment)):
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
        replicas = self.replicas(account, deployment)
        healthy = [r for r in replicas if local_processes.ready(r)]
        if not replicas and self._record(account, deployment).exists():
            return ReplicaStatus((), 0, None)  # scaled to zero: the next one loads what the store says
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
        process = local_processes.spawn(["gateway", "--store", store.url, "--gateway", spec.name,
                                         "--state-dir", str(self.state_dir)], port,
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
