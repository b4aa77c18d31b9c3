"""The resource spec: inputs and outputs of Model, LoRAAddon and Deployment, with every domain rule.

This module is the single source for validation (provider check), for the JSON Schemas in schema/,
for the policy pack and for the runtime's adapter checks. It imports pydantic only: never pulumi, never
torch. Every error names the offending field and value; `parse` turns pydantic's errors into a
`SpecError` whose `.errors` map straight onto Pulumi check failures.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator,
                      model_validator)

from ember.provider.domain import catalog
from ember.provider.domain.accounts import foreign_model_refusal, is_catalog_name
from ember.provider.domain.names import (DATASET_NAME_PATTERN, DEPLOYMENT_NAME_PATTERN, ID_PATTERN, MODEL_NAME_PATTERN,
                                         check_id, dataset_name, deployment_name, fine_tuning_job_name, model_name,
                                         parse_dataset_name, parse_deployment_name, parse_model_name)

# ---------------------------------------------------------------------------------------------------
# Errors


class FieldError(ValueError):
    """A rule broken by one field, raised from a validator that sees the whole resource. `needs`: the inputs the
    rule reads, when it can say so; a rule that does not is judged in preview only once every input is known."""

    def __init__(self, field: str, message: str, needs: tuple[str, ...] | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.needs = needs


class SpecError(ValueError):
    """Invalid resource input: `.errors` is a list of (field path, message), each naming the value."""

    def __init__(self, resource: str, errors: list[tuple[str, str]],
                 cross_field: dict[str, tuple[str, ...] | None] | None = None):
        self.resource = resource
        self.errors = errors
        self.cross_field = dict(cross_field or {})  # path of an error from a rule that spans fields → what it reads
        lines = "\n".join(f"  {field or '(resource)'}: {message}" for field, message in errors)
        super().__init__(f"invalid {resource}:\n{lines}")


def _path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _describe(error: dict) -> tuple[str, str]:
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        parts = tuple(int(p) if p.isdigit() else p for p in cause.field.split("."))
        return _path(loc + parts), cause.message
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return _path(loc), "is required"
    if error["type"] == "extra_forbidden":
        return _path(loc), f"is not a known property (got {error['input']!r})"
    if not isinstance(cause, ValueError) and "input" in error:
        got = error["input"]
        if isinstance(got, float) and got.is_integer():
            got = int(got)  # the engine sends every number as a float: say "got 0", as the user wrote it
        message = f"{message} (got {got!r})"
    return _path(loc), message


S = TypeVar("S", bound=BaseModel)


def parse(cls: type[S], data: Any) -> S:
    """Validate `data` as `cls`, raising SpecError with every broken rule."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        causes = [(e.get("ctx") or {}).get("error") for e in exc.errors()]
        cross = {errors[i][0]: cause.needs for i, cause in enumerate(causes) if isinstance(cause, FieldError)}
        raise SpecError(cls.__name__, errors, cross) from None


# Stand-ins for inputs the engine only knows once a dependency exists (preview): each passes the rules
# on its own field, so only the rules on known values are judged (a catalog base passes the serverless
# rules; they are judged again when the real name is known).
PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "ModelSpec": {"account_id": "unknown", "source": "unknown"},
    "DeploymentSpec": {"account_id": "unknown", "base_model": "accounts/unknown/models/llama-v3p1-8b-instruct"},
    "LoRAAddonSpec": {"account_id": "unknown", "base_model": "accounts/unknown/models/llama-v3p1-8b-instruct",
                      "source": "unknown", "deployments": []},
    "DatasetSpec": {"account_id": "unknown", "source": "unknown"},
    "FineTuningJobSpec": {"account_id": "unknown", "base_model": "accounts/unknown/models/unknown",
                          "dataset": "accounts/unknown/datasets/unknown", "evaluation_dataset": None,
                          "output_model": "unknown", "training_url": "unknown"},
}


def parse_known(cls: type[S], props: dict[str, Any], unknown: set[str]) -> tuple[S | None, list[tuple[str, str]]]:
    """Validate what is known of a resource's inputs: (spec, []) or (None, broken rules on known values).

    `unknown` names the top-level inputs not known yet; a rule that needs one of them is skipped.
    """
    placeholders = PLACEHOLDERS[cls.__name__]
    data = {k: (placeholders.get(k) if k in unknown else v) for k, v in props.items()}
    try:
        return parse(cls, {k: v for k, v in data.items() if v is not None}), []
    except SpecError as exc:
        return None, [(field, message) for field, message in exc.errors
                      if not (_top(field) in unknown or _needs_unknown(exc.cross_field, field, unknown))]


