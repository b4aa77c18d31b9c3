"""The Model kind: a base model's weights (a Hugging Face directory, a GGUF file, or a catalog model)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ember.provider.domain import catalog
from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import model_name
from ember.provider.domain.spec import (DisplayName, FieldError, ModelKind, ModelName, ModelState, ResourceId, Source,
                                        Spec, Text, full_name, refuse_reserved_id)


class ModelSpec(Spec):
    """A base model: full weights from a Hugging Face directory, or a catalog model."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {"account_id": "unknown", "source": "unknown"}

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
            refuse_reserved_id(self.model_id)
        return self

    @property
    def name(self) -> str:
        return full_name(model_name, self.account_id, self.model_id, "model_id")

    @property
    def is_catalog(self) -> bool:
        return self.catalog_id is not None


class ModelOutputs(Spec):
    name: ModelName
    state: ModelState
    message: str | None = Field(None, description="why the model FAILED")
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$", description="content digest of the weights")
    architecture: str | None = None
    parameter_count: int | None = Field(None, ge=0)
    source_digest: str | None = Field(None, description="content digest of a local source, derived at check")


KIND = Kind("Model", ModelSpec, ModelOutputs, schema_key="model",
            provider="ember.provider.providers.model:ModelProvider",
            replace=frozenset({"account_id", "model_id", "kind", "catalog_id", "source_digest"}),
            derived=("source_digest",))
