"""One request forwarded to a replica, and its response passed back as it comes.

The request goes to the replica the balancer picks among the route's deployments (the preferred deployment first).
A replica that refuses the connection, closes it without a response (it was killed, or is draining), or answers 503 or
429 before any byte of its response reached the client is left for the next one, up to the gateway's `max_attempts`;
the response says how many were made (`x-ember-attempts`). Nothing is tried again once a byte was sent.

The response is passed through unbuffered: a stream's chunks as the replica sends them. When the client leaves, the
connection to the replica is closed, which the replica takes as an abort (and meters once, as aborted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from starlette.responses import Response

from ember.runtime.gateway.balancer import Balancer
from ember.runtime.gateway.bodies import PARSE_ON_THE_LOOP_BYTES
from ember.runtime.gateway.directory import Deployment, Replica
from ember.runtime.gateway.metrics import GatewayMetrics
from ember.runtime.gateway.routing import Route
from ember.runtime.serving.errors import APIError

log = logging.getLogger("ember.gateway")

ATTEMPTS_HEADER = "x-ember-attempts"
DEPLOYMENT_HEADER = "x-ember-deployment"
# A replica's "not now": its queue is full (429), or it is loading or at its connection cap (503). Another may have
# room.
RETRYABLE_STATUSES = frozenset({429, 503})
# The connection failed before a response began: nothing of the request ran to an answer, so another replica may take
# it.
RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError)
# Headers of one connection, not of the request or response they carry (RFC 9110 §7.6.1), and those httpx sets itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
# What the gateway's server sets on every response itself, besides the connection's own.
OWN_RESPONSE_HEADERS = (HOP_BY_HOP - {"content-length"}) | {"date", "server"}
USAGE_TAIL_BYTES = 8192  # a stream's usage chunk is in its last few hundred bytes
# A whole (non-streamed) response is read for its usage up to the size a body is parsed on the event loop at (a larger
# one keeps the estimate).
MAX_SETTLED_BODY = PARSE_ON_THE_LOOP_BYTES


class ClientGone(Exception):
    """The client closed its connection before the response began."""


async def until_disconnected(receive) -> None:
    """Returns when the client has gone (the request's body was read already: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class Upstream:
    """A response head from a replica, its body still to come."""

    response: httpx.Response
    replica: Replica
    deployment: Deployment
    attempts: int


@dataclass
class Forwarder:
    client: httpx.AsyncClient
    balancer: Balancer
    metrics: GatewayMetrics

    async def send(self, route: Route, path: str, body: bytes, headers: dict[str, str], affinity: bytes | None,
                   max_attempts: int, receive) -> Upstream:
        """The first response head a replica of the route gives that is not a refusal; raises APIError (503, or the
        last replica's own refusal) when none does within `max_attempts`, ClientGone when the client leaves first."""
        tried: set[str] = set()
        refusal: httpx.Response | None = None
        attempts = 0
        while attempts < max_attempts:
            picked = self._pick(route, affinity, frozenset(tried))
            if picked is None:
                break
            replica, deployment = picked
            tried.add(replica.url)
            attempts += 1
            self.balancer.take(replica)
            self.metrics.outstanding.labels(deployment.name).inc()
            sent_at = time.perf_counter()
            try:
                response = await self._send_unless_gone(replica, path, body, headers, receive)
            except httpx.PoolTimeout:  # the gateway's own limit, not the replica's fault
                self._release(replica, deployment)
                raise APIError(503, "the gateway has no connection to spare; retry shortly", type="service_unavailable",
                               code="overloaded", headers={"Retry-After": "1"}) from None
            except RETRYABLE_ERRORS as exc:
                self._release(replica, deployment)
                self.balancer.down(replica)
                self.metrics.retries.labels(deployment.name, type(exc).__name__).inc()
                log.warning("replica %s of %s: %s; trying another", replica.url, deployment.name, type(exc).__name__)
                continue
            except BaseException:
                self._release(replica, deployment)
                raise
            self.metrics.upstream_latency.labels(deployment.name).observe(time.perf_counter() - sent_at)
            if response.status_code in RETRYABLE_STATUSES and attempts < max_attempts:
                refusal = await self._keep_refusal(response)
                self._release(replica, deployment)
                self.metrics.retries.labels(deployment.name, str(response.status_code)).inc()
                continue
            return Upstream(response, replica, deployment, attempts)
        if refusal is not None:  # every replica there was said "not now": the last one's answer, as it gave it
            raise _refusal_error(refusal, attempts)
        names = ", ".join(d.name for d in route.deployments)
        log.warning("no ready replica of %s after %d attempts (%d registered)", names, attempts,
                    sum(len(d.replicas) for d in route.deployments))
        raise APIError(503, f"no replica of {names} is ready for {route.model!r}; retry shortly",
                       type="service_unavailable", code="no_ready_replica",
                       headers={"Retry-After": "5" if not attempts else "1", ATTEMPTS_HEADER: str(attempts)})

    def _pick(self, route: Route, affinity: bytes | None, tried: frozenset[str]) -> tuple[Replica, Deployment] | None:
        # An addon goes to the replicas that say they serve it while any does: a deployment it was just attached to
        # is routed it (its desired set names it) a moment before its replicas have loaded it, and they would
        # answer 404 meanwhile. Only when none says so is any replica tried (the registrations may lag).
        passes = [lambda r: route.addon in r.served, lambda r: True] if route.addon else [lambda r: True]
        for serves in passes:
            for deployment in route.deployments:
                replicas = [r for r in deployment.replicas if serves(r)]
                replica = self.balancer.pick(replicas, route.addon, affinity, tried)
                if replica is not None:
                    return replica, deployment
        return None

    def release(self, upstream: Upstream) -> None:
        self._release(upstream.replica, upstream.deployment)

    def _release(self, replica: Replica, deployment: Deployment) -> None:
        self.balancer.release(replica)
        self.metrics.outstanding.labels(deployment.name).dec()

    async def _send_unless_gone(self, replica: Replica, path: str, body: bytes, headers: dict[str, str],
                                receive) -> httpx.Response:
        request = self.client.build_request("POST", f"{replica.url}{path}", content=body, headers=headers)
        sending = asyncio.ensure_future(self.client.send(request, stream=True))
        watching = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()  # the response reads the client's disconnect itself from here on
        if not sending.done():
            sending.cancel()  # closes the connection: the replica aborts the request
            raise ClientGone()
        return sending.result()

    @staticmethod
    async def _keep_refusal(response: httpx.Response) -> httpx.Response:
        try:
            await response.aread()  # a refusal's body is a line of JSON
        finally:
            await response.aclose()
        return response


def _refusal_error(response: httpx.Response, attempts: int) -> APIError:
    try:
        error = response.json()["error"]
        message, kind, code = str(error["message"]), str(error["type"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, kind, code = f"the replica answered {response.status_code}", "service_unavailable", None
    return APIError(response.status_code, message, type=kind, code=code,
                    headers={"Retry-After": response.headers.get("retry-after", "1"), ATTEMPTS_HEADER: str(attempts)})


def request_headers(headers) -> dict[str, str]:
    """The client's headers as a replica gets them: its key too (the replica checks it again)."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def usage_tokens(body: bytes) -> int | None:
    """total_tokens of the usage in a JSON response, or in the last SSE event that has one."""
    candidates = [body] if body.lstrip().startswith(b"{") else [
        event.removeprefix(b"data: ") for event in reversed(body.split(b"\n\n")) if b'"usage"' in event]
    for candidate in candidates:
        try:
            usage = json.loads(candidate).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            return usage["total_tokens"]
    return None


class PassThrough(Response):
    """The replica's response as it comes: its status and headers (with the gateway's), then each chunk of its body as
    soon as it arrives. `done(status, kept, complete)` runs at the end with the body's last bytes (a stream's) or all of
    it (a whole one, up to MAX_SETTLED_BODY), and whether the client got all of it."""

    def __init__(self, upstream: Upstream, extra_headers: dict[str, str],
                 done: Callable[[int, bytes, bool], None]):
        self.upstream, self.done = upstream, done
        self.status_code = upstream.response.status_code
        headers = [(k.encode(), v.encode()) for k, v in upstream.response.headers.multi_items()
                   if k.lower() not in OWN_RESPONSE_HEADERS]
        self.raw_headers = headers + [(k.lower().encode(), v.encode()) for k, v in extra_headers.items()]
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        response = self.upstream.response
        streamed = "text/event-stream" in response.headers.get("content-type", "")
        kept, complete = bytearray(), False

        async def relay() -> None:
            nonlocal complete
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if streamed:
                    kept.extend(chunk[-USAGE_TAIL_BYTES:])
                    del kept[:-USAGE_TAIL_BYTES]
                elif len(kept) + len(chunk) <= MAX_SETTLED_BODY:
                    kept.extend(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        relaying = asyncio.ensure_future(relay())
        watching = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
            if relaying.done():
                relaying.result()
        except RETRYABLE_ERRORS + (httpx.ReadTimeout,) as exc:
            # The replica went away mid-response: nothing can be tried again now. The client's response ends without
            # its last chunk, so the client sees the cut (uvicorn closes a connection whose response is unfinished).
            log.warning("replica %s went away mid-response: %s", self.upstream.replica.url, type(exc).__name__)
        finally:
            watching.cancel()
            relaying.cancel()  # when the client left first: closing the replica's response below aborts it there
            await response.aclose()
            self.done(self.status_code, bytes(kept), complete)