def _needs_unknown(cross_field: dict[str, tuple[str, ...] | None], field: str, unknown: set[str]) -> bool:
    """Whether the cross-field rule that failed on `field` reads an input not known yet (judged once it is)."""
    if field not in cross_field:
        return False
    needs = cross_field[field]
    return bool(unknown) if needs is None else bool(unknown & set(needs))


def _top(field: str) -> str:
    return field.split(".")[0].split("[")[0]


# ---------------------------------------------------------------------------------------------------
# Vocabulary


class ModelKind(str, Enum):
    HF_BASE_MODEL = "HF_BASE_MODEL"  # full weights: config.json + *.safetensors + tokenizer.json
    HF_PEFT_ADDON = "HF_PEFT_ADDON"  # LoRA: adapter_config.json + adapter_model.safetensors


class ModelState(str, Enum):
    READY = "READY"
    FAILED = "FAILED"


class DeploymentState(str, Enum):
    READY = "READY"
    FAILED = "FAILED"


class DeploymentType(str, Enum):
    DEDICATED = "dedicated"  # private to its account, billed per GPU-second
    SERVERLESS = "serverless"  # shared across accounts, catalog bases only, billed per token


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # weight-only: projection weights in int8 (per output channel), computed in bf16
    INT4 = "int4"  # weight-only: projection weights in int4 (groups of 32), computed in bf16
    FP8 = "fp8"  # projection weights in fp8 e4m3 (per output channel), fp8 GEMMs: accelerators with FP8 only

    @property
    def bytes(self) -> float:
        """Bytes per weight, roughly (quantized: the projections' share, the rest is bf16)."""
        return {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5, "fp8": 1}[self.value]


class AcceleratorType(str, Enum):
    CPU = "CPU"  # the local default: one runtime process on the host's cores
    NVIDIA_A100_80GB = "NVIDIA_A100_80GB"
    NVIDIA_H100_80GB = "NVIDIA_H100_80GB"
    NVIDIA_H200_141GB = "NVIDIA_H200_141GB"
    AMD_MI300X_192GB = "AMD_MI300X_192GB"

    @property
    def vendor(self) -> str | None:
        return {"CPU": None, "AMD_MI300X_192GB": "amd"}.get(self.value, "nvidia")

    @property
    def memory_gb(self) -> int | None:
        return None if self is AcceleratorType.CPU else int(self.value.rsplit("_", 1)[1].removesuffix("GB"))

    @property
    def allowed_counts(self) -> tuple[int, ...]:
        return (1,) if self is AcceleratorType.CPU else (1, 2, 4, 8)

    @property
    def has_fp8(self) -> bool:
        """fp8 tensor cores, which precision fp8 needs: Hopper (H100, H200) and MI300X; not Ampere (A100)."""
        return self.value in ("NVIDIA_H100_80GB", "NVIDIA_H200_141GB", "AMD_MI300X_192GB")


# A LoRA rank beyond this is a full fine-tune in disguise and would not batch well with the rest.
MAX_LORA_RANK = 256
LORA_RANK_BUCKETS = (8, 16, 32, 64, 128, 256)
DEFAULT_MAX_LORA_RANK = 64
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_REPLICAS = 64
MAX_EPOCHS = 100
MAX_RETENTION_DAYS = 365
# Weights may fill at most this share of accelerator memory; the rest holds the KV cache and activations.
WEIGHT_MEMORY_SHARE = 0.9

# ---------------------------------------------------------------------------------------------------
# Field types


def _json_string(pattern: str, description: str, max_length: int | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "pattern": pattern, "description": description}
    if max_length:
        schema |= {"minLength": 1, "maxLength": max_length}
    return WithJsonSchema(schema)


def _check_name(parse_fn):
    def check(value: str) -> str:
        return str(parse_fn(value))

    return check


ResourceId = Annotated[
    str,
    AfterValidator(check_id),
    _json_string(ID_PATTERN, "1-63 characters of [a-z0-9-], not starting or ending with '-'", 63),
]
ModelName = Annotated[
    str,
    AfterValidator(_check_name(parse_model_name)),
    _json_string(MODEL_NAME_PATTERN, "accounts/<ACCOUNT_ID>/models/<MODEL_ID>"),
]
DatasetName = Annotated[
    str,
    AfterValidator(_check_name(parse_dataset_name)),
    _json_string(DATASET_NAME_PATTERN, "accounts/<ACCOUNT_ID>/datasets/<DATASET_ID>"),
]
DeploymentName = Annotated[
    str,
    AfterValidator(_check_name(parse_deployment_name)),
    _json_string(DEPLOYMENT_NAME_PATTERN, "accounts/<ACCOUNT_ID>/deployments/<DEPLOYMENT_ID>"),
]
Text = Annotated[str, Field(max_length=1000)]
DisplayName = Annotated[str, Field(min_length=1, max_length=128)]


