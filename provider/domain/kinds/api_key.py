"""The ApiKey kind: a key of one account, with a role and an optional expiry. The key itself is made at create and
returned once, as a secret output; only its SHA-256 reaches the store."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ember.provider.domain.accounts import IMPLICIT_KEY_ID
from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import api_key_name
from ember.provider.domain.spec import ApiKeyName, DisplayName, FieldError, ResourceId, Spec, Text, full_name


class ApiKeySpec(Spec):
    """An API key of one account: `inference` calls the OpenAI routes, `admin` the admin routes too."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {"account_id": "unknown"}

    account_id: ResourceId
    key_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    role: Literal["inference", "admin"] = Field("inference", description="inference: the OpenAI routes; admin: also "
                                                                         "the admin routes (addons, reconcile, metrics)")
    expires_at: datetime | None = Field(None, description="ISO 8601 with a UTC offset (2027-01-31T00:00:00Z); after it "
                                                          "the key gets 401 saying it expired; none: it does not expire")
    rotation: str | None = Field(None, min_length=1, max_length=64,
                                 description="any label: changing it rotates the key (the new key is made before the "
                                             "old one is revoked, so both work in between)")
    display_name: DisplayName | None = None
    description: Text | None = None

    @field_validator("expires_at")
    @classmethod
    def _with_offset(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError(f"{value.isoformat()!r} has no UTC offset; write it as 2027-01-31T00:00:00Z")
        return value

    @model_validator(mode="after")
    def _not_implicit(self) -> "ApiKeySpec":
        if self.key_id == IMPLICIT_KEY_ID:
            raise FieldError("key_id", f"{IMPLICIT_KEY_ID!r} is reserved for the account's implicit key (the one made "
                                       f"at its first up, beside the program)")
        return self

    @property
    def name(self) -> str:
        return full_name(api_key_name, self.account_id, self.key_id, "key_id")


class ApiKeyOutputs(Spec):
    name: ApiKeyName
    state: Literal["ACTIVE", "EXPIRED"]
    message: str | None = None
    key: str | None = Field(None, description="the key (a secret output: encrypted in the stack's state; the store "
                                              "holds only its SHA-256)")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="what revokes it")
    key_hint: str | None = Field(None, description="its first characters, to tell keys apart")
    created_at: str | None = None


KIND = Kind("ApiKey", ApiKeySpec, ApiKeyOutputs, schema_key="api_key",
            provider="ember.provider.providers.api_key:ApiKeyProvider",
            # a new key: made before the old one is revoked (the engine's default order), so clients can move over
            replace=frozenset({"account_id", "key_id", "rotation"}),
            secret_outputs=("key",))
