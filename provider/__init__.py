"""Ember's Pulumi resources: `from ember.provider import Model, ModelArgs, LoRAAddon, LoRAAddonArgs, Deployment,
DeploymentArgs, Dataset, DatasetArgs, FineTuningJob, FineTuningJobArgs, Gateway, GatewayArgs` (and
`KubernetesDeployment, KubernetesFineTuningJob, KubernetesGateway, KubernetesArgs, KubernetesGatewayArgs`).

The public names come from the one list of kinds (ember.provider.domain.kinds) and load on first use, so importing
`ember.provider.domain` (as a runtime replica does) never imports pulumi.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

KUBERNETES = ("KubernetesDeployment", "KubernetesArgs", "KubernetesFineTuningJob", "KubernetesGateway",
              "KubernetesGatewayArgs")

if TYPE_CHECKING:
    from ember.provider.args import (AccountRateLimitsArgs, AutoscalingPolicyArgs, DatasetArgs, DeploymentArgs,
                                     FineTuningJobArgs, GatewayArgs, KubernetesWorkloadArgs, LoRAAddonArgs, ModelArgs,
                                     RateLimitsArgs, RequestLoggingArgs)
    from ember.provider.kubernetes import (KubernetesArgs, KubernetesDeployment, KubernetesFineTuningJob,
                                           KubernetesGateway, KubernetesGatewayArgs)
    from ember.provider.resources import Dataset, Deployment, FineTuningJob, Gateway, LoRAAddon, Model


@cache
def _public() -> dict[str, str]:
    """Each public name → the module that holds it: every kind's resource and Args, the nested Args, the Kubernetes
    components."""
    from ember.provider.domain.kinds import KINDS
    from ember.provider.tools.args_sdk import arg_classes

    return ({kind.name: "ember.provider.resources" for kind in KINDS} | dict.fromkeys(arg_classes(), "ember.provider.args")
            | dict.fromkeys(KUBERNETES, "ember.provider.kubernetes"))


def __getattr__(name: str):
    if name == "__all__":
        return sorted(_public())
    if name not in _public():
        raise AttributeError(f"module 'ember.provider' has no attribute {name!r}")
    return getattr(importlib.import_module(_public()[name]), name)
