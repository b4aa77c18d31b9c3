"""Request bodies: parsed by the routes themselves, so a bad one gets an OpenAI-format error naming the
parameter (and never echoing its value, which could be prompt text)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from ember.runtime.serving.errors import APIError


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    # pydantic's message, without its echo of the input (which could be prompt text)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a parameter this server supports"
    elif first["type"] == "json_invalid":  # pydantic's own parse (a lone surrogate, say): no parameter to name
        return APIError(400, "the request body is not JSON this server reads", code="invalid_json")
    elif param is None and ": " in message:  # a rule across fields names its parameter first
        param, message = message.split(": ", 1)
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_parameter")


def documented_body(cls: type[BaseModel]) -> dict:
    """`openapi_extra` declaring a route's JSON body: FastAPI cannot see a body the route parses itself;
    clients and API fuzzers read it from /openapi.json."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


# Validating a body of megabytes (100k messages, say: a second of pydantic and Python validators) is not for the
# event loop, which serves every client, nor for its default executor, where the replica's key reloads and
# billing heartbeats run: bodies have workers of their own.
_parsers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ember-body")


async def parse_body(request: Request, cls: type[BaseModel]):
    try:
        raw = await request.body()  # bounded in size and time by BodyLimits
    except ClientDisconnect:  # the client left half-way through its body
        raise APIError(499, "the client closed the request", code="client_closed_request") from None
    return await asyncio.get_running_loop().run_in_executor(_parsers, _parse, raw, cls)


def _too_deep() -> APIError:
    return APIError(400, "the request body nests arrays and objects too deeply", code="invalid_json")


def _parse(raw: bytes, cls: type[BaseModel]):
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not JSON", code="invalid_json") from None
    except ValueError:  # Python refuses to read an integer of more than 4,300 digits (a quadratic conversion)
        raise APIError(400, "the request body holds a number of more than 4300 digits", code="invalid_json") from None
    except RecursionError:  # Python's parser gives up about 1000 levels down
        raise _too_deep() from None
    try:
        return cls.model_validate_json(raw)  # JSON mode: strict types as JSON has them
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid" and "recursion limit" in first["msg"]:  # pydantic's gives up sooner
            raise _too_deep() from None
        raise _validation_error(exc) from None
