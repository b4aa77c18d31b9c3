"""The gateway's Kubernetes scaler against a fake API server (httpx.MockTransport): what it asks, with which
credentials, and what it makes of the answers. Against a real kube-apiserver, with the RBAC that KubernetesGateway
declares: tests/cluster/test_kubernetes_scaler.py."""

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import certifi
import httpx
import pytest

from ember.provider.domain.accounts import DeploymentAccess
from ember.provider.domain.kinds.deployment import AutoscalingPolicy, KubernetesWorkload
from ember.provider.domain.records import DeploymentRecord
from ember.runtime.gateway.directory import Deployment
from ember.runtime.gateway.kubernetes_scaler import FIELD_MANAGER, KubernetesScaler, ScaleError, kubernetes_scalers

NAME = "accounts/acme/deployments/chat"
SCALE = "/apis/apps/v1/namespaces/ember/deployments/ember-acme-chat/scale"


def deployment(kubeconfig: str | None = None, cluster: str = "kubernetes", workload: bool = True,
               name: str = "ember-acme-chat") -> Deployment:
    target = KubernetesWorkload(namespace="ember", name=name, kubeconfig=kubeconfig, template_digest="abc")
    record = DeploymentRecord(name=NAME, base_model="accounts/acme/models/base", cluster=cluster, min_replicas=0,
                              max_replicas=3, autoscaling=AutoscalingPolicy(scale_to_zero_window_s=60),
                              kubernetes_workload=target if workload else None)
    return Deployment(DeploymentAccess(NAME, "acme", "accounts/acme/models/base"), frozenset(), (), record)


class FakeApi:
    """The scale subresource of apps/v1 Deployments, as kube-apiserver answers it; `refuse` makes it answer a Status."""

    def __init__(self, scales: dict[str, int]):
        self.scales = scales  # path -> spec.replicas
        self.requests: list[httpx.Request] = []
        self.refuse: tuple[int, str] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.refuse:
            code, message = self.refuse
            return httpx.Response(code, json={"kind": "Status", "status": "Failure", "message": message, "code": code})
        path = request.url.path
        if path not in self.scales:
            return httpx.Response(404, json={"kind": "Status", "message": f'deployments.apps "{path.split("/")[-2]}" '
                                                                          f'not found', "code": 404})
        if request.method == "PATCH":
            assert request.headers["content-type"] == "application/merge-patch+json"
            self.scales[path] = json.loads(request.content)["spec"]["replicas"]
        spec = {"replicas": self.scales[path]} if self.scales[path] else {}  # omitempty: 0 is left out
        return httpx.Response(200, json={"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": spec,
                                         "status": {"replicas": self.scales[path]}})


def write_kubeconfig(path: Path, server: str = "https://api.example.test:6443", token: str = "t0k3n") -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server, "certificate-authority": certifi.where()}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return str(path)


@pytest.fixture
def api():
    return FakeApi({SCALE: 0})


@pytest.fixture
def kubeconfig(tmp_path):
    return write_kubeconfig(tmp_path / "kubeconfig")


def test_it_reads_and_patches_the_scale_with_the_workloads_kubeconfig(api, kubeconfig):
    scaler = KubernetesScaler(environ={}, transport=httpx.MockTransport(api))
    target = deployment(kubeconfig)
    assert scaler.running(target) == 0
    assert scaler.resize(target, 1) == 1 and api.scales[SCALE] == 1
    assert scaler.running(target) == 1
    assert scaler.resize(target, 0) == 0 and scaler.running(target) == 0
    get, patch = api.requests[0], api.requests[1]
    assert (get.method, str(get.url)) == ("GET", f"https://api.example.test:6443{SCALE}")
    assert patch.method == "PATCH" and patch.url.params["fieldManager"] == FIELD_MANAGER == "ember-gateway"
    assert json.loads(patch.content) == {"spec": {"replicas": 1}}  # nothing else of the Deployment is touched
    assert {r.headers["authorization"] for r in api.requests} == {"Bearer t0k3n"}


def test_it_handles_only_deployments_on_kubernetes_with_a_workload(kubeconfig):
    scaler = KubernetesScaler(environ={})
    assert scaler.follows_load is False  # the HPA moves 1..max; the gateway only 0 <-> 1
    assert scaler.handles(deployment(kubeconfig))
    assert not scaler.handles(deployment(cluster="local", workload=False))
    assert not scaler.handles(deployment(workload=False))
    assert not scaler.handles(Deployment(DeploymentAccess(NAME, "acme", "accounts/acme/models/base"), frozenset(), ()))


