"""What one replica holds: its engine (loaded in the background so /health can answer 503 meanwhile), its
API keys, its meter and metrics, and the addon set it reconciles towards; and who may use what."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import fsspec
from fastapi import Request

from ember.provider.domain.accounts import Accounts, Caller, DeploymentAccess, foreign_model_refusal, is_catalog_name
from ember.provider.domain.audit import AuditLog, ExpiredKeyRefusals
from ember.provider.domain.names import PIN, parse_deployment_name, parse_model_name
from ember.provider.domain.records import DeploymentRecord
from ember.provider.domain.replica_spec import DEFAULT_MAX_QUEUE
from ember.provider.domain.spec import ModelKind
from ember.provider.domain.store_layout import StoreLayout
from ember.provider.domain.usage import Meter
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.fetch import local_copy
from ember.runtime.lora.adapters import AdapterError
from ember.runtime.serving.async_engine import AsyncEngine
from ember.runtime.serving.errors import APIError, bearer_key, expired_key, invalid_key
from ember.runtime.serving.limits import Limits
from ember.runtime.serving.metrics import Metrics
from ember.runtime.serving.registration import Registration
from ember.runtime.serving.request_log import RequestLog
from ember.runtime.serving.shutdown import shut_down

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
        self.expired_refusals = ExpiredKeyRefusals(config.store_url, f"at {config.deployment.name}")
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
        self.shutdown_date: date | None = None  # a serverless deployment's, from its record in the store
        self.audit_log = AuditLog(config.store_url) if config.store_url else None  # addon changes (audit.py)
        self._refusals_recorded: dict[str, str] = {}  # what the audit log was last told of the desired set's refusals
        self._audit_lock = threading.Lock()
        self.reload_record()

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
                self.audit_reconcile(self._reconcile(engine), self.own_actor)
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
            self.audit("addon.refused", name, self.own_actor, "refused", self.adapter_failures[name])
            return
        try:
            if engine.lora:
                engine.lora.add(name, source)
                self.audit("addon.loaded", name, self.own_actor)
            self.adapter_failures.pop(name, None)
        except AdapterError as exc:
            self.adapter_failures[name] = str(exc)
            log.warning("addon %s refused: %s", name, exc)
            self.audit("addon.refused", name, self.own_actor, "refused", str(exc))

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

    async def reconcile(self, actor: str) -> dict:
        """Serve the store's desired addon set now. `actor`: who asked (an API key's name, or `own_actor` for the
        replica's timer), for the audit log."""
        if not self.config.desired_addons_url:
            raise APIError(400, "this replica was started without a desired-addons URL to reconcile from")
        result = await self.ready().call(self._reconcile)
        await asyncio.to_thread(self.audit_reconcile, result, actor)  # a store write: not on the engine thread
        return result

    # -- audit ---------------------------------------------------------------------------------------------

    @property
    def own_actor(self) -> str:
        """Who a replica's own reconcile (at start, on its timer) is in the audit log."""
        return f"replica:{self.config.deployment.name}"

    def audit(self, action: str, addon: str, actor: str, result: str = "ok", why: str | None = None) -> None:
        """One audit record of an addon change on this deployment, filed under the deployment's account (whose
        deployment changed); each replica writes its own. None without a store; never raises. A store write: called
        off the engine thread."""
        if self.audit_log is None:
            return
        detail = f"on {self.config.deployment.name}" + (f": {why}" if why else "")
        self.audit_log.record(account=self.config.deployment.account_id, actor=actor, action=action, target=addon,
                              result=result, detail=detail)

    def audit_refusal(self, addon: str, actor: str, why: str) -> None:
        """An admin load refused. Only a well-formed model name is recorded: anything else is a request's text."""
        try:
            parse_model_name(addon)
        except ValueError:
            return
        self.audit("addon.refused", addon, actor, "refused", why)

    def audit_reconcile(self, result: dict, actor: str) -> None:
        """The records of one reconcile: each addon it loaded or removed, and each refusal not recorded yet (a refused
        addon stays in the desired set and is judged again on every tick: recorded once, and again if its reason
        changes)."""
        with self._audit_lock:
            for name in result.get("loaded", []):
                self.audit("addon.loaded", name, actor)
            for name in result.get("removed", []):
                self.audit("addon.unloaded", name, actor)
            failed = result.get("failed", {})
            for name, why in failed.items():
                if self._refusals_recorded.get(name) != why:
                    self.audit("addon.refused", name, actor, "refused", why)
            self._refusals_recorded = dict(failed)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def reload_record(self) -> None:
        """Re-read a serverless deployment's shutdown date from its record in the store (at start and on each
        heartbeat: the platform may set or move it while the replica runs). A record not written yet (Kubernetes
        starts the pods before it registers the deployment) or a store that does not answer leaves the date in
        force as it was."""
        access = self.config.deployment
        if not (access.serverless and self.config.store_url):
            return  # dedicated deployments have no shutdown date: their owner chose the model
        name = parse_deployment_name(access.name)
        url = StoreLayout(self.config.store_url).deployment_record(name.account_id, name.resource_id)
        try:
            with fsspec.open(url, "r") as f:
                record = DeploymentRecord.model_validate(json.load(f))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("could not read the deployment record: %s", type(exc).__name__)
            return
        if record.shutdown_date != self.shutdown_date:
            log.info("serverless shutdown date: %s", record.shutdown_date)
        self.shutdown_date = record.shutdown_date

    def refuse_if_shut_down(self) -> None:
        """A 410 for every inference request once the base model's serverless shutdown date has come (its addons
        ride on it, so they go with it)."""
        refusal = shut_down(self.config.deployment.base_model, self.shutdown_date)
        if refusal is not None:
            raise refusal

    # -- access --------------------------------------------------------------------------------------------

    async def caller(self, request: Request) -> Caller:
        """Who the request's key says it is; 401 for no key, an unknown or revoked one, or an expired one."""
        key = bearer_key(request)
        caller = self.accounts.authenticate(key)
        if caller is None and key and await asyncio.to_thread(self.reload_keys):
            # a key made since the last reload (a new tenant of a serverless deployment) works at once; the keys
            # file is looked at on a worker thread (a stat, or an object store's HEAD), never on the event loop
            caller = self.accounts.authenticate(key)
        if caller is None:
            raise invalid_key()
        if caller.expired():
            if write := self.expired_refusals.first(caller.account, caller.key_id):
                threading.Thread(target=write, daemon=True, name="ember-audit").start()
            raise expired_key()
        return caller

    async def account(self, request: Request) -> str:
        """The caller's account, which may use this deployment (any key role may call the OpenAI routes)."""
        account = (await self.caller(request)).account
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

    async def owner(self, request: Request) -> Caller:
        """The caller of an admin route: an `admin` key of the deployment's own account."""
        caller = await self.caller(request)
        if caller.account != self.config.deployment.account_id:
            raise APIError(403, f"only account {self.config.deployment.account_id!r} administers this deployment",
                           type="permission_error", code="forbidden")
        if not caller.admin:
            raise APIError(403, f"this key's role is {caller.role!r}: the admin routes need a key of role 'admin'",
                           type="permission_error", code="forbidden")
        return caller

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
