"""What every resource kind's spec is made of: errors that name the field and value, parsing (also of inputs
only partly known in preview), the domain's vocabulary and limits, field types, and the rules several kinds share.

The kinds themselves (domain/kinds/) are the single source for validation (provider check), for the JSON Schemas in
schema/ and for the policy pack; LoRAConfig here is the runtime's adapter check. It imports pydantic only: never
pulumi, never torch. Every error names the offending field and value; `parse` turns pydantic's errors into a
`SpecError` whose `.errors` map straight onto Pulumi check failures.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema,
                      field_validator)

from ember.provider.domain import catalog
from ember.provider.domain.accounts import foreign_model_refusal, is_catalog_name
from ember.provider.domain.names import (API_KEY_NAME_PATTERN, DATASET_NAME_PATTERN, DEPLOYMENT_NAME_PATTERN,
                                         GATEWAY_NAME_PATTERN, ID_PATTERN, MODEL_NAME_PATTERN, check_id,
                                         parse_api_key_name, parse_dataset_name, parse_deployment_name,
                                         parse_gateway_name, parse_model_name)

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
        if part == "[key]":  # pydantic's mark of a mapping's key: the key itself is the part before it
            continue
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


def parse_known(cls: type[S], props: dict[str, Any], unknown: set[str]) -> tuple[S | None, list[tuple[str, str]]]:
    """Validate what is known of a resource's inputs: (spec, []) or (None, broken rules on known values).

    `unknown` names the top-level inputs not known yet; a rule that needs one of them is skipped.
    """
    # Stand-ins for unknown inputs, declared by each spec: each passes the rules on its own field, so only the
    # rules on known values are judged (a catalog base passes the serverless rules; they are judged again when the
    # real name is known).
    placeholders = cls.PREVIEW_PLACEHOLDERS
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

    @property
    def unquantized_bytes(self) -> float:
        """Bytes per weight of what is never quantized (embeddings, norms): bf16 under a quantized precision."""
        return self.bytes if self.value in ("fp32", "bf16", "fp16") else 2


class JobState(str, Enum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


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
        # Tensor-parallel degrees; on the CPU the ranks are processes sharing the host's cores (tests, big hosts).
        return (1, 2, 4, 8)

    @property
    def has_fp8(self) -> bool:
        """fp8 tensor cores, which precision fp8 needs: Hopper (H100, H200) and MI300X; not Ampere (A100)."""
        return self.value in ("NVIDIA_H100_80GB", "NVIDIA_H200_141GB", "AMD_MI300X_192GB")


# A LoRA rank beyond this is a full fine-tune in disguise and would not batch well with the rest.
MAX_LORA_RANK = 256
LORA_RANK_BUCKETS = (8, 16, 32, 64, 128, 256)
DEFAULT_MAX_LORA_RANK = 64
DEFAULT_MAX_LORAS = 8  # addons on the accelerator at once: a deployment's, and so its replicas' default
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 keeps q/k/v and gate/up fused in its checkpoint, so PEFT targets them by these names there.
FUSED_LORA_TARGET_MODULES = ("qkv_proj", "gate_up_proj")
# A Mixture of Experts' experts, which PEFT targets as parameters (`target_parameters`: transformers >= 5 keeps each
# layer's experts in one [experts, out, in] tensor), named here by how every such name ends.
LORA_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
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
GatewayName = Annotated[
    str,
    AfterValidator(_check_name(parse_gateway_name)),
    _json_string(GATEWAY_NAME_PATTERN, "accounts/<ACCOUNT_ID>/gateways/<GATEWAY_ID>"),
]
ApiKeyName = Annotated[
    str,
    AfterValidator(_check_name(parse_api_key_name)),
    _json_string(API_KEY_NAME_PATTERN, "accounts/<ACCOUNT_ID>/apiKeys/<KEY_ID>"),
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
# Rules several kinds share


def full_name(make, account_id: str, resource_id: str | None, field: str) -> str:
    if resource_id is None:
        raise ValueError(f"{field} is not set yet (it is generated at check time)")
    return make(account_id, resource_id)


def refuse_reserved_id(model_id: str | None, field: str = "model_id") -> None:
    if model_id and catalog.lookup(model_id):
        raise FieldError(field, f"{model_id!r} is reserved for the catalog model of that name")


def refuse_foreign_base(account_id: str, base_model: str) -> None:
    """Accounts are sealed: judged here from the name (the account is in it), at create again from the store."""
    refusal = foreign_model_refusal(account_id, base_model, is_catalog_name(base_model))
    if refusal:
        raise FieldError("base_model", refusal, needs=("account_id", "base_model"))


class LoRAConfig(BaseModel):
    """The parts of a PEFT `adapter_config.json` that Ember serves; anything else is refused by name."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: Literal["LORA"] = "LORA"
    r: int = Field(ge=1, le=MAX_LORA_RANK)
    lora_alpha: float = Field(gt=0)
    target_parameters: tuple[str, ...] = ()  # LORA_EXPERT_PARAMETERS (PEFT's names end so: mlp.experts.down_proj)
    target_modules: tuple[str, ...] = ()
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
        known = LORA_TARGET_MODULES + FUSED_LORA_TARGET_MODULES
        unsupported = [m for m in value or () if m not in known]
        if unsupported:
            raise ValueError(f"{unsupported!r} are not supported; use any of {', '.join(known)}")
        return tuple(sorted(set(value or ()), key=known.index))

    @field_validator("target_parameters", mode="before")
    @classmethod
    def _expert_parameters(cls, value: Any) -> Any:
        unsupported = [p for p in value or () if not str(p).endswith(LORA_EXPERT_PARAMETERS)]
        if unsupported:
            raise ValueError(f"{unsupported!r} are not supported; Ember serves LoRA on the experts' "
                             f"{' and '.join(LORA_EXPERT_PARAMETERS)}")
        return tuple(sorted({next(e for e in LORA_EXPERT_PARAMETERS if str(p).endswith(e)) for p in value or ()},
                            key=LORA_EXPERT_PARAMETERS.index))

    @field_validator("target_modules")
    @classmethod
    def _targets_something(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not value and not info.data.get("target_parameters"):
            raise ValueError("is empty: an adapter must target at least one module")
        return value

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)
