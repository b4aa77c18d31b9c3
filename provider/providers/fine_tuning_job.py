"""The FineTuningJob provider: trains a LoRA on a base model and a dataset, and stores it as an addon model.

create runs the training on the local cluster (a child process), uploads the PEFT adapter content-addressed,
writes the output model's manifest (an addon of the base) and the job's record with its metrics, and meters
the tokens trained. Every input decides the adapter, so any change replaces the job (a new adapter); the
same inputs and seed give the same digest. A failed run leaves nothing in the store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fsspec
from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from ember.provider.backends.local_training import TrainingError, run_training
from ember.provider.backends.records import AddonManifest, BaseModelManifest, DatasetRecord, FineTuningJobRecord
from ember.provider.backends.store import Store, StoreError
from ember.provider.domain.names import parse_dataset_name, parse_fine_tuning_job_name, parse_model_name
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.spec import JobState
from ember.provider.domain.usage import record_training
from ember.provider.providers.base import EmberError, EmberProvider, base_manifest, progress
from ember.provider.providers.dataset import DATASET_FILE


class FineTuningJobProvider(EmberProvider):
    spec_cls = FineTuningJobSpec
    derived = ("base_model_digest", "dataset_digest", "evaluation_dataset_digest")

    def check_known(self, spec: FineTuningJobSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references)
        for field in ("dataset", "evaluation_dataset"):
            facts = references.get(field)
            if field not in unknown and isinstance(facts, dict) and facts.get("declared") is False:
                failures.append((field, f"{getattr(spec, field)} is not a Dataset declared in this program"))
        return failures

    def _dataset_file(self, store: Store, name: str, field: str) -> str:
        parsed = parse_dataset_name(name)
        record: DatasetRecord | None = store.read_dataset_record(parsed.account_id, parsed.resource_id)
        if record is None:
            raise EmberError(f"{field}: {name} is not in the store; declare it as a Dataset first")
        return str(store.local_path(record.object) / DATASET_FILE)

    def _job(self, spec: FineTuningJobSpec, base: BaseModelManifest, store: Store, output_dir: Path) -> dict:
        """The training process's settings (runtime.training.trainer.TrainingJob)."""
        return {"base_model": spec.base_model, "base_dir": str(store.local_path(base.object)),
                "dataset": self._dataset_file(store, spec.dataset, "dataset"),
                "evaluation_dataset": (self._dataset_file(store, spec.evaluation_dataset, "evaluation_dataset")
                                       if spec.evaluation_dataset else None),
                "output_dir": str(output_dir), "epochs": spec.epochs, "learning_rate": spec.learning_rate,
                "lora_rank": spec.lora_rank, "lora_alpha": spec.alpha, "target_modules": list(spec.target_modules),
                "batch_size": spec.batch_size, "max_context_length": spec.max_context_length,
                "early_stop": spec.early_stop, "seed": spec.seed}

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec: FineTuningJobSpec = self._spec(props)
        store = self.store
        job = parse_fine_tuning_job_name(spec.name)
        if store.read_job_record(job.account_id, job.resource_id) is not None:
            raise EmberError(f"job_id: {spec.name} already exists in the store")
        if store.read_manifest(spec.account_id, spec.output_model) is not None:
            raise EmberError(f"output_model: {spec.output_model_name} already exists (model IDs are globally unique); "
                             f"name the trained model anew")
        base = base_manifest(store, spec.base_model, spec.account_id)
        with self.scratch() as tmp:
            adapter = tmp / "adapter"
            if spec.cluster == "kubernetes":
                result = self._trained_in_cluster(spec, adapter)
            else:
                progress(f"{spec.name}: fine-tuning {spec.base_model} on {spec.dataset}")
                try:
                    result = run_training(self._job(spec, base, store, adapter), tmp, progress)
                except TrainingError as exc:
                    raise EmberError(f"{spec.name}: training failed: {exc}") from None
            digest, _ = store.put_directory(adapter, progress)
        return CreateResult(spec.name, props | self._record(spec, base, digest, result, props))

    @staticmethod
    def _trained_in_cluster(spec: FineTuningJobSpec, adapter: Path) -> dict:
        """The metrics and adapter a KubernetesFineTuningJob's pod wrote (pulumi-kubernetes waited for the Job)."""
        fs, root = fsspec.core.url_to_fs(spec.training_url)
        if not fs.exists(f"{root}/result.json"):
            raise EmberError(f"training_url: the Kubernetes Job wrote no result to {spec.training_url} (it failed or "
                             f"was cut short: see its pod's log)")
        adapter.mkdir(parents=True)
        for path in fs.ls(f"{root}/adapter", detail=False):
            fs.get_file(path, str(adapter / Path(path).name))
        return json.loads(fs.cat_file(f"{root}/result.json"))

    def _record(self, spec: FineTuningJobSpec, base: BaseModelManifest, digest: str, result: dict,
                props: dict[str, Any]) -> dict[str, Any]:
        """The output model's manifest and the job's record written (or nothing, on failure); the outputs."""
        store = self.store
        manifest = AddonManifest(name=spec.output_model_name, digest=digest, object=store.urls.object(digest),
                                 base_model=spec.base_model, rank=spec.lora_rank,
                                 target_modules=list(spec.target_modules), created=time.time(),
                                 inputs={"fine_tuning_job": spec.name})
        outputs = {"name": spec.name, "state": JobState.COMPLETED.value, "message": None,
                   "output_model_name": spec.output_model_name, "digest": digest, "adapter_url": manifest.object,
                   "train_loss": result["train_loss"], "step_loss": result["step_loss"],
                   "evaluation_loss": result["evaluation_loss"],
                   "epochs_run": result["epochs_run"], "dataset_tokens": result["dataset_tokens"],
                   "trained_tokens": result["trained_tokens"],
                   "duration_s": result["duration_s"]}
        record = FineTuningJobRecord(name=spec.name, state=JobState.COMPLETED, output_model_name=manifest.name,
                                     digest=digest, outputs=outputs, created=time.time(), inputs=self._inputs(props))
        try:
            store.write_manifest(manifest)
            store.write_job_record(record)
            record_training(store.url, spec.account_id, spec.name, spec.base_model, base.parameter_count,
                            result["trained_tokens"], result["duration_s"])
        except Exception:
            self._remove(spec)
            store.delete_object(digest)
            raise
        return outputs

    def drifted(self, olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return olds.get("state") == JobState.FAILED.value  # a refresh found the trained adapter gone or damaged

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # Only descriptions change in place; an adapter a refresh found damaged is trained again (same digest).
        spec: FineTuningJobSpec = self._spec(news)
        job = parse_fine_tuning_job_name(spec.name)
        record = self.store.read_job_record(job.account_id, job.resource_id)
        if record is None or olds.get("state") == JobState.FAILED.value:
            self._remove(spec)
            if record is not None:
                self.store.discard_object(record.digest)
            return UpdateResult(self.create(news).outs)
        record = record.model_copy(update={"inputs": self._inputs(news)})
        self.store.write_job_record(record)
        return UpdateResult(news | record.outputs)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec, by_id = self._read_spec(id_, props)
        name = parse_fine_tuning_job_name(id_) if by_id else parse_fine_tuning_job_name(spec.name)
        record = self.store.read_job_record(name.account_id, name.resource_id)
        if record is None:
            return ReadResult("", {})
        outputs = dict(record.outputs)
        output = parse_model_name(record.output_model_name)
        try:
            if self.store.read_manifest(output.account_id, output.resource_id) is None:
                raise StoreError(f"the trained model {record.output_model_name} is missing from the store")
            self.store.verify_object(record.digest)
        except StoreError as exc:
            outputs |= {"state": JobState.FAILED.value, "message": str(exc)}
        if by_id:
            return ReadResult(str(name), record.inputs | outputs, record.inputs)
        return ReadResult(id_, props | outputs)

    def _remove(self, spec: FineTuningJobSpec) -> None:
        job = parse_fine_tuning_job_name(spec.name)
        self.store.delete_document(self.store.paths.fine_tuning_job(job.account_id, job.resource_id))
        output = self.store.read_manifest(spec.account_id, spec.output_model)
        if output is not None and output.inputs.get("fine_tuning_job") == spec.name:  # ours, not another's
            self.store.delete_manifest(spec.account_id, spec.output_model)

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        spec: FineTuningJobSpec = self._spec(props)
        job = parse_fine_tuning_job_name(spec.name)
        record = self.store.read_job_record(job.account_id, job.resource_id)
        self._remove(spec)
        if record:
            self.store.delete_object(record.digest)  # kept while an addon deployed from it refers to it
