"""A runtime replica's HTTP server: the OpenAI API for one deployment (a base model and its addons).

request → auth (API key → account) → access (deployment, addon) → validation → tokenizer → AsyncEngine
→ response (JSON or SSE) → usage record + metrics. No prompt or output text reaches any log, usage record,
metric or error; only a deployment that opted in writes it, to its own request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import fsspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from ember.provider.domain.accounts import Accounts, Deployment
from ember.runtime.lora.adapters import AdapterError
from ember.runtime.serving.async_engine import AsyncEngine, Overloaded
from ember.runtime.engine.engine import Engine, EngineConfig, RequestOutput
from ember.runtime.fetch import local_copy
from ember.provider.domain.usage import Meter
from ember.runtime.serving.metrics import Metrics
from ember.runtime.serving.protocol import AdapterLoadRequest, APIError, ChatRequest, CompletionRequest
from ember.runtime.serving.request_log import RequestLog
from ember.runtime.model.sampling import TokenLogprob

log = logging.getLogger("ember.server")


@dataclass
class ServerConfig:
    model_dir: str
    deployment: Deployment
    keys_url: str
    usage_url: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_queue: int = 64
    addons: dict[str, str] = field(default_factory=dict)  # served from the start: name → source
    desired_addons_url: str | None = None  # a JSON {name: source} in the store; reconciled on a timer and on demand
    reconcile_interval_s: float = 30.0
    heartbeat_interval_s: float = 30.0
    request_log_url: str | None = None  # opt-in request logging
    retention_days: int | None = None
    accelerator_type: str = "CPU"
    accelerator_count: int = 1


class Replica:
    """Everything one server holds; the model loads in the background so /health can say 503 meanwhile."""

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

    def load(self) -> None:
        try:
            engine = Engine.from_dir(local_copy(self.config.model_dir), self.config.engine)
            for name, source in self.config.addons.items():
                self._add_adapter(engine, name, source)
            if self.config.desired_addons_url:
                self._reconcile(engine)
            self.engine = AsyncEngine(engine, self.config.max_queue)
            self._update_adapter_gauge(engine)
        except Exception as exc:  # reported by /health; the message names files, never request text
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.failure)

    def _add_adapter(self, engine: Engine, name: str, source: str) -> None:
        try:
            engine.lora.add(name, source) if engine.lora else None
            self.adapter_failures.pop(name, None)
        except AdapterError as exc:
            self.adapter_failures[name] = str(exc)
            log.warning("addon %s refused: %s", name, exc)

    def _reconcile(self, engine: Engine) -> dict:
        with fsspec.open(self.config.desired_addons_url, "r") as f:
            desired = json.load(f)
        if engine.lora is None:
            return {"failed": dict.fromkeys(desired, "this deployment serves no addons (max_loras=0)")}
        before = set(engine.lora.served)
        failed = engine.lora.reconcile(desired)
        self.adapter_failures = failed
        for name, why in failed.items():
            log.warning("addon %s refused: %s", name, why)
        after = set(engine.lora.served)
        self._update_adapter_gauge(engine)
        return {"loaded": sorted(after - before), "removed": sorted(before - after), "failed": failed,
                "served": sorted(after)}

    def _update_adapter_gauge(self, engine: Engine) -> None:
        self.metrics.adapters.set(len(engine.lora.served) if engine.lora else 0)

    async def reconcile(self) -> dict:
        if not self.config.desired_addons_url:
            raise APIError(400, "this replica was started without a desired-addons URL to reconcile from")
        return await self.ready().call(self._reconcile)

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, "the model is loading" if not self.failure else f"the model failed to load: {self.failure}",
                           type="service_unavailable", code="model_loading", headers={"Retry-After": "5"})
        return self.engine

    # -- access ------------------------------------------------------------------------------------------

    def account(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", type="authentication_error",
                           code="missing_api_key")
        scheme, _, key = header.partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else None
        account = self.accounts.authenticate(key)
        if account is None and key and self.reload_keys():
            # a key made since the last reload (a new tenant of a serverless deployment) works at once
            account = self.accounts.authenticate(key)
        if account is None:
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
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

    def resolve_model(self, model: str, account: str, engine: Engine) -> str | None:
        """The adapter a request's `model` names (None for the base model), checked against the account."""
        deployment = self.config.deployment
        if model in (deployment.base_model, deployment.name):
            return None
        served = engine.lora.served if engine.lora else []
        if model in served:
            if not deployment.may_use_addon(account, model):
                raise APIError(403, f"account {account!r} may not use addon {model!r}", type="permission_error",
                               param="model", code="forbidden")
            return model
        raise APIError(400, f"model {model!r} is not served by this deployment", param="model", code="model_not_found")


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    # pydantic's message, without its echo of the input (which could be prompt text)
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_parameter")


