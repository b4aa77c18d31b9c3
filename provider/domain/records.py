"""What the store keeps about each model, addon, deployment and gateway, typed: a manifest per model or addon, a
record per deployment and gateway, and each running replica's registration. Defaults come from the spec, so an older
document reads the way the spec reads. The provider writes them, replicas and the gateway read them (the domain, so
both halves share one definition)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ember.provider.domain.kinds.deployment import AutoscalingPolicy, DeploymentSpec, KubernetesWorkload
from ember.provider.domain.kinds.gateway import GatewaySpec
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
    owner: str | None = None  # the stack's resource that made it (organization/project/stack/name), which may replace it
    # which create made what runs under the name (a random id, in the resource's outputs too): the delete of a replaced
    # resource finds a newer one here and leaves it be
    generation: str | None = None
    # what the gateway routes and scales by
    min_replicas: int = DeploymentSpec.model_fields["min_replicas"].default
    max_replicas: int = DeploymentSpec.model_fields["max_replicas"].default
    autoscaling: AutoscalingPolicy = AutoscalingPolicy()
    traffic_weight: int = DeploymentSpec.model_fields["traffic_weight"].default
    kubernetes_workload: KubernetesWorkload | None = None
    shutdown_date: date | None = None  # serverless only: from this day (UTC) on, its model answers 410, unbilled


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


class GatewayRecord(_Document):
    """A store's gateway: its settings (a GatewaySpec, which the gateway re-reads, so a new limit needs no restart)."""

    name: str  # accounts/<account>/gateways/<id>
    spec: dict[str, Any]  # the GatewaySpec, as JSON
    created: bool = True  # as a deployment record's: False until a create has finished
    inputs: dict[str, Any] = {}

    def settings(self) -> GatewaySpec:
        return GatewaySpec.model_validate(self.spec)


# A replica rewrites its registration this often; the gateway takes one older than the TTL for a replica that died
# without saying so (killed), and stops routing to it.
REGISTRATION_INTERVAL_S = 2.0
REGISTRATION_TTL_S = 15.0


class ReplicaRegistration(_Document):
    """A running replica as it announces itself for the gateway: where it answers, and which addons it holds. Written
    once it is ready, again every REGISTRATION_INTERVAL_S, as draining when it is told to stop, and removed as it
    exits."""

    replica: str  # its own id, as in its usage records
    deployment: str  # accounts/<account>/deployments/<id>
    url: str  # where the gateway reaches it: http://<address>:<port>
    state: Literal["ready", "draining"] = "ready"
    served: tuple[str, ...] = ()  # addons it can answer now (in host memory)
    slots: tuple[str, ...] = ()  # those of them in a device slot: no load before the first step
    last_seen: float = 0.0
    # when it last began a request (wall clock): a deployment is idle only when no gateway sent it one, which every
    # gateway pod reads here
    last_request: float = 0.0
    in_flight: int = 0  # requests it runs now (from whichever gateway)

    def fresh(self, now: float) -> bool:
        return now - self.last_seen <= REGISTRATION_TTL_S
