"""The gateway's HTTP server: one endpoint in front of every deployment of a store.

request → auth (the store's hashed keys) → body (bounded; its JSON read, not judged) → the account's rate limits →
route (by `model`: deployments the account may use) → a replica (balanced, retried while nothing was sent) → the
replica's response, passed through as it comes → metrics, and the account's tokens settled at the response's usage.

What it knows of the store is a snapshot read on a worker thread every `refresh_interval_s`, and again when a request
names a key, a model or a deployment the snapshot lacks (snapshots.py): a deployment just created answers at once. No
prompt, completion or key reaches its logs or metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from ember.provider.domain.accounts import Caller
from ember.provider.domain.audit import AuditLog, ExpiredKeyRefusals
from ember.runtime.gateway.autoscaler import Autoscaler, scale_forever
from ember.runtime.gateway.balancer import Balancer, affinity_key
from ember.runtime.gateway.bodies import parse_json_object
from ember.runtime.gateway.config import GatewayConfig
from ember.runtime.gateway.directory import HAND_RUN, Deployment, Directory
from ember.runtime.gateway.kubernetes_scaler import kubernetes_scalers
from ember.runtime.gateway.metrics import GatewayMetrics
from ember.runtime.gateway.proxy import (ATTEMPTS_HEADER, DEPLOYMENT_HEADER, ClientGone, Forwarder, PassThrough,
                                         Upstream, request_headers, usage_tokens)
from ember.runtime.gateway.rate_limits import Admission, RateLimiter, estimate_tokens
from ember.runtime.gateway.routing import Route, models, route
from ember.runtime.gateway.scalers import LocalScaler, Scaler
from ember.runtime.gateway.snapshots import Snapshots
from ember.runtime.serving.errors import APIError, bearer_key, expired_key, invalid_key
from ember.runtime.serving.frame import api_app

log = logging.getLogger("ember.gateway")


class GatewayState:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.balancer = Balancer()
        self.limiter = RateLimiter()
        self.store = Snapshots(config, self._read)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.upstream_timeout_s, connect=config.connect_timeout_s,
                                  pool=config.connect_timeout_s),
            # every client connection may hold a replica connection while its request runs
            limits=httpx.Limits(max_connections=config.limits.max_connections,
                                max_keepalive_connections=config.limits.max_connections))
        self.forwarder = Forwarder(self.client, self.balancer, self.metrics)
        self.autoscaler = Autoscaler(scalers_for(config), self._load, self._scaled, self._audit_scaled)
        self._tasks: set[asyncio.Task] = set()
        self.expired_refusals = ExpiredKeyRefusals(config.store_url, "at the gateway")

    def _load(self, deployment: Deployment) -> int:
        return sum(self.balancer.outstanding(r) for r in deployment.replicas)

    def _scaled(self, deployment: str, before: int, after: int) -> None:
        self.metrics.scaled.labels(deployment, "up" if after > before else "down").inc()

    def _audit_scaled(self, deployment: Deployment, before: int, after: int, result: str) -> None:
        """A scale change in the audit log, by this gateway's autoscaler (named as the gateway whose settings it
        runs by: its own, or the store's one gateway's when run by hand)."""
        directory = self.store.directory
        gateway = self.config.gateway or (directory.settings if directory else HAND_RUN).name
        AuditLog(self.config.store_url).record(
            account=deployment.access.account_id, actor=f"autoscaler:{gateway}", action="deployment.scaled",
            target=deployment.name, result=result, detail=f"{before} -> {after} replicas")

    def _read(self, directory: Directory) -> None:
        self.limiter.share = directory.settings.replicas
        self.balancer.forget({r.url for d in directory.deployments.values() for r in d.replicas})

    async def caller(self, request: Request, arrived: float) -> Caller:
        key = bearer_key(request)
        caller = self.store.current().accounts.authenticate(key)
        if caller is None and key:  # a key made since the last read (a new tenant) works at once
            caller = (await self.store.since(arrived)).accounts.authenticate(key)
        if caller is None:
            raise invalid_key()
        if caller.expired():
            if write := self.expired_refusals.first(caller.account, caller.key_id):
                self._background(asyncio.to_thread(write))
            raise expired_key()
        return caller

    async def account(self, request: Request, arrived: float) -> str:
        return (await self.caller(request, arrived)).account

    async def route(self, account: str, model: object, arrived: float, stale: bool = False) -> Route:
        """`stale`: the current snapshot failed this request (its replicas were gone): read one begun after `arrived`."""
        draw = random.random()  # the same split for every read of this request
        try:
            found = route(await self.store.since(arrived) if stale else self.store.current(), account, model, draw)
        except APIError as exc:
            if exc.status != 404:
                raise
            found = route(await self.store.since(arrived), account, model, draw)  # a deployment made a moment ago
        if not any(d.replicas for d in found.deployments):
            found = route(await self.store.since(arrived), account, model, draw)  # replicas ready a moment ago
        asleep = [d for d in found.deployments if not d.replicas and self.autoscaler.wakeable(d)]
        if asleep and not any(d.replicas for d in found.deployments):
            found = await self._cold_start(asleep[0], account, model, draw)
        elif asleep and not asleep[0].access.serverless:
            # The caller's own deployment is at zero while another (a shared one) answers: this request goes there,
            # and its own is started for the next ones (it pays for it to answer them).
            self._background(self.autoscaler.wake(asleep[0]))
        return found

    def _background(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # kept until done (the loop holds only a weak reference)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.warning("could not start a replica: %s", t.exception()))

    async def _cold_start(self, deployment: Deployment, account: str, model: object, draw: float) -> Route:
        """Hold the request while a replica of `deployment` (scaled to zero) starts: the route once one is ready, or a
        503 when the queue of held requests is full or none is ready in time."""
        config, held = self.config, self.autoscaler.held
        if held[deployment.name] >= config.max_held_requests:
            # (how many wait is not said: on a shared deployment they are other accounts' requests)
            raise APIError(503, f"{deployment.name} is starting and has as many requests waiting as it holds; retry "
                                f"shortly", type="service_unavailable", code="cold_start_queue_full",
                           headers={"Retry-After": "5"})
        held[deployment.name] += 1
        self.metrics.held.labels(deployment.name).inc()
        deadline = time.monotonic() + config.cold_start_timeout_s
        try:
            try:
                await self.autoscaler.wake(deployment)
            except Exception as exc:  # the cluster refused (its API's words name it: they go to the log, not the caller)
                log.warning("could not start a replica of %s: %s", deployment.name, exc)
                raise APIError(503, f"could not start a replica of {deployment.name}; retry shortly",
                               type="service_unavailable", code="cold_start_failed",
                               headers={"Retry-After": "5"}) from None
            while time.monotonic() < deadline:
                found = route(await self.store.since(time.monotonic()), account, model, draw)
                if any(d.replicas for d in found.deployments):
                    return found
        finally:
            held[deployment.name] -= 1
            self.metrics.held.labels(deployment.name).dec()
        raise APIError(503, f"no replica of {deployment.name} was ready within {config.cold_start_timeout_s:.0f} s of "
                            f"starting; retry shortly", type="service_unavailable", code="cold_start_timeout",
                       headers={"Retry-After": "5"})


    def deployments(self) -> list[Deployment]:
        return list(self.store.directory.deployments.values()) if self.store.directory else []


def scalers_for(config: GatewayConfig) -> list[Scaler]:
    """The clusters whose replicas this gateway scales: the local one it runs beside, Kubernetes from inside it."""
    scalers: list[Scaler] = [LocalScaler(config.state_dir)] if config.state_dir else []
    return scalers + kubernetes_scalers()


def gateway_of(request: Request) -> GatewayState:
    return request.app.state.gateway


async def _refresh_forever(gateway: GatewayState) -> None:
    while True:
        await gateway.store.refresh()
        await asyncio.sleep(gateway.config.refresh_interval_s)


def create_gateway_app(config: GatewayConfig) -> FastAPI:
    gateway = GatewayState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(_refresh_forever(gateway)),
                 asyncio.create_task(scale_forever(gateway.autoscaler, gateway.deployments))]
        yield
        for task in tasks:
            task.cancel()
        await gateway.client.aclose()

    app = api_app("Ember gateway", lifespan, config.limits, _api_error)
    app.state.gateway = gateway
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", _model, methods=["GET"])
    app.add_api_route("/v1/completions", _completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", _chat_completions, methods=["POST"])
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    model, deployment = getattr(request.state, "labels", ("", ""))
    gateway_of(request).metrics.requests.labels(model, deployment, str(exc.status)).inc()
    headers = getattr(request.state, "headers", {}) | exc.headers
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _health(request: Request) -> JSONResponse:
    # Unauthenticated (probes and balancers ask it): whether it can route, and why not, naming no tenant.
    gateway = gateway_of(request)
    store = gateway.store
    if store.directory is None or time.monotonic() - store.directory.read_at > gateway.config.stale_after_s:
        reason = store.failure or "has not read the store yet"
        return JSONResponse({"status": "failing", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready"} | ({"store": "the last read failed"} if store.failure else {}))


async def _metrics(request: Request) -> Response:
    # The platform team's (the Gateway's account): its series name every tenant's addons and every account it limited.
    gateway = gateway_of(request)
    caller = await gateway.caller(request, time.monotonic())
    if caller.account != gateway.store.current().owner or not caller.admin:
        raise APIError(403, "only an admin key of the gateway's own account reads its metrics",
                       type="permission_error", code="forbidden")
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _models(request: Request) -> dict:
    # A list has no miss to notice: it is read from a snapshot begun after the request came (a model deployed a moment
    # ago is in it, as a request for it would find it).
    gateway, arrived = gateway_of(request), time.monotonic()
    account = await gateway.account(request, arrived)
    return {"object": "list", "data": list(models(await gateway.store.since(arrived), account).values())}


async def _model(model: str, request: Request) -> dict:
    gateway, arrived = gateway_of(request), time.monotonic()
    account = await gateway.account(request, arrived)  # first: an unauthenticated request reads nothing of the store
    listed = models(await gateway.store.since(arrived), account)
    if model not in listed:
        raise APIError(404, f"the model {model!r} does not exist or you do not have access to it",
                       type="not_found_error", param="model", code="model_not_found")
    return listed[model]


async def _completions(request: Request):
    return await _forward(request, chat=False)


async def _chat_completions(request: Request):
    return await _forward(request, chat=True)


async def _forward(request: Request, chat: bool):
    gateway, arrived = gateway_of(request), time.monotonic()
    account = await gateway.account(request, arrived)
    try:
        raw = await request.body()  # bounded in size and time by BodyLimits
    except ClientDisconnect:  # the client left half-way through its body
        raise APIError(499, "the client closed the request", code="client_closed_request") from None
    body = await parse_json_object(raw)
    settings = gateway.store.current().settings
    try:
        admission = gateway.limiter.admit(account, settings.limits_of(account), estimate_tokens(body, chat))
    except APIError:
        gateway.metrics.rate_limited.labels(account).inc()
        raise
    request.state.headers = admission.headers
    found = await gateway.route(account, body.get("model"), arrived)
    request.state.labels = (found.model, found.deployments[0].name)
    affinity = affinity_key(account, found.model, body, chat)

    async def send(to: Route) -> Upstream:
        return await gateway.forwarder.send(to, request.url.path, raw, request_headers(request.headers), affinity,
                                            settings.max_attempts, request.receive)

    try:
        try:
            upstream = await send(found)
        except APIError as exc:
            # Every replica it tried was gone (drained by a replacement, scaled down): those that replaced them were
            # registered before they went, so a read of the store begun now has them, though one begun since the
            # request came may not.
            if exc.code != "no_ready_replica" or exc.headers.get(ATTEMPTS_HEADER, "0") == "0":
                raise
            upstream = await send(await gateway.route(account, body.get("model"), time.monotonic(), stale=True))
            upstream.attempts += int(exc.headers[ATTEMPTS_HEADER])
    except ClientGone:
        raise APIError(499, "the client closed the request", code="client_closed_request") from None
    request.state.labels = (found.model, upstream.deployment.name)
    gateway.autoscaler.requested(upstream.deployment)
    headers = admission.headers | {ATTEMPTS_HEADER: str(upstream.attempts), DEPLOYMENT_HEADER: upstream.deployment.name}
    return PassThrough(upstream, headers, _finish(gateway, found, upstream, admission))


def _finish(gateway: GatewayState, found: Route, upstream: Upstream, admission: Admission):
    def done(status: int, kept: bytes, complete: bool) -> None:
        gateway.forwarder.release(upstream)
        gateway.metrics.requests.labels(found.model, upstream.deployment.name, str(status)).inc()
        used = usage_tokens(kept) if complete and status == 200 else None
        if used is not None:
            gateway.limiter.settle(admission, used)

    return done
