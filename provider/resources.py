"""Model, LoRAAddon and Deployment as Pulumi resources, with typed Args as in pulumi-kubernetes' SDK.

    base = Model("tiny-llama", ModelArgs(account_id="acme", source="models/tiny-llama"))
    prod = Deployment("prod", DeploymentArgs(account_id="acme", base_model=base))
    LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source="models/pirate", deployments=[prod]))

Passing a resource where a name is expected (base_model=base, deployments=[prod]) also makes the
dependency explicit and carries the base model's digest, so new base weights replace what runs on them.
IDs default to the resource name. The type tokens are pulumi-python:dynamic/ember:Model and friends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import pulumi
from pulumi.dynamic import Resource

from .providers import DeploymentProvider, LoRAAddonProvider, ModelProvider


def default_id(resource_name: str) -> str:
    """A valid ID from a Pulumi resource name: lower case, [a-z0-9-], at most 63 characters."""
    slug = re.sub(r"[^a-z0-9-]+", "-", resource_name.lower()).strip("-")[:63].strip("-")
    return slug or "resource"


@dataclass
class ModelArgs:
    account_id: pulumi.Input[str]
    model_id: pulumi.Input[str] | None = None
    source: pulumi.Input[str] | None = None  # a local path or fsspec URL of a Hugging Face directory
    catalog_id: pulumi.Input[str] | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class AutoscalingPolicyArgs:
    scale_up_window_s: pulumi.Input[int] | None = None
    scale_down_window_s: pulumi.Input[int] | None = None
    scale_to_zero_window_s: pulumi.Input[int] | None = None
    target_concurrent_requests: pulumi.Input[float] | None = None


@dataclass
class RequestLoggingArgs:
    enabled: pulumi.Input[bool] = False
    retention_days: pulumi.Input[int] | None = None


@dataclass
class DeploymentArgs:
    account_id: pulumi.Input[str]
    base_model: "pulumi.Input[str] | Model"
    deployment_id: pulumi.Input[str] | None = None
    deployment_type: pulumi.Input[str] | None = None  # dedicated | serverless
    cluster: str | None = None  # local (default) | kubernetes (set by ember.provider.kubernetes)
    accelerator_type: pulumi.Input[str] | None = None
    accelerator_count: pulumi.Input[int] | None = None
    precision: pulumi.Input[str] | None = None
    min_replicas: pulumi.Input[int] | None = None
    max_replicas: pulumi.Input[int] | None = None
    autoscaling: AutoscalingPolicyArgs | None = None
    max_loras: pulumi.Input[int] | None = None
    max_lora_rank: pulumi.Input[int] | None = None
    request_logging: RequestLoggingArgs | None = None
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


@dataclass
class LoRAAddonArgs:
    account_id: pulumi.Input[str]
    base_model: "pulumi.Input[str] | Model"
    source: pulumi.Input[str]  # a PEFT directory: adapter_config.json + adapter_model.safetensors
    model_id: pulumi.Input[str] | None = None
    deployments: Sequence["pulumi.Input[str] | Deployment"] = field(default_factory=list)
    serverless: pulumi.Input[bool] = False
    display_name: pulumi.Input[str] | None = None
    description: pulumi.Input[str] | None = None


def _props(args: Any) -> dict[str, Any]:
    """A dataclass of inputs as a property dict (no deep copy: inputs may be Outputs)."""
    props = {}
    for f in fields(args):
        value = getattr(args, f.name)
        if value is not None:
            props[f.name] = _props(value) if is_dataclass(value) else value
    return props


def _base(props: dict[str, Any], base_model: Any) -> None:
    if isinstance(base_model, Model):
        props["base_model"] = base_model.name
        props["base_model_digest"] = base_model.digest
    else:
        props["base_model"] = base_model


class Model(Resource, module="ember", name="Model"):
    name: pulumi.Output[str]  # accounts/<account>/models/<model_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    digest: pulumi.Output[str]
    architecture: pulumi.Output[str]
    parameter_count: pulumi.Output[int]

    def __init__(self, resource_name: str, args: ModelArgs, opts: pulumi.ResourceOptions | None = None):
        props = _props(args)
        if args.model_id is None and args.catalog_id is None:
            props["model_id"] = default_id(resource_name)
        outputs = dict.fromkeys(["name", "state", "message", "digest", "architecture", "parameter_count"])
        super().__init__(ModelProvider(), resource_name, props | outputs, opts)


class Deployment(Resource, module="ember", name="Deployment"):
    name: pulumi.Output[str]  # accounts/<account>/deployments/<deployment_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    endpoints: pulumi.Output[list[str]]
    ready_replicas: pulumi.Output[int]
    loaded_addons: pulumi.Output[list[str]]

    def __init__(self, resource_name: str, args: DeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        props = _props(args)
        _base(props, args.base_model)
        if args.deployment_id is None:
            props["deployment_id"] = default_id(resource_name)
        outputs = dict.fromkeys(["name", "state", "message", "endpoints", "ready_replicas", "loaded_addons",
                                 "serving_digest"])
        super().__init__(DeploymentProvider(), resource_name, props | outputs, opts)


class LoRAAddon(Resource, module="ember", name="LoRAAddon"):
    name: pulumi.Output[str]
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    digest: pulumi.Output[str]
    rank: pulumi.Output[int]
    target_modules: pulumi.Output[list[str]]
    deployed_on: pulumi.Output[list[str]]

    def __init__(self, resource_name: str, args: LoRAAddonArgs, opts: pulumi.ResourceOptions | None = None):
        props = _props(args)
        _base(props, args.base_model)
        props["deployments"] = [d.name if isinstance(d, Deployment) else d for d in args.deployments]
        if args.model_id is None:
            props["model_id"] = default_id(resource_name)
        outputs = dict.fromkeys(["name", "state", "message", "digest", "rank", "target_modules", "deployed_on"])
        super().__init__(LoRAAddonProvider(), resource_name, props | outputs, opts)
