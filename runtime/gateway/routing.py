"""Which deployments may answer a request, from its `model` and the caller's account: pure functions of a Directory.

A base model or addon name goes to the deployments that serve it and that the account may use: its own dedicated ones
first, then serverless ones. `…#accounts/<a>/deployments/<d>` goes to exactly that deployment. A model the account may
not use is answered exactly as one that does not exist (404 model_not_found), so no answer tells one account what
another deploys. A serverless deployment whose model was shut down takes no requests: they go to the others, and when
none is left the shutdown's 410 answers (the replicas' own words).
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.provider.domain.names import split_pinned
from ember.runtime.gateway.directory import Deployment, Directory
from ember.runtime.serving.errors import APIError


@dataclass(frozen=True)
class Route:
    model: str  # the model's name, without a pin
    deployments: tuple[Deployment, ...]  # those that may answer, the preferred first

    @property
    def addon(self) -> str | None:
        """The addon the request names (None for a base model), the same on every deployment of the route."""
        first = self.deployments[0].access
        return None if self.model == first.base_model else self.model


def _unknown(model: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist or you do not have access to it",
                    type="not_found_error", param="model", code="model_not_found")


def route(directory: Directory, account: str, requested: object, draw: float = 0.0) -> Route:
    """The deployments that may answer `account`'s request for `requested` (the body's `model`), or an APIError: 400
    for a name that is not one, 404 for a model or pinned deployment that does not serve it to this account. `draw`
    (uniform in [0, 1)) picks the first among the account's own deployments of the model by their traffic weights."""
    if not isinstance(requested, str):
        raise APIError(400, "model: is required, as a string: accounts/<account>/models/<model>", param="model",
                       code="invalid_parameter")
    try:
        model, pinned = split_pinned(requested)
    except ValueError as exc:
        raise APIError(400, f"model: {exc}", param="model", code="invalid_parameter") from None
    if pinned is not None:
        deployment = directory.deployments.get(pinned)
        if deployment is None or not deployment.usable(account, model):
            # the same words whether the deployment does not exist, is another account's, or serves another model
            raise APIError(404, f"the model {model!r} is not served by deployment {pinned!r}, or you do not have "
                                f"access to it", type="not_found_error", param="model", code="model_not_found")
        refusal = deployment.shutdown()
        if refusal is not None:
            raise refusal
        return Route(model, (deployment,))
    usable = [d for d in directory.deployments.values() if d.usable(account, model)]
    if not usable:
        raise _unknown(model)
    open_ = [d for d in usable if d.shutdown() is None]
    if not open_:
        raise usable[0].shutdown()
    usable = open_
    # Its own dedicated deployments first (it pays for them), then the shared serverless ones; within each, those with
    # replicas ready, then by name, so that the order is the same on every gateway replica.
    # One that takes no traffic (weight 0) answers only when no other can.
    usable.sort(key=lambda d: (d.traffic_weight == 0, d.access.serverless, not d.replicas, d.name))
    first = _weighted([d for d in usable if not d.access.serverless and d.traffic_weight > 0], draw)
    if first is not None:
        usable.remove(first)
        usable.insert(0, first)
    return Route(model, tuple(usable))


def _weighted(own: list[Deployment], draw: float) -> Deployment | None:
    """A canary's split: one of the account's own deployments of the model, each as likely as its traffic weight says
    (among those with a replica ready, when any has one: a deployment scaled to zero is woken only when none is)."""
    candidates = [d for d in own if d.replicas] or own
    total = sum(d.traffic_weight for d in candidates)
    point = draw * total
    for deployment in candidates:
        point -= deployment.traffic_weight
        if point < 0:
            return deployment
    return candidates[-1] if candidates else None


def models(directory: Directory, account: str) -> dict[str, dict]:
    """Every model `account` may call, across deployments, as OpenAI's model objects (by id)."""
    listed: dict[str, dict] = {}
    for deployment in sorted(directory.deployments.values(), key=lambda d: d.name):
        access = deployment.access
        if not access.may_use_deployment(account):
            continue
        names = [access.base_model, *sorted(a for a in deployment.addons if access.may_use_addon(account, a))]
        for name in names:
            entry = listed.setdefault(name, {
                "id": name, "object": "model", "created": 0, "owned_by": name.split("/")[1],
                "parent": None if name == access.base_model else access.base_model,
                "kind": "HF_BASE_MODEL" if name == access.base_model else "HF_PEFT_ADDON", "deployments": []})
            entry["deployments"].append(access.name)
    return listed
