"""The audit log: every admin action, as a metadata-only record in the store's `audit/` folder.

A record says when (UTC, to the second), on which account, who did it (`actor`), what (`action`, one of ACTIONS), to
which resource (`target`, a resource name), how it ended (`result`) and, optionally, a short `detail` such as
"2 -> 3 replicas" or why an addon was refused. Never a prompt, a completion or an API key: every field but `detail`
is held to a grammar of names, and writers put in `detail` only numbers, resource names and refusal reasons (which
name files and rules, never a request's text).

Each record is its own object, `audit/<account>/<YYYY-MM-DD>/<HHMMSS.ffffff>-<random hex>.json`: object stores
cannot append, and one file per record never races with another writer (every replica of a deployment, each gateway
pod and the provider write beside each other).

Writing, for every writer (replicas, the gateway's autoscaler, the provider's API keys):

    AuditLog(store_root).record(account=..., actor=..., action=..., target=..., result="ok", detail=None)

`record` never raises into the action it records: a record that cannot be written (the store is down, a field breaks
its grammar) is logged as a warning naming only the failure's class, and the action goes on. `read(account, since)`
gives the records back sorted by time.

Actors: an API key's name `accounts/<a>/apiKeys/<id>`, `stack:<org>/<project>/<stack>` (what a Pulumi stack's provider
did; `stack:<project>/<stack>` under the offline runner, which knows no organization), `provider` (the account's
implicit key, made by whichever resource first needed it), `autoscaler:<gateway name>`, or `replica:<deployment name>`
(a replica's own reconcile, on its timer or at start).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ember.provider.domain.names import ID_PATTERN
from ember.provider.domain.store_layout import StoreLayout

log = logging.getLogger("ember.audit")

Action = Literal["addon.loaded", "addon.unloaded", "addon.refused", "key.created", "key.updated", "key.revoked",
                 "key.expired", "deployment.scaled"]
ACTIONS: tuple[str, ...] = Action.__args__
MAX_DETAIL = 300  # characters: a reason, not a document

_ID = ID_PATTERN.strip("^$")
_PULUMI_NAME = r"[A-Za-z0-9_.-]+"
# A stack is organization/project/stack, or project/stack where no organization is known (the offline runner);
# `provider` is the provider acting for no one stack (the account's implicit key, made at its first up).
ACTOR_PATTERN = (rf"^(accounts/{_ID}/apiKeys/{_ID}|stack:({_PULUMI_NAME}/)?{_PULUMI_NAME}/{_PULUMI_NAME}|provider"
                 rf"|autoscaler:accounts/{_ID}/gateways/{_ID}|replica:accounts/{_ID}/deployments/{_ID})$")
TARGET_PATTERN = rf"^accounts/{_ID}/(models|apiKeys|deployments)/{_ID}$"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


class AuditRecord(BaseModel):
    """One admin action, metadata only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: str = Field(default_factory=utc_now, description="UTC ISO-8601 to the second: 2025-05-01T12:00:03Z")
    account: str = Field(pattern=ID_PATTERN, description="the account acted on")
    actor: str = Field(pattern=ACTOR_PATTERN, description="a key's name, stack:…, provider, autoscaler:… or replica:…")
    action: Action
    target: str = Field(pattern=TARGET_PATTERN, description="the resource acted on: an addon, a key, a deployment")
    result: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.]{0,63}$", description="ok, refused, or a failure's class name")
    detail: str | None = Field(None, max_length=MAX_DETAIL, pattern=r"^[^\n\r]*$",
                               description="metadata only: '2 -> 3 replicas', 'on <deployment>', a refusal's reason")

    @field_validator("time")
    @classmethod
    def _utc_seconds(cls, value: str) -> str:
        try:
            datetime.strptime(value, TIME_FORMAT)
        except ValueError:
            raise ValueError(f"{value!r} is not a UTC time like 2025-05-01T12:00:03Z") from None
        return value

    @property
    def at(self) -> datetime:
        return datetime.strptime(self.time, TIME_FORMAT).replace(tzinfo=UTC)


