"""A throwaway Kubernetes cluster on loopback ports: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and kwok (nodes and pod lifecycles simulated: no kubelet, no container runs), with simulated GPU nodes.

    python tools/kubernetes/cluster.py            # starts one, prints its kubeconfig, stops on Ctrl-C

The binaries come from install.sh (built once from the Go module proxy). Everything the cluster writes lives
in one temporary folder; stopping it kills every process and removes the folder. The `cluster` tests start
one per test module (tests/cluster/test_kubernetes_cluster.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKEN = "ember-test-admin-token"  # a static token in system:masters, on a cluster that lives for one test session

# What a node of a GPU cloud carries: the product label Ember's node selectors use (NVIDIA's GPU feature
# discovery, AMD's GPU operator), the extended resource its device plugin advertises, and the taint GPU
# node pools put on so that only pods asking for GPUs land there.
NVIDIA_PRODUCT = "nvidia.com/gpu.product"
AMD_PRODUCT = "amd.com/gpu.product-name"


@dataclass(frozen=True)
class NodeShape:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    gpus: dict[str, int] = field(default_factory=dict)  # extended resource -> count

    def manifest(self) -> dict:
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"}
        capacity |= {resource: str(count) for resource, count in self.gpus.items()}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"type": "kwok", "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64"} | self.labels},
            "spec": {"taints": [{"key": resource, "value": "present", "effect": "NoSchedule"}
                                for resource in self.gpus]},
            "status": {"capacity": capacity, "allocatable": capacity},
        }


NODES = (
    NodeShape("h100-0", {NVIDIA_PRODUCT: "NVIDIA-H100-80GB-HBM3"}, {"nvidia.com/gpu": 8}),
    NodeShape("h100-1", {NVIDIA_PRODUCT: "NVIDIA-H100-80GB-HBM3"}, {"nvidia.com/gpu": 8}),
    NodeShape("a100-0", {NVIDIA_PRODUCT: "NVIDIA-A100-SXM4-80GB"}, {"nvidia.com/gpu": 4}),
    NodeShape("a100-1", {NVIDIA_PRODUCT: "NVIDIA-A100-SXM4-80GB"}, {"nvidia.com/gpu": 4}),
    NodeShape("mi300x-0", {AMD_PRODUCT: "AMD_Instinct_MI300X"}, {"amd.com/gpu": 8}),
    NodeShape("cpu-0"),
)


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binaries() -> Path:
    """The folder holding ember-kube, pulumi-resource-kubernetes and kwok's stages (built on first use)."""
    out = subprocess.run([str(HERE / "install.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


class Cluster:
    def __init__(self, bin_dir: Path, nodes: tuple[NodeShape, ...] = NODES):
        self.bin_dir, self.nodes = bin_dir, nodes
        self.dir = Path(tempfile.mkdtemp(prefix="ember-cluster-"))
        self.kubeconfig = self.dir / "kubeconfig"
        self.ca = self.dir / "pki" / "apiserver.crt"
        self.processes: dict[str, subprocess.Popen] = {}
        self.server = ""

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> Cluster:
        try:
            self._start(time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline: float) -> None:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self._credentials()
        self._spawn("etcd", "--name=etcd0", f"--data-dir={self.dir / 'etcd'}", "--unsafe-no-fsync",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=etcd0=http://127.0.0.1:{peer_port}")
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
                    f"--cert-dir={self.dir / 'pki'}", f"--token-auth-file={self.dir / 'tokens.csv'}",
                    "--authorization-mode=RBAC", "--service-cluster-ip-range=10.96.0.0/16",
                    # The loopback address may not be an endpoint of the `kubernetes` Service.
                    "--endpoint-reconciler-type=none",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={self.dir / 'sa.pub'}",
                    f"--service-account-signing-key-file={self.dir / 'sa.key'}")
        # The API server makes itself a CA and a serving certificate for 127.0.0.1 (the CA's certificate is in
        # the same file): clients verify it with that file.
        self._wait(lambda: self.ca.exists(), "kube-apiserver's certificate", deadline)
        self._write_kubeconfig()
        self._wait(lambda: self.get("/readyz") is not None, "kube-apiserver to be ready", deadline)
        self._spawn("kube-controller-manager", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                    "--secure-port=0", f"--service-account-private-key-file={self.dir / 'sa.key'}",
                    "--horizontal-pod-autoscaler-sync-period=2s", "--concurrent-deployment-syncs=10")
        self._spawn("kube-scheduler", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0")
        stages = self.bin_dir / "kwok-stages.yaml"
        self._spawn("kwok", f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    "--node-lease-duration-seconds=40", "--cidr=10.0.0.1/16", "--node-ip=10.0.0.1",
                    f"--config={stages}")
        for node in self.nodes:
            self.request("POST", "/api/v1/nodes", node.manifest())
        self._wait(self._nodes_ready, "the simulated nodes to be Ready", deadline)
        self._wait(lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
                   "the controller manager to make the default service account", deadline)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the API, for tests ----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json") -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "Accept": "application/json"})
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise ClusterError(f"{method} {path}: {exc.code} {exc.read().decode()[:500]}") from None
        return json.loads(text) if text.startswith("{") else {"text": text}

    def get(self, path: str) -> dict | None:
        """The object at path, or None when it does not exist (or the server is not up yet)."""
        try:
            return self.request("GET", path)
        except (ClusterError, OSError):
            return None

    def items(self, path: str) -> list[dict]:
        return self.request("GET", path)["items"]

    # -- internals -------------------------------------------------------------------------------------------

    def _credentials(self) -> None:
        key, pub = self.dir / "sa.key", self.dir / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                       capture_output=True)
        (self.dir / "tokens.csv").write_text(f'{TOKEN},admin,admin,"system:masters"\n')

    def _write_kubeconfig(self) -> None:
        # JSON is YAML: every client (pulumi-kubernetes, the control plane's own components) reads it.
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "ember",
            "clusters": [{"name": "ember", "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": "admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "ember", "context": {"cluster": "ember", "user": "admin"}}],
        }, indent=1))

    def _spawn(self, component: str, *args: str) -> None:
        log = open(self.dir / f"{component}.log", "wb")
        self.processes[component] = subprocess.Popen([str(self.bin_dir / "ember-kube"), component, *args],
                                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()

    def _nodes_ready(self) -> bool:
        nodes = self.items("/api/v1/nodes")
        ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in n.get("status", {}).get("conditions", []))]
        return len(ready) == len(self.nodes)

    def _wait(self, condition, what: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            for component, process in self.processes.items():
                if process.poll() is not None:
                    logs = "\n".join(f"--- {name}\n{self.log_tail(name)}" for name in self.processes)
                    raise ClusterError(f"{component} exited with {process.returncode} while waiting for {what}:\n"
                                       + logs)
            if condition():
                return
            time.sleep(0.2)
        raise ClusterError(f"timed out waiting for {what}")

    def log_tail(self, component: str, lines: int = 30) -> str:
        path = self.dir / f"{component}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def main() -> int:
    with Cluster(binaries()) as cluster:
        print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
        print(f"nodes: {', '.join(n.name for n in cluster.nodes)}; Ctrl-C stops and removes it", file=sys.stderr)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
