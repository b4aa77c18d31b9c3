"""Ember's resources on Kubernetes: an Ember deployment (or fine-tuning job) as pulumi-kubernetes resources, beside the
Ember resource that registers it (the providers then call backends/kubernetes_cluster.py, which waits for them).

`KubernetesDeployment` is a component whose children `pulumi preview` shows: a `Secret` with the store
credentials, an apps/v1 `Deployment` of the runtime image (GPU requests and limits from the accelerator count,
node selection by accelerator type, probes on /health, the Pod Security `restricted` profile, a drain on
rollouts), a `Service`, a `PodDisruptionBudget`, a `NetworkPolicy`, a `HorizontalPodAutoscaler` when the replica
range can move, and the Ember `Deployment` (cluster="kubernetes": it registers the deployment and its desired
addon set in the model store). pulumi-kubernetes applies them; the apps/v1 Deployment without waiting, since
the Ember Deployment comes after it and waits for the rollout itself through the Kubernetes API
(kubernetes_rollout.py), so it reports READY only once Kubernetes runs the replicas, and says why when it
does not. Nothing else here talks to the cluster.

`KubernetesFineTuningJob` trains a FineTuningJob as a batch/v1 `Job` (GPU requests, node selection by
accelerator type, no retries) whose pod reads the base model and datasets from the store and writes the adapter
and its metrics back; the Ember `FineTuningJob` (cluster="kubernetes") depends on it and, once
pulumi-kubernetes has seen the Job complete, stores the adapter as the addon model.

Replicas load the base model from the store at start and reconcile addons from it on a timer (an addon set not
written yet is an empty one), with the same runtime code as the local cluster, so attaching an addon needs no
pod restart.

HPA requirements: the autoscaler scales on the pods metric `ember_running_requests` (each replica's
/metrics), so the cluster needs a metrics pipeline that serves pod custom metrics (for example
Prometheus with prometheus-adapter). An HPA does not scale to zero (it leaves a Deployment at 0 replicas alone): with
min_replicas 0 the gateway does, through the Deployment's `scale` subresource (runtime/gateway/kubernetes_scaler.py),
as a service account that `KubernetesGatewayArgs.scales` allows exactly that, and the HPA moves it from 1 up.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pulumi
import pulumi_kubernetes as k8s

from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.names import parse_model_name
from ember.provider.domain.replica_spec import replica_spec, serve_command
from ember.provider.domain.spec import AcceleratorType, parse
from ember.provider.domain.store_layout import DATASET_FILE, StoreLayout
from ember.provider.resources import (Dataset, Deployment, DeploymentArgs, FineTuningJob, FineTuningJobArgs, Gateway,
                                      GatewayArgs, Model, default_id, props_of)

RUNTIME_PORT = 8000
GATEWAY_PORT = 8080

# Node labels published by NVIDIA's GPU feature discovery and AMD's GPU operator.
NODE_SELECTORS: dict[AcceleratorType, dict[str, str]] = {
    AcceleratorType.NVIDIA_A100_80GB: {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
    AcceleratorType.NVIDIA_H100_80GB: {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    AcceleratorType.NVIDIA_H200_141GB: {"nvidia.com/gpu.product": "NVIDIA-H200"},
    AcceleratorType.AMD_MI300X_192GB: {"amd.com/gpu.product-name": "AMD_Instinct_MI300X"},
}


@dataclass
class KubernetesArgs:
    image: pulumi.Input[str]  # the runtime image (runtime/Dockerfile), e.g. registry.example.com/ember-runtime:0.1.0
    store_url: str  # the model store as replicas reach it, e.g. s3://bucket/ember
    namespace: pulumi.Input[str] = "default"
    # Environment for fsspec's store backend (AWS_ACCESS_KEY_ID …); kept in a Secret, never in a manifest.
    store_credentials: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    provider: k8s.Provider | None = None  # a kubeconfig/namespace provider; the ambient kubeconfig otherwise
    # The kubeconfig file the provider uses (a path), for the Ember Deployment, which waits for the rollout
    # through it; the ambient kubeconfig when None.
    kubeconfig: str | None = None
    cpu: str = "2"  # requests per replica besides accelerators
    memory: str = "16Gi"
    # The longest request a rollout or scale-down lets finish: a replica told to stop finishes what it runs
    # (the runtime drains on SIGTERM) for up to this long before Kubernetes kills it.
    drain_s: int = 300
    # Where the pods may connect besides DNS: the store's address ranges (a NetworkPolicy names addresses, not
    # hosts). Anywhere by default; narrow it to the store's ranges (e.g. the S3 prefix list of its region).
    store_cidrs: Sequence[str] = ("0.0.0.0/0",)
    store_port: int = 443


# Stands in for a base model that is a Model resource (its name is known only once it exists) while the
# component validates the deployment's own fields; the Ember Deployment checks the real name.
PLACEHOLDER_BASE = "accounts/placeholder/models/llama-v3p1-8b-instruct"


def labels(spec: DeploymentSpec, base_name: pulumi.Input[str]) -> dict[str, pulumi.Input[str]]:
    base = pulumi.Output.from_input(base_name).apply(parse_model_name)
    return {"app.kubernetes.io/name": "ember-runtime", "app.kubernetes.io/managed-by": "ember",
            "ember.dev/account": spec.account_id, "ember.dev/deployment": spec.deployment_id,
            "ember.dev/model": base.apply(lambda b: b.resource_id),
            "ember.dev/model-account": base.apply(lambda b: b.account_id)}


def container_resources(accelerator: AcceleratorType, count: int, cpu: str, memory: str) -> dict:
    amounts = {"cpu": cpu, "memory": memory}
    if accelerator.vendor:
        amounts[f"{accelerator.vendor}.com/gpu"] = str(count)
    # Requests equal limits: a pod's accelerators and memory are reserved, never overcommitted.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def placement(accelerator: AcceleratorType) -> dict:
    """A pod spec's node selection: nodes of the accelerator type, whose GPU taint it tolerates."""
    pod = {"nodeSelector": NODE_SELECTORS.get(accelerator, {})}
    if accelerator.vendor:
        pod["tolerations"] = [{"key": f"{accelerator.vendor}.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return pod


# Pod Security Admission's `restricted` profile: a non-root user (the image's, uid 1000), no privilege
# escalation, no capabilities, the runtime's default seccomp profile; the root filesystem is read-only, so
# everything the runtime writes goes to the volumes below.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
SCRATCH = {"cache": "/var/cache/ember", "logs": "/var/log/ember", "tmp": "/tmp", "shm": "/dev/shm"}
# The ReplicaSpec, from a ConfigMap: a read-only file, as the root filesystem is.
REPLICA_SPEC_DIR, REPLICA_SPEC_FILE = "/etc/ember", "replica.json"
# Endpoints stop routing to a stopping pod a moment after it is marked terminating; the pre-stop wait covers
# that moment so no new request reaches a replica that has begun to drain.
PRE_STOP_S = 10
# The pod's own address, from the downward API.
POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def writable_volumes(names: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts) for the writable folders of a read-only root filesystem."""
    volumes = [{"name": name, "emptyDir": {"medium": "Memory"} if name == "shm" else {}} for name in names]
    return volumes, [{"name": name, "mountPath": SCRATCH[name]} for name in names]


def replica_spec_volume(config_map_name: pulumi.Input[str]) -> tuple[dict, dict]:
    """(pod volume, container mount) of the ReplicaSpec's ConfigMap."""
    return ({"name": "replica-spec", "configMap": {"name": config_map_name}},
            {"name": "replica-spec", "mountPath": REPLICA_SPEC_DIR, "readOnly": True})


def container(spec: DeploymentSpec, cluster: KubernetesArgs, secret_name, spec_mount: dict) -> dict:
    probe = {"httpGet": {"path": "/health", "port": RUNTIME_PORT}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "name": "runtime",
        "image": cluster.image,
        "command": ["python", "-m", "ember.runtime"],
        # The replica registers in the store at its pod's address, where the gateway reaches it ($(POD_IP) is
        # expanded by the kubelet from the environment below).
        "args": serve_command(f"{REPLICA_SPEC_DIR}/{REPLICA_SPEC_FILE}") + [
            "--host", "0.0.0.0", "--port", str(RUNTIME_PORT), "--advertise-url", f"http://$(POD_IP):{RUNTIME_PORT}"],
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT}],
        "envFrom": [{"secretRef": {"name": secret_name}}],
        "env": [{"name": "EMBER_CACHE_DIR", "value": "/var/cache/ember"}, POD_IP],
        "resources": container_resources(spec.accelerator_type, spec.accelerator_count, cluster.cpu, cluster.memory),
        # Loading weights takes a while: the startup probe allows it, then liveness takes over.
        "startupProbe": {**probe, "failureThreshold": 120},
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_S}}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": writable_volumes(list(SCRATCH))[1] + [spec_mount],
    }


