"""A stack file: resources declared together, and the rules no single resource can see."""

from __future__ import annotations

from pydantic import model_validator

from ember.provider.domain.kinds.dataset import DatasetSpec
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.lora_addon import LoRAAddonSpec
from ember.provider.domain.kinds.model import ModelSpec
from ember.provider.domain.spec import FieldError, Spec


class StackSpec(Spec):
    """Resources declared together; checks the rules no single resource can see."""

    models: tuple[ModelSpec, ...] = ()
    addons: tuple[LoRAAddonSpec, ...] = ()
    deployments: tuple[DeploymentSpec, ...] = ()
    datasets: tuple[DatasetSpec, ...] = ()
    fine_tuning_jobs: tuple[FineTuningJobSpec, ...] = ()

    @model_validator(mode="after")
    def _cross_references(self) -> "StackSpec":
        seen: dict[str, str] = {}
        namespaces = {"deployments": "deployment", "datasets": "dataset", "fine_tuning_jobs": "model"}
        for group, items, id_field in (
            ("models", self.models, "model_id"),
            ("addons", self.addons, "model_id"),
            ("deployments", self.deployments, "deployment_id"),
            ("datasets", self.datasets, "dataset_id"),
            ("fine_tuning_jobs", self.fine_tuning_jobs, "output_model"),  # a job's output is a model
        ):
            for i, item in enumerate(items):
                ident = getattr(item, id_field)
                key = f"{namespaces.get(group, 'model')}:{ident}"
                if ident is not None and key in seen:
                    raise FieldError(f"{group}.{i}.{id_field}", f"{ident!r} is already used by {seen[key]}")
                seen[key] = f"{group}[{i}]"
        declared_models = {m.name: m for m in self.models if m.model_id}
        for i, d in enumerate(self.deployments):
            if d.base_model not in declared_models and any(a.name == d.base_model for a in self.addons if a.model_id):
                raise FieldError(f"deployments.{i}.base_model", f"{d.base_model!r} is a LoRA addon, not a base model")
        deployments = {d.name: d for d in self.deployments if d.deployment_id}
        for i, addon in enumerate(self.addons):
            for j, target in enumerate(addon.deployments):
                deployment = deployments.get(target)
                if deployment is not None and deployment.base_model != addon.base_model:
                    raise FieldError(f"addons.{i}.deployments.{j}", f"{target!r} serves base model "
                                     f"{deployment.base_model!r}, not this addon's base {addon.base_model!r}")
        return self
