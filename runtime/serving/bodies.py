"""Request bodies: parsed by the routes themselves, so a bad one gets an OpenAI-format error naming the
parameter (and never echoing its value, which could be prompt text)."""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ember.runtime.serving.protocol import APIError


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    # pydantic's message, without its echo of the input (which could be prompt text)
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_parameter")


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


async def parse_body(request: Request, cls: type[BaseModel]):
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not JSON", code="invalid_json") from None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