def _documented_body(cls) -> dict:
    """`openapi_extra` declaring a route's JSON body: the routes parse it themselves (for OpenAI-format
    errors), so FastAPI cannot see it; clients and API fuzzers read it from /openapi.json."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


async def _body(request: Request, cls):
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not JSON", code="invalid_json") from None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _token_text(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def create_app(config: ServerConfig) -> FastAPI:
    replica = Replica(config)

    async def background() -> None:
        last_reconcile = time.monotonic()
        while True:
            await asyncio.sleep(min(config.heartbeat_interval_s, config.reconcile_interval_s))
            await asyncio.to_thread(replica.meter.heartbeat)
            await asyncio.to_thread(replica.reload_keys)  # revoked keys stop working, new ones start
            if replica.engine and config.desired_addons_url and time.monotonic() - last_reconcile >= config.reconcile_interval_s:
                last_reconcile = time.monotonic()
                try:
                    await replica.reconcile()
                except Exception as exc:  # a store hiccup must not stop the replica
                    log.warning("reconcile failed: %s", type(exc).__name__)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=replica.load, name="ember-load", daemon=True).start()
        task = asyncio.create_task(background())
        yield
        task.cancel()
        if replica.engine:
            replica.engine.stop()
        replica.meter.heartbeat()

    app = FastAPI(title="Ember runtime", version="0.1.0", lifespan=lifespan)
    app.state.replica = replica

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(404)
    async def not_found(request: Request, exc) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    @app.get("/health")
    async def health() -> JSONResponse:
        if replica.engine is None:
            status = {"status": "failed", "error": replica.failure} if replica.failure else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        engine = replica.engine.engine
        return JSONResponse({
            "status": "ready",
            "deployment": config.deployment.name,
            "base_model": config.deployment.base_model,
            "addons": engine.lora.served if engine.lora else [],
            "failed_addons": replica.adapter_failures,
            "replica": replica.meter.replica,
            "uptime_s": round(time.time() - replica.started, 3),
        })

    @app.get("/metrics")
    async def metrics() -> Response:
        if replica.engine:
            replica.metrics.queue_depth.set(replica.engine.queue_depth)
            replica.metrics.running.set(replica.engine.running)
        return Response(generate_latest(replica.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        account = replica.account(request)
        engine = replica.ready().engine
        created = int(replica.started)
        data = [{"id": config.deployment.base_model, "object": "model", "created": created,
                 "owned_by": config.deployment.base_model.split("/")[1], "parent": None, "kind": "HF_BASE_MODEL"}]
        for name in engine.lora.served if engine.lora else []:
            if config.deployment.may_use_addon(account, name):
                data.append({"id": name, "object": "model", "created": created, "owned_by": name.split("/")[1],
                             "parent": config.deployment.base_model, "kind": "HF_PEFT_ADDON"})
        return {"object": "list", "data": data}

    @app.get("/v1/usage")
    async def usage(request: Request, account: str | None = None) -> dict:
        """The caller's own usage on this deployment: metadata records and their totals, never text."""
        caller = replica.account(request)
        if account not in (None, caller):
            raise APIError(403, f"account {caller!r} may not read the usage of account {account!r}",
                           type="permission_error", param="account", code="forbidden")
        records = await asyncio.to_thread(replica.meter.read, caller)
        totals = {"requests": len(records)} | {
            field: sum(r[field] for r in records) for field in ("prompt_tokens", "completion_tokens")}
        return {"object": "list", "account_id": caller, "deployment": config.deployment.name, "data": records,
                "totals": totals}

    # -- admin -------------------------------------------------------------------------------------------

    @app.get("/admin/adapters")
    async def list_adapters(request: Request) -> dict:
        replica.owner(request)
        engine = replica.ready()
        lora = engine.engine.lora
        return {"served": lora.served if lora else [], "slots": list(lora.slots) if lora else [],
                "failed": replica.adapter_failures}

    @app.post("/admin/adapters", openapi_extra=_documented_body(AdapterLoadRequest))
    async def load_adapter(request: Request) -> dict:
        replica.owner(request)
        body = await _body(request, AdapterLoadRequest)
        name, source = body.name, body.source

        def add(engine: Engine) -> list[str]:
            if engine.lora is None:
                raise APIError(400, "this deployment serves no addons (max_loras=0)")
            try:
                engine.lora.add(name, source)
            except AdapterError as exc:
                raise APIError(400, str(exc), param="source", code="bad_adapter") from None
            replica._update_adapter_gauge(engine)
            return engine.lora.served

        return {"served": await replica.ready().call(add)}

    @app.delete("/admin/adapters/{name:path}")
    async def unload_adapter(name: str, request: Request) -> dict:
        replica.owner(request)

        def remove(engine: Engine) -> list[str]:
            if engine.lora is None or name not in engine.lora.sources:
                raise APIError(404, f"addon {name!r} is not loaded", param="name", code="model_not_found")
            engine.lora.remove(name)
            replica._update_adapter_gauge(engine)
            return engine.lora.served

        return {"served": await replica.ready().call(remove)}

    @app.post("/admin/reconcile")
    async def reconcile(request: Request) -> dict:
        replica.owner(request)
        return await replica.reconcile()

    # -- inference ---------------------------------------------------------------------------------------

    async def serve(request: Request, chat: bool):
        started = time.perf_counter()
        account = replica.account(request)
        runner = replica.ready()
        engine = runner.engine
        body = await _body(request, ChatRequest if chat else CompletionRequest)
        adapter = replica.resolve_model(body.model, account, engine)
        if chat:
            try:
                prompt_ids = engine.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from None
            logprobs = body.wanted_logprobs()
            requested = body.max_completion_tokens or body.max_tokens
        else:
            prompt_ids = engine.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
            logprobs = body.logprobs
            requested = body.max_tokens or 16
        context = engine.max_model_len
        if len(prompt_ids) >= context:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = requested or context - len(prompt_ids)
        if len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"the prompt's {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceed this "
                                f"model's context of {context} tokens", param="max_tokens", code="context_length_exceeded")
        try:
            params = [body.sampling(max_tokens, logprobs, i) for i in range(body.n)]
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(":")[0]) from None
        try:
            call = Call(replica, runner, account, body.model, adapter, prompt_ids, params, chat, started, body)
        except Overloaded:
            replica.metrics.requests.labels(body.model, "429").inc()
            raise APIError(429, "the deployment is at capacity; retry shortly", type="rate_limit_error",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        if body.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream")
        return JSONResponse(await call.complete())

    @app.post("/v1/completions", openapi_extra=_documented_body(CompletionRequest))
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_documented_body(ChatRequest))
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