def workload_spec(spec: DeploymentSpec, cluster: KubernetesArgs, selector: dict, pod_labels: dict,
                  runtime: dict, spec_volume: dict, spec_digest: pulumi.Input[str]) -> dict:
    """The apps/v1 Deployment's spec: one pod template of the runtime, on nodes of the accelerator type. The
    replica spec's digest is in the template, so a new spec rolls the pods (a changed ConfigMap alone would not)."""
    pod_spec = {
        "containers": [runtime],
        "volumes": writable_volumes(list(SCRATCH))[0] + [spec_volume],
        "securityContext": POD_SECURITY,
        "automountServiceAccountToken": False,  # the runtime never talks to the API server
        "terminationGracePeriodSeconds": PRE_STOP_S + cluster.drain_s,
    } | placement(spec.accelerator_type)
    workload = {
        "selector": {"matchLabels": selector},
        "template": {"metadata": {"labels": pod_labels, "annotations": {
            "ember.dev/accelerator": f"{spec.accelerator_count}x{spec.accelerator_type.value}",
            "ember.dev/replica-spec": spec_digest}}, "spec": pod_spec},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
    }
    if spec.min_replicas > 0 and not autoscaled(spec):
        workload["replicas"] = spec.min_replicas
    # Otherwise an autoscaler owns the count (the HPA from 1 up, the gateway between 0 and 1): a count here would be
    # applied again by every `up`, undoing theirs. A new Deployment starts at the API server's default of 1.
    return workload


