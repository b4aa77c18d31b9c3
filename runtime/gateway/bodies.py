"""What the gateway reads of a request body, without judging it (the replica validates every field): the JSON object
itself (parsed on a worker thread when it is large), and a message's text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ember.runtime.serving.errors import APIError

# Parsing is microseconds below this; above, up to the body limit (4 MiB), it could hold up every other client.
PARSE_ON_THE_LOOP_BYTES = 64 * 1024


async def parse_json_object(raw: bytes) -> dict[str, Any]:
    if len(raw) <= PARSE_ON_THE_LOOP_BYTES:
        return _parse(raw)
    return await asyncio.to_thread(_parse, raw)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests arrays and objects too deeply", code="invalid_json") from None
    except ValueError:  # an integer of more than 4,300 digits, which Python refuses to convert
        raise APIError(400, "the request body holds a number of more than 4300 digits", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def content_text(content: object) -> str:
    """A message's text: its content, or the text of its content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
