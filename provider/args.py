"""Typed inputs of Ember's resources, as in pulumi-kubernetes' SDK. GENERATED from the kinds' specs
(ember.provider.domain.kinds) by ember.provider.tools.args_sdk: edit the specs, then run
`python -m ember.provider.tools.args_sdk`. Every field may be left out but the required ones; check applies the spec's
defaults and says what is wrong, naming the field and value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi

if TYPE_CHECKING:
    from ember.provider.resources import Dataset, Deployment, FineTuningJob, Model

__all__ = ["ModelArgs", "LoRAAddonArgs", "DeploymentArgs", "DatasetArgs", "FineTuningJobArgs", "GatewayArgs",
           "ApiKeyArgs", "AccountRateLimitsArgs", "AutoscalingPolicyArgs", "KubernetesWorkloadArgs",
           "RateLimitsArgs", "RequestLoggingArgs"]


@dataclass
class ModelArgs:
    """A base model: full weights from a Hugging Face directory, or a catalog model."""

    # 1-63 characters of [a-z0-9-], not starting or ending with '-'
    account_id: pulumi.Input[str]
    # user-chosen; generated when omitted; a catalog model's ID is its catalog ID
    model_id: pulumi.Input[str] | None = None
    # HF directory (config.json, *.safetensors, tokenizer.json) or a .gguf file, converted on upload
    source: pulumi.Input[str] | None = None
    # a built-in catalog model
    catalog_id: pulumi.Input[str] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class LoRAAddonArgs:
    """A LoRA addon of one base model, deployed on that base model's deployments."""

    # 1-63 characters of [a-z0-9-], not starting or ending with '-'
    account_id: pulumi.Input[str]
    # accounts/<ACCOUNT_ID>/models/<MODEL_ID>
    base_model: pulumi.Input[str] | Model
    # PEFT directory: adapter_config.json + adapter_model.safetensors
    source: pulumi.Input[str] | FineTuningJob
    # user-chosen; generated when omitted
    model_id: pulumi.Input[str] | None = None
    # dedicated deployments of the base model, in this addon's account
    deployments: Sequence[pulumi.Input[str] | Deployment] | None = None
    # also serve on the serverless deployments of the base model
    serverless: pulumi.Input[bool] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class DeploymentArgs:
    """A base model (plus its loaded addons) served on hardware."""

    # 1-63 characters of [a-z0-9-], not starting or ending with '-'
    account_id: pulumi.Input[str]
    # accounts/<ACCOUNT_ID>/models/<MODEL_ID>
    base_model: pulumi.Input[str] | Model
    # user-chosen; generated when omitted
    deployment_id: pulumi.Input[str] | None = None
    # one of dedicated, serverless
    deployment_type: pulumi.Input[str] | None = None
    # local: replicas are processes on this machine; kubernetes: pods (ember.provider.KubernetesDeployment); one of
    # local, kubernetes
    cluster: pulumi.Input[str] | None = None
    # one of CPU, NVIDIA_A100_80GB, NVIDIA_H100_80GB, NVIDIA_H200_141GB, AMD_MI300X_192GB
    accelerator_type: pulumi.Input[str] | None = None
    # accelerators per replica
    accelerator_count: pulumi.Input[int] | None = None
    # defaults to fp32 on CPU and bf16 on accelerators; int8 and int4 quantize the projection weights (weight-only;
    # activations, KV cache and LoRA addons stay bf16); fp8 stores them in fp8 e4m3 and multiplies in fp8, on
    # accelerators with FP8 only (H100, H200, MI300X); one of fp32, bf16, fp16, int8, int4, fp8
    precision: pulumi.Input[str] | None = None
    min_replicas: pulumi.Input[int] | None = None
    max_replicas: pulumi.Input[int] | None = None
    autoscaling: AutoscalingPolicyArgs | pulumi.Input[dict] | None = None
    # its share of the gateway's traffic for its base model and addons against the account's other dedicated
    # deployments of that model (90 and 10: a canary); 0 takes none unless no other can answer
    traffic_weight: pulumi.Input[int] | None = None
    # addons active on the accelerator at once (more wait in host memory)
    max_loras: pulumi.Input[int] | None = None
    # one of 8, 16, 32, 64, 128, 256
    max_lora_rank: pulumi.Input[int] | None = None
    request_logging: RequestLoggingArgs | pulumi.Input[dict] | None = None
    # cluster='kubernetes': the pods' apps/v1 Deployment, whose rollout create and update wait for
    kubernetes_workload: KubernetesWorkloadArgs | pulumi.Input[dict] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class DatasetArgs:
    """A JSONL file of chat examples, uploaded content-addressed; private to its account."""

    # 1-63 characters of [a-z0-9-], not starting or ending with '-'
    account_id: pulumi.Input[str]
    # JSONL, one {"messages": [{"role", "content"}, ...]} per line, ending with the assistant's answer
    source: pulumi.Input[str]
    # user-chosen; generated when omitted
    dataset_id: pulumi.Input[str] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class FineTuningJobArgs:
    """Supervised fine-tuning of a LoRA on a base model; its output is an addon model of that base."""

    # 1-63 characters of [a-z0-9-], not starting or ending with '-'
    account_id: pulumi.Input[str]
    # accounts/<ACCOUNT_ID>/models/<MODEL_ID>
    base_model: pulumi.Input[str] | Model
    # accounts/<ACCOUNT_ID>/datasets/<DATASET_ID>
    dataset: pulumi.Input[str] | Dataset
    # the trained addon's model ID in this account
    output_model: pulumi.Input[str]
    # user-chosen; generated when omitted
    job_id: pulumi.Input[str] | None = None
    # its loss is reported after every epoch
    evaluation_dataset: pulumi.Input[str] | Dataset | None = None
    epochs: pulumi.Input[int] | None = None
    learning_rate: pulumi.Input[float] | None = None
    lora_rank: pulumi.Input[int] | None = None
    # default: twice the rank
    lora_alpha: pulumi.Input[float] | None = None
    target_modules: Sequence[pulumi.Input[str]] | None = None
    # examples per optimizer step
    batch_size: pulumi.Input[int] | None = None
    # longest example, in tokens
    max_context_length: pulumi.Input[int] | None = None
    # stop when the evaluation loss stops improving (needs evaluation_dataset); the best epoch's adapter is kept
    early_stop: pulumi.Input[bool] | None = None
    seed: pulumi.Input[int] | None = None
    # where it trains: a child process on this machine, or a batch/v1 Job (set by KubernetesFineTuningJob); one of
    # local, kubernetes
    cluster: pulumi.Input[str] | None = None
    # where the Kubernetes Job writes the adapter and its metrics (set by KubernetesFineTuningJob)
    training_url: pulumi.Input[str] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class GatewayArgs:
    """The platform's one endpoint: routes requests by model name to the deployments of its store."""

    # the platform team's account: its keys read the gateway's /metrics
    account_id: pulumi.Input[str]
    # user-chosen; generated when omitted
    gateway_id: pulumi.Input[str] | None = None
    # local: a process on this machine; kubernetes: pods (ember.provider.KubernetesGateway); one of local, kubernetes
    cluster: pulumi.Input[str] | None = None
    # local: the loopback port it listens on; when omitted, one is picked at the first up and kept
    port: pulumi.Input[int] | None = None
    # gateway processes behind the endpoint (1 on the local cluster; at least 2, the default, on Kubernetes); each
    # holds an account to its share of the limits
    replicas: pulumi.Input[int] | None = None
    rate_limits: RateLimitsArgs | pulumi.Input[dict] | None = None
    # per-account overrides of rate_limits, by account ID
    account_rate_limits: Mapping[str, AccountRateLimitsArgs | pulumi.Input[dict]] | None = None
    # replicas a request is tried on when one refuses the connection, drains, or answers 503 or 429 before its first
    # byte
    max_attempts: pulumi.Input[int] | None = None
    # kubernetes: where clients reach it (its Ingress, route or Service), set by KubernetesGateway
    advertised_url: pulumi.Input[str] | None = None
    # cluster='kubernetes': the gateway pods' apps/v1 Deployment, whose rollout create and update wait for
    kubernetes_workload: KubernetesWorkloadArgs | pulumi.Input[dict] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class ApiKeyArgs:
    """An API key of one account: `inference` calls the OpenAI routes, `admin` the admin routes too."""

    # 1-63 characters of [a-z0-9-], not starting or ending with '-'
    account_id: pulumi.Input[str]
    # user-chosen; generated when omitted
    key_id: pulumi.Input[str] | None = None
    # inference: the OpenAI routes; admin: also the admin routes (addons, reconcile, metrics); one of inference, admin
    role: pulumi.Input[str] | None = None
    # ISO 8601 with a UTC offset (2027-01-31T00:00:00Z); after it the key gets 401 saying it expired; none: it does
    # not expire
    expires_at: pulumi.Input[str] | None = None
    # any label: changing it rotates the key (the new key is made before the old one is revoked, so both work in
    # between)
    rotation: pulumi.Input[str] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class AccountRateLimitsArgs:
    """One account's own limits; a limit left out is the gateway's."""

    requests_per_minute: pulumi.Input[int] | None = None
    tokens_per_minute: pulumi.Input[int] | None = None


