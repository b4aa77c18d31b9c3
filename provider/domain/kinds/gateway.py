"""The Gateway kind: the platform's one endpoint in front of every deployment of a store. It authenticates the caller,
routes each request by its `model` to a deployment that serves it and that the caller may use, balances across that
deployment's replicas, retries what never reached one, and holds each account to its rate limits."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ember.provider.domain.kinds.deployment import KubernetesWorkload
from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import gateway_name
from ember.provider.domain.spec import (DeploymentState, DisplayName, FieldError, GatewayName, ResourceId, Spec, Text,
                                        full_name)

# One process answers a loopback port on the local cluster; on Kubernetes a pod may go (a node drains, a rollout) while
# the endpoint stays, so at least two serve it.
LOCAL_GATEWAY_REPLICAS = 1
MIN_KUBERNETES_GATEWAY_REPLICAS = 2


class RateLimits(Spec):
    """What one account may send through the gateway: token buckets holding a minute's worth, refilled evenly."""

    requests_per_minute: int = Field(600, ge=1, le=1_000_000, description="requests an account may send a minute")
    tokens_per_minute: int = Field(
        1_000_000, ge=1, le=10_000_000_000,
        description="prompt and completion tokens an account may use a minute: a request is counted when it is "
                    "admitted (its prompt's characters / 4, plus max_tokens for each choice) and settled at its usage")


class AccountRateLimits(Spec):
    """One account's own limits; a limit left out is the gateway's."""

    requests_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    tokens_per_minute: int | None = Field(None, ge=1, le=10_000_000_000)


class GatewaySpec(Spec):
    """The platform's one endpoint: routes requests by model name to the deployments of its store."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {"account_id": "unknown"}

    account_id: ResourceId = Field(description="the platform team's account: its keys read the gateway's /metrics")
    gateway_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    cluster: Literal["local", "kubernetes"] = Field(
        "local", description="local: a process on this machine; kubernetes: pods (ember.provider.KubernetesGateway)")
    port: int | None = Field(None, ge=1024, le=65535, description="local: the loopback port it listens on; when "
                                                                  "omitted, one is picked at the first up and kept")
    replicas: int | None = Field(None, ge=1, le=64, description="gateway processes behind the endpoint (1 on the local "
                                                                "cluster; at least 2, the default, on Kubernetes); each "
                                                                "holds an account to its share of the limits")
    rate_limits: RateLimits = RateLimits()
    account_rate_limits: dict[ResourceId, AccountRateLimits] = Field(
        default_factory=dict, max_length=10_000, description="per-account overrides of rate_limits, by account ID",
        json_schema_extra={"additionalProperties": False})  # a key that is no account ID is refused, not ignored
    max_attempts: int = Field(3, ge=1, le=10, description="replicas a request is tried on when one refuses the "
                                                          "connection, drains, or answers 503 or 429 before its first "
                                                          "byte")
    advertised_url: str | None = Field(None, min_length=1, max_length=2048,
                                       description="kubernetes: where clients reach it (its Ingress, route or "
                                                   "Service), set by KubernetesGateway")
    kubernetes_workload: KubernetesWorkload | None = Field(
        None, description="cluster='kubernetes': the gateway pods' apps/v1 Deployment, whose rollout create and update "
                          "wait for")
    display_name: DisplayName | None = None
    description: Text | None = None

    @model_validator(mode="after")
    def _fits_cluster(self) -> "GatewaySpec":
        kubernetes = self.cluster == "kubernetes"
        for field in ("kubernetes_workload", "advertised_url"):
            if getattr(self, field) is not None and not kubernetes:
                raise FieldError(field, f"is set, but cluster is {self.cluster!r}")
        if self.port is not None and kubernetes:
            raise FieldError("port", f"{self.port} given, but a Kubernetes gateway listens on its pods' port behind "
                                     f"its Service")
        if self.replicas is None:
            default = MIN_KUBERNETES_GATEWAY_REPLICAS if kubernetes else LOCAL_GATEWAY_REPLICAS
            object.__setattr__(self, "replicas", default)
        if kubernetes and self.replicas < MIN_KUBERNETES_GATEWAY_REPLICAS:
            raise FieldError("replicas", f"{self.replicas} is too few on Kubernetes: at least "
                                         f"{MIN_KUBERNETES_GATEWAY_REPLICAS} keep the endpoint up while a pod goes")
        if not kubernetes and self.replicas != LOCAL_GATEWAY_REPLICAS:
            raise FieldError("replicas", f"{self.replicas} given, but the local cluster runs one gateway process")
        return self

    @property
    def name(self) -> str:
        return full_name(gateway_name, self.account_id, self.gateway_id, "gateway_id")

    def limits_of(self, account: str) -> RateLimits:
        """The limits `account` is held to across all of the gateway's replicas."""
        own = self.account_rate_limits.get(account)
        if own is None:
            return self.rate_limits
        return RateLimits(requests_per_minute=own.requests_per_minute or self.rate_limits.requests_per_minute,
                          tokens_per_minute=own.tokens_per_minute or self.rate_limits.tokens_per_minute)


class GatewayOutputs(Spec):
    name: GatewayName
    state: DeploymentState
    message: str | None = None
    url: str | None = Field(None, description="the endpoint clients call (its /v1 is OpenAI's base URL)")
    ready_replicas: int = Field(0, ge=0)


KIND = Kind("Gateway", GatewaySpec, GatewayOutputs, schema_key="gateway",
            provider="ember.provider.providers.gateway:GatewayProvider",
            replace=frozenset({"account_id", "gateway_id", "cluster"}))
