"""Resource IDs and full names: `accounts/<ACCOUNT_ID>/models/<MODEL_ID>` and friends.

Pure string grammar with no pydantic or pulumi, so the runtime can parse a request's `model` field
with exactly the rules the provider validates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ID_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
ID_RULE = "1-63 characters of [a-z0-9-], not starting or ending with '-'"
_ID = re.compile(ID_PATTERN)

MODEL_NAME_PATTERN = r"^accounts/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/models/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DEPLOYMENT_NAME_PATTERN = (
    r"^accounts/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/deployments/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)
DATASET_NAME_PATTERN = r"^accounts/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/datasets/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
GATEWAY_NAME_PATTERN = r"^accounts/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/gateways/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
API_KEY_NAME_PATTERN = r"^accounts/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/apiKeys/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# A request's `model` may pin the deployment that answers it: accounts/<a>/models/<m>#accounts/<a>/deployments/<d>
PIN = "#"

# The Pulumi type token of every Ember resource starts so (Pulumi's dynamic provider, then ember:<Kind>).
EMBER_TYPE_PREFIX = "pulumi-python:dynamic/ember:"


def check_id(value: str, what: str = "ID") -> str:
    """Return `value` if it is a valid account/model/deployment ID, else raise naming it."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{value!r} is not a valid {what}: use {ID_RULE}")
    return value


@dataclass(frozen=True)
class ResourceName:
    """A parsed `accounts/<account_id>/<collection>/<resource_id>` name."""

    account_id: str
    collection: str  # "models", "deployments", "datasets", "fineTuningJobs" or "gateways"
    resource_id: str

    def __str__(self) -> str:
        return f"accounts/{self.account_id}/{self.collection}/{self.resource_id}"

    @classmethod
    def parse(cls, value: str, collection: str) -> "ResourceName":
        example = f"accounts/my-account/{collection}/my-{collection[:-1].lower()}"
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a {collection[:-1]} name like {example!r}")
        parts = value.split("/")
        if len(parts) != 4 or parts[0] != "accounts" or parts[2] != collection:
            raise ValueError(f"{value!r} is not a {collection[:-1]} name like {example!r}")
        check_id(parts[1], "account ID")
        check_id(parts[3], f"{collection[:-1]} ID")
        return cls(parts[1], collection, parts[3])


def model_name(account_id: str, model_id: str) -> str:
    return str(ResourceName(check_id(account_id, "account ID"), "models", check_id(model_id, "model ID")))


def deployment_name(account_id: str, deployment_id: str) -> str:
    return str(
        ResourceName(check_id(account_id, "account ID"), "deployments", check_id(deployment_id, "deployment ID"))
    )


def parse_model_name(value: str) -> ResourceName:
    return ResourceName.parse(value, "models")


def parse_deployment_name(value: str) -> ResourceName:
    return ResourceName.parse(value, "deployments")


def dataset_name(account_id: str, dataset_id: str) -> str:
    return str(ResourceName(check_id(account_id, "account ID"), "datasets", check_id(dataset_id, "dataset ID")))


def parse_dataset_name(value: str) -> ResourceName:
    return ResourceName.parse(value, "datasets")


def fine_tuning_job_name(account_id: str, job_id: str) -> str:
    return str(ResourceName(check_id(account_id, "account ID"), "fineTuningJobs", check_id(job_id, "job ID")))


def parse_fine_tuning_job_name(value: str) -> ResourceName:
    return ResourceName.parse(value, "fineTuningJobs")


def gateway_name(account_id: str, gateway_id: str) -> str:
    return str(ResourceName(check_id(account_id, "account ID"), "gateways", check_id(gateway_id, "gateway ID")))


def parse_gateway_name(value: str) -> ResourceName:
    return ResourceName.parse(value, "gateways")


def api_key_name(account_id: str, key_id: str) -> str:
    return str(ResourceName(check_id(account_id, "account ID"), "apiKeys", check_id(key_id, "key ID")))


def parse_api_key_name(value: str) -> ResourceName:
    return ResourceName.parse(value, "apiKeys")


def owner_stack(owner: object) -> str | None:
    """organization/project/stack of a resource's owner (organization/project/stack/resource name, as the program
    passes it along; the resource's own name may hold a "/")."""
    parts = owner.split("/", 3) if isinstance(owner, str) else []
    return "/".join(parts[:3]) if len(parts) == 4 else None


def split_pinned(model: str) -> tuple[str, str | None]:
    """A request's `model` as (model name, the deployment it pins or None): `accounts/a/models/m` or
    `accounts/a/models/m#accounts/a/deployments/d`. Each part is checked as a name; raises ValueError naming it."""
    name, pin, deployment = model.partition(PIN)
    parse_model_name(name)
    if not pin:
        return name, None
    parse_deployment_name(deployment)
    return name, deployment
