"""The Deployment kind: a base model (plus its loaded addons) served on hardware, dedicated or serverless."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ember.provider.domain import catalog, tensor_parallel
from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import deployment_name, parse_model_name
from ember.provider.domain.tensor_parallel import Dims
from ember.provider.domain.spec import (DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, LORA_RANK_BUCKETS, MAX_REPLICAS,
                                        MAX_RETENTION_DAYS, WEIGHT_MEMORY_SHARE, AcceleratorType, DeploymentName,
                                        DeploymentState, DeploymentType, DisplayName, FieldError, ModelName, Precision,
                                        ResourceId, Spec, Text, full_name, refuse_foreign_base)


def check_split(dims: Dims, count: int, accelerator: AcceleratorType, precision: Precision, model: str) -> None:
    """Refuse an accelerator_count the model cannot be split across, or whose fullest device its share of the
    weights would not leave room on for the KV cache (what the runtime's tensor parallelism will hold)."""
    why = tensor_parallel.refusal(dims, count)
    if why:
        raise FieldError("accelerator_count", f"{count} cannot split {model}: {why}")
    if accelerator.memory_gb is None:
        return
    need = tensor_parallel.weights_per_device(dims, count, precision.bytes, precision.unquantized_bytes) / 1e9
    have = accelerator.memory_gb * WEIGHT_MEMORY_SHARE
    if need > have:
        split = f", split {count} ways," if count > 1 else ""
        raise FieldError("accelerator_count", f"{count} x {accelerator.value} holds {have:.0f} GB of weights per "
                         f"device, but {model}{split} needs {need:.0f} GB on its fullest device in {precision.value}")


class AutoscalingPolicy(Spec):
    """How the gateway moves a deployment's replica count with its measured load (requests in flight per replica)."""

    scale_up_window_s: int = Field(30, ge=0, le=3600, description="load must stay high this long before scaling up")
    # at least a few seconds: a replica started for a burst is not stopped in the lull between two requests
    scale_down_window_s: int = Field(600, ge=5, le=86400, description="load must stay low this long before scaling down")
    scale_to_zero_window_s: int | None = Field(
        None, ge=5, le=86400, description="idle time before the last replica stops; needs min_replicas=0"
    )
    target_concurrent_requests: float = Field(8.0, gt=0, le=1024, description="load target per replica")


class RequestLogging(Spec):
    """Prompts and outputs are never logged unless a deployment opts in, with a bounded retention."""

    enabled: bool = False
    retention_days: int | None = Field(None, ge=1, le=MAX_RETENTION_DAYS)

    @model_validator(mode="after")
    def _retention_with_opt_in(self) -> "RequestLogging":
        if self.enabled and self.retention_days is None:
            raise FieldError("retention_days", "is required when request logging is enabled")
        if not self.enabled and self.retention_days is not None:
            raise FieldError("retention_days", f"{self.retention_days!r} given, but request logging is not enabled")
        return self


class KubernetesWorkload(Spec):
    """The apps/v1 Deployment whose rollout a Kubernetes deployment or gateway waits for (set by KubernetesDeployment
    and KubernetesGateway)."""

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=63)
    kubeconfig: str | None = Field(None, description="a kubeconfig file's path; the ambient kubeconfig (KUBECONFIG, "
                                                     "~/.kube/config, or the pod's service account) when omitted")
    template_digest: str = Field(description="a digest of its spec (pod template, replicas): a new one means a "
                                             "rollout to wait for")


