"""examples/kubernetes through the real Pulumi CLI and pulumi-kubernetes, against a real control plane.

The API server admits, validates and defaults every object (Pod Security `restricted` enforced on the
namespace), the scheduler places pods on kwok's simulated GPU nodes, the controllers roll out, scale and
garbage-collect. No kubelet runs the runtime (kwok marks its pods Ready), so these tests prove what the cluster
accepts and does with Ember's objects, not that the image serves; a fine-tuning Job's pod is run on this
machine by `HostKubelet` with the environment its pod spec gives it.

The tests of the first stack run in file order, each step building on the one before, as a user's stack does.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from tests.cluster.cluster_helpers import HostKubelet, cluster, install_plugin, kubernetes_bin, requires_go
from tests.engine.engine_helpers import EngineStack, requires_pulumi
from tests.runtime.gateway_helpers import StandIn, ThreadServer

from ember.provider.domain.records import ReplicaRegistration
from ember.provider.domain.store_layout import StoreLayout
from ember.runtime.gateway.app import create_gateway_app
from ember.runtime.gateway.config import GatewayConfig

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "ember"
SECRET = "s3cr3t-store-key-canary"
H100_NODES = {"h100-0", "h100-1"}
A100_NODES = {"a100-0", "a100-1"}
pytestmark = [pytest.mark.cluster, pytest.mark.engine, pytest.mark.slow, requires_pulumi, requires_go]


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    bin_dir = kubernetes_bin()
    with cluster.Cluster(bin_dir) as api:
        api.bin_dir = bin_dir
        yield api


def make_namespace(api, name: str) -> None:
    api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                 "pod-security.kubernetes.io/enforce-version": "latest"}}})


def make_program(root: Path) -> Path:
    """examples/kubernetes with the files it reads beside it, as in the repository."""
    from ember.provider.tools import pirate, quickstart

    program = shutil.copytree(REPO / "examples/kubernetes", root / "kubernetes")
    quickstart.prepare(root / "quickstart" / "models", log=lambda _: None)
    pirate.write(root / "fine-tuning" / "data")
    return program


def open_stack(api, root: Path, namespace: str, **config) -> EngineStack:
    make_namespace(api, namespace)
    program = make_program(root)
    stack = EngineStack(program, root / "engine")
    install_plugin(stack.env, api.bin_dir)
    store = f"file://{root / 'store'}"
    stack.env |= {"EMBER_STORE_URL": store, "EMBER_STATE_DIR": str(root / "state")}
    settings = {"kubeconfig": str(api.kubeconfig), "namespace": namespace, "storeUrl": store,
                "acceleratorType": "NVIDIA_H100_80GB", "minReplicas": "1", "maxReplicas": "3"} | config
    for key, value in settings.items():
        stack.pulumi("config", "set", key, value)
    stack.pulumi("config", "set", "--secret", "storeAccessKey", "AKIA-canary")
    stack.pulumi("config", "set", "--secret", "storeSecretKey", SECRET)
    return stack


def objects(api, namespace: str, kind: str, group: str = "api/v1") -> list[dict]:
    return api.items(f"/{group}/namespaces/{namespace}/{kind}?labelSelector=app.kubernetes.io/managed-by%3Dember")


def runtime_pods(api, namespace: str, name: str = "ember-runtime") -> list[dict]:
    pods = api.items(f"/api/v1/namespaces/{namespace}/pods?labelSelector=app.kubernetes.io/name%3D{name}")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def named(items: list[dict], name: str) -> dict:
    (found,) = [item for item in items if item["metadata"]["name"] == name]
    return found


def wait_for(condition, what: str, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ember_state(stack: EngineStack, name: str) -> dict:
    resources = json.loads(stack.pulumi("stack", "export").stdout)["deployment"]["resources"]
    (resource,) = [r for r in resources if r["type"].endswith("ember:Deployment") and r["urn"].endswith(f"::{name}")]
    return resource


@pytest.fixture(scope="module")
def stack(kube, tmp_path_factory):
    stack = open_stack(kube, tmp_path_factory.mktemp("example"), NAMESPACE)
    # Every `up` may start a fine-tuning Job's pod (a new accelerator type replaces the Job): one kubelet for all.
    with HostKubelet(kube, NAMESPACE) as kubelet:
        stack.kubelet = kubelet
        up = stack.pulumi("up", "--yes", "--skip-preview", check=False)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n" + "\n".join(kubelet.outputs.values())
        yield stack
        stack.pulumi("destroy", "--yes", check=False)


def test_up_creates_every_object_and_the_api_server_accepts_them(kube, stack):
    kinds = {"secrets": "api/v1", "services": "api/v1", "deployments": "apis/apps/v1",
             "poddisruptionbudgets": "apis/policy/v1", "horizontalpodautoscalers": "apis/autoscaling/v2",
             "networkpolicies": "apis/networking.k8s.io/v1", "jobs": "apis/batch/v1"}
    found = {kind: sorted(o["metadata"]["name"] for o in objects(kube, NAMESPACE, kind, group))
             for kind, group in kinds.items()}
    gateway = "ember-gw-quickstart-gateway"
    assert found == {"secrets": ["ember-ft-quickstart-smollm2-pirate-sft-store", f"{gateway}-store",
                                 "ember-quickstart-smollm2-gpu-store"],
                     "services": [gateway, "ember-quickstart-smollm2-gpu"],
                     "deployments": [gateway, "ember-quickstart-smollm2-gpu"],
                     "poddisruptionbudgets": [gateway, "ember-quickstart-smollm2-gpu"],
                     "horizontalpodautoscalers": ["ember-quickstart-smollm2-gpu"],
                     "networkpolicies": [gateway, "ember-quickstart-smollm2-gpu"],
                     "jobs": ["ember-ft-quickstart-smollm2-pirate-sft"]}
    # The fine-tuning Job's pod (run here by the stand-in kubelet) trained the addon the stack deploys.
    assert list(stack.kubelet.ran.values()) == [0]
    job = objects(kube, NAMESPACE, "jobs", "apis/batch/v1")[0]
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    # Store credentials live in the Secrets only: no manifest, annotation or state holds the value.
    for kind, group in kinds.items():
        if kind != "secrets":
            assert SECRET not in json.dumps(objects(kube, NAMESPACE, kind, group))
    assert SECRET not in stack.pulumi("stack", "export").stdout


def test_pods_run_on_nodes_of_the_accelerator_and_ember_reports_ready_after_the_rollout(kube, stack):
    pods = runtime_pods(kube, NAMESPACE)
    assert pods and {p["spec"]["nodeName"] for p in pods} <= H100_NODES
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["status"]["phase"] == "Running"
    workload = named(objects(kube, NAMESPACE, "deployments", "apis/apps/v1"), "ember-quickstart-smollm2-gpu")
    assert workload["status"]["readyReplicas"] == workload["status"]["replicas"] == 1
    ember = ember_state(stack, "smollm2-gpu")
    # The Ember Deployment comes after the workload and waited for its rollout through the API.
    assert ember["outputs"]["state"] == "READY" and ember["outputs"]["ready_replicas"] == 1
    assert any(d.endswith("kubernetes:apps/v1:Deployment::smollm2-gpu") for d in ember["dependencies"])


def test_pods_meet_the_restricted_pod_security_profile_and_drain(kube, stack):
    """The namespace enforces `restricted`: the API server admitted these pods, so they meet it."""
    for pod in runtime_pods(kube, NAMESPACE):
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert spec["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/var/cache/ember", "/var/log/ember", "/tmp", "/dev/shm"} <= mounts
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == 10
        assert spec["terminationGracePeriodSeconds"] == 310


def test_a_pod_the_restricted_profile_refuses_is_refused(kube, stack):
    """The namespace really enforces: the same pod as root with privilege escalation is refused."""
    pod = runtime_pods(kube, NAMESPACE)[0]
    spec = pod["spec"]
    spec["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    spec["securityContext"] = {}
    spec.pop("nodeName")
    with pytest.raises(cluster.ClusterError, match=r"violates PodSecurity .*restricted:latest"):
        kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "escalating"}, "spec": spec})


def test_the_gateway_pods_are_admitted_under_restricted_security_and_route_to_the_examples_deployment(kube, stack):
    """Two gateway pods the restricted namespace admitted, behind a Service; and the gateway, reading the store the
    stack wrote, routes the example's models to its deployment: here to a stand-in for the replica a kubelet would run
    (kwok runs none), registered as a pod registers itself."""
    pods = runtime_pods(kube, NAMESPACE, "ember-gateway")
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
        assert "nodeSelector" not in pod["spec"] or not pod["spec"]["nodeSelector"]  # no GPU: any node
    service = named(objects(kube, NAMESPACE, "services"), "ember-gw-quickstart-gateway")
    assert all(service["spec"]["selector"].items() <= p["metadata"]["labels"].items() for p in pods)
    gateway = next(r for r in json.loads(stack.pulumi("stack", "export").stdout)["deployment"]["resources"]
                   if r["type"].endswith("ember:Gateway"))
    assert gateway["outputs"]["state"] == "READY" and gateway["outputs"]["ready_replicas"] == 2
    assert stack.pulumi("stack", "output", "gateway").stdout.strip() == \
        "http://ember-gw-quickstart-gateway.ember.svc.cluster.local"

    store_url = stack.env["EMBER_STORE_URL"]
    key = (Path(stack.env["EMBER_STATE_DIR"]) / "keys" / "quickstart.key").read_text().strip()
    replica = StandIn(["ok"]).start()
    front = ThreadServer(create_gateway_app(GatewayConfig(store_url=store_url,
                                                          gateway="accounts/quickstart/gateways/gateway")))
    try:
        registration = ReplicaRegistration(replica="pod-0", deployment="accounts/quickstart/deployments/smollm2-gpu",
                                           url=replica.url, last_seen=time.time())
        path = Path(StoreLayout(store_url.removeprefix("file://")).replica("quickstart", "smollm2-gpu", "pod-0"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(registration.to_json()))
        auth = {"Authorization": f"Bearer {key}"}
        listed = {m["id"] for m in httpx.get(f"{front.url}/v1/models", headers=auth, timeout=10).json()["data"]}
        assert {"accounts/quickstart/models/smollm2-135m-instruct", "accounts/quickstart/models/smollm2-poet",
                "accounts/quickstart/models/smollm2-pirate"} <= listed
        answer = httpx.post(f"{front.url}/v1/completions", headers=auth, timeout=10, json={
            "model": "accounts/quickstart/models/smollm2-pirate", "prompt": "Ahoy", "max_tokens": 4})
        assert answer.status_code == 200
        assert answer.headers["x-ember-deployment"] == "accounts/quickstart/deployments/smollm2-gpu"
        assert replica.seen[-1].body["model"] == "accounts/quickstart/models/smollm2-pirate"
        path.unlink()
    finally:
        front.stop()
        replica.stop()


def test_refresh_after_up_shows_no_change(stack):
    stack.pulumi("refresh", "--yes", "--expect-no-changes")
    stack.pulumi("up", "--yes", "--expect-no-changes")


def test_attaching_an_addon_changes_no_pod(kube, stack):
    before = {p["metadata"]["uid"] for p in runtime_pods(kube, NAMESPACE)}
    main = stack.program / "__main__.py"
    main.write_text(main.read_text() + '''
LoRAAddon("smollm2-poet-2", LoRAAddonArgs(account_id=ACCOUNT, base_model=base, deployments=[gpu.deployment],
                                          source="../quickstart/models/smollm2-poet"))
''')
    stack.up()
    assert {p["metadata"]["uid"] for p in runtime_pods(kube, NAMESPACE)} == before
    desired = Path(stack.env["EMBER_STORE_URL"].removeprefix("file://")) / "deployments/quickstart/smollm2-gpu"
    assert "accounts/quickstart/models/smollm2-poet-2" in (desired / "addons.json").read_text()


def test_raising_min_replicas_scales_the_deployment(kube, stack):
    stack.pulumi("config", "set", "minReplicas", "2")
    stack.up()
    hpa = objects(kube, NAMESPACE, "horizontalpodautoscalers", "apis/autoscaling/v2")[0]
    assert hpa["spec"]["minReplicas"] == 2
    # The autoscaler owns the count: it raises the Deployment to its new minimum (no metrics are needed for that),
    # and `up` returns once it has: the Ember Deployment waits for min_replicas, not the count the API server
    # defaulted (1, since the manifest leaves replicas to the autoscaler).
    assert len([p for p in runtime_pods(kube, NAMESPACE) if p["status"].get("phase") == "Running"]) == 2
    assert ember_state(stack, "smollm2-gpu")["outputs"]["ready_replicas"] == 2


def test_changing_the_accelerator_rolls_the_pods_and_keeps_the_service(kube, stack):
    service = named(objects(kube, NAMESPACE, "services"), "ember-quickstart-smollm2-gpu")["metadata"]["uid"]
    stack.pulumi("config", "set", "acceleratorType", "NVIDIA_A100_80GB")
    stack.up()
    # `up` returned once the rollout completed: every replica already runs on an A100 node, none on an H100.
    pods = runtime_pods(kube, NAMESPACE)
    assert pods and {p["spec"]["nodeName"] for p in pods} <= A100_NODES
    assert named(objects(kube, NAMESPACE, "services"), "ember-quickstart-smollm2-gpu")["metadata"]["uid"] == service
    template = named(objects(kube, NAMESPACE, "deployments", "apis/apps/v1"),
                     "ember-quickstart-smollm2-gpu")["spec"]["template"]["spec"]
    assert template["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_destroy_removes_every_object(kube, stack):
    stack.pulumi("destroy", "--yes")
    for kind, group in {"secrets": "api/v1", "services": "api/v1", "deployments": "apis/apps/v1",
                        "jobs": "apis/batch/v1", "networkpolicies": "apis/networking.k8s.io/v1",
                        "poddisruptionbudgets": "apis/policy/v1",
                        "horizontalpodautoscalers": "apis/autoscaling/v2"}.items():
        assert objects(kube, NAMESPACE, kind, group) == [], kind
    store = Path(stack.env["EMBER_STORE_URL"].removeprefix("file://"))
    assert not (store / "gateways").exists() or not list((store / "gateways").rglob("*.json"))
    wait_for(lambda: kube.items(f"/api/v1/namespaces/{NAMESPACE}/pods") == [], "the pods to be gone")


def test_more_gpus_than_any_node_has_fails_clearly_and_makes_no_ember_deployment(kube, tmp_path):
    namespace = "ember-too-big"
    # 8 is a count the spec allows, but the A100 nodes have 4 each
    stack = open_stack(kube, tmp_path, namespace, acceleratorType="NVIDIA_A100_80GB", acceleratorCount="8")
    stack.env["EMBER_READY_TIMEOUT"] = "20"
    try:
        with HostKubelet(kube, namespace):
            up = stack.pulumi("up", "--yes", "--skip-preview", check=False)
        assert up.returncode != 0
        out = up.stdout + up.stderr
        error = next(line.strip() for line in out.splitlines() if "EmberError: accelerator_count:" in line)
        print(error)
        assert "did not complete within 20 s" in error and "Insufficient nvidia.com/gpu" in error, out
        assert "each replica asks for 8 x NVIDIA_A100_80GB (nvidia.com/gpu: 8)" in error, out
        assert "InsecureRequestWarning" not in out  # the kubeconfig names the API server's CA
        # No Ember deployment was registered, so no addon attached to it either; the model and dataset it
        # did not need to wait for are made (Pulumi creates independent resources side by side).
        store = tmp_path / "store"
        assert (store / "models/quickstart/smollm2-135m-instruct.json").exists()
        assert not (store / "deployments/quickstart/smollm2-gpu/deployment.json").exists()
        assert not (store / "models/quickstart/smollm2-poet.json").exists()
        assert "smollm2-gpu" not in {r["urn"].rsplit("::", 1)[-1] for r in json.loads(stack.pulumi(
            "stack", "export").stdout)["deployment"]["resources"] if r["type"].endswith("ember:Deployment")}
    finally:
        stack.pulumi("destroy", "--yes", check=False)
