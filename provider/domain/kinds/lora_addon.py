"""The LoRAAddon kind: a PEFT adapter of one base model, served on that base model's deployments."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ember.provider.domain import catalog
from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import model_name, parse_deployment_name, parse_model_name
from ember.provider.domain.spec import (MAX_LORA_RANK, DeploymentName, DisplayName, FieldError, ModelName, ModelState,
                                        ResourceId, Source, Spec, Text, full_name, refuse_foreign_base,
                                        refuse_reserved_id)


class LoRAAddonSpec(Spec):
    """A LoRA addon of one base model, deployed on that base model's deployments."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {
        "account_id": "unknown", "base_model": "accounts/unknown/models/llama-v3p1-8b-instruct", "source": "unknown",
        "deployments": []}

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
        return full_name(model_name, self.account_id, self.model_id, "model_id")

    @field_validator("deployments")
    @classmethod
    def _sorted_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Order carries no meaning, so a reordered list must not show up as a diff.
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _fits_domain(self) -> "LoRAAddonSpec":
        refuse_reserved_id(self.model_id)
        refuse_foreign_base(self.account_id, self.base_model)
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


class LoRAAddonOutputs(Spec):
    name: ModelName
    state: ModelState
    message: str | None = None
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    rank: int | None = Field(None, ge=1, le=MAX_LORA_RANK)
    target_modules: tuple[str, ...] = ()
    deployed_on: tuple[DeploymentName, ...] = ()


KIND = Kind("LoRAAddon", LoRAAddonSpec, LoRAAddonOutputs, schema_key="lora_addon",
            provider="ember.provider.providers.lora_addon:LoRAAddonProvider",
            # new weights (source_digest) are a new version of the same addon, loaded in place before the old one
            # leaves: the name answers throughout
            replace=frozenset({"account_id", "model_id", "kind", "base_model", "base_model_digest"}),
            derived=("base_model_digest", "source_digest"))
