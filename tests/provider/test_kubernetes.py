"""The Kubernetes example through pulumi mocks: the objects it declares and what each change touches.

Whether the API server accepts them (validation, defaulting, Pod Security admission, scheduling, rollouts) is
proven against a real control plane in test_kubernetes_cluster.py."""

import asyncio
import json
import runpy
from pathlib import Path

import pulumi
import pytest
from pulumi.runtime import rpc

from ember.provider.domain.spec import SpecError
from ember.provider.policy.check import RecordingMonitor

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-value-never-in-manifests"


def is_secret(value) -> bool:
    return isinstance(value, dict) and value.get(rpc._special_sig_key) == rpc._special_secret_sig


def unwrap(value):
    """The manifest as the cluster receives it: secrets decrypted by the engine."""
    if is_secret(value):
        return unwrap(value["value"])
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


class Cluster(pulumi.runtime.Mocks):
    """Records Kubernetes objects; answers Ember's resources as their providers would."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.raw: dict[str, dict] = {}  # as registered, secrets still wrapped
        self.ember: dict[str, dict] = {}

    def new_resource(self, args):
        inputs = dict(args.inputs)
        if args.typ.startswith("kubernetes:"):
            self.raw[f"{inputs['kind']}/{args.name}"] = inputs
            self.objects[f"{inputs['kind']}/{args.name}"] = unwrap(inputs)
            return f"{args.name}-id", inputs
        self.ember[args.name] = inputs
        outputs = dict(inputs)
        if args.typ.endswith("ember:Model"):
            outputs |= {"name": f"accounts/{inputs['account_id']}/models/{inputs['model_id']}",
                        "digest": "sha256:" + "ab" * 32}
        elif args.typ.endswith("ember:Deployment"):
            outputs |= {"name": f"accounts/{inputs['account_id']}/deployments/{inputs['deployment_id']}"}
        elif args.typ.endswith("ember:LoRAAddon"):
            outputs |= {"name": f"accounts/{inputs['account_id']}/models/{inputs['model_id']}"}
        elif args.typ.endswith("ember:Dataset"):
            outputs |= {"name": f"accounts/{inputs['account_id']}/datasets/{inputs['dataset_id']}",
                        "digest": "sha256:" + "cd" * 32}
        elif args.typ.endswith("ember:FineTuningJob"):
            outputs |= {"name": f"accounts/{inputs['account_id']}/fineTuningJobs/{inputs['job_id']}",
                        "adapter_url": "s3://ember-models/store/objects/" + "ef" * 32}
        return args.name, outputs

    def call(self, args):
        return {}, None


def run_example(config: dict | None = None, preview: bool = False) -> Cluster:
    cluster = Cluster()
    cluster.monitor = RecordingMonitor(cluster)  # keeps each registration, for the policy pack tests
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_all_config({"ember-kubernetes:storeSecretKey": SECRET, "ember-kubernetes:storeAccessKey": "AKIA1",
                                   **{f"ember-kubernetes:{k}": str(v) for k, v in (config or {}).items()}},
                                  secret_keys=["ember-kubernetes:storeSecretKey", "ember-kubernetes:storeAccessKey"])
    pulumi.runtime.set_mocks(cluster, project="ember-kubernetes", stack="test", preview=preview, monitor=cluster.monitor)
    defaults = {"image": "registry.example.com/ember-runtime:0.1.0", "namespace": "ember",
                "storeUrl": "s3://ember-models/store", "acceleratorType": "NVIDIA_H100_80GB",
                "minReplicas": "1", "maxReplicas": "3"}
    for key, value in defaults.items():
        pulumi.runtime.set_config(f"ember-kubernetes:{key}", str((config or {}).get(key, value)))

    @pulumi.runtime.test
    def program():
        runpy.run_path(str(REPO / "examples/kubernetes/__main__.py"))

    program()
    return cluster


@pytest.fixture(scope="module")
def cluster():
    return run_example()


def test_the_example_declares_its_objects(cluster):
    kinds = sorted(o["kind"] for o in cluster.objects.values())
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Job", "NetworkPolicy",
                     "NetworkPolicy", "PodDisruptionBudget", "PodDisruptionBudget", "Secret", "Secret", "Secret",
                     "Service", "Service"]


def test_gpus_nodes_probes_and_labels(cluster):
    deployment = cluster.objects["Deployment/smollm2-gpu"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" == container["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # the collective library's shared memory between a pod's GPUs (tensor parallelism): a memory-backed /dev/shm
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8000}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["ember.dev/account"] == "quickstart" and labels["ember.dev/deployment"] == "smollm2-gpu"
    assert labels["ember.dev/model"] == "smollm2-135m-instruct"
    hpa = cluster.objects["HorizontalPodAutoscaler/smollm2-gpu-hpa"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3) and "replicas" not in deployment["spec"]
    assert cluster.ember["smollm2-gpu"]["cluster"] == "kubernetes"


def test_the_runtime_serves_the_replica_spec_of_a_config_map(cluster):
    from ember.provider.domain.replica_spec import ReplicaSpec
    from ember.provider.kubernetes import digest_of

    template = cluster.objects["Deployment/smollm2-gpu"]["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["args"] == ["serve", "--replica-spec", "/etc/ember/replica.json", "--host", "0.0.0.0",
                                 "--port", "8000", "--advertise-url", "http://$(POD_IP):8000"]
    # the replica registers at its pod's address, which the downward API gives it
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    config_map = cluster.objects["ConfigMap/smollm2-gpu-replica"]
    text = config_map["data"]["replica.json"]
    spec = ReplicaSpec.model_validate_json(text)
    assert spec.model == "s3://ember-models/store/objects/" + "ab" * 32  # the Model's object
    assert spec.base_model == "accounts/quickstart/models/smollm2-135m-instruct"
    assert spec.deployment == "accounts/quickstart/deployments/smollm2-gpu"
    assert spec.desired_addons.endswith("/deployments/quickstart/smollm2-gpu/addons.json")
    assert (spec.keys, spec.store) == ("s3://ember-models/store/keys.json", "s3://ember-models/store")
    assert (spec.precision.value, spec.max_loras, spec.accelerator_type.value) == ("bf16", 8, "NVIDIA_H100_80GB")
    # mounted read-only beside the scratch volumes; the root filesystem stays read-only
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == "replica-spec")
    assert volume == {"name": "replica-spec", "configMap": {"name": config_map["metadata"]["name"]}}
    assert {"name": "replica-spec", "mountPath": "/etc/ember", "readOnly": True} in container["volumeMounts"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    # the spec's digest is in the pod template: a new spec rolls the pods and is a rollout the Ember Deployment waits for
    assert template["metadata"]["annotations"]["ember.dev/replica-spec"] == digest_of(text)


def test_no_secret_value_in_plain_manifests(cluster):
    for name, manifest in cluster.raw.items():
        if manifest["kind"] != "Secret":
            assert SECRET not in json.dumps(manifest), name
    assert is_secret(cluster.raw["Secret/smollm2-gpu-store"]["stringData"])  # encrypted in Pulumi's state
    assert cluster.objects["Secret/smollm2-gpu-store"]["stringData"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    container = cluster.objects["Deployment/smollm2-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "ember-quickstart-smollm2-gpu-store"}}]
    assert SECRET not in json.dumps(cluster.ember)


def test_changes_touch_only_the_objects_that_should(cluster):
    replicas = run_example({"minReplicas": 2, "maxReplicas": 5})
    changed = {k for k in cluster.objects if cluster.objects[k] != replicas.objects[k]}
    assert changed == {"HorizontalPodAutoscaler/smollm2-gpu-hpa"}
    fixed = run_example({"minReplicas": 2, "maxReplicas": 2})
    assert "HorizontalPodAutoscaler/smollm2-gpu-hpa" not in fixed.objects
    assert fixed.objects["Deployment/smollm2-gpu"]["spec"]["replicas"] == 2
    gpus = run_example({"acceleratorType": "NVIDIA_A100_80GB"})
    changed = {k for k in cluster.objects if cluster.objects[k] != gpus.objects[k]}
    # a new replica spec and new pods, and the training Job on the new type too; the Service, PDB and HPA stay
    assert changed == {"ConfigMap/smollm2-gpu-replica", "Deployment/smollm2-gpu", "Job/smollm2-pirate-sft"}
    template = gpus.objects["Deployment/smollm2-gpu"]["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert cluster.objects["Service/smollm2-gpu-service"] == gpus.objects["Service/smollm2-gpu-service"]


def test_amd_and_cpu_pods():
    amd = run_example({"acceleratorType": "AMD_MI300X_192GB"})
    pod = amd.objects["Deployment/smollm2-gpu"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"amd.com/gpu.product-name": "AMD_Instinct_MI300X"}
    cpu = run_example({"acceleratorType": "CPU"})
    pod = cpu.objects["Deployment/smollm2-gpu"]["spec"]["template"]["spec"]
    assert not any("gpu" in k for k in pod["containers"][0]["resources"]["limits"]) and "tolerations" not in pod


def scale_to_zero_program(min_replicas: int = 0, max_replicas: int = 3, window: int | None = 600,
                          scales: tuple[str, ...] = ("chat", "solo")) -> Cluster:
    """Two deployments that scale to zero in the namespace `models` (chat up to `max_replicas` with an HPA, solo up to
    1), and a gateway in `ember` that scales those named in `scales`."""
    from ember.provider.args import AutoscalingPolicyArgs, DeploymentArgs, GatewayArgs
    from ember.provider.kubernetes import KubernetesArgs, KubernetesDeployment, KubernetesGateway, KubernetesGatewayArgs

    recorded = Cluster()
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(recorded, project="p", stack="s", preview=False)

    @pulumi.runtime.test
    def program():
        models = KubernetesArgs(image="img", store_url="s3://b/s", namespace="models")
        policy = AutoscalingPolicyArgs(scale_to_zero_window_s=window)
        deployments = {name: KubernetesDeployment(name, DeploymentArgs(
            account_id="acme", base_model="accounts/acme/models/m", min_replicas=min_replicas, max_replicas=top,
            autoscaling=policy), models) for name, top in (("chat", max_replicas), ("solo", 1))}
        KubernetesGateway("front", GatewayArgs(account_id="acme"), KubernetesArgs(
            image="img", store_url="s3://b/s", namespace="ember"), KubernetesGatewayArgs(
            scales=[deployments[name] for name in scales], api_server_cidrs=["10.0.0.0/24"]))

    program()
    return recorded


def test_scale_to_zero_on_kubernetes_leaves_the_count_to_the_gateway_and_the_hpa_from_one():
    recorded = scale_to_zero_program()
    chat, solo = recorded.objects["Deployment/chat"]["spec"], recorded.objects["Deployment/solo"]["spec"]
    # no count in the manifest: `up` applies none over the gateway's (or the HPA's), and a new one starts at 1
    assert "replicas" not in chat and "replicas" not in solo
    hpa = recorded.objects["HorizontalPodAutoscaler/chat-hpa"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3)  # an HPA's floor is 1; from 0 the gateway starts one
    assert "HorizontalPodAutoscaler/solo-hpa" not in recorded.objects  # 0..1 is the gateway's alone: no HPA to feed
    ember = recorded.ember["chat"]
    assert ember["min_replicas"] == 0 and ember["autoscaling"]["scale_to_zero_window_s"] == 600
    assert ember["kubernetes_workload"]["name"] == "ember-acme-chat"  # what the gateway's scaler patches
    # a new window, or a higher ceiling, is no new pod template (no rollout) and still no count
    later = scale_to_zero_program(max_replicas=5, window=900)
    assert later.objects["Deployment/chat"] == recorded.objects["Deployment/chat"]
    assert later.ember["chat"]["kubernetes_workload"] == ember["kubernetes_workload"]
    # with a fixed count (no autoscaler at all) the manifest holds it, as before
    fixed = scale_to_zero_program(min_replicas=1, max_replicas=1, window=None)
    assert fixed.objects["Deployment/chat"]["spec"]["replicas"] == 1 and not any(
        k.startswith("HorizontalPodAutoscaler/") for k in fixed.objects)


def test_the_gateway_may_scale_exactly_the_deployments_it_is_given():
    recorded = scale_to_zero_program()
    account = recorded.objects["ServiceAccount/front-account"]
    assert account["metadata"]["name"] == "ember-gw-acme-front" and account["metadata"]["namespace"] == "ember"
    pod = recorded.objects["Deployment/front"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ember-gw-acme-front" and pod["automountServiceAccountToken"] is True
    for name in ("chat", "solo"):
        role = recorded.objects[f"Role/front-scales-{name}"]
        assert role["metadata"]["namespace"] == "models"  # the deployment's namespace, not the gateway's
        assert role["metadata"]["name"] == f"ember-gw-acme-front-scales-ember-acme-{name}"
        assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                                  "resourceNames": [f"ember-acme-{name}"], "verbs": ["get", "patch"]}]
        binding = recorded.objects[f"RoleBinding/front-scales-{name}"]
        assert binding["metadata"]["namespace"] == "models"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ember-gw-acme-front", "namespace": "ember"}]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
    kinds = [k.split("/")[0] for k in recorded.objects]
    assert kinds.count("Role") == kinds.count("RoleBinding") == 2
    assert not {"ClusterRole", "ClusterRoleBinding"} & set(kinds)  # nothing cluster-wide
    # its NetworkPolicy lets it reach the API server (as configured) besides DNS, the store and the replicas
    egress = recorded.objects["NetworkPolicy/front-network"]["spec"]["egress"]
    assert egress[3] == {"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                         "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}
    # one deployment fewer: its Role and binding go, the other's stay as they were
    fewer = scale_to_zero_program(scales=("chat",))
    assert "Role/front-scales-solo" not in fewer.objects and "RoleBinding/front-scales-solo" not in fewer.objects
    assert fewer.objects["Role/front-scales-chat"] == recorded.objects["Role/front-scales-chat"]
    # none: no account, no token, no way to the API server
    none = scale_to_zero_program(scales=())
    assert not any(k.split("/")[0] in ("ServiceAccount", "Role", "RoleBinding") for k in none.objects)
    pod = none.objects["Deployment/front"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert len(none.objects["NetworkPolicy/front-network"]["spec"]["egress"]) == 3


def test_a_gateway_scales_only_kubernetes_deployments():
    from ember.provider.args import GatewayArgs
    from ember.provider.kubernetes import KubernetesArgs, KubernetesGateway, KubernetesGatewayArgs

    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(Cluster(), project="p", stack="s", preview=False)
    with pytest.raises(ValueError, match="scales: 'chat' is not a KubernetesDeployment"):
        KubernetesGateway("g", GatewayArgs(account_id="a"), KubernetesArgs(image="img", store_url="s3://b/s"),
                          KubernetesGatewayArgs(scales=["chat"]))


def test_a_fine_tuning_job_trains_as_a_kubernetes_job_on_a_gpu(cluster):
    job = cluster.objects["Job/smollm2-pirate-sft"]
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    [trainer] = pod["containers"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["envFrom"] == [{"secretRef": {"name": "ember-ft-quickstart-smollm2-pirate-sft-store"}}]
    args = trainer["args"]
    settings, upload = json.loads(args[args.index("--job-json") + 1]), args[args.index("--upload") + 1]
    assert settings["base_dir"] == "s3://ember-models/store/objects/" + "ab" * 32  # the Model's object
    assert settings["dataset"] == "s3://ember-models/store/objects/" + "cd" * 32 + "/dataset.jsonl"
    assert (settings["lora_rank"], settings["epochs"], settings["learning_rate"]) == (8, 1, 1e-3)
    ember_job = cluster.ember["smollm2-pirate-sft"]
    assert ember_job["cluster"] == "kubernetes" and ember_job["training_url"] == upload
    assert upload.startswith("s3://ember-models/store/fine-tuning-runs/quickstart/smollm2-pirate-sft/")
    assert cluster.ember["smollm2-pirate"]["source"] == "s3://ember-models/store/objects/" + "ef" * 32
    assert SECRET not in json.dumps(job)


def test_the_ember_deployment_waits_for_the_workload_it_names(cluster):
    workload = cluster.objects["Deployment/smollm2-gpu"]
    assert workload["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true"}  # Ember waits, and says why
    target = cluster.ember["smollm2-gpu"]["kubernetes_workload"]
    assert (target["namespace"], target["name"]) == ("ember", "ember-quickstart-smollm2-gpu")
    # a new pod template is a rollout to wait for; a new replica range is not (the HPA moves the count)
    gpus = run_example({"acceleratorType": "NVIDIA_A100_80GB"}).ember["smollm2-gpu"]["kubernetes_workload"]
    more = run_example({"minReplicas": 2, "maxReplicas": 5}).ember["smollm2-gpu"]["kubernetes_workload"]
    assert gpus["template_digest"] != target["template_digest"] == more["template_digest"]


def test_the_network_policy_admits_the_service_port_and_lets_out_only_dns_and_the_store(cluster):
    policy = cluster.objects["NetworkPolicy/smollm2-gpu-network"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ember.dev/account": "quickstart", "ember.dev/deployment": "smollm2-gpu"}
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    dns, store = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert store == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]}


def test_the_gateway_runs_two_restricted_pods_behind_a_service_and_a_disruption_budget(cluster):
    workload = cluster.objects["Deployment/gateway"]
    assert workload["spec"]["replicas"] == 2 and workload["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true"}
    pod = workload["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["gateway", "--store", "s3://ember-models/store", "--gateway",
                                 "accounts/quickstart/gateways/gateway", "--host", "0.0.0.0", "--port", "8080"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    assert not any("gpu" in k for k in container["resources"]["limits"])
    # the replicas' own restricted profile: non-root, no escalation, no capabilities, read-only root, no API token
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    # it scales no deployment here (KubernetesGatewayArgs.scales): no service account, no token
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert container["envFrom"] == [{"secretRef": {"name": "ember-gw-quickstart-gateway-store"}}]
    selector = workload["spec"]["selector"]["matchLabels"]
    assert cluster.objects["Service/gateway-service"]["spec"]["selector"] == selector
    assert cluster.objects["Service/gateway-service"]["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 8080}]
    assert cluster.objects["PodDisruptionBudget/gateway-pdb"]["spec"] == {"selector": {"matchLabels": selector},
                                                                          "minAvailable": 1}
    policy = cluster.objects["NetworkPolicy/gateway-network"]["spec"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]
    runtime = policy["egress"][2]  # besides DNS and the store: the runtime pods' port, where it forwards requests
    assert runtime == {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ember-runtime"}}}],
                       "ports": [{"protocol": "TCP", "port": 8000}]}
    ember = cluster.ember["gateway"]
    assert ember["cluster"] == "kubernetes" and ember["kubernetes_workload"]["name"] == "ember-gw-quickstart-gateway"
    assert ember["advertised_url"] == "http://ember-gw-quickstart-gateway.ember.svc.cluster.local"
    assert not any(k.startswith("Ingress/") for k in cluster.objects)  # only where it is asked for


def test_the_gateway_gets_an_ingress_or_an_http_route_where_asked():
    exposed = run_example({"gatewayHost": "ember.example.com"})
    ingress = exposed.objects["Ingress/gateway-ingress"]["spec"]
    assert ingress["rules"] == [{"host": "ember.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
        "service": {"name": "ember-gw-quickstart-gateway", "port": {"number": 80}}}}]}}]
    assert exposed.ember["gateway"]["advertised_url"] == "http://ember.example.com"

    from ember.provider.args import GatewayArgs
    from ember.provider.kubernetes import KubernetesArgs, KubernetesGateway, KubernetesGatewayArgs

    routed = Cluster()
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(routed, project="p", stack="s", preview=False)

    @pulumi.runtime.test
    def program():
        KubernetesGateway("front", GatewayArgs(account_id="platform", replicas=3),
                          KubernetesArgs(image="img", store_url="s3://b/s", namespace="ember"),
                          KubernetesGatewayArgs(route_parent={"name": "public", "namespace": "infra"},
                                                route_hostnames=["api.example.com"]))

    program()
    route = routed.objects["HTTPRoute/front-route"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "infra"}]
    assert route["spec"]["rules"] == [{"backendRefs": [{"name": "ember-gw-platform-front", "port": 80}]}]
    assert routed.objects["Deployment/front"]["spec"]["replicas"] == 3
    assert routed.ember["front"]["advertised_url"] == "http://api.example.com"


def test_a_kubernetes_gateway_of_one_pod_is_refused():
    from ember.provider.args import GatewayArgs
    from ember.provider.kubernetes import KubernetesArgs, KubernetesGateway

    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(Cluster(), project="p", stack="s", preview=False)
    with pytest.raises(SpecError, match="replicas: 1 is too few on Kubernetes"):
        KubernetesGateway("g", GatewayArgs(account_id="a", replicas=1), KubernetesArgs(image="img", store_url="s3://b/s"))
