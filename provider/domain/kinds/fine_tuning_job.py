"""The FineTuningJob kind: supervised fine-tuning of a LoRA on a base model; its output is an addon model."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ember.provider.domain.kinds.kind import Kind
from ember.provider.domain.names import fine_tuning_job_name, model_name, parse_dataset_name
from ember.provider.domain.spec import (LORA_TARGET_MODULES, MAX_EPOCHS, MAX_LORA_RANK, DatasetName, DisplayName,
                                        FieldError, JobState, ModelName, ResourceId, Spec, Text, full_name,
                                        refuse_foreign_base, refuse_reserved_id)


class FineTuningJobSpec(Spec):
    """Supervised fine-tuning of a LoRA on a base model; its output is an addon model of that base."""

    PREVIEW_PLACEHOLDERS: ClassVar[dict[str, Any]] = {
        "account_id": "unknown", "base_model": "accounts/unknown/models/unknown",
        "dataset": "accounts/unknown/datasets/unknown", "evaluation_dataset": None, "output_model": "unknown",
        "training_url": "unknown"}

    account_id: ResourceId
    job_id: ResourceId | None = Field(None, description="user-chosen; generated when omitted")
    base_model: ModelName
    dataset: DatasetName
    evaluation_dataset: DatasetName | None = Field(None, description="its loss is reported after every epoch")
    output_model: ResourceId = Field(description="the trained addon's model ID in this account")
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    learning_rate: float = Field(1e-4, gt=0, le=0.1)
    lora_rank: int = Field(8, ge=1, le=MAX_LORA_RANK)
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="default: twice the rank")
    target_modules: tuple[str, ...] = Field(LORA_TARGET_MODULES, min_length=1)
    batch_size: int = Field(8, ge=1, le=512, description="examples per optimizer step")
    max_context_length: int = Field(2048, ge=16, le=131072, description="longest example, in tokens")
    early_stop: bool = Field(False, description="stop when the evaluation loss stops improving (needs "
                                                "evaluation_dataset); the best epoch's adapter is kept")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    cluster: Literal["local", "kubernetes"] = Field("local", description="where it trains: a child process on this "
                                                    "machine, or a batch/v1 Job (set by KubernetesFineTuningJob)")
    training_url: str | None = Field(None, description="where the Kubernetes Job writes the adapter and its metrics "
                                                       "(set by KubernetesFineTuningJob)")
    display_name: DisplayName | None = None
    description: Text | None = None

    @property
    def name(self) -> str:
        return full_name(fine_tuning_job_name, self.account_id, self.job_id, "job_id")

    @property
    def output_model_name(self) -> str:
        return model_name(self.account_id, self.output_model)

    @property
    def training_settings(self) -> dict:
        """The hyperparameters as the training process takes them (runtime.training.trainer.TrainingJob), the same
        from every cluster; each adds where the base model, the datasets and the output are."""
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "lora_rank": self.lora_rank,
                "lora_alpha": self.alpha, "target_modules": list(self.target_modules), "batch_size": self.batch_size,
                "max_context_length": self.max_context_length, "early_stop": self.early_stop, "seed": self.seed}

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in value if m not in LORA_TARGET_MODULES]
        if unknown:
            raise ValueError(f"{unknown!r} are not LoRA-targetable; use any of {', '.join(LORA_TARGET_MODULES)}")
        return tuple(sorted(set(value), key=LORA_TARGET_MODULES.index))

    @model_validator(mode="after")
    def _fits_domain(self) -> "FineTuningJobSpec":
        refuse_reserved_id(self.output_model, "output_model")
        refuse_foreign_base(self.account_id, self.base_model)
        for field in ("dataset", "evaluation_dataset"):
            value = getattr(self, field)
            if value is not None and parse_dataset_name(value).account_id != self.account_id:
                raise FieldError(field, f"{value!r} belongs to account {parse_dataset_name(value).account_id!r}: "
                                        f"datasets are private to their account")
        if self.early_stop and self.evaluation_dataset is None:
            raise FieldError("early_stop", "True needs an evaluation_dataset to judge the epochs by")
        if (self.cluster == "kubernetes") != (self.training_url is not None):
            raise FieldError("training_url", "is set with cluster='kubernetes' (by KubernetesFineTuningJob), and only then")
        return self


class FineTuningJobOutputs(Spec):
    name: str = Field(description="accounts/<ACCOUNT_ID>/fineTuningJobs/<JOB_ID>")
    state: JobState
    message: str | None = None
    output_model_name: ModelName | None = None
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$", description="the trained adapter's")
    adapter_url: str | None = Field(None, description="the adapter in the store: a LoRAAddon's source")
    train_loss: tuple[float, ...] = Field((), description="mean training loss of each epoch")
    step_loss: tuple[float, ...] = Field((), description="training loss of each optimizer step (the loss curve)")
    evaluation_loss: tuple[float, ...] = Field((), description="evaluation loss after each epoch")
    epochs_run: int = Field(0, ge=0)
    dataset_tokens: int = Field(0, ge=0, description="the training dataset's tokens after the base model's chat "
                                                     "template (one epoch)")
    trained_tokens: int = Field(0, ge=0, description="tokens trained on, all epochs (billed)")
    duration_s: float = Field(0.0, ge=0)


KIND = Kind("FineTuningJob", FineTuningJobSpec, FineTuningJobOutputs, schema_key="fine_tuning_job",
            provider="ember.provider.providers.fine_tuning_job:FineTuningJobProvider",
            # every input decides the adapter: any change trains a new one
            replace=frozenset(set(FineTuningJobSpec.model_fields) - {"display_name", "description"}
                              | {"base_model_digest", "dataset_digest", "evaluation_dataset_digest"}),
            derived=("base_model_digest", "dataset_digest", "evaluation_dataset_digest"))