@dataclass
class AutoscalingPolicyArgs:
    """How the gateway moves a deployment's replica count with its measured load (requests in flight per replica)."""

    # load must stay high this long before scaling up
    scale_up_window_s: pulumi.Input[int] | None = None
    # load must stay low this long before scaling down
    scale_down_window_s: pulumi.Input[int] | None = None
    # idle time before the last replica stops; needs min_replicas=0
    scale_to_zero_window_s: pulumi.Input[int] | None = None
    # load target per replica
    target_concurrent_requests: pulumi.Input[float] | None = None


@dataclass
class KubernetesWorkloadArgs:
    """The apps/v1 Deployment whose rollout a Kubernetes deployment or gateway waits for (set by KubernetesDeployment
and KubernetesGateway)."""

    namespace: pulumi.Input[str]
    name: pulumi.Input[str]
    # a digest of its spec (pod template, replicas): a new one means a rollout to wait for
    template_digest: pulumi.Input[str]
    # a kubeconfig file's path; the ambient kubeconfig (KUBECONFIG, ~/.kube/config, or the pod's service account) when
    # omitted
    kubeconfig: pulumi.Input[str] | None = None


@dataclass
class RateLimitsArgs:
    """What one account may send through the gateway: token buckets holding a minute's worth, refilled evenly."""

    # requests an account may send a minute
    requests_per_minute: pulumi.Input[int] | None = None
    # prompt and completion tokens an account may use a minute: a request is counted when it is admitted (its prompt's
    # characters / 4, plus max_tokens for each choice) and settled at its usage
    tokens_per_minute: pulumi.Input[int] | None = None


@dataclass
class RequestLoggingArgs:
    """Prompts and outputs are never logged unless a deployment opts in, with a bounded retention."""

    enabled: pulumi.Input[bool] | None = None
    retention_days: pulumi.Input[int] | None = None