def autoscaled(spec: DeploymentSpec) -> bool:
    """Whether an HPA moves the count: a range above one replica, where the gateway takes over below (from zero)."""
    return spec.max_replicas > max(spec.min_replicas, 1)


def autoscaler_spec(spec: DeploymentSpec, workload_name: pulumi.Input[str]) -> dict:
    policy = spec.autoscaling
    return {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": workload_name},
        "minReplicas": max(spec.min_replicas, 1),  # an HPA's floor is 1; below it the gateway scales
        "maxReplicas": spec.max_replicas,
        "metrics": [{"type": "Pods", "pods": {
            "metric": {"name": "ember_running_requests"},
            "target": {"type": "AverageValue", "averageValue": str(policy.target_concurrent_requests)}}}],
        "behavior": {"scaleUp": {"stabilizationWindowSeconds": policy.scale_up_window_s},
                     "scaleDown": {"stabilizationWindowSeconds": policy.scale_down_window_s}},
    }


def network_policy_spec(selector: dict, cluster: KubernetesArgs) -> dict:
    """In: only the runtime's port (the Service's target). Out: DNS, and the store."""
    return {
        "podSelector": {"matchLabels": selector},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"ports": [{"protocol": "TCP", "port": RUNTIME_PORT}]}],
        "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                   {"to": [{"ipBlock": {"cidr": cidr}} for cidr in cluster.store_cidrs],
                    "ports": [{"protocol": "TCP", "port": cluster.store_port}]}],
    }


def wait_at_most(seconds: float) -> pulumi.ResourceOptions:
    """How long pulumi-kubernetes waits for the object to be ready (its default is 10 minutes)."""
    return pulumi.ResourceOptions(custom_timeouts=pulumi.CustomTimeouts(create=f"{seconds:g}s", update=f"{seconds:g}s"))


