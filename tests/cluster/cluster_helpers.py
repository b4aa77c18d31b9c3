"""A real Kubernetes control plane for the `cluster` tests (tools/kubernetes: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok's simulated GPU nodes), and a stand-in kubelet for Jobs.

kwok makes pods Ready without running them. A fine-tuning Job's pod must really run for `pulumi up` to finish
(the Ember FineTuningJob reads what it wrote), so `HostKubelet` runs each such pod's command on this machine,
with the environment the pod spec gives it (the Secret's values included), then reports the pod Succeeded or
Failed through the pod's status, as a kubelet would.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "tools/kubernetes/install.sh"


def _load_cluster_module():
    spec = importlib.util.spec_from_file_location("ember_test_cluster", REPO / "tools/kubernetes/cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cluster = _load_cluster_module()
requires_go = pytest.mark.skipif(shutil.which("go") is None and not os.environ.get("EMBER_KUBERNETES_BIN"),
                                 reason="no Go toolchain to build the control plane (tools/kubernetes/install.sh)")


def kubernetes_bin() -> Path:
    """The built control plane and plugin: EMBER_KUBERNETES_BIN, or install.sh's cached build."""
    if os.environ.get("EMBER_KUBERNETES_BIN"):
        return Path(os.environ["EMBER_KUBERNETES_BIN"])
    return cluster.binaries()


def install_plugin(env: dict, bin_dir: Path) -> None:
    """The pulumi-kubernetes plugin into the stack's PULUMI_HOME, from file (nothing is downloaded)."""
    version = (bin_dir / "pulumi-resource-kubernetes.version").read_text().strip()
    subprocess.run([shutil.which("pulumi"), "plugin", "install", "resource", "kubernetes", version,
                    "--file", str(bin_dir / "pulumi-resource-kubernetes")], env=env, check=True, capture_output=True)


def decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


class HostKubelet:
    """Runs the pods of Jobs labelled `app.kubernetes.io/name=<app>` on this machine, once each."""

    def __init__(self, api, namespace: str, app: str = "ember-fine-tuning"):
        self.api, self.namespace, self.app = api, namespace, app
        self.ran: dict[str, int] = {}  # pod name -> exit status
        self.outputs: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> HostKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=600)

    def _loop(self) -> None:
        selector = f"app.kubernetes.io/name%3D{self.app}"
        while not self._stop.wait(0.5):
            try:
                pods = self.api.items(f"/api/v1/namespaces/{self.namespace}/pods?labelSelector={selector}")
            except Exception:  # the cluster is stopping
                continue
            for pod in pods:
                name = pod["metadata"]["name"]
                if name not in self.ran and pod["status"].get("phase") == "Running":
                    self.ran[name] = self._run(pod)

    def _run(self, pod: dict) -> int:
        (container,) = pod["spec"]["containers"]
        env = dict(os.environ)
        for source in container.get("envFrom", []):
            name = source["secretRef"]["name"]
            env |= decoded(self.api.request("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}"))
        env |= {item["name"]: item["value"] for item in container.get("env", [])}
        scratch = Path(tempfile.mkdtemp(prefix="ember-pod-"))
        env["EMBER_CACHE_DIR"] = str(scratch / "cache")  # the pod's emptyDir
        command = container["command"]
        assert command[:1] == ["python"], command  # the runtime image's entrypoint, run with this Python
        out = subprocess.run([sys.executable, *command[1:], *container.get("args", [])], env=env,
                             capture_output=True, text=True, cwd=scratch)
        self.outputs[pod["metadata"]["name"]] = out.stdout + out.stderr
        shutil.rmtree(scratch, ignore_errors=True)
        self._report(pod, out.returncode)
        return out.returncode

    def _report(self, pod: dict, code: int) -> None:
        now = pod["status"].get("startTime")
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": now, "finishedAt": now}
        status = {"phase": "Succeeded" if code == 0 else "Failed",
                  "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                  "containerStatuses": [{"name": pod["spec"]["containers"][0]["name"], "ready": False,
                                         "restartCount": 0, "image": pod["spec"]["containers"][0]["image"],
                                         "imageID": "", "state": {"terminated": terminated}}]}
        path = f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}/status"
        self.api.request("PATCH", path, {"status": status}, content_type="application/strategic-merge-patch+json")