class DeploymentSpec(Spec):
    """A base model (plus its loaded addons) served on hardware."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {
        "account_id": "unknown", "base_model": "accounts/unknown/models/llama-v3p1-8b-instruct"}

    account_id: ResourceId
    deployment_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    base_model: ModelName
    deployment_type: DeploymentType = DeploymentType.DEDICATED
    cluster: Literal["local", "kubernetes"] = Field(
        "local", description="local: replicas are processes on this machine; kubernetes: pods (ember.provider.KubernetesDeployment)"
    )
    accelerator_type: AcceleratorType = AcceleratorType.CPU
    accelerator_count: int = Field(1, description="accelerators per replica")
    precision: Precision | None = Field(
        None, description="defaults to fp32 on CPU and bf16 on accelerators; int8 and int4 quantize the projection "
                          "weights (weight-only; activations, KV cache and LoRA addons stay bf16); fp8 stores them "
                          "in fp8 e4m3 and multiplies in fp8, on accelerators with FP8 only (H100, H200, MI300X)")
    min_replicas: int = Field(1, ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    autoscaling: AutoscalingPolicy = AutoscalingPolicy()
    traffic_weight: int = Field(
        100, ge=0, le=10000, description="its share of the gateway's traffic for its base model and addons against "
        "the account's other dedicated deployments of that model (90 and 10: a canary); 0 takes none unless no other "
        "can answer")
    max_loras: int = Field(DEFAULT_MAX_LORAS, ge=1, le=128, description="addons active on the accelerator at once (more wait in host memory)")
    max_lora_rank: int = Field(DEFAULT_MAX_LORA_RANK, json_schema_extra={"enum": list(LORA_RANK_BUCKETS)})
    request_logging: RequestLogging = RequestLogging()
    kubernetes_workload: KubernetesWorkload | None = Field(
        None, description="cluster='kubernetes': the pods' apps/v1 Deployment, whose rollout create and update wait for")
    display_name: DisplayName | None = None
    description: Text | None = None

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_bucket(cls, value: int) -> int:
        if value not in LORA_RANK_BUCKETS:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, LORA_RANK_BUCKETS))}")
        return value

    @model_validator(mode="after")
    def _fits_domain(self) -> "DeploymentSpec":
        refuse_foreign_base(self.account_id, self.base_model)
        accelerator = self.accelerator_type
        if self.accelerator_count not in accelerator.allowed_counts:
            raise FieldError("accelerator_count", f"{self.accelerator_count!r} is not allowed for {accelerator.value}; "
                             f"use one of {', '.join(map(str, accelerator.allowed_counts))}")
        if self.precision is None:
            precision = Precision.FP32 if accelerator is AcceleratorType.CPU else Precision.BF16
            object.__setattr__(self, "precision", precision)
        if self.precision is Precision.FP8 and not accelerator.has_fp8:
            with_fp8 = [a.value for a in AcceleratorType if a.has_fp8]
            raise FieldError("precision", f"'fp8' needs an accelerator with FP8, and {accelerator.value} has none; "
                             f"use one of {', '.join(with_fp8)}, or another precision",
                             needs=("precision", "accelerator_type"))
        if self.min_replicas > self.max_replicas:
            raise FieldError("min_replicas", f"{self.min_replicas} is more than max_replicas {self.max_replicas}")
        if self.kubernetes_workload is not None and self.cluster != "kubernetes":
            raise FieldError("kubernetes_workload", f"is set, but cluster is {self.cluster!r}")
        # On Kubernetes too: the gateway scales the Deployment from and to zero, the HPA from 1 up.
        to_zero = self.autoscaling.scale_to_zero_window_s
        if self.min_replicas == 0 and to_zero is None:
            raise FieldError("autoscaling.scale_to_zero_window_s", "is required when min_replicas is 0")
        if self.min_replicas > 0 and to_zero is not None:
            raise FieldError("autoscaling.scale_to_zero_window_s", f"{to_zero} given, but min_replicas is "
                             f"{self.min_replicas}: scale-to-zero needs min_replicas=0")
        base_id = parse_model_name(self.base_model).resource_id
        base = catalog.lookup(base_id)
        if self.deployment_type is DeploymentType.SERVERLESS:
            if base is None:
                raise FieldError("deployment_type", f"'serverless' refuses custom base model {self.base_model!r}: "
                                                    f"only catalog models are served serverless")
            if not base.serverless:
                raise FieldError("deployment_type", f"'serverless' is not offered for catalog model {base_id!r}")
            if self.request_logging.enabled:
                raise FieldError("request_logging.enabled",
                                 "True is not allowed on a serverless deployment: it is shared across accounts")
        if base is not None:
            check_split(base.dims, self.accelerator_count, accelerator, self.precision, base_id)
        return self

    @property
    def name(self) -> str:
        return full_name(deployment_name, self.account_id, self.deployment_id, "deployment_id")


class DeploymentOutputs(Spec):
    name: DeploymentName
    state: DeploymentState
    message: str | None = None
    endpoints: tuple[str, ...] = ()
    ready_replicas: int = Field(0, ge=0)
    serving_digest: str | None = Field(None, description="digest of the base weights the replicas serve")
    generation: str | None = Field(None, description="which create made what runs under its name (a replacement makes "
                                                     "a new one)")


KIND = Kind("Deployment", DeploymentSpec, DeploymentOutputs, schema_key="deployment",
            provider="ember.provider.providers.deployment:DeploymentProvider",
            replace=frozenset({"account_id", "deployment_id", "cluster", "base_model", "base_model_digest",
                               "deployment_type", "accelerator_type", "accelerator_count", "precision", "max_loras",
                               "max_lora_rank", "request_logging"}),
            # a serverless base's shutdown date, from the catalog file (domain/catalog_lifecycle.py): a platform team's
            # new date is an update, which rewrites the deployment's record, so its replicas learn it
            derived=("base_model_digest", "base_model_shutdown_date"))