def normalise_source(value: str) -> str:
    """A local path or an fsspec URL; normalised so that a reformatted program gives no diff."""
    from fsspec.registry import known_implementations, registry

    value = value.strip()
    if not value:
        raise ValueError("must be a local path or an fsspec URL, got an empty string")
    if "://" in value:
        protocol = value.split("://", 1)[0]
        parts = urlsplit(value)
        if parts.username or parts.password:
            masked = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
            raise ValueError(f"{masked!r} embeds credentials, which would be stored in the stack's state in plain "
                             f"text; give them to fsspec through its environment or config instead")
        known = set(known_implementations) | set(registry)
        if protocol not in known:
            raise ValueError(f"{value!r} uses {protocol!r}, which is not an fsspec protocol")
        return value.rstrip("/")
    return os.path.normpath(value)


Source = Annotated[
    str,
    AfterValidator(normalise_source),
    WithJsonSchema({"type": "string", "minLength": 1, "description": "a local path or an fsspec URL"}),
]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------
# Model


def _full_name(make, account_id: str, resource_id: str | None, field: str) -> str:
    if resource_id is None:
        raise ValueError(f"{field} is not set yet (it is generated at check time)")
    return make(account_id, resource_id)


def _refuse_reserved_id(model_id: str | None, field: str = "model_id") -> None:
    if model_id and catalog.lookup(model_id):
        raise FieldError(field, f"{model_id!r} is reserved for the catalog model of that name")


def _refuse_foreign_base(account_id: str, base_model: str) -> None:
    """Accounts are sealed: judged here from the name (the account is in it), at create again from the store."""
    refusal = foreign_model_refusal(account_id, base_model, is_catalog_name(base_model))
    if refusal:
        raise FieldError("base_model", refusal, needs=("account_id", "base_model"))


