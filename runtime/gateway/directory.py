"""What the gateway knows of its store: every deployment with the addons it is meant to serve and its live replicas, the
API keys, and the gateway's own settings. Read whole on a worker thread (`read_directory`) and swapped in at once, so a
request sees one consistent snapshot; nothing in a request's path touches the store."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ember.provider.domain.accounts import Accounts, DeploymentAccess
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.names import parse_deployment_name, parse_gateway_name
from ember.provider.domain.records import DeploymentRecord, GatewayRecord, ReplicaRegistration
from ember.provider.domain.store_layout import StoreLayout
from ember.runtime.serving.errors import APIError
from ember.runtime.serving.shutdown import shut_down

# The settings of a gateway run by hand on a store that declares none: the spec's defaults. Its /metrics then answers
# no one, since no account owns it.
HAND_RUN = GatewaySpec(account_id="unowned", gateway_id="by-hand")


class DirectoryError(RuntimeError):
    """The store could not be read. The message says what (for the gateway's log); `reason` says it in words that name
    nothing in the store, for its unauthenticated /health."""

    def __init__(self, message: str, reason: str = "cannot read the store"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Replica:
    url: str
    served: frozenset[str] = frozenset()
    slots: frozenset[str] = frozenset()
    last_request: float = 0.0  # when it last began a request (wall clock), whichever gateway sent it
    in_flight: int = 0  # requests it ran at its last registration


@dataclass(frozen=True)
class Deployment:
    access: DeploymentAccess  # its name, owner, base model and whether it is serverless
    addons: frozenset[str]  # what the store says it serves besides its base (its desired addon set)
    replicas: tuple[Replica, ...]  # ready, and registered within the TTL
    record: DeploymentRecord | None = None  # its cluster, replica range, autoscaling and traffic weight

    @property
    def last_request(self) -> float:
        """When one of its replicas last began a request (wall clock; 0 when none says)."""
        return max((r.last_request for r in self.replicas), default=0.0)

    @property
    def busy(self) -> bool:
        """Whether a replica said it was running a request (sent by any gateway)."""
        return any(r.in_flight for r in self.replicas)

    @property
    def traffic_weight(self) -> int:
        return self.record.traffic_weight if self.record else DeploymentRecord.model_fields["traffic_weight"].default

    @property
    def name(self) -> str:
        return self.access.name

    def shutdown(self) -> APIError | None:
        """The 410 its replicas answer once a serverless model's shutdown date has come (None before, or for a dedicated
        deployment): answered here instead, so that no replica is woken from zero just to say it."""
        if not self.access.serverless or self.record is None:
            return None
        return shut_down(self.access.base_model, self.record.shutdown_date)

    def usable(self, account: str, model: str) -> bool:
        """Whether `account` may call `model` here: a deployment it may use, and a model of it the account may see."""
        access = self.access
        if not access.may_use_deployment(account):
            return False
        if model == access.base_model:
            return True
        return model in self.addons and access.may_use_addon(account, model)


@dataclass(frozen=True)
class Directory:
    deployments: dict[str, Deployment] = field(default_factory=dict)
    accounts: Accounts = field(default_factory=lambda: Accounts([]))
    settings: GatewaySpec = HAND_RUN
    owner: str | None = None  # the account whose keys read /metrics: the Gateway resource's
    read_at: float = 0.0  # time.monotonic() when the read began (the store was at least this new)


def _documents(fs, pattern: str, parse: Callable[[Any], Any]) -> Iterator[tuple[str, Any]]:
    """(path, document) of each file matching `pattern`; one removed or half-written meanwhile is skipped (a
    registration is renamed into place, so a half-written one is a store's fault, and the next read has it)."""
    for path in fs.glob(pattern):
        try:
            yield path, parse(json.loads(fs.cat_file(path)))
        except (FileNotFoundError, ValueError):
            continue


def _settings(fs, layout: StoreLayout, gateway: str | None) -> tuple[GatewaySpec, str | None]:
    """This gateway's settings: its record's, or the store's one gateway's when run by hand without a name."""
    if gateway:
        name = parse_gateway_name(gateway)
        records = [record for _, record in _documents(fs, layout.gateway(name.account_id, name.resource_id),
                                                       GatewayRecord.model_validate)]
        if not records:
            raise DirectoryError(f"the store has no gateway {gateway}", "the store has no record of this gateway")
    else:
        records = [record for _, record in _documents(fs, layout.gateway("*", "*"), GatewayRecord.model_validate)]
    if not records:
        return HAND_RUN, None
    settings = records[0].settings()
    return settings, settings.account_id


def read_directory(store_url: str, gateway: str | None) -> Directory:
    """The store as the gateway routes by it. Raises DirectoryError when the store cannot be read."""
    try:
        fs, root = fsspec.core.url_to_fs(store_url)
        layout = StoreLayout(root)
        settings, owner = _settings(fs, layout, gateway)
        accounts = Accounts.load(StoreLayout(store_url).keys) if fs.exists(layout.keys) else Accounts([])
        now = time.time()
        live: dict[str, list[Replica]] = {}
        for _, registration in _documents(fs, layout.replica("*", "*", "*"), ReplicaRegistration.model_validate):
            if registration.state == "ready" and registration.fresh(now):
                live.setdefault(registration.deployment, []).append(
                    Replica(registration.url, frozenset(registration.served), frozenset(registration.slots),
                            registration.last_request, registration.in_flight))
        deployments = {}
        for path, record in _documents(fs, layout.deployment_record("*", "*"), DeploymentRecord.model_validate):
            if not record.created:
                continue
            account = parse_deployment_name(record.name).account_id
            addons = _read_addons(fs, path.rsplit("/", 1)[0] + "/addons.json")
            access = DeploymentAccess(record.name, account, record.base_model, record.serverless)
            deployments[record.name] = Deployment(access, frozenset(addons), tuple(live.get(record.name, ())), record)
    except DirectoryError:
        raise
    except (OSError, ValueError) as exc:  # the store's words name paths, never a request's text
        raise DirectoryError(f"cannot read the store: {type(exc).__name__}: {exc}") from None
    return Directory(deployments, accounts, settings, owner)


def _read_addons(fs, path: str) -> dict[str, str]:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}