def digest_of(text: str) -> str:
    """A short digest naming a version of something declared here (a workload spec, a training job's inputs)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def store_secret(resource_name: str, metadata: dict, cluster: KubernetesArgs, opts: pulumi.ResourceOptions):
    """The store credentials as a Secret the pods take their environment from (never in a manifest)."""
    return k8s.core.v1.Secret(f"{resource_name}-store", metadata={**metadata, "name": f"{metadata['name']}-store"},
                              string_data={k: pulumi.Output.secret(v) for k, v in cluster.store_credentials.items()},
                              opts=opts)


class KubernetesDeployment(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]  # the Service's in-cluster URL
    deployment: Deployment
    workload: k8s.apps.v1.Deployment  # the replicas' apps/v1 Deployment (a KubernetesGateway may scale it)

    def __init__(self, resource_name: str, args: DeploymentArgs, cluster: KubernetesArgs,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("ember:kubernetes:Deployment", resource_name, None, opts)
        args = replace(args, cluster="kubernetes", deployment_id=args.deployment_id or default_id(resource_name))
        from_resource = isinstance(args.base_model, Model)
        plain = props_of(args) | {"base_model": PLACEHOLDER_BASE if from_resource else args.base_model}
        # Validated here with the plain values, so a bad spec fails `pulumi preview` before any object is planned.
        spec = parse(DeploymentSpec, {k: v for k, v in plain.items() if k in DeploymentSpec.model_fields})
        store = StoreLayout(cluster.store_url)
        if from_resource:
            base_name = args.base_model.name
            model_url = args.base_model.digest.apply(store.object)
        else:
            base_name = args.base_model
            model_url = store.catalog(parse_model_name(args.base_model).resource_id)
        # The base model's name and object are known once the Model exists; the rest of the spec is `spec`'s.
        replica_json = pulumi.Output.all(model_url, base_name).apply(lambda values: replica_spec(
            spec.model_copy(update={"base_model": values[1]}), values[0], store,
            "/var/log/ember/requests.jsonl").to_json())
        child = pulumi.ResourceOptions(parent=self, provider=cluster.provider)
        pod_labels = labels(spec, base_name)
        name = f"ember-{spec.account_id}-{spec.deployment_id}"[:63].rstrip("-")
        metadata = {"name": name, "namespace": cluster.namespace, "labels": pod_labels}
        selector = {"ember.dev/account": spec.account_id, "ember.dev/deployment": spec.deployment_id}

        secret = store_secret(resource_name, metadata, cluster, child)
        config_map = k8s.core.v1.ConfigMap(f"{resource_name}-replica", metadata={
            **metadata, "name": f"{metadata['name']}-replica"}, data={REPLICA_SPEC_FILE: replica_json}, opts=child)
        spec_volume, spec_mount = replica_spec_volume(config_map.metadata["name"])
        runtime = container(spec, cluster, secret.metadata["name"], spec_mount)
        template = workload_spec(spec, cluster, selector, pod_labels, runtime, spec_volume,
                                 replica_json.apply(digest_of))
        # The Ember Deployment waits for the rollout (pulumi-kubernetes does not: its wait cannot say why pods
        # are not scheduled), and is READY once Kubernetes runs the replicas. Pods started before it read an
        # empty addon set until it is registered.
        workload = self.workload = k8s.apps.v1.Deployment(resource_name, metadata={**metadata, "annotations": {
            "pulumi.com/skipAwait": "true"}}, spec=template, opts=child)
        target = pulumi.Output.all(cluster.namespace, workload.metadata["name"], template).apply(
            lambda v: {"namespace": v[0], "name": v[1], "kubeconfig": cluster.kubeconfig,
                       "template_digest": digest_of(json.dumps(v[2], sort_keys=True))})
        self.deployment = Deployment(resource_name, replace(args, kubernetes_workload=target),
                                     pulumi.ResourceOptions(parent=self, depends_on=[workload]))
        service = k8s.core.v1.Service(f"{resource_name}-service", metadata=metadata, spec={
            "selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": RUNTIME_PORT}]}, opts=child)
        k8s.policy.v1.PodDisruptionBudget(f"{resource_name}-pdb", metadata=metadata, spec={
            "selector": {"matchLabels": selector},
            "maxUnavailable": 1,  # voluntary disruptions take at most one replica at a time
        }, opts=child)
        k8s.networking.v1.NetworkPolicy(f"{resource_name}-network", metadata=metadata,
                                        spec=network_policy_spec(selector, cluster), opts=child)
        if autoscaled(spec):
            k8s.autoscaling.v2.HorizontalPodAutoscaler(f"{resource_name}-hpa", metadata=metadata,
                                                       spec=autoscaler_spec(spec, workload.metadata["name"]), opts=child)
        self.endpoint = pulumi.Output.concat("http://", service.metadata["name"], ".", cluster.namespace,
                                             ".svc.cluster.local")
        self.register_outputs({"endpoint": self.endpoint})


class KubernetesFineTuningJob(pulumi.ComponentResource):
    job: FineTuningJob

    def __init__(self, resource_name: str, args: FineTuningJobArgs, cluster: KubernetesArgs,
                 accelerator_type: str = AcceleratorType.NVIDIA_H100_80GB.value, accelerator_count: int = 1,
                 training_timeout_s: float = 24 * 3600, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ember:kubernetes:FineTuningJob", resource_name, None, opts)
        if not isinstance(args.dataset, Dataset) or not isinstance(args.evaluation_dataset, (Dataset, type(None))):
            raise ValueError("dataset: a KubernetesFineTuningJob's datasets are Dataset resources of this program "
                             "(its pod reads them from the store by their digest)")
        accelerator = AcceleratorType(accelerator_type)
        job_id = args.job_id or default_id(resource_name)
        plain = props_of(replace(args, job_id=job_id, cluster="kubernetes", training_url="placeholder")) | {
            "base_model": PLACEHOLDER_BASE if isinstance(args.base_model, Model) else args.base_model,
            "dataset": f"accounts/{args.account_id}/datasets/placeholder"}
        plain.pop("evaluation_dataset", None)
        spec = parse(FineTuningJobSpec, {k: v for k, v in plain.items() if k in FineTuningJobSpec.model_fields})
        store = StoreLayout(cluster.store_url)
        if isinstance(args.base_model, Model):
            base_name, base_url = args.base_model.name, args.base_model.digest.apply(store.object)
        else:
            base_name, base_url = args.base_model, store.catalog(parse_model_name(args.base_model).resource_id)
        dataset_url = args.dataset.digest.apply(lambda d: f"{store.object(d)}/{DATASET_FILE}")
        eval_url = (args.evaluation_dataset.digest.apply(lambda d: f"{store.object(d)}/{DATASET_FILE}")
                    if args.evaluation_dataset else None)
        settings = spec.training_settings | {"output_dir": "/tmp/adapter"}
        job_json = pulumi.Output.all(base_name, base_url, dataset_url, eval_url).apply(lambda v: json.dumps(
            settings | {"base_model": v[0], "base_dir": v[1], "dataset": v[2], "evaluation_dataset": v[3]},
            sort_keys=True))
        # A new job (other settings, data or base) writes to a new place, so a stale result is never read.
        training_url = job_json.apply(lambda text: store.fine_tuning_run(
            spec.account_id, job_id, digest_of(text)))
        name = f"ember-ft-{spec.account_id}-{job_id}"[:63].rstrip("-")
        metadata = {"name": name, "namespace": cluster.namespace, "labels": {
            "app.kubernetes.io/name": "ember-fine-tuning", "app.kubernetes.io/managed-by": "ember",
            "ember.dev/account": spec.account_id, "ember.dev/fine-tuning-job": job_id}}
        child = pulumi.ResourceOptions(parent=self, provider=cluster.provider)
        secret = store_secret(resource_name, metadata, cluster, child)
        trainer = {"name": "finetune", "image": cluster.image, "command": ["python", "-m", "ember.runtime"],
                   "args": pulumi.Output.all(job_json, training_url).apply(
                       lambda v: ["finetune", "--job-json", v[0], "--upload", v[1]]),
                   "envFrom": [{"secretRef": {"name": secret.metadata["name"]}}],
                   "env": [{"name": "EMBER_CACHE_DIR", "value": "/var/cache/ember"}],
                   "resources": container_resources(accelerator, accelerator_count, cluster.cpu, cluster.memory),
                   "securityContext": CONTAINER_SECURITY,
                   "volumeMounts": writable_volumes(["cache", "tmp", "shm"])[1]}
        workload = k8s.batch.v1.Job(resource_name, metadata=metadata, spec={
            "backoffLimit": 0,  # a failed training is reported, not retried: the same inputs fail the same way
            "template": {"metadata": {"labels": metadata["labels"]}, "spec": {
                "restartPolicy": "Never", "containers": [trainer], "volumes": writable_volumes(["cache", "tmp", "shm"])[0],
                "securityContext": POD_SECURITY, "automountServiceAccountToken": False,
            } | placement(accelerator)}}, opts=pulumi.ResourceOptions.merge(child, wait_at_most(training_timeout_s)))
        self.job = FineTuningJob(resource_name, replace(args, job_id=job_id, cluster="kubernetes",
                                                        training_url=training_url),
                                 pulumi.ResourceOptions(parent=self, depends_on=[workload]))
        self.register_outputs({"job": self.job.name})


@dataclass
class KubernetesGatewayArgs:
    """How clients outside the cluster reach the gateway, besides its Service: an Ingress, or a Gateway API HTTPRoute
    on a Gateway the cluster already has. Neither by default."""

    ingress_host: str | None = None  # an Ingress for this host name
    ingress_class: str | None = None  # its ingressClassName (the cluster's default class when None)
    tls_secret: str | None = None  # a TLS Secret for the Ingress host: the URL is then https://
    # A Gateway API Gateway ({"name": …, "namespace": …}) to attach an HTTPRoute to, with the host names it answers
    route_parent: Mapping[str, str] | None = None
    route_hostnames: Sequence[str] = ()
    cpu: str = "1"  # requests per gateway pod: it routes and relays, nothing heavy
    memory: str = "1Gi"
    # The deployments whose count the gateway changes between 0 and 1 (those with min_replicas 0; the HPA moves them
    # from 1 up). Its pods then get a service account allowed only get and patch of these Deployments' `scale`, and
    # may reach the API server; with none, they mount no token.
    scales: Sequence[KubernetesDeployment] = ()
    # Where the API server is, as the NetworkPolicy sees it: its endpoints' addresses, after the `kubernetes` Service's
    # address translation (port 443 on most managed clusters, 6443 on kubeadm's). Narrow to the control plane's range.
    api_server_cidrs: Sequence[str] = ("0.0.0.0/0",)
    api_server_ports: Sequence[int] = (443, 6443)


def gateway_container(spec: GatewaySpec, cluster: KubernetesArgs, secret_name, exposure: KubernetesGatewayArgs) -> dict:
    probe = {"httpGet": {"path": "/health", "port": GATEWAY_PORT}, "periodSeconds": 5, "timeoutSeconds": 3}
    return {
        "name": "gateway",
        "image": cluster.image,
        "command": ["python", "-m", "ember.runtime"],
        "args": ["gateway", "--store", cluster.store_url, "--gateway", spec.name, "--host", "0.0.0.0",
                 "--port", str(GATEWAY_PORT)],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
        "envFrom": [{"secretRef": {"name": secret_name}}],
        "resources": {"requests": {"cpu": exposure.cpu, "memory": exposure.memory},
                      "limits": {"cpu": exposure.cpu, "memory": exposure.memory}},
        # /health fails while the store cannot be read: such a pod takes no traffic
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_S}}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": writable_volumes(["tmp"])[1],
    }


def gateway_network_policy_spec(selector: dict, cluster: KubernetesArgs,
                                exposure: KubernetesGatewayArgs | None = None) -> dict:
    """In: the gateway's port, from anywhere. Out: DNS, the store, the runtime pods' port, and the API server when it
    scales deployments."""
    egress = [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
              {"to": [{"ipBlock": {"cidr": cidr}} for cidr in cluster.store_cidrs],
               "ports": [{"protocol": "TCP", "port": cluster.store_port}]},
              {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ember-runtime"}}}],
               "ports": [{"protocol": "TCP", "port": RUNTIME_PORT}]}]
    if exposure is not None and exposure.scales:
        egress.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in exposure.api_server_cidrs],
                       "ports": [{"protocol": "TCP", "port": port} for port in exposure.api_server_ports]})
    return {
        "podSelector": {"matchLabels": selector},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]}],
        "egress": egress,
    }


# What the gateway may do to a Deployment it scales: read and set the count of its `scale` subresource (a merge patch),
# nothing of its pods, template or anything else. `update` (a PUT of the whole Scale) is not needed.
SCALE_VERBS = ("get", "patch")


def scale_role_rules(workload_name: pulumi.Input[str]) -> list[dict]:
    """A Role's rules that allow scaling the one apps/v1 Deployment `workload_name` (resourceNames), and only that."""
    return [{"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": [workload_name],
             "verbs": list(SCALE_VERBS)}]


