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
from dataclasses import dataclass
from pathlib import Path

import fsspec

from ember.provider.domain import catalog
from ember.provider.domain.names import check_id, parse_model_name

KEY_PREFIX = "ek-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    account_id: str
    sha256: str


class Accounts:
    def __init__(self, records: list[KeyRecord]):
        self.records = records

    @classmethod
    def load(cls, url: str | Path) -> "Accounts":
        """Read a keys file: {"keys": [{"account_id": ..., "sha256": ...}]} (never plain keys)."""
        with fsspec.open(str(url), "r") as f:
            raw = json.load(f)
        records = []
        for i, item in enumerate(raw.get("keys", [])):
            if "key" in item:
                raise ValueError(f"keys[{i}]: holds a plain key; store only its sha256")
            records.append(KeyRecord(check_id(item["account_id"], "account ID"), item["sha256"]))
        return cls(records)

    @staticmethod
    def add_key(url: str | Path, account_id: str) -> str:
        """Create a key for an account, store its hash, and return the key (shown once)."""
        check_id(account_id, "account ID")
        fs, path = fsspec.core.url_to_fs(str(url))
        raw = json.loads(fs.cat_file(path)) if fs.exists(path) else {"keys": []}
        key = new_key()
        raw["keys"].append({"account_id": account_id, "sha256": hash_key(key)})
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(8)}.tmp"  # moved into place: replicas re-reading it never see half
        fs.pipe_file(tmp, json.dumps(raw, indent=2).encode())
        fs.mv(tmp, path)
        return key

    def authenticate(self, key: str | None) -> str | None:
        """The key's account, or None. Every stored hash is compared, in constant time."""
        if not key:
            return None
        digest = hash_key(key)
        account = None
        for record in self.records:
            if hmac.compare_digest(record.sha256, digest):
                account = record.account_id
        return account


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
