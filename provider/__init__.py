"""Ember's Pulumi resources: `from ember.provider import Model, ModelArgs, LoRAAddon, LoRAAddonArgs, Deployment,
DeploymentArgs, Dataset, DatasetArgs, FineTuningJob, FineTuningJobArgs` (and `KubernetesDeployment,
KubernetesFineTuningJob, KubernetesArgs`).

The names load on first use, so importing `ember.provider.domain` (as a runtime replica does) never
imports pulumi.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "Model": "ember.provider.resources",
    "ModelArgs": "ember.provider.resources",
    "LoRAAddon": "ember.provider.resources",
    "LoRAAddonArgs": "ember.provider.resources",
    "Deployment": "ember.provider.resources",
    "DeploymentArgs": "ember.provider.resources",
    "AutoscalingPolicyArgs": "ember.provider.resources",
    "RequestLoggingArgs": "ember.provider.resources",
    "Dataset": "ember.provider.resources",
    "DatasetArgs": "ember.provider.resources",
    "FineTuningJob": "ember.provider.resources",
    "FineTuningJobArgs": "ember.provider.resources",
    "KubernetesDeployment": "ember.provider.backends.kubernetes",
    "KubernetesArgs": "ember.provider.backends.kubernetes",
    "KubernetesFineTuningJob": "ember.provider.backends.kubernetes",
}
__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from ember.provider.backends.kubernetes import KubernetesArgs, KubernetesDeployment, KubernetesFineTuningJob
    from ember.provider.resources import (AutoscalingPolicyArgs, Dataset, DatasetArgs, Deployment, DeploymentArgs,
                                          FineTuningJob, FineTuningJobArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs,
                                          RequestLoggingArgs)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ember.provider' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
