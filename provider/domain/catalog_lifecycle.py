"""The serverless lifecycle of catalog models: when each is deprecated and when it shuts down, from a JSON file a
platform team writes (so the dates move without a release of Ember), and which account owns serverless capacity.

    {"platform_account": "platform",
     "models": {"llama-v3p1-8b-instruct": {"deprecation_date": "2027-01-01", "shutdown_date": "2027-01-15"}}}

Found through Pulumi config `ember:catalogFile` or the EMBER_CATALOG_FILE variable (a relative path resolves from the
program's folder); with neither, nothing is deprecated and the platform account is "platform". From its deprecation
date a serverless use of a model previews with a warning; from its shutdown date it is refused. Dates are UTC days.
It imports pydantic only: never pulumi, never torch.
"""

from __future__ import annotations

import json
import os
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from ember.provider.domain import catalog
from ember.provider.domain.spec import FieldError, ResourceId, Spec, SpecError, parse

ENV = "EMBER_CATALOG_FILE"
MIN_NOTICE_DAYS = 14
DEFAULT_PLATFORM_ACCOUNT = "platform"

Phase = Literal["active", "deprecated", "shut_down"]


def today() -> date:
    """The day every lifecycle rule is judged on (UTC); the one clock tests move."""
    return datetime.now(timezone.utc).date()


class Lifecycle(Spec):
    deprecation_date: date
    shutdown_date: date

    @model_validator(mode="after")
    def _notice(self) -> "Lifecycle":
        # Tenants need time to move their traffic and addons: a shutdown never comes without two weeks' notice.
        notice = (self.shutdown_date - self.deprecation_date).days
        if notice < 0:
            raise FieldError("shutdown_date", f"{self.shutdown_date} is before deprecation_date {self.deprecation_date}; "
                                              f"a model is deprecated first, then shut down")
        if notice < MIN_NOTICE_DAYS:
            raise FieldError("shutdown_date", f"{self.shutdown_date} is {notice} days after deprecation_date "
                                              f"{self.deprecation_date}; serverless models get at least "
                                              f"{MIN_NOTICE_DAYS} days of notice")
        return self

    def phase(self, on: date) -> Phase:
        """deprecated from deprecation_date, shut down from shutdown_date (both days included)."""
        if on >= self.shutdown_date:
            return "shut_down"
        return "deprecated" if on >= self.deprecation_date else "active"

    def notice(self, model_id: str, on: date) -> str | None:
        """What a serverless use of `model_id` is told on that day, or None while it is active."""
        phase = self.phase(on)
        if phase == "deprecated":
            return f"{model_id} is deprecated for serverless use: it shuts down on {self.shutdown_date}"
        if phase == "shut_down":
            return f"{model_id} was shut down for serverless use on {self.shutdown_date}"
        return None


class CatalogFile(Spec):
    platform_account: ResourceId = DEFAULT_PLATFORM_ACCOUNT
    models: dict[str, Lifecycle] = {}

    @model_validator(mode="after")
    def _catalog_models(self) -> "CatalogFile":
        for model_id in self.models:
            if catalog.lookup(model_id) is None:
                raise FieldError(f"models.{model_id}", f"{model_id!r} is not a catalog model; these are: "
                                                       f"{', '.join(sorted(catalog.CATALOG))}")
        return self

    def lifecycle(self, model_id: str) -> Lifecycle | None:
        return self.models.get(model_id)


NO_FILE = CatalogFile()


class CatalogFileError(SpecError):
    """A catalog file that cannot be read or breaks a rule: each line `<file>: <field>: <message>`."""

    def __init__(self, path: Path, errors: list[tuple[str, str]]):
        super().__init__(str(path), errors)
        self.path = path
        ValueError.__init__(self, "; ".join(f"{path}: {field or '(file)'}: {message}" for field, message in errors))


def locate(configured: str | None, root: Path) -> Path | None:
    """The catalog file: `ember:catalogFile` (given here), else EMBER_CATALOG_FILE, relative to `root` (the program's
    folder); None when neither is set."""
    value = configured or os.environ.get(ENV)
    return (root / Path(value).expanduser()).resolve() if value else None


def load(path: Path | None) -> CatalogFile:
    """The file's dates (NO_FILE for None); CatalogFileError names the file, the field and the value."""
    if path is None:
        return NO_FILE
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CatalogFileError(path, [("", f"cannot be read: {exc.strerror or exc}")]) from None
    except ValueError as exc:
        raise CatalogFileError(path, [("", f"is not JSON: {exc}")]) from None
    try:
        return parse(CatalogFile, raw)
    except SpecError as exc:
        raise CatalogFileError(path, exc.errors) from None