class KubernetesGateway(pulumi.ComponentResource):
    """The store's gateway on Kubernetes: at least two pods of the runtime image running `ember gateway`, a Service, a
    PodDisruptionBudget that keeps one up, a NetworkPolicy, the same restricted pod security as the replicas, and an
    Ingress or HTTPRoute where asked; and the Ember Gateway (its settings in the store), which waits for the rollout."""

    url: pulumi.Output[str]
    gateway: Gateway

    def __init__(self, resource_name: str, args: GatewayArgs, cluster: KubernetesArgs,
                 exposure: KubernetesGatewayArgs | None = None, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ember:kubernetes:Gateway", resource_name, None, opts)
        exposure = exposure or KubernetesGatewayArgs()
        args = replace(args, cluster="kubernetes", gateway_id=args.gateway_id or default_id(resource_name))
        # Validated here with the plain values, so a bad spec fails `pulumi preview` before any object is planned.
        spec = parse(GatewaySpec, {k: v for k, v in props_of(args).items() if k in GatewaySpec.model_fields})
        name = f"ember-gw-{spec.account_id}-{spec.gateway_id}"[:63].rstrip("-")
        selector = {"app.kubernetes.io/name": "ember-gateway", "ember.dev/gateway": spec.gateway_id}
        owner = {"app.kubernetes.io/managed-by": "ember", "ember.dev/account": spec.account_id}
        metadata = {"name": name, "namespace": cluster.namespace, "labels": selector | owner}
        child = pulumi.ResourceOptions(parent=self, provider=cluster.provider)
        secret = store_secret(resource_name, metadata, cluster, child)
        pod = {"containers": [gateway_container(spec, cluster, secret.metadata["name"], exposure)],
               "volumes": writable_volumes(["tmp"])[0], "securityContext": POD_SECURITY,
               "automountServiceAccountToken": False,  # it reads the store, and the API server only to scale
               "terminationGracePeriodSeconds": PRE_STOP_S + cluster.drain_s}  # streams it relays finish
        if exposure.scales:
            account = self._scaling_rights(resource_name, metadata, exposure.scales, child)
            pod |= {"serviceAccountName": account.metadata["name"], "automountServiceAccountToken": True}
        template = {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": metadata["labels"]}, "spec": pod},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        }
        workload = k8s.apps.v1.Deployment(resource_name, metadata={**metadata, "annotations": {
            "pulumi.com/skipAwait": "true"}}, spec=template, opts=child)
        service = k8s.core.v1.Service(f"{resource_name}-service", metadata=metadata, spec={
            "selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": GATEWAY_PORT}]}, opts=child)
        k8s.policy.v1.PodDisruptionBudget(f"{resource_name}-pdb", metadata=metadata, spec={
            "selector": {"matchLabels": selector}, "minAvailable": 1}, opts=child)
        k8s.networking.v1.NetworkPolicy(f"{resource_name}-network", metadata=metadata,
                                        spec=gateway_network_policy_spec(selector, cluster, exposure), opts=child)
        self.url = self._expose(resource_name, metadata, service, exposure, child)
        # Its record is in the store before the Ember Gateway waits for the rollout: the pods read it to get ready.
        target = pulumi.Output.all(cluster.namespace, workload.metadata["name"], template).apply(
            lambda v: {"namespace": v[0], "name": v[1], "kubeconfig": cluster.kubeconfig,
                       "template_digest": digest_of(json.dumps(v[2], sort_keys=True))})
        self.gateway = Gateway(resource_name, replace(args, kubernetes_workload=target, advertised_url=self.url),
                               pulumi.ResourceOptions(parent=self, depends_on=[workload]))
        self.register_outputs({"url": self.url})

    @staticmethod
    def _scaling_rights(resource_name: str, metadata: dict, scales: Sequence[KubernetesDeployment],
                        child: pulumi.ResourceOptions) -> k8s.core.v1.ServiceAccount:
        """The pods' ServiceAccount, and for each deployment it scales a Role in that deployment's namespace allowing
        get and patch of its Deployment's scale (by name), bound to the account: nothing else, anywhere."""
        for scaled in scales:
            if not isinstance(scaled, KubernetesDeployment):
                raise ValueError(f"scales: {scaled!r} is not a KubernetesDeployment (the gateway scales the apps/v1 "
                                 f"Deployment that one declares)")
        account = k8s.core.v1.ServiceAccount(f"{resource_name}-account", metadata=metadata, opts=child)
        subject = {"kind": "ServiceAccount", "name": account.metadata["name"], "namespace": metadata["namespace"]}
        for scaled in scales:
            target = scaled.workload.metadata
            # Named after both ends: several gateways may scale one deployment, one gateway several.
            role_meta = {"name": pulumi.Output.concat(metadata["name"], "-scales-", target["name"]),
                         "namespace": target["namespace"], "labels": metadata["labels"]}
            key = f"{resource_name}-scales-{scaled.pulumi_resource_name}"
            role = k8s.rbac.v1.Role(key, metadata=role_meta, rules=scale_role_rules(target["name"]), opts=child)
            k8s.rbac.v1.RoleBinding(key, metadata=role_meta, subjects=[subject], role_ref={
                "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.metadata["name"]}, opts=child)
        return account

    @staticmethod
    def _expose(resource_name: str, metadata: dict, service, exposure: KubernetesGatewayArgs,
                child: pulumi.ResourceOptions) -> pulumi.Output[str]:
        """The Ingress or HTTPRoute asked for, and the URL clients use: theirs, else the Service's in-cluster one."""
        backend = {"name": service.metadata["name"], "port": {"number": 80}}
        if exposure.ingress_host:
            rule = {"host": exposure.ingress_host, "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": backend}}]}}
            spec = {"rules": [rule]} | ({"ingressClassName": exposure.ingress_class} if exposure.ingress_class else {})
            if exposure.tls_secret:
                spec["tls"] = [{"hosts": [exposure.ingress_host], "secretName": exposure.tls_secret}]
            k8s.networking.v1.Ingress(f"{resource_name}-ingress", metadata=metadata, spec=spec, opts=child)
            return pulumi.Output.from_input(f"{'https' if exposure.tls_secret else 'http'}://{exposure.ingress_host}")
        if exposure.route_parent:
            k8s.apiextensions.CustomResource(
                f"{resource_name}-route", api_version="gateway.networking.k8s.io/v1", kind="HTTPRoute",
                metadata=metadata, spec={"parentRefs": [dict(exposure.route_parent)],
                                         "hostnames": list(exposure.route_hostnames),
                                         "rules": [{"backendRefs": [{"name": service.metadata["name"], "port": 80}]}]},
                opts=child)
            if exposure.route_hostnames:
                return pulumi.Output.from_input(f"http://{exposure.route_hostnames[0]}")
        return pulumi.Output.concat("http://", service.metadata["name"], ".", metadata["namespace"],
                                    ".svc.cluster.local")
