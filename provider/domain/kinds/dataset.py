"""The Dataset kind: a JSONL file of chat examples, uploaded content-addressed, private to its account."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import dataset_name
from ember.provider.domain.spec import DatasetName, DisplayName, ModelState, ResourceId, Source, Spec, Text, full_name


class DatasetSpec(Spec):
    """A JSONL file of chat examples, uploaded content-addressed; private to its account."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {"account_id": "unknown", "source": "unknown"}

    account_id: ResourceId
    dataset_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    source: Source = Field(description='JSONL, one {"messages": [{"role", "content"}, ...]} per line, ending with '
                                       "the assistant's answer")
    display_name: DisplayName | None = None
    description: Text | None = None

    @property
    def name(self) -> str:
        return full_name(dataset_name, self.account_id, self.dataset_id, "dataset_id")


class DatasetOutputs(Spec):
    name: DatasetName
    state: ModelState
    message: str | None = None
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    example_count: int | None = Field(None, ge=0)
    message_count: int | None = Field(None, ge=0)
    character_count: int | None = Field(None, ge=0)
    source_digest: str | None = Field(None, description="content digest of a local source, derived at check")


KIND = Kind("Dataset", DatasetSpec, DatasetOutputs, schema_key="dataset",
            provider="ember.provider.providers.dataset:DatasetProvider",
            replace=frozenset({"account_id", "dataset_id", "source_digest"}),
            derived=("source_digest",))
