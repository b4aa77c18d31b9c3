"""The resource kinds, one module each (spec, outputs, what replaces it, type token, provider), and the one list
of them that every registry is derived from."""

from __future__ import annotations

from ember.provider.domain.kinds import api_key, dataset, deployment, fine_tuning_job, gateway, lora_addon, model
from ember.provider.domain.kinds.kind import Kind

KINDS: tuple[Kind, ...] = (model.KIND, lora_addon.KIND, deployment.KIND, dataset.KIND, fine_tuning_job.KIND,
                           gateway.KIND, api_key.KIND)
BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}
BY_TOKEN: dict[str, Kind] = {kind.type_token: kind for kind in KINDS}
BY_SPEC: dict[type, Kind] = {kind.spec: kind for kind in KINDS}
