"""The HTTP frame a replica and the gateway share: refusals, unknown routes and methods answered in OpenAI's format, and
bodies bounded in size and time before any route reads them."""

from __future__ import annotations

from fastapi import FastAPI

from ember.runtime.serving.body_limits import BodyLimits
from ember.runtime.serving.errors import APIError, method_not_allowed, not_found
from ember.runtime.serving.limits import Limits


def api_app(title: str, lifespan, limits: Limits, api_error) -> FastAPI:
    """A FastAPI app in that frame; `api_error` answers an APIError (each server counts refusals in its own metrics)."""
    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(APIError, api_error)
    app.add_middleware(BodyLimits, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, method_not_allowed)
    return app
