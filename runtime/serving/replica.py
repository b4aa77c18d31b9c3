"""What one replica holds: its engine (loaded in the background so /health can answer 503 meanwhile), its
API keys, its meter and metrics, and the addon set it reconciles towards; and who may use what."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fastapi import Request

from ember.provider.domain.accounts import Accounts, DeploymentAccess, foreign_model_refusal, is_catalog_name
from ember.provider.domain.names import PIN, parse_model_name
from ember.provider.domain.replica_spec import DEFAULT_MAX_QUEUE
from ember.provider.domain.spec import ModelKind
from ember.provider.domain.store_layout import StoreLayout
from ember.provider.domain.usage import Meter
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.fetch import local_copy
from ember.runtime.lora.adapters import AdapterError
from ember.runtime.serving.async_engine import AsyncEngine
from ember.runtime.serving.errors import APIError, bearer_key, invalid_key
from ember.runtime.serving.limits import Limits
from ember.runtime.serving.metrics import Metrics
from ember.runtime.serving.registration import Registration
from ember.runtime.serving.request_log import RequestLog

log = logging.getLogger("ember.server")
# After a tensor-parallel rank dies, how long the replica's orderly stop may take before the process just exits.
RANK_FAILURE_EXIT_S = 10.0


@dataclass
class ServerConfig:
    model_dir: str
    deployment: DeploymentAccess
    keys_url: str
    usage_url: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_queue: int = DEFAULT_MAX_QUEUE
    limits: Limits = field(default_factory=Limits)  # what one client may take: body size, timeouts, connections
    addons: dict[str, str] = field(default_factory=dict)  # served from the start: name → source
    desired_addons_url: str | None = None  # a JSON {name: source} in the store; reconciled on a timer and on demand
    store_url: str | None = None  # the store's root: the admin API finds addons there by model name
    reconcile_interval_s: float = 30.0
    heartbeat_interval_s: float = 30.0
    request_log_url: str | None = None  # opt-in request logging
    retention_days: int | None = None
    accelerator_type: str = "CPU"
    accelerator_count: int = 1
    advertise_url: str | None = None  # where the gateway reaches it: it registers in the store (with store_url)


def process_age_s() -> float:
    """Seconds since this process started (its interpreter and imports included), from the kernel's clock."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class Replica:
    def __init__(self, config: ServerConfig):
        self.config = config
        self._keys_fs, self._keys_path = fsspec.core.url_to_fs(str(config.keys_url))
        self._keys_version = self._keys_file_version()
        self.accounts = Accounts.load(config.keys_url)
        self.meter = Meter(config.usage_url, config.deployment.name, config.accelerator_type, config.accelerator_count,
                           config.deployment.base_model, config.deployment.serverless)
        self.metrics = Metrics()
        self.request_log = RequestLog(config.request_log_url, config.retention_days) if config.request_log_url else None
        self.engine: AsyncEngine | None = None
        self.failure: str | None = None
        self.adapter_failures: dict[str, str] = {}
        self.started = time.time()
        self.last_request = 0.0  # when it last began one (wall clock), in its registration: what idleness is judged by
        self.draining = False
        self.registration = (Registration(config.store_url, config.deployment.name, self.meter.replica,
                                          config.advertise_url) if config.store_url and config.advertise_url else None)

    def load(self) -> None:
        try:
            began = time.monotonic()
            self._check_base()
            engine = Engine.from_dir(local_copy(self.config.model_dir), self.config.engine)
            if engine.peers is not None:
                engine.peers.on_failure = self.rank_failed
            weights = time.monotonic()
            for name, source in self.config.addons.items():
                self._add_adapter(engine, name, source)
            if self.config.desired_addons_url:
                self._reconcile(engine)
            runner = AsyncEngine(engine, self.config.max_queue)
            if self.registration:  # registered before it says it is ready: a cluster that waits for ready, and
                self.announce(engine)  # then calls the gateway, finds it routed to
            self.engine = runner
            self.count_adapters(engine)
            # what a cold start is made of (bench_changes reads this line)
            age, done = process_age_s(), time.monotonic()
            log.info("ready %.2f s after the process started: start-up %.2f s, weights %.2f s, compiling %.2f s, "
                     "addons %.2f s", age, age - (done - began), weights - began - engine.warm_up_s, engine.warm_up_s,
                     done - weights)
        except Exception as exc:  # reported by /health; the message names files, never request text
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.failure)

    def rank_failed(self, why: str) -> None:
        """Another tensor-parallel rank died: health says failed at once, and the process stops so that its
        cluster starts the replica again (a hard exit if stopping hangs on the broken ranks)."""
        self.failure, self.engine = why, None
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Timer(RANK_FAILURE_EXIT_S, os._exit, (1,)).start()

    def announce(self, engine: Engine) -> None:
        """Write this replica's registration in the store: where it answers, the addons it holds."""
        try:
            self.registration.write(list(engine.served_addons), list(engine.lora.slots) if engine.lora else [],
                                    self.last_request, len(engine.requests))
        except Exception as exc:  # a store hiccup must not stop the replica; the next write comes soon
            log.warning("registration failed: %s", type(exc).__name__)

    def drain(self) -> None:
        """Told to stop (SIGTERM): the gateway is told first, so that it sends nothing new here while the server
        finishes what it runs. Called from the signal handler: the store write runs on a thread of its own."""
        self.draining = True
        if self.registration:
            threading.Thread(target=self._announce_drain, name="ember-drain", daemon=True).start()

    def _announce_drain(self) -> None:
        try:
            self.registration.drain()
        except Exception as exc:  # the registration goes stale instead, and the gateway stops routing here then
            log.warning("could not announce the drain: %s", type(exc).__name__)

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, "the model is loading" if not self.failure else f"the model failed to load: {self.failure}",
                           type="service_unavailable", code="model_loading", headers={"Retry-After": "5"})
        return self.engine

    def _check_base(self) -> None:
        """Defence in depth behind the provider's checks: a deployment serves its own account's base model or a
        catalog one (as the store's manifest says, where this replica has the store)."""
        access = self.config.deployment
        manifest = self._manifest(access.base_model)
        is_catalog = manifest.get("catalog_id") is not None if manifest else is_catalog_name(access.base_model)
        refusal = foreign_model_refusal(access.account_id, access.base_model, is_catalog)
        if refusal:
            raise PermissionError(f"base model: {refusal}")

    def _manifest(self, name: str) -> dict | None:
        """A model's manifest in the store (None without a store, or when it has none)."""
        if not self.config.store_url:
            return None
        model = parse_model_name(name)
        try:
            with fsspec.open(StoreLayout(self.config.store_url).manifest(model.account_id, model.resource_id), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    # -- addons --------------------------------------------------------------------------------------------

    def _add_adapter(self, engine: Engine, name: str, source: str) -> None:
        access = self.config.deployment
        if not access.may_load_addon(name):
            self.adapter_failures[name] = f"a dedicated deployment of account {access.account_id!r} serves only its addons"
            log.warning("addon %s refused: not of the deployment's account", name)
            return
        try:
            engine.lora.add(name, source) if engine.lora else None
            self.adapter_failures.pop(name, None)
        except AdapterError as exc:
            self.adapter_failures[name] = str(exc)
            log.warning("addon %s refused: %s", name, exc)

    def _reconcile(self, engine: Engine) -> dict:
        try:
            with fsspec.open(self.config.desired_addons_url, "r") as f:
                desired = json.load(f)
        except FileNotFoundError:
            # Not written yet: on Kubernetes the pods start before the deployment is registered (it is
            # registered once their rollout completes), and no addon can be attached before that.
            desired = {}
        if engine.lora is None:
            return {"failed": dict.fromkeys(desired, "this deployment serves no addons (max_loras=0)")}
        refused = {}
        for name, source in desired.items():
            try:
                if self.addon_source(name, of_base=False) != source:
                    refused[name] = "its source is not the object the store's manifest names"
            except APIError as exc:
                refused[name] = exc.message
        before = set(engine.served_addons)
        failed = engine.lora.reconcile({n: s for n, s in desired.items() if n not in refused}) | refused
        self.adapter_failures = failed
        for name, why in failed.items():
            log.warning("addon %s refused: %s", name, why)
        after = set(engine.served_addons)
        self.count_adapters(engine)
        return {"loaded": sorted(after - before), "removed": sorted(before - after), "failed": failed,
                "served": sorted(after)}

    def count_adapters(self, engine: Engine) -> None:
        self.metrics.adapters.set(len(engine.served_addons))

    def addon_source(self, name: str, of_base: bool = True) -> str:
        """The store object of an addon this deployment may load, from its manifest: the only way an adapter is
        named (by the admin API or the desired set), so no path or URL a request carries is ever opened. A
        dedicated deployment loads its own account's addons; a serverless one any account's (each answers only
        its owner). Another account's addon is answered as an unknown one. `of_base`: the addon must be of this
        deployment's base, as the admin API asks; the desired set may name one whose base a replacement of
        this deployment just renamed (the provider checked its base when it attached it, and the addon's own
        replacement comes next)."""
        try:
            parse_model_name(name)
        except ValueError as exc:
            raise APIError(400, f"name: {exc}", param="name") from None
        access = self.config.deployment
        if not self.config.store_url:
            raise APIError(400, "this replica was started without --store, so it cannot find addons by name")
        manifest = self._manifest(name) if access.may_load_addon(name) else None
        if manifest is None:
            raise APIError(404, f"name: {name} is not in the store", param="name", code="model_not_found")
        other_base = of_base and manifest.get("base_model") != access.base_model
        if manifest.get("kind") != ModelKind.HF_PEFT_ADDON.value or other_base:
            raise APIError(400, f"name: {name} is not an addon of {access.base_model}", param="name",
                           code="bad_adapter")
        return manifest["object"]

    async def reconcile(self) -> dict:
        if not self.config.desired_addons_url:
            raise APIError(400, "this replica was started without a desired-addons URL to reconcile from")
        return await self.ready().call(self._reconcile)

    # -- access --------------------------------------------------------------------------------------------

    def account(self, request: Request) -> str:
        key = bearer_key(request)
        account = self.accounts.authenticate(key)
        if account is None and key and self.reload_keys():
            # a key made since the last reload (a new tenant of a serverless deployment) works at once
            account = self.accounts.authenticate(key)
        if account is None:
            raise invalid_key()
        if not self.config.deployment.may_use_deployment(account):
            raise APIError(403, f"account {account!r} may not use deployment {self.config.deployment.name!r}",
                           type="permission_error", code="forbidden")
        return account

    def _keys_file_version(self) -> str | None:
        try:
            return self._keys_fs.checksum(self._keys_path)  # from size and mtime / ETag: a stat, not a read
        except OSError:
            return None

    def reload_keys(self) -> bool:
        """Re-read the keys file if it changed (keys added or revoked since); True if it was re-read."""
        version = self._keys_file_version()
        if version == self._keys_version:
            return False
        try:
            self.accounts = Accounts.load(self.config.keys_url)
        except (OSError, ValueError) as exc:  # the keys in force stay so until the store answers again
            log.warning("could not reload API keys: %s", type(exc).__name__)
            return False
        self._keys_version = version
        return True

    def owner(self, request: Request) -> str:
        account = self.account(request)
        if account != self.config.deployment.account_id:
            raise APIError(403, f"only account {self.config.deployment.account_id!r} administers this deployment",
                           type="permission_error", code="forbidden")
        return account

    def served_name(self, model: str) -> str:
        """A request's `model` without the pin of this deployment (`…#accounts/<a>/deployments/<d>`, which the gateway
        routes by); a pin of another deployment is answered as an unknown model."""
        name, pin, deployment = model.partition(PIN)
        if pin and deployment != self.config.deployment.name:
            raise APIError(404, f"model {model!r} is not served by this deployment", type="not_found_error",
                           param="model", code="model_not_found")
        return name

    def resolve_model(self, model: str, account: str, engine: Engine) -> str | None:
        """The adapter a request's `model` names (None for the base model), checked against the account."""
        deployment = self.config.deployment
        if model in (deployment.base_model, deployment.name):
            return None
        if model in engine.served_addons and deployment.may_use_addon(account, model):
            return model
        # another account's addon is answered exactly as an unknown one: no oracle of which names exist
        raise APIError(404, f"model {model!r} is not served by this deployment", type="not_found_error", param="model",
                       code="model_not_found")


def replica_of(request: Request) -> Replica:
    return request.app.state.replica
