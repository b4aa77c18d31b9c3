"""Request bodies bounded in size and in time, as ASGI middleware in front of every route.

A body over the limit is refused with 413 before it is read whole: from its Content-Length before any of it
is read, or, sent chunked, as soon as the bytes received pass the limit. A body that takes longer than the
body timeout to arrive is refused with 408. Both are raised from the route's own read of the body, so they
reach the client through the app's APIError handler (OpenAI's format, counted in the metrics like any other
refusal), after the route's earlier checks (a request without a valid key still gets its 401 first).

A response sent while part of the body is still unread closes the connection: the rest would otherwise be
read and thrown away for as long as the client cares to send it.
"""

from __future__ import annotations

import asyncio

from ember.runtime.serving.errors import APIError


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's Content-Length (None when it is sent chunked, or has none); the HTTP parser has checked it."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"transfer-encoding" for name, _ in headers) or bool(_declared_length(headers))


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                    code="request_too_large")


class BodyLimits:
    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            return await self.app(scope, receive, send)
        declared = _declared_length(scope["headers"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, done = 0, False

        async def bounded_receive():
            nonlocal received, done
            if done:  # after the body: only a disconnect is left to hear of
                return await receive()
            if declared is not None and declared > self.max_bytes:
                raise _too_large(self.max_bytes)
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                               code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _too_large(self.max_bytes)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, bounded_receive, closing_send)