def short(detail: str | None) -> str | None:
    """A detail on one line and within MAX_DETAIL (a refusal's reason may be long: its start says why)."""
    if detail is None:
        return None
    line = " ".join(detail.split())
    return line if len(line) <= MAX_DETAIL else line[:MAX_DETAIL - 1] + "…"


class AuditLog:
    """The audit folder of a store (a URL or an fsspec path)."""

    def __init__(self, store_root: str):
        self.fs, root = fsspec.core.url_to_fs(str(store_root))
        self.folder = StoreLayout(root).audit

    def record(self, *, account: str, actor: str, action: str, target: str, result: str = "ok",
               detail: str | None = None) -> AuditRecord | None:
        """Build and append one record; None (and a warning) if it could not be. Never raises."""
        try:
            record = AuditRecord(account=account, actor=actor, action=action, target=target, result=result,
                                 detail=short(detail))
        except ValidationError as exc:  # a writer's defect: the fields it broke, not their values
            fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            log.warning("audit record of %s not written: invalid %s", action, fields)
            return None
        return record if self.append(record) else None

    def append(self, record: AuditRecord) -> bool:
        """Write one record as its own object; False (and a warning naming only the failure) if the store failed."""
        folder = f"{self.folder}/{record.account}/{record.time[:10]}"
        # microseconds in the name: records made within one second read back in the order they were made
        name = f"{datetime.now(UTC):%H%M%S.%f}-{secrets.token_hex(4)}.json"
        data = record.model_dump_json(exclude_none=True).encode()
        try:
            if isinstance(self.fs, LocalFileSystem):  # a local write can be read half-done: written aside, moved in
                self.fs.makedirs(folder, exist_ok=True)
                self.fs.pipe_file(f"{folder}/.{name}.tmp", data)
                self.fs.mv(f"{folder}/.{name}.tmp", f"{folder}/{name}")
            else:  # an object store's put is whole or absent
                self.fs.pipe_file(f"{folder}/{name}", data)
        except Exception as exc:  # the action it records goes on; the record's content stays out of the log
            log.warning("audit record of %s not written: %s", record.action, type(exc).__name__)
            return False
        return True

    def read(self, account: str | None = None, since: datetime | None = None) -> list[AuditRecord]:
        """The records (of one account, at or after `since`), oldest first. A record that cannot be read is skipped
        with a warning."""
        pattern = f"{self.folder}/{account or '*'}/*/*.json"
        since = since.replace(tzinfo=UTC) if since and since.tzinfo is None else since
        first_day = since.astimezone(UTC).strftime("%Y-%m-%d") if since else ""
        found = []
        for path in self.fs.glob(pattern):
            if path.rsplit("/", 2)[1] < first_day:
                continue  # a day folder before `since`: not opened
            try:
                record = AuditRecord.model_validate(json.loads(self.fs.cat_file(path)))
            except (OSError, ValueError) as exc:
                log.warning("audit record %s unreadable: %s", path, type(exc).__name__)
                continue
            if since is None or record.at >= since:
                found.append((record.time, path.rsplit("/", 1)[1], record))
        return [record for *_, record in sorted(found, key=lambda f: f[:2])]


_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO date or time (UTC unless it says otherwise), or a span back from now: 30m, 1h, 7d."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative[2]]: int(relative[1])})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {text!r} is not an ISO date or time (2025-05-01, 2025-05-01T12:00Z) or a span "
                         f"back from now (30m, 1h, 7d)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


class ExpiredKeyRefusals:
    """Each expired key's first refusal in a process (a replica, a gateway), as one `key.expired` record: later
    refusals would only repeat it."""

    def __init__(self, store_root: str | None, where: str):
        self.log = AuditLog(store_root) if store_root else None
        self.where = where  # the record's detail: which process refused it
        self.noted: set[str] = set()

    def first(self, account: str, key_id: str) -> Callable[[], bool] | None:
        """The record's write, for the caller to run off its event loop (it is store I/O), if this is the key's first
        refusal here; else None."""
        if self.log is None or key_id in self.noted:
            return None
        self.noted.add(key_id)
        return functools.partial(self.log.record, account=account, actor=key_id, action="key.expired", target=key_id,
                                 result="refused", detail=self.where)