def test_a_refusal_is_none_to_the_autoscaler_and_an_error_naming_the_deployment_and_the_answer(api, kubeconfig, caplog):
    scaler = KubernetesScaler(environ={}, transport=httpx.MockTransport(api))
    target = deployment(kubeconfig)
    api.refuse = (403, ('deployments.apps "ember-acme-chat" is forbidden: User "system:serviceaccount:ember:gw" '
                        'cannot patch resource "deployments/scale" in API group "apps" in the namespace "ember"'))
    with caplog.at_level(logging.WARNING, logger="ember.gateway"):
        assert scaler.running(target) is None
        assert scaler.running(target) is None  # a lasting failure is logged once, not every tick
    [record] = caplog.records
    assert NAME in record.message and "ember/ember-acme-chat" in record.message and "403 Forbidden" in record.message
    with pytest.raises(ScaleError, match=r"accounts/acme/deployments/chat: scaling ember/ember-acme-chat to 1: the "
                                         r"API server at https://api.example.test:6443 answered 403 Forbidden: "
                                         r".*cannot patch resource \"deployments/scale\""):
        scaler.resize(target, 1)
    api.refuse = None
    assert scaler.running(target) == 0  # and it recovers by itself
    missing = deployment(kubeconfig, name="gone")
    assert scaler.running(missing) is None
    with pytest.raises(ScaleError, match='404 Not Found: deployments.apps "gone" not found'):
        scaler.resize(missing, 1)


def test_a_conflict_is_a_change_not_made_this_time(api, kubeconfig):
    scaler = KubernetesScaler(environ={}, transport=httpx.MockTransport(api))
    api.refuse = (409, "Operation cannot be fulfilled: the object has been modified")
    assert scaler.resize(deployment(kubeconfig), 1) is None


def test_an_api_server_that_does_not_answer_costs_a_timeout_not_a_hang(kubeconfig, tmp_path, caplog):
    def timing_out(request):
        raise httpx.ReadTimeout("timed out", request=request)

    scaler = KubernetesScaler(environ={}, transport=httpx.MockTransport(timing_out))
    assert scaler.running(deployment(kubeconfig)) is None
    with pytest.raises(ScaleError, match="no answer from the API server at https://api.example.test:6443: ReadTimeout"):
        scaler.resize(deployment(kubeconfig), 1)
    # a real socket that accepts and never answers: the call ends at the timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        config = write_kubeconfig(tmp_path / "silent", server=f"http://127.0.0.1:{port}")
        scaler = KubernetesScaler(environ={}, timeout=httpx.Timeout(0.3))
        started = time.monotonic()
        assert scaler.running(deployment(config)) is None
        with pytest.raises(ScaleError, match="ReadTimeout"):
            scaler.resize(deployment(config), 1)
        assert time.monotonic() - started < 3


def in_pod(tmp_path: Path, token: str = "pod-token") -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir(exist_ok=True)
    (folder / "token").write_text(token)
    shutil.copyfile(certifi.where(), folder / "ca.crt")  # any CA bundle: the mock transport makes no TLS
    return folder


POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_a_pod_it_uses_the_service_account_and_reads_its_token_at_each_call(api, tmp_path):
    account = in_pod(tmp_path)
    scaler = KubernetesScaler(service_account=account, environ=POD_ENV, transport=httpx.MockTransport(api))
    # the record's kubeconfig is the path `pulumi up` read on its own machine: a pod does not have it
    target = deployment("/home/someone/.kube/config")
    assert scaler.running(target) == 0
    (account / "token").write_text("rotated-token")  # the kubelet rotates projected tokens
    assert scaler.resize(target, 1) == 1
    # port 443, the default
    assert [str(r.url.copy_with(query=None)) for r in api.requests] == [f"https://10.96.0.1{SCALE}"] * 2
    assert [r.headers["authorization"] for r in api.requests] == ["Bearer pod-token", "Bearer rotated-token"]


def test_a_gateway_pod_given_nothing_to_scale_leaves_kubernetes_deployments_be(tmp_path, kubeconfig):
    # KubernetesGatewayArgs.scales empty: no token is mounted, and no request is held for a start it could not make
    scaler = KubernetesScaler(service_account=tmp_path / "no-token", environ=POD_ENV)
    assert not scaler.handles(deployment("/home/someone/.kube/config"))
    assert not scaler.handles(deployment(None))
    assert scaler.handles(deployment(kubeconfig))  # unless this machine has the workload's kubeconfig


def test_a_kubeconfig_this_machine_has_comes_before_the_pod(api, tmp_path, kubeconfig):
    scaler = KubernetesScaler(service_account=in_pod(tmp_path), environ=POD_ENV, transport=httpx.MockTransport(api))
    assert scaler.running(deployment(kubeconfig)) == 0
    assert api.requests[0].headers["authorization"] == "Bearer t0k3n"


def test_outside_a_pod_a_missing_kubeconfig_is_named(tmp_path):
    scaler = KubernetesScaler(service_account=tmp_path / "none", environ={})
    target = deployment(str(tmp_path / "absent"))
    assert scaler.running(target) is None
    with pytest.raises(ScaleError, match=r"accounts/acme/deployments/chat: kubernetes_workload.kubeconfig: no file at "
                                         r"'.*absent', and this gateway does not run in a pod"):
        scaler.resize(target, 1)


def test_a_gateway_with_no_deployment_on_kubernetes_pays_nothing_for_the_scaler():
    code = ("import sys; from ember.runtime.gateway.kubernetes_scaler import kubernetes_scalers; "
            "[s] = kubernetes_scalers(); print('kubernetes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the kubernetes package loads only to read a kubeconfig
    assert [type(s).__name__ for s in kubernetes_scalers()] == ["KubernetesScaler"]