class ModelSpec(Spec):
    """A base model: full weights from a Hugging Face directory, or a catalog model."""

    account_id: ResourceId
    model_id: ResourceId | None = Field(
        None, description="user-chosen; generated when omitted; a catalog model's ID is its catalog ID"
    )
    kind: Literal["HF_BASE_MODEL"] = "HF_BASE_MODEL"
    source: Source | None = Field(None, description="HF directory (config.json, *.safetensors, tokenizer.json) or a "
                                                  ".gguf file, converted on upload")
    catalog_id: str | None = Field(None, description="a built-in catalog model", json_schema_extra={"enum": sorted(catalog.CATALOG)})
    display_name: DisplayName | None = None
    description: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _addon_kind_hint(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == ModelKind.HF_PEFT_ADDON.value:
            raise FieldError("kind", "'HF_PEFT_ADDON' is a LoRA addon: declare it as a LoRAAddon, not a Model")
        return data

    @field_validator("catalog_id")
    @classmethod
    def _known_catalog_id(cls, value: str | None) -> str | None:
        if value is not None and not catalog.lookup(value):
            raise ValueError(f"{value!r} is not a catalog model; known: {', '.join(sorted(catalog.CATALOG))}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.source is None) == (self.catalog_id is None):
            raise FieldError("source", "give exactly one of source (a path or URL) and catalog_id")
        if self.catalog_id:
            if self.model_id not in (None, self.catalog_id):
                raise FieldError(
                    "model_id", f"{self.model_id!r} must equal catalog_id {self.catalog_id!r} for a catalog model"
                )
            object.__setattr__(self, "model_id", self.catalog_id)
        else:
            _refuse_reserved_id(self.model_id)
        return self

    @property
    def name(self) -> str:
        return _full_name(model_name, self.account_id, self.model_id, "model_id")

    @property
    def is_catalog(self) -> bool:
        return self.catalog_id is not None


# ---------------------------------------------------------------------------------------------------
# LoRA addon


class LoRAAddonSpec(Spec):
    """A LoRA addon of one base model, deployed on that base model's deployments."""

    account_id: ResourceId
    model_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    kind: Literal["HF_PEFT_ADDON"] = "HF_PEFT_ADDON"
    base_model: ModelName
    source: Source = Field(description="PEFT directory: adapter_config.json + adapter_model.safetensors")
    deployments: tuple[DeploymentName, ...] = Field(
        (), description="dedicated deployments of the base model, in this addon's account"
    )
    serverless: bool = Field(False, description="also serve on the serverless deployments of the base model")
    display_name: DisplayName | None = None
    description: Text | None = None

    @property
    def name(self) -> str:
        return _full_name(model_name, self.account_id, self.model_id, "model_id")

    @field_validator("deployments")
    @classmethod
    def _sorted_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Order carries no meaning, so a reordered list must not show up as a diff.
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _fits_domain(self) -> "LoRAAddonSpec":
        _refuse_reserved_id(self.model_id)
        _refuse_foreign_base(self.account_id, self.base_model)
        for i, name in enumerate(self.deployments):
            owner = parse_deployment_name(name).account_id
            if owner != self.account_id:
                raise FieldError(f"deployments.{i}", f"{name!r} belongs to account {owner!r}: dedicated deployments are "
                                 f"private to their account (to share a base model across accounts, set serverless=True)")
        if self.serverless:
            base = catalog.lookup(parse_model_name(self.base_model).resource_id)
            if base is None or not base.serverless_addons:
                accepting = sorted(m.model_id for m in catalog.CATALOG.values() if m.serverless_addons)
                raise FieldError("serverless", f"base model {self.base_model!r} does not accept serverless addons; "
                                               f"these do: {', '.join(accepting)}")
        return self


class LoRAConfig(BaseModel):
    """The parts of a PEFT `adapter_config.json` that Ember serves; anything else is refused by name."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: Literal["LORA"] = "LORA"
    r: int = Field(ge=1, le=MAX_LORA_RANK)
    lora_alpha: float = Field(gt=0)
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    bias: Literal["none"] = "none"
    use_dora: Literal[False] = False
    fan_in_fan_out: Literal[False] = False
    modules_to_save: None | tuple[()] = None
    layers_to_transform: None = None
    rank_pattern: dict[str, Any] = Field(default_factory=dict, max_length=0)
    alpha_pattern: dict[str, Any] = Field(default_factory=dict, max_length=0)
    base_model_name_or_path: str | None = None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _supported_modules(cls, value: Any) -> Any:
        if value == "all-linear":
            return LORA_TARGET_MODULES
        if isinstance(value, str):
            raise ValueError(f"{value!r}: give a list of module names, not a pattern")
        unsupported = [m for m in value if m not in LORA_TARGET_MODULES]
        if unsupported:
            raise ValueError(f"{unsupported!r} are not supported; use any of {', '.join(LORA_TARGET_MODULES)}")
        if not value:
            raise ValueError("is empty: an adapter must target at least one module")
        return tuple(sorted(set(value), key=LORA_TARGET_MODULES.index))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


# ---------------------------------------------------------------------------------------------------
# Deployment


class AutoscalingPolicy(Spec):
    scale_up_window_s: int = Field(30, ge=0, le=3600, description="load must stay high this long before scaling up")
    scale_down_window_s: int = Field(600, ge=60, le=86400, description="load must stay low this long before scaling down")
    scale_to_zero_window_s: int | None = Field(
        None, ge=300, le=86400, description="idle time before the last replica stops; needs min_replicas=0"
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
    """The apps/v1 Deployment whose rollout a Kubernetes deployment waits for (set by KubernetesDeployment)."""

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=63)
    kubeconfig: str | None = Field(None, description="a kubeconfig file's path; the ambient kubeconfig (KUBECONFIG, "
                                                     "~/.kube/config, or the pod's service account) when omitted")
    template_digest: str = Field(description="a digest of its spec (pod template, replicas): a new one means a "
                                             "rollout to wait for")


class DeploymentSpec(Spec):
    """A base model (plus its loaded addons) served on hardware."""

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
    max_loras: int = Field(8, ge=1, le=128, description="addons active on the accelerator at once (more wait in host memory)")
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
        _refuse_foreign_base(self.account_id, self.base_model)
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
        to_zero = self.autoscaling.scale_to_zero_window_s
        if self.cluster == "kubernetes" and to_zero is not None:
            raise FieldError("autoscaling.scale_to_zero_window_s", f"{to_zero} given, but a Kubernetes "
                             f"HorizontalPodAutoscaler cannot scale to zero: set min_replicas >= 1")
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
        if base is not None and accelerator.memory_gb is not None:
            need = base.parameter_count * self.precision.bytes / 1e9
            have = accelerator.memory_gb * self.accelerator_count * WEIGHT_MEMORY_SHARE
            if need > have:
                raise FieldError("accelerator_count", f"{self.accelerator_count} x {accelerator.value} holds {have:.0f} GB "
                                 f"of weights, but {base_id} needs {need:.0f} GB in {self.precision.value}")
        return self

    @property
    def name(self) -> str:
        return _full_name(deployment_name, self.account_id, self.deployment_id, "deployment_id")


# ---------------------------------------------------------------------------------------------------
# Fine-tuning: datasets and the jobs that train LoRA addons on them


class JobState(str, Enum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class DatasetSpec(Spec):
    """A JSONL file of chat examples, uploaded content-addressed; private to its account."""

    account_id: ResourceId
    dataset_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    source: Source = Field(description='JSONL, one {"messages": [{"role", "content"}, ...]} per line, ending with '
                                       "the assistant's answer")
    display_name: DisplayName | None = None
    description: Text | None = None

    @property
    def name(self) -> str:
        return _full_name(dataset_name, self.account_id, self.dataset_id, "dataset_id")


class FineTuningJobSpec(Spec):
    """Supervised fine-tuning of a LoRA on a base model; its output is an addon model of that base."""

    account_id: ResourceId
    job_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    base_model: ModelName
    dataset: DatasetName
    evaluation_dataset: DatasetName | None = Field(None, description="its loss is reported after every epoch")
    output_model: ResourceId = Field(description="the trained addon's model ID in this account")
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    learning_rate: float = Field(1e-4, gt=0, le=0.1)
    lora_rank: int = Field(8, ge=1, le=MAX_LORA_RANK)
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="default: twice the rank")
    target_modules: tuple[str, ...] = Field(LORA_TARGET_MODULES, min_length=1)
    batch_size: int = Field(8, ge=1, le=512, description="examples per optimizer step")
    max_context_length: int = Field(2048, ge=16, le=131072, description="longest example, in tokens")
    early_stop: bool = Field(False, description="stop when the evaluation loss stops improving (needs "
                                                "evaluation_dataset); the best epoch's adapter is kept")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    cluster: Literal["local", "kubernetes"] = Field("local", description="where it trains: a child process on this "
                                                    "machine, or a batch/v1 Job (set by KubernetesFineTuningJob)")
    training_url: str | None = Field(None, description="where the Kubernetes Job writes the adapter and its metrics "
                                                       "(set by KubernetesFineTuningJob)")
    display_name: DisplayName | None = None
    description: Text | None = None

    @property
    def name(self) -> str:
        return _full_name(fine_tuning_job_name, self.account_id, self.job_id, "job_id")

    @property
    def output_model_name(self) -> str:
        return model_name(self.account_id, self.output_model)

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in value if m not in LORA_TARGET_MODULES]
        if unknown:
            raise ValueError(f"{unknown!r} are not LoRA-targetable; use any of {', '.join(LORA_TARGET_MODULES)}")
        return tuple(sorted(set(value), key=LORA_TARGET_MODULES.index))

    @model_validator(mode="after")
    def _fits_domain(self) -> "FineTuningJobSpec":
        _refuse_reserved_id(self.output_model, "output_model")
        _refuse_foreign_base(self.account_id, self.base_model)
        for field in ("dataset", "evaluation_dataset"):
            value = getattr(self, field)
            if value is not None and parse_dataset_name(value).account_id != self.account_id:
                raise FieldError(field, f"{value!r} belongs to account {parse_dataset_name(value).account_id!r}: "
                                        f"datasets are private to their account")
        if self.early_stop and self.evaluation_dataset is None:
            raise FieldError("early_stop", "True needs an evaluation_dataset to judge the epochs by")
        if (self.cluster == "kubernetes") != (self.training_url is not None):
            raise FieldError("training_url", "is set with cluster='kubernetes' (by KubernetesFineTuningJob), and only then")
        return self


# ---------------------------------------------------------------------------------------------------
# Outputs: what the provider reports back after create/update/read.


class ModelOutputs(Spec):
    name: ModelName
    state: ModelState
    message: str | None = Field(None, description="why the model FAILED")
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$", description="content digest of the weights")
    architecture: str | None = None
    parameter_count: int | None = Field(None, ge=0)
    source_digest: str | None = Field(None, description="content digest of a local source, derived at check")


class LoRAAddonOutputs(Spec):
    name: ModelName
    state: ModelState
    message: str | None = None
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    rank: int | None = Field(None, ge=1, le=MAX_LORA_RANK)
    target_modules: tuple[str, ...] = ()
    deployed_on: tuple[DeploymentName, ...] = ()


class DeploymentOutputs(Spec):
    name: DeploymentName
    state: DeploymentState
    message: str | None = None
    endpoints: tuple[str, ...] = ()
    ready_replicas: int = Field(0, ge=0)
    serving_digest: str | None = Field(None, description="digest of the base weights the replicas serve")


class DatasetOutputs(Spec):
    name: DatasetName
    state: ModelState
    message: str | None = None
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    example_count: int | None = Field(None, ge=0)
    message_count: int | None = Field(None, ge=0)
    character_count: int | None = Field(None, ge=0)
    source_digest: str | None = Field(None, description="content digest of a local source, derived at check")


class FineTuningJobOutputs(Spec):
    name: str = Field(description="accounts/<ACCOUNT_ID>/fineTuningJobs/<JOB_ID>")
    state: JobState
    message: str | None = None
    output_model_name: ModelName | None = None
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$", description="the trained adapter's")
    adapter_url: str | None = Field(None, description="the adapter in the store: a LoRAAddon's source")
    train_loss: tuple[float, ...] = Field((), description="mean training loss of each epoch")
    step_loss: tuple[float, ...] = Field((), description="training loss of each optimizer step (the loss curve)")
    evaluation_loss: tuple[float, ...] = Field((), description="evaluation loss after each epoch")
    epochs_run: int = Field(0, ge=0)
    dataset_tokens: int = Field(0, ge=0, description="the training dataset's tokens after the base model's chat "
                                                     "template (one epoch)")
    trained_tokens: int = Field(0, ge=0, description="tokens trained on, all epochs (billed)")
    duration_s: float = Field(0.0, ge=0)


# ---------------------------------------------------------------------------------------------------
# A whole stack: the rules that span resources.


class StackSpec(Spec):
    """Resources declared together; checks the rules no single resource can see."""

    models: tuple[ModelSpec, ...] = ()
    addons: tuple[LoRAAddonSpec, ...] = ()
    deployments: tuple[DeploymentSpec, ...] = ()
    datasets: tuple[DatasetSpec, ...] = ()
    fine_tuning_jobs: tuple[FineTuningJobSpec, ...] = ()

    @model_validator(mode="after")
    def _cross_references(self) -> "StackSpec":
        seen: dict[str, str] = {}
        namespaces = {"deployments": "deployment", "datasets": "dataset", "fine_tuning_jobs": "model"}
        for group, items, id_field in (
            ("models", self.models, "model_id"),
            ("addons", self.addons, "model_id"),
            ("deployments", self.deployments, "deployment_id"),
            ("datasets", self.datasets, "dataset_id"),
            ("fine_tuning_jobs", self.fine_tuning_jobs, "output_model"),  # a job's output is a model
        ):
            for i, item in enumerate(items):
                ident = getattr(item, id_field)
                key = f"{namespaces.get(group, 'model')}:{ident}"
                if ident is not None and key in seen:
                    raise FieldError(f"{group}.{i}.{id_field}", f"{ident!r} is already used by {seen[key]}")
                seen[key] = f"{group}[{i}]"
        declared_models = {m.name: m for m in self.models if m.model_id}
        for i, d in enumerate(self.deployments):
            if d.base_model not in declared_models and any(a.name == d.base_model for a in self.addons if a.model_id):
                raise FieldError(f"deployments.{i}.base_model", f"{d.base_model!r} is a LoRA addon, not a base model")
        deployments = {d.name: d for d in self.deployments if d.deployment_id}
        for i, addon in enumerate(self.addons):
            for j, target in enumerate(addon.deployments):
                deployment = deployments.get(target)
                if deployment is not None and deployment.base_model != addon.base_model:
                    raise FieldError(f"addons.{i}.deployments.{j}", f"{target!r} serves base model "
                                     f"{deployment.base_model!r}, not this addon's base {addon.base_model!r}")
        return self


RESOURCES: dict[str, tuple[type[Spec], type[Spec]]] = {
    "model": (ModelSpec, ModelOutputs),
    "lora_addon": (LoRAAddonSpec, LoRAAddonOutputs),
    "deployment": (DeploymentSpec, DeploymentOutputs),
    "dataset": (DatasetSpec, DatasetOutputs),
    "fine_tuning_job": (FineTuningJobSpec, FineTuningJobOutputs),
}
