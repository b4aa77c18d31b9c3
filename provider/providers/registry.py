"""The provider of each resource type, by the name its resource registers under (`ember:<name>`)."""

from __future__ import annotations

from ember.provider.providers.base import EmberProvider
from ember.provider.providers.dataset import DatasetProvider
from ember.provider.providers.deployment import DeploymentProvider
from ember.provider.providers.fine_tuning_job import FineTuningJobProvider
from ember.provider.providers.lora_addon import LoRAAddonProvider
from ember.provider.providers.model import ModelProvider

PROVIDERS: dict[str, type[EmberProvider]] = {"Model": ModelProvider, "LoRAAddon": LoRAAddonProvider,
                                             "Deployment": DeploymentProvider, "Dataset": DatasetProvider,
                                             "FineTuningJob": FineTuningJobProvider}
