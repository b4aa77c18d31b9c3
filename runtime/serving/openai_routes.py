"""The OpenAI API: /v1/models, /v1/usage, /v1/completions and /v1/chat/completions.

request → auth (API key → account) → a serverless model's shutdown (410) → access (deployment, addon) → validation →
tokenizer → engine → response (JSON or SSE) → metrics and a usage record.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember.runtime.engine.engine import ContextLengthExceeded, Engine, UnknownTokenId
from ember.runtime.model.sampling import SamplingParams
from ember.runtime.serving.accounting import Accounting
from ember.runtime.serving.async_engine import Overloaded
from ember.runtime.serving.bodies import documented_body, parse_body
from ember.runtime.serving.call import Call
from ember.runtime.serving.errors import APIError
from ember.runtime.serving.grammars import compile_grammar
from ember.runtime.serving.protocol import ChatRequest, CompletionRequest
from ember.runtime.serving.replica import Replica, replica_of
from ember.runtime.serving.responses import Responses
from ember.runtime.serving.tools import ToolUse, template_messages, tool_use

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request, replica: Replica = Depends(replica_of)) -> dict:
    account = await replica.account(request)
    engine = replica.ready().engine
    deployment = replica.config.deployment
    created = int(replica.started)
    data = [{"id": deployment.base_model, "object": "model", "created": created,
             "owned_by": deployment.base_model.split("/")[1], "parent": None, "kind": "HF_BASE_MODEL"}]
    for name in engine.served_addons:
        if deployment.may_use_addon(account, name):
            data.append({"id": name, "object": "model", "created": created, "owned_by": name.split("/")[1],
                         "parent": deployment.base_model, "kind": "HF_PEFT_ADDON"})
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request, replica: Replica = Depends(replica_of)) -> dict:
    listed = {entry["id"]: entry for entry in (await models(request, replica))["data"]}
    if model not in listed:
        raise APIError(404, f"model {model!r} is not served by this deployment", type="not_found_error",
                       param="model", code="model_not_found")
    return listed[model]


@router.get("/v1/usage")
async def usage(request: Request, account: str | None = None, replica: Replica = Depends(replica_of)) -> dict:
    """The caller's own usage on this deployment: metadata records and their totals, never text."""
    caller = await replica.account(request)
    if account not in (None, caller):
        raise APIError(403, f"account {caller!r} may not read the usage of account {account!r}",
                       type="permission_error", param="account", code="forbidden")
    records = await asyncio.to_thread(replica.meter.read, caller)
    totals = {"requests": len(records)} | {
        field: sum(r[field] for r in records) for field in ("prompt_tokens", "completion_tokens")}
    return {"object": "list", "account_id": caller, "deployment": replica.config.deployment.name, "data": records,
            "totals": totals}


def _prompts(body: ChatRequest | CompletionRequest, uses: ToolUse | None, engine: Engine) -> list[list[int]]:
    """The request's prompts as token ids: a chat's one (with its tools' `uses`), or each of a completions batch."""
    _check_length(body, engine)
    if isinstance(body, ChatRequest):
        tokenizer = engine.tokenizer
        takes_tools = tokenizer.template_takes_tools
        messages = template_messages(body.messages, uses, takes_tools)
        tools = uses.template_tools() if uses is not None and uses.parsed and takes_tools else None
        try:
            return [tokenizer.encode_chat(messages, tools=tools, continue_final_message=body.continues_final_message)]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append(engine.tokenizer.encode(prompt))
        else:
            _check_token_ids("prompt", prompt, engine)
            prompts.append(list(prompt))
    return prompts


def _check_length(body: ChatRequest | CompletionRequest, engine: Engine) -> None:
    """A prompt whose characters alone are more than the context could hold is refused before it is tokenized
    (seconds of work for megabytes of text). Twice the bound, as a normalizer that composes characters (NFC) can
    let one token stand for a little more than its piece's length."""
    chat = isinstance(body, ChatRequest)
    if chat:
        lengths = [sum(len(m.text()) for m in body.messages)]
    else:
        lengths = [len(p) for p in body.prompts() if isinstance(p, str)]
    chars = max(lengths, default=0)
    limit = 2 * engine.max_model_len * engine.tokenizer.max_token_chars
    if chars > limit:
        raise APIError(400, f"the prompt is {chars} characters, more than this model's context of "
                            f"{engine.max_model_len} tokens can hold (at most {limit})",
                       param="messages" if chat else "prompt", code="context_length_exceeded")


