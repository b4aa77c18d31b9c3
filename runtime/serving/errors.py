"""Errors answered in OpenAI's format, by a replica and by the gateway alike (a light module: the gateway loads no
torch): the error itself, the handlers for unknown routes and methods, and the caller's API key or its 401."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def not_found(request: Request, exc) -> JSONResponse:
    return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)


async def method_not_allowed(request: Request, exc) -> JSONResponse:
    error = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(error.body(), status_code=405, headers=getattr(exc, "headers", None) or {})


def bearer_key(request: Request) -> str | None:
    """The key of `Authorization: Bearer <key>` (None for another scheme); a 401 when there is no header."""
    header = request.headers.get("authorization", "")
    if not header:
        raise APIError(401, "missing API key: send Authorization: Bearer <key>", type="authentication_error",
                       code="missing_api_key")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def invalid_key() -> APIError:
    return APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")


def expired_key() -> APIError:
    # Which key is not said: the caller holds it, and a log or a proxy in between need not learn its name.
    return APIError(401, "API key expired: ask the account's administrators for a new one", type="authentication_error",
                    code="expired_api_key")
