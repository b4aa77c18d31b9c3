"""What the store keeps about each model, addon and deployment, typed: a manifest per model or addon, a
record per deployment. Defaults come from the spec, so an older document reads the way the spec reads."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.spec import DEFAULT_MAX_LORA_RANK, JobState, ModelKind, ModelState


class _Document(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _Manifest(_Document):
    name: str  # accounts/<account>/models/<id>
    state: ModelState = ModelState.READY
    message: str | None = None
    digest: str  # the content digest of the object
    object: str  # its URL in the store
    created: float = 0.0
    inputs: dict[str, Any] = {}  # the checked inputs, given back by `get` and `import`


class BaseModelManifest(_Manifest):
    kind: Literal[ModelKind.HF_BASE_MODEL] = ModelKind.HF_BASE_MODEL
    architecture: str
    parameter_count: int
    config: dict[str, Any]  # config.json, which addons are checked against
    catalog_id: str | None = None


class AddonManifest(_Manifest):
    kind: Literal[ModelKind.HF_PEFT_ADDON] = ModelKind.HF_PEFT_ADDON
    base_model: str
    rank: int
    target_modules: list[str]


Manifest = Annotated[BaseModelManifest | AddonManifest, Field(discriminator="kind")]
MANIFEST = TypeAdapter(Manifest)


class DeploymentRecord(_Document):
    """What addons need to know about a deployment they target, and its inputs."""

    name: str  # accounts/<account>/deployments/<id>
    base_model: str
    serverless: bool = False
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    cluster: Literal["local", "kubernetes"] = DeploymentSpec.model_fields["cluster"].default
    # False until a create has finished: a create cut short (a killed `up`) is resumed by the next one,
    # while a deployment another stack finished creating is never taken over.
    created: bool = True
    inputs: dict[str, Any] = {}


class DatasetRecord(_Document):
    """An uploaded dataset: its object (one file, dataset.jsonl) and what it holds."""

    name: str  # accounts/<account>/datasets/<id>
    state: ModelState = ModelState.READY
    message: str | None = None
    digest: str
    object: str
    example_count: int
    message_count: int
    character_count: int
    created: float = 0.0
    inputs: dict[str, Any] = {}


class FineTuningJobRecord(_Document):
    """A finished job: what it trained, and its metrics (the outputs it reports)."""

    name: str  # accounts/<account>/fineTuningJobs/<id>
    state: JobState
    output_model_name: str
    digest: str
    outputs: dict[str, Any] = {}
    created: float = 0.0
    inputs: dict[str, Any] = {}
