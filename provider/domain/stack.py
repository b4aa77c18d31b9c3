"""A stack file's resources, declared together: the rules that span them (domain/rules.py) judge them at once."""

from __future__ import annotations

from pydantic import Field, model_validator

from ember.provider.domain.kinds.api_key import ApiKeySpec
from ember.provider.domain.kinds.dataset import DatasetSpec
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.domain.kinds.lora_addon import LoRAAddonSpec
from ember.provider.domain.kinds.model import ModelSpec
from ember.provider.domain.rules import Declaration, DeploymentFacts, addon_misfits, base_model_refusal, name_clashes
from ember.provider.domain.spec import FieldError, Spec


class StackSpec(Spec):
    """Resources declared together; checks the rules no single resource can see."""

    models: tuple[ModelSpec, ...] = ()
    addons: tuple[LoRAAddonSpec, ...] = ()
    deployments: tuple[DeploymentSpec, ...] = ()
    datasets: tuple[DatasetSpec, ...] = ()
    fine_tuning_jobs: tuple[FineTuningJobSpec, ...] = ()
    gateways: tuple[GatewaySpec, ...] = Field((), max_length=1, description="a store has one gateway")
    api_keys: tuple[ApiKeySpec, ...] = ()

    @model_validator(mode="after")
    def _cross_references(self) -> "StackSpec":
        declared = self._declarations()
        for declaration, message in name_clashes(declared):
            raise FieldError(declared[declaration], message)
        addons = {a.name for a in self.addons if a.model_id} - {m.name for m in self.models if m.model_id}
        for i, deployment in enumerate(self.deployments):
            refusal = base_model_refusal(deployment.base_model, deployment.base_model in addons, None)
            if refusal:
                raise FieldError(f"deployments.{i}.base_model", refusal)
        deployments = {d.name: DeploymentFacts(d.name, d.base_model, d.max_lora_rank)
                       for d in self.deployments if d.deployment_id}
        for i, addon in enumerate(self.addons):
            for j, target in enumerate(addon.deployments):
                misfits = addon_misfits(addon.base_model, None, deployments[target]) if target in deployments else []
                for _, message in misfits:
                    raise FieldError(f"addons.{i}.deployments.{j}", message)
        return self

    def _declarations(self) -> dict[Declaration, str]:
        """Every name the stack's resources take (a job's output model too), with the path of the field taking it."""
        declared = {}
        for group, id_field in (("models", "model_id"), ("addons", "model_id"), ("deployments", "deployment_id"),
                                ("datasets", "dataset_id"), ("fine_tuning_jobs", "output_model")):
            for i, item in enumerate(getattr(self, group)):
                if getattr(item, id_field) is None:
                    continue
                trained = group == "fine_tuning_jobs"
                name = item.output_model_name if trained else item.name
                declared[Declaration(name, f"{group}[{i}]", trained)] = f"{group}.{i}.{id_field}"
        return declared