class Call:
    """One HTTP request's choices running in the engine, turned into OpenAI responses and one usage record.

    The choices are queued when the Call is made (raising Overloaded at once if the backlog is full) and
    run to completion whatever the client does; a client that leaves aborts them. The usage record is
    written exactly once, when the last choice ends: ok, aborted or error.
    """

    def __init__(self, replica: Replica, runner: AsyncEngine, account: str, model: str, adapter: str | None,
                 prompt_ids: list[int], params: list, chat: bool, started: float, body):
        self.replica, self.runner, self.account, self.model, self.adapter = replica, runner, account, model, adapter
        self.prompt_ids, self.params, self.chat, self.started, self.body = prompt_ids, params, chat, started, body
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.first_token: float | None = None
        self.texts = [""] * len(params)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outcomes: list[str] = []
        self.streams = []
        try:
            for p in params:
                self.streams.append(runner.submit(prompt_ids, p, adapter))
        except Overloaded:
            for stream in self.streams:
                stream.close()
            raise
        self.tasks = [asyncio.create_task(self._pump(i, stream)) for i, stream in enumerate(self.streams)]

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    async def _pump(self, index: int, stream) -> None:
        outcome = "ok"
        try:
            async for out in stream:
                if self.first_token is None:
                    self.first_token = time.perf_counter()
                self.completion_tokens += len(out.token_ids)
                self.texts[index] += out.text
                self.queue.put_nowait((index, out))
        except asyncio.CancelledError:
            outcome = "aborted"
            stream.close()
        except Exception as exc:  # handed to the consumer
            outcome = "error"
            self.queue.put_nowait((index, exc))
        finally:
            self.outcomes.append(outcome)
            self.queue.put_nowait((index, None))
            if len(self.outcomes) == len(self.streams):
                self._finish(next((o for o in ("error", "aborted") if o in self.outcomes), "ok"))

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The outputs of all n choices, as they come; leaving early aborts the choices still running."""
        open_choices = len(self.tasks)
        try:
            while open_choices:
                index, item = await self.queue.get()
                if item is None:
                    open_choices -= 1
                elif isinstance(item, Exception):
                    raise APIError(400 if isinstance(item, ValueError) else 500, str(item),
                                   type="invalid_request_error" if isinstance(item, ValueError) else "server_error")
                else:
                    yield index, item
        finally:
            for task in self.tasks:
                task.cancel()

    def _finish(self, status: str) -> None:
        latency = time.perf_counter() - self.started
        metrics = self.replica.metrics
        metrics.requests.labels(self.model, status).inc()
        metrics.tokens.labels(self.model, "prompt").inc(len(self.prompt_ids))
        metrics.tokens.labels(self.model, "completion").inc(self.completion_tokens)
        metrics.latency.labels(self.model).observe(latency)
        if self.first_token is not None:
            metrics.ttft.labels(self.model).observe(self.first_token - self.started)
        self.replica.meter.record(self.account, self.model, len(self.prompt_ids), self.completion_tokens, latency, status)
        if self.replica.request_log and status == "ok":
            prompt = [m.model_dump() for m in self.body.messages] if self.chat else self.body.prompt
            for text in self.texts:
                self.replica.request_log.write(self.account, self.model, prompt, text)

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt_ids) + self.completion_tokens}
    def _logprobs(self, items: list[TokenLogprob]) -> dict | None:
        engine = self.runner.engine
        if self.chat:
            return {"content": [{
                "token": _token_text(engine, lp.token_id), "logprob": lp.logprob,
                "bytes": list(_token_text(engine, lp.token_id).encode()),
                "top_logprobs": [{"token": _token_text(engine, t), "logprob": v,
                                  "bytes": list(_token_text(engine, t).encode())} for t, v in lp.top],
            } for lp in items]}
        return {"tokens": [_token_text(engine, lp.token_id) for lp in items],
                "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [{_token_text(engine, t): v for t, v in lp.top} for lp in items],
                "text_offset": []}

    def _choice(self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None, delta: bool) -> dict:
        choice: dict = {"index": index, "finish_reason": finish}
        if self.chat:
            choice["delta" if delta else "message"] = {"role": "assistant", "content": text} if not delta else {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(logprobs) if logprobs is not None else None
        return choice

    async def complete(self) -> dict:
        finishes: dict[int, str | None] = {}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(self.params))}
        async for index, out in self._merged():
            logprobs[index] += out.logprobs
            if out.finished:
                finishes[index] = out.finish_reason
        wanted = self.params[0].logprobs is not None
        choices = [self._choice(i, self.texts[i], finishes.get(i), logprobs[i] if wanted else None, delta=False)
                   for i in range(len(self.params))]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        wanted = self.params[0].logprobs is not None
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)

        def event(choices: list[dict], usage: dict | None = None) -> str:
            chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
            if include_usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            if self.chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(len(self.params))])
            async for index, out in self._merged():
                if out.text or out.finished or (wanted and out.logprobs):
                    yield event([self._choice(index, out.text, out.finish_reason,
                                              out.logprobs if wanted else None, delta=True)])
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        if include_usage:
            yield event([], self.usage())
        yield "data: [DONE]\n\n"