def _check_token_ids(param: str, ids, engine: Engine) -> None:
    """Token ids a request names (in its prompt, logit_bias, stop_token_ids) exist in the model's vocabulary: the
    engine's rule, made here so that a bad one is a 400 before anything runs or streams."""
    try:
        engine.check_token_ids(param, ids)
    except UnknownTokenId as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_parameter") from None


def _sampling(body: ChatRequest | CompletionRequest, prompt_ids: list[int], engine: Engine) -> list[SamplingParams]:
    """Each choice's sampling parameters, once the (longest) prompt and max_tokens are known to fit the context
    (the engine's check, made here so that a request that does not fit is a 400 before anything streams)."""
    chat = isinstance(body, ChatRequest)
    requested = (body.max_completion_tokens or body.max_tokens) if chat else (body.max_tokens or 16)
    try:
        max_tokens = engine.room(len(prompt_ids), requested)
    except ContextLengthExceeded as exc:
        param = ("messages" if chat else "prompt") if exc.param == "prompt" else exc.param
        raise APIError(400, exc.detail, param=param, code="context_length_exceeded") from None
    logprobs = body.wanted_logprobs() if chat else body.logprobs
    return [body.sampling(max_tokens, logprobs, i) for i in range(body.n)]


async def _serve(request: Request, replica: Replica, chat: bool):
    started = time.perf_counter()
    account = await replica.account(request)
    # before the body is read or anything tokenized: a shut-down model's requests cost nothing and are not metered
    replica.refuse_if_shut_down()
    runner = replica.ready()
    replica.last_request = time.time()
    engine = runner.engine
    body = await parse_body(request, ChatRequest if chat else CompletionRequest)
    model = replica.served_name(body.model)
    adapter = replica.resolve_model(model, account, engine)
    _check_token_ids("logit_bias", body.logit_bias, engine)
    _check_token_ids("stop_token_ids", body.stop_token_ids, engine)
    choices = body.n * (len(body.prompts()) if not chat else 1)
    if choices > replica.config.max_queue:
        raise APIError(400, f"n: {choices} choices can never be served by this deployment, which queues at most "
                            f"{replica.config.max_queue} requests", param="n", code="invalid_parameter")
    uses = tool_use(body) if chat else None
    prompts = await asyncio.to_thread(_prompts, body, uses, engine)  # templates and tokenizing: off the event loop
    params = _sampling(body, max(prompts, key=len), engine) * len(prompts)
    # Compiled once for every choice, on a grammar worker: a schema that cannot be served is refused before
    # anything streams, and a big one holds up no other request meanwhile.
    # a required tool call's output is the call itself; otherwise the response format's (if any)
    source = uses.grammar if uses is not None and uses.constrained else body.grammar
    grammar = await compile_grammar(engine.grammars, source, param="tools" if uses is not None else "response_format")
    if grammar is not None:
        params = [replace(p, grammar=grammar) for p in params]
    logged_prompt = None
    if replica.request_log:
        logged_prompt = [m.model_dump() for m in body.messages] if chat else body.prompt
    echoes = [engine.tokenizer.decode(p) for p in prompts for _ in range(body.n)] if not chat and body.echo else None
    responses = Responses(chat, model, engine.tokenizer, params[0].logprobs is not None,
                          bool(body.stream_options and body.stream_options.include_usage), echoes,
                          uses if uses is not None and uses.parsed else None)
    accounting = Accounting(replica, account, model, started, responses.id, body.user or "", logged_prompt)
    try:
        call = Call(runner, prompts, params, adapter, accounting, account)
    except Overloaded:
        raise APIError(429, "the deployment is at capacity; retry shortly", type="rate_limit_error",
                       code="overloaded", headers={"Retry-After": "1"}) from None
    if body.stream:
        return StreamingResponse(responses.stream(call), media_type="text/event-stream")
    return JSONResponse(await _unless_disconnected(request, responses.complete(call)))


async def _unless_disconnected(request: Request, work):
    """A non-streaming request's work, cancelled when its client leaves: its choices are aborted (and recorded as
    aborted), as a stream's are when its reader goes, instead of running on for nobody."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the request", code="client_closed_request")
    return task.result()


@router.post("/v1/completions", openapi_extra=documented_body(CompletionRequest))
async def completions(request: Request, replica: Replica = Depends(replica_of)):
    return await _serve(request, replica, chat=False)


@router.post("/v1/chat/completions", openapi_extra=documented_body(ChatRequest))
async def chat_completions(request: Request, replica: Replica = Depends(replica_of)):
    return await _serve(request, replica, chat=True)
