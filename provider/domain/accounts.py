"""API keys and who may use what.

Keys are stored only as SHA-256 hashes (a key is 256 random bits, so a fast hash is enough) and compared
in constant time against every stored hash. A dedicated deployment serves only its own account; a
serverless one serves any account, but an addon only to the account that owns it (named in the addon's
`accounts/<ACCOUNT_ID>/models/<MODEL_ID>`). What an account builds on (deploys, fine-tunes, puts an addon
on) is its own account's models or catalog models, never another account's private weights.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec

from ember.provider.domain import catalog
from ember.provider.domain.names import api_key_name, check_id, parse_model_name

KEY_PREFIX = "ek-"
# What a key may do: `inference` calls the OpenAI routes; `admin` also the admin routes (addons, reconcile, metrics).
ROLES = ("inference", "admin")
# The account's implicit key (made at its first `up`, kept beside the program for the quickstart and the provider's own
# calls) is named with this ID; an ApiKey resource may not take it.
IMPLICIT_KEY_ID = "default"
# How often a replica looks at the keys file (a stat; a read only when it changed): with the gateway's snapshot
# interval, the bound within which a revoked key stops working everywhere.
KEYS_REFRESH_S = 2.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _utc(value: datetime | str | None) -> datetime | None:
    """An expiry as an aware time: one written without an offset (by hand, in the keys file) is UTC."""
    if value is None:
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when if when.utcoffset() is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class KeyRecord:
    """One key as the store holds it: its hash and what it may do, never the key."""

    account_id: str
    sha256: str
    key_id: str = ""  # accounts/<a>/apiKeys/<id>; records written before keys had names are the implicit key
    role: str = "admin"
    expires_at: datetime | None = None
    owner: str | None = None  # the stack (organization/project/stack) whose ApiKey made it; None: the implicit key

    def __post_init__(self) -> None:
        if not self.key_id:
            object.__setattr__(self, "key_id", api_key_name(self.account_id, IMPLICIT_KEY_ID))
        if self.role not in ROLES:
            raise ValueError(f"role: {self.role!r} is not one of {', '.join(ROLES)}")
        object.__setattr__(self, "expires_at", _utc(self.expires_at))

    def to_json(self) -> dict[str, Any]:
        return {"account_id": self.account_id, "sha256": self.sha256, "key_id": self.key_id, "role": self.role,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None, "owner": self.owner}


@dataclass(frozen=True)
class Caller:
    """Who a request's key says it is: the account, the key's name (what an audit record calls the actor), its role."""

    account: str
    key_id: str
    role: str
    expires_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Accounts:
    def __init__(self, records: list[KeyRecord]):
        self.records = records

    @classmethod
    def load(cls, url: str | Path) -> "Accounts":
        """Read a keys file: {"keys": [{"account_id", "sha256", "key_id", "role", "expires_at", "owner"}]} (never
        plain keys)."""
        with fsspec.open(str(url), "r") as f:
            raw = json.load(f)
        return cls(cls._records(raw))

    @staticmethod
    def _records(raw: dict) -> list[KeyRecord]:
        records = []
        for i, item in enumerate(raw.get("keys", [])):
            if "key" in item:
                raise ValueError(f"keys[{i}]: holds a plain key; store only its sha256")
            records.append(KeyRecord(check_id(item["account_id"], "account ID"), item["sha256"],
                                     item.get("key_id") or "", item.get("role") or "admin",
                                     _utc(item.get("expires_at")), item.get("owner")))
        return records

    @staticmethod
    def change(url: str | Path, edit: Callable[[list[KeyRecord]], list[KeyRecord]]) -> list[KeyRecord]:
        """Rewrite the keys file with `edit(records)` (the caller holds the store's keys lock). Written aside and moved
        into place: replicas re-reading it never see half of it."""
        fs, path = fsspec.core.url_to_fs(str(url))
        raw = json.loads(fs.cat_file(path)) if fs.exists(path) else {"keys": []}
        records = edit(Accounts._records(raw))
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(8)}.tmp"
        fs.pipe_file(tmp, json.dumps({"keys": [r.to_json() for r in records]}, indent=2).encode())
        fs.mv(tmp, path)
        return records

    @staticmethod
    def add_key(url: str | Path, account_id: str, key_id: str = IMPLICIT_KEY_ID, role: str = "admin",
                expires_at: datetime | None = None, owner: str | None = None) -> str:
        """Create a key for an account, store its hash, and return the key (shown once)."""
        key = new_key()
        record = KeyRecord(check_id(account_id, "account ID"), hash_key(key), api_key_name(account_id, key_id), role,
                           expires_at, owner)
        Accounts.change(url, lambda records: [*records, record])
        return key

    def authenticate(self, key: str | None) -> Caller | None:
        """The key's caller, or None. Every stored hash is compared, in constant time; an expired key is still
        found (the caller says it expired, without naming it)."""
        if not key:
            return None
        digest = hash_key(key)
        caller = None
        for record in self.records:
            if hmac.compare_digest(record.sha256, digest):
                caller = Caller(record.account_id, record.key_id, record.role, record.expires_at)
        return caller


def is_catalog_name(model: str) -> bool:
    """A catalog model by its name alone: catalog IDs are reserved for catalog models, in any account."""
    return catalog.lookup(parse_model_name(model).resource_id) is not None


def foreign_model_refusal(account_id: str, model: str, is_catalog: bool) -> str | None:
    """Why `account_id` may not build on `model` (deploy it, fine-tune it, put an addon on it), or None. Its own
    models are its own and catalog models (the operator's weights, in any account's name) are everyone's; another
    account's are refused in the same words whether or not they exist, so the refusal tells nothing about them."""
    owner = parse_model_name(model).account_id
    if owner == account_id or is_catalog:
        return None
    return (f"{model} is not a model account {account_id!r} may use: an account builds only on its own models "
            f"and on catalog models")


@dataclass(frozen=True)
class DeploymentAccess:
    """What a replica serves and for whom."""

    name: str  # accounts/<account>/deployments/<id>
    account_id: str  # the owner
    base_model: str  # accounts/<account>/models/<id>
    serverless: bool = False

    def may_use_deployment(self, account: str) -> bool:
        return self.serverless or account == self.account_id

    def may_load_addon(self, addon: str) -> bool:
        """A dedicated deployment loads its own account's addons; a serverless one any account's (each answers
        only its owner)."""
        return self.serverless or parse_model_name(addon).account_id == self.account_id

    def may_use_addon(self, account: str, addon: str) -> bool:
        return parse_model_name(addon).account_id == account or (not self.serverless and account == self.account_id)
