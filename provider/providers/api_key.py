"""The ApiKey provider: a key made at create and returned once (a secret output), its hash, role and expiry in the
store's keys file, where replicas and the gateway read it; delete revokes it. A rotation (a new `rotation` label) is a
replacement the engine makes create-before-delete: the new key works before the old one is revoked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, ReadResult, UpdateResult

from ember.provider.domain.accounts import KeyRecord, hash_key, new_key
from ember.provider.domain.audit import AuditLog
from ember.provider.domain.kinds.api_key import KIND, ApiKeySpec
from ember.provider.domain.names import owner_stack, parse_api_key_name
from ember.provider.providers.base import REFERENCES, EmberError, EmberProvider, has_unknown

HINT_CHARACTERS = 8  # "ek-" and five more: enough to tell a team's keys apart, nothing to guess the rest by


def _stack(props: dict[str, Any]) -> str | None:
    """The stack that declares the key (organization/project/stack), from the owner the program passes along."""
    references = props.get(REFERENCES)
    return owner_stack(references.get("owner")) if isinstance(references, dict) else None


def _shown(stack: str) -> str:
    """organization/project/stack, or project/stack where no organization is known (the offline runner)."""
    return stack.removeprefix("None/")


def _actor(props: dict[str, Any]) -> str:
    stack = _stack(props)
    return f"stack:{_shown(stack)}" if stack else "provider"


class ApiKeyProvider(EmberProvider):
    spec_cls = ApiKeySpec
    delete_before_replace = False  # a rotation: the new key first, then the old one is revoked

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        result = super().check(olds, news)
        expires = result.inputs.get("expires_at")
        # A past expiry is refused where a key is made (a create, a rotation) or given it; one that has since passed on
        # a key already made is what it was, and the key answers that it expired.
        made = not olds or any(result.inputs.get(field) != olds.get(field) for field in KIND.replace)
        if isinstance(expires, str) and not has_unknown(expires) and (made or expires != olds.get("expires_at")):
            try:
                when = datetime.fromisoformat(expires)
            except ValueError:
                when = None  # the spec names the bad value
            if when is not None and when.utcoffset() is not None and when <= datetime.now(UTC):
                result.failures.append(CheckFailure("expires_at", f"{expires!r} is in the past: a new key's expiry "
                                                                  f"must be later than now"))
        return result

    def check_known(self, spec: ApiKeySpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        if "account_id" in unknown:
            return []
        stack = _stack({REFERENCES: references})
        others = sorted({r.owner for r in self._records() if r.account_id == spec.account_id and r.owner
                         and r.owner != stack})
        if others:
            return [("account_id", f"{spec.account_id!r} is administered by another stack ({_shown(others[0])}): an account's "
                                   f"keys are declared by the one stack that made its first key")]
        return []

    def _records(self) -> list[KeyRecord]:
        try:
            return self.store.api_keys()
        except (OSError, ValueError):  # an unreadable keys file: create says so, naming it
            return []

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: ApiKeySpec = self._spec(props)
        if failures := self.check_known(spec, set(), props.get(REFERENCES) or {}):
            raise EmberError("; ".join(f"{field}: {message}" for field, message in failures))
        key = new_key()
        record = KeyRecord(spec.account_id, hash_key(key), spec.name, spec.role, spec.expires_at, _stack(props))
        self.store.change_api_keys(lambda records: [*records, record])
        AuditLog(self.store.url).record(account=spec.account_id, actor=_actor(props), action="key.created",
                                        target=spec.name, result="ok", detail=f"role {spec.role}")
        outputs = {"name": spec.name, "state": "ACTIVE", "message": None, "key": key, "key_sha256": record.sha256,
                   "key_hint": key[:HINT_CHARACTERS], "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        return CreateResult(spec.name, props | outputs)

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """A new role or expiry applies to the same key (display_name and description are the program's only)."""
        spec: ApiKeySpec = self._spec(news)
        digest = olds.get("key_sha256")
        found = []

        def change(records: list[KeyRecord]) -> list[KeyRecord]:
            for i, r in enumerate(records):
                if r.sha256 == digest:
                    records[i] = KeyRecord(r.account_id, r.sha256, r.key_id, spec.role, spec.expires_at, r.owner)
                    found.append(r)
            return records

        self.store.change_api_keys(change)
        if not found:
            raise EmberError(f"{spec.name}: the key is no longer in the store (revoked outside this stack); rotate it "
                             f"(change `rotation`) to make a new one")
        before = found[0]
        changes = [f"role {before.role} -> {spec.role}"] if before.role != spec.role else []
        if before.expires_at != spec.expires_at:
            shown = [t.isoformat() if t else "never" for t in (before.expires_at, spec.expires_at)]
            changes.append(f"expires {shown[0]} -> {shown[1]}")
        if changes:  # a key given more power or a longer life is an admin action like its creation
            AuditLog(self.store.url).record(account=spec.account_id, actor=_actor(news), action="key.updated",
                                            target=spec.name, result="ok", detail="; ".join(changes))
        kept = {k: olds.get(k) for k in ("key", "key_sha256", "key_hint", "created_at")}
        return UpdateResult(news | kept | {"name": spec.name, **self._state(spec.expires_at)})

    @staticmethod
    def _state(expires_at: datetime | None) -> dict[str, Any]:
        if expires_at is not None and expires_at <= datetime.now(UTC):
            return {"state": "EXPIRED", "message": f"expired at {expires_at.isoformat()}"}
        return {"state": "ACTIVE", "message": None}

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """refresh: a key revoked outside the stack is gone; one past its expiry says so."""
        spec, by_id = self._read_spec(id_, props)
        name = str(parse_api_key_name(id_)) if by_id else spec.name
        records = [r for r in self.store.api_keys() if r.key_id == name]
        mine = [r for r in records if r.sha256 == props.get("key_sha256")]
        if not mine:
            if by_id and records:
                raise EmberError(f"{name}: a key cannot be read back once made (only its hash is kept); declare a new "
                                 f"ApiKey instead of getting this one")
            return ReadResult("", {})
        return ReadResult(id_, props | self._state(mine[0].expires_at))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        """Revoke: the record of this resource's own key goes (a rotation's new key, under the same name, stays)."""
        spec: ApiKeySpec = self._spec(props)
        digest = props.get("key_sha256") or (hash_key(props["key"]) if isinstance(props.get("key"), str) else None)
        removed = []

        def revoke(records: list[KeyRecord]) -> list[KeyRecord]:
            removed.extend(r for r in records if r.sha256 == digest)
            return [r for r in records if r.sha256 != digest]

        self.store.change_api_keys(revoke)
        if removed:
            AuditLog(self.store.url).record(account=spec.account_id, actor=_actor(props), action="key.revoked",
                                            target=spec.name, result="ok")
