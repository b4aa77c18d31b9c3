"""A serverless model past its shutdown date: the 410 that a replica and the gateway answer for it (a light module, as
errors.py: the gateway loads no torch). The day is judged by the catalog lifecycle's one clock, as preview judges it."""

from __future__ import annotations

from datetime import date

from ember.provider.domain import catalog_lifecycle
from ember.provider.domain.names import parse_model_name
from ember.runtime.serving.errors import APIError


def shut_down(base_model: str, shutdown_date: date | None) -> APIError | None:
    """The 410 for a request to `base_model` (or an addon on it) on a serverless deployment whose shutdown date has
    come; None while it has not, or when it has none. The message names the catalog model and the date only: it is
    the same for every caller, and no request's text is in it."""
    if shutdown_date is None or catalog_lifecycle.today() < shutdown_date:
        return None
    model = parse_model_name(base_model).resource_id
    return APIError(410, f"{model} was shut down for serverless use on {shutdown_date.isoformat()}; deploy it on a "
                         f"dedicated deployment or move to another model", param="model", code="model_shut_down")
