"""A runtime replica's HTTP server: the OpenAI API for one deployment (a base model and its addons), its
owner's admin routes and /metrics, and an unauthenticated /health that says only whether it is ready.

No prompt or output text reaches any log, usage record, metric or error; only a deployment that opted in
writes it, to its own request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ember.provider.domain.accounts import KEYS_REFRESH_S
from ember.provider.domain.records import REGISTRATION_INTERVAL_S
from ember.runtime.serving import admin_routes, openai_routes
from ember.runtime.serving.errors import APIError
from ember.runtime.serving.frame import api_app
from ember.runtime.serving.replica import Replica, ServerConfig

log = logging.getLogger("ember.server")


async def _background(replica: Replica) -> None:
    """Heartbeats for GPU-second billing, deployment record reloads, and reconciling the addon set with the store."""
    config = replica.config
    last_reconcile = time.monotonic()
    while True:
        await asyncio.sleep(min(config.heartbeat_interval_s, config.reconcile_interval_s))
        await asyncio.to_thread(replica.meter.heartbeat)
        await asyncio.to_thread(replica.reload_record)  # a serverless model's shutdown date, set or moved meanwhile
        if replica.engine and config.desired_addons_url and time.monotonic() - last_reconcile >= config.reconcile_interval_s:
            last_reconcile = time.monotonic()
            try:
                await replica.reconcile(replica.own_actor)
            except Exception as exc:  # a store hiccup must not stop the replica
                log.warning("reconcile failed: %s", type(exc).__name__)


async def _watch_keys(replica: Replica) -> None:
    """Revoked keys stop working, and new ones start, within KEYS_REFRESH_S (a stat each time; a read when changed)."""
    while True:
        await asyncio.sleep(KEYS_REFRESH_S)
        await asyncio.to_thread(replica.reload_keys)


async def _announce(replica: Replica) -> None:
    """Keep this replica's registration in the store fresh (the gateway routes by it)."""
    registration = replica.registration
    try:
        await asyncio.to_thread(registration.sweep)
    except Exception as exc:  # the dead ones' entries wait for the next replica; this one registers regardless
        log.warning("sweeping stale registrations failed: %s", type(exc).__name__)
    while replica.engine is None:  # the load registers it first, before it is ready
        await asyncio.sleep(REGISTRATION_INTERVAL_S)
    while not replica.draining:
        await asyncio.sleep(REGISTRATION_INTERVAL_S)
        await asyncio.to_thread(replica.announce, replica.engine.engine)


def create_app(config: ServerConfig) -> FastAPI:
    replica = Replica(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=replica.load, name="ember-load", daemon=True).start()
        tasks = [asyncio.create_task(_background(replica)), asyncio.create_task(_watch_keys(replica))]
        if replica.registration:
            tasks.append(asyncio.create_task(_announce(replica)))
        yield
        for task in tasks:
            task.cancel()
        if replica.registration:
            await asyncio.to_thread(replica.registration.remove)
        if replica.engine:
            replica.engine.stop()
        replica.meter.heartbeat()

    app = api_app("Ember runtime", lifespan, config.limits, _api_error)
    app.state.replica = replica
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    # refused requests count too (by status; a refused request may name no model it is allowed to see)
    request.app.state.replica.metrics.requests.labels("", str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _health(request: Request) -> JSONResponse:
    # Unauthenticated (probes and balancers ask it): whether the replica is ready, and nothing that names a tenant,
    # an addon or a file. Why a load failed is in the replica's log; what it serves is the owner's (/admin/adapters).
    replica: Replica = request.app.state.replica
    if replica.engine is None:
        return JSONResponse({"status": "failed" if replica.failure else "loading"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def _metrics(request: Request) -> Response:
    # The deployment operator's: its per-addon series name every tenant's addons on a serverless deployment.
    replica: Replica = request.app.state.replica
    await replica.owner(request)
    if replica.engine:
        replica.metrics.queue_depth.set(replica.engine.queue_depth)
        replica.metrics.running.set(replica.engine.running)
        engine = replica.engine.engine
        allocator = engine.cache.allocator
        replica.metrics.kv_cache_usage.set(1 - allocator.num_free / allocator.num_blocks)
        replica.metrics.preemptions.set(engine.scheduler.num_preemptions)
        replica.metrics.prefix_cache_hits.set(engine.scheduler.prefix_hit_tokens)
    return Response(generate_latest(replica.metrics.registry), media_type=CONTENT_TYPE_LATEST)
