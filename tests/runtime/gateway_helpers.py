"""A gateway in front of stand-in replicas, for tests of what the gateway itself does (routing, balancing, retries,
rate limits, streaming, disconnects) in milliseconds: each stand-in is a small ASGI app on a loopback port, told per
request what to answer, and registered in a store written as the provider and real replicas write it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ember.provider.domain.accounts import Accounts
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.records import DeploymentRecord, GatewayRecord, ReplicaRegistration
from ember.provider.domain.store_layout import StoreLayout
from ember.runtime.gateway.app import create_gateway_app
from ember.runtime.gateway.config import GatewayConfig
from ember.runtime.serving.connections import connection_protocol
from ember.runtime.serving.limits import Limits


ACCOUNTS = ("acme", "globex", "platform")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """An ASGI app served by uvicorn on a thread, on a loopback port. `stop_all` stops every one still running."""

    running: list["ThreadServer"] = []

    @classmethod
    def stop_all(cls) -> None:
        while cls.running:
            cls.running.pop().stop()

    def __init__(self, app, limits: Limits | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                http=connection_protocol(limits or Limits()))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.running.append(self)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self in self.running:
            self.running.remove(self)


def completion(model: str, total_tokens: int = 12) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "fine", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": total_tokens - 2, "completion_tokens": 2, "total_tokens": total_tokens}}


@dataclass
class Seen:
    """A request as the stand-in replica got it."""

    body: dict
    headers: dict
    aborted: bool = False
    finished: bool = False


@dataclass
class StandIn:
    """A stand-in replica. `answers` says, request by request, how to answer (the last one repeats):
    "ok", "late" (an answer after 30 s, unless the connection closes first), "stream", "slow-stream" (a chunk, then one
    every 0.1 s for a minute), "cut" (a chunk, then the connection breaks), or a status code (503, 429) refused with
    Retry-After."""

    answers: list = field(default_factory=lambda: ["ok"])
    seen: list[Seen] = field(default_factory=list)
    server: ThreadServer | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, port: int | None = None) -> "StandIn":
        self.server = ThreadServer(Starlette(routes=[Route("/v1/completions", self._answer, methods=["POST"]),
                                                     Route("/v1/chat/completions", self._answer, methods=["POST"])]),
                                   port=port)
        return self

    def stop(self) -> None:
        self.server.stop()

    async def _answer(self, request: Request):
        body = json.loads(await request.body())
        seen = Seen(body, dict(request.headers))
        self.seen.append(seen)
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if isinstance(answer, int):
            return JSONResponse({"error": {"message": "not now", "type": "service_unavailable", "param": None,
                                           "code": "overloaded"}}, status_code=answer, headers={"Retry-After": "2"})
        if answer == "late":
            for _ in range(300):  # a non-streamed completion: the replica watches for its client leaving
                if await request.is_disconnected():
                    seen.aborted = True
                    return JSONResponse({}, status_code=499)
                await asyncio.sleep(0.1)
        if answer in ("ok", "late"):
            seen.finished = True
            return JSONResponse(completion(body["model"]))
        return StreamingResponse(self._events(answer, seen, body["model"]), media_type="text/event-stream")

    async def _events(self, answer: str, seen: Seen, model: str):
        try:
            chunks = 600 if answer == "slow-stream" else 3
            for i in range(chunks):
                yield f"data: {json.dumps({'model': model, 'choices': [{'index': 0, 'text': f't{i}'}]})}\n\n"
                if answer == "cut":
                    raise ConnectionAbortedError("the replica died")
                await asyncio.sleep(0.1 if answer == "slow-stream" else 0.01)
            yield f"data: {json.dumps({'choices': [], 'usage': completion(model, 40)['usage']})}\n\n"
            yield "data: [DONE]\n\n"
            seen.finished = True
        except asyncio.CancelledError:
            seen.aborted = True  # the connection closed under the stream: the replica aborts the request
            raise


@dataclass
class FakeStore:
    """A store written as the provider and the replicas write it."""

    root: Path
    keys: dict[str, str] = field(default_factory=dict)  # account → plain key

    def __post_init__(self) -> None:
        for account in ACCOUNTS:  # before the gateway reads the store
            self.key(account)

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(str(self.root))

    def _write(self, path: str, document: dict) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.tmp")
        staged.write_text(json.dumps(document))
        staged.replace(target)

    def key(self, account: str) -> str:
        if account not in self.keys:
            self.keys[account] = Accounts.add_key(self.root / "keys.json", account)
        return self.keys[account]

    def deployment(self, name: str, base_model: str, addons: tuple[str, ...] = (), serverless: bool = False,
                   **record) -> None:
        """`record`: more of its DeploymentRecord (replica range, autoscaling, traffic weight)."""
        _, account, _, deployment = name.split("/")
        self._write(self.layout.deployment_record(account, deployment),
                    DeploymentRecord(name=name, base_model=base_model, serverless=serverless, **record).to_json())
        self._write(self.layout.desired_addons(account, deployment), {a: f"objects/{a}" for a in addons})

    def register(self, deployment: str, replica: StandIn | str, slots: tuple[str, ...] = (),
                 state: str = "ready", last_seen: float | None = None, replica_id: str | None = None) -> None:
        """`replica_id` names its file: the gateway lists a deployment's replicas in that order (its port's, else)."""
        url = replica if isinstance(replica, str) else replica.url
        _, account, _, name = deployment.split("/")
        replica_id = replica_id or url.rsplit(":", 1)[1]
        self._write(self.layout.replica(account, name, replica_id), ReplicaRegistration(
            replica=replica_id, deployment=deployment, url=url, state=state, served=slots, slots=slots,
            last_seen=time.time() if last_seen is None else last_seen).to_json())

    def gateway(self, **settings) -> str:
        spec = GatewaySpec(account_id="platform", gateway_id="front", **settings)
        self._write(self.layout.gateway("platform", "front"),
                    GatewayRecord(name=spec.name, spec=spec.model_dump(mode="json")).to_json())
        return spec.name


@dataclass
class Front:
    """A gateway on a thread, in front of a FakeStore."""

    store: FakeStore
    server: ThreadServer
    app: object

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self):
        return self.app.state.gateway

    def headers(self, account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.store.key(account)}"}


def start_gateway(store: FakeStore, limits: Limits | None = None, refresh_interval_s: float = 0.1,
                  wait: Callable[[object], bool] = lambda state: state.store.directory is not None,
                  scalers: tuple = (), **config) -> Front:
    """`scalers`: what the gateway's autoscaler changes replica counts with (none: it scales nothing)."""
    app = create_gateway_app(GatewayConfig(store_url=store.url, refresh_interval_s=refresh_interval_s,
                                           limits=limits or Limits(), connect_timeout_s=1.0, **config))
    app.state.gateway.autoscaler.scalers.extend(scalers)
    front = Front(store, ThreadServer(app, limits), app)
    deadline = time.monotonic() + 10
    while not wait(front.state):
        assert time.monotonic() < deadline, "the gateway never read its store"
        time.sleep(0.02)
    return front


@pytest.fixture(autouse=True)
def servers():
    """Every gateway and stand-in replica a test starts stops with it (a test module imports this fixture)."""
    yield
    ThreadServer.stop_all()


@pytest.fixture
def store(tmp_path):
    """A store with the platform's Gateway record in it (a test module imports this fixture)."""
    store = FakeStore(tmp_path / "store")
    store.gateway()
    return store


async def concurrent_completions(front: Front, model: str, count: int, account: str = "acme") -> list[httpx.Response]:
    """`count` completions sent at once through the gateway."""
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(
            f"{front.url}/v1/completions", headers=front.headers(account),
            json={"model": model, "prompt": "hello", "max_tokens": 4}) for _ in range(count)))
