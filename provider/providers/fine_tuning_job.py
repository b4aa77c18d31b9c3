"""The FineTuningJob provider: trains a LoRA on a base model and a dataset, and stores it as an addon model.

create trains on the job's cluster (a child process locally; on Kubernetes it collects what the Job wrote), uploads
the PEFT adapter content-addressed, writes the output model's manifest (an addon of the base) and the job's record
with its metrics, and meters the tokens trained. Every input decides the adapter, so any change replaces the job
(a new adapter); the same inputs and seed give the same digest. A failed run leaves nothing in the store.
"""

from __future__ import annotations

import time
from typing import Any

from pulumi.dynamic import CreateResult, ReadResult, UpdateResult

from ember.provider.backends.cluster import ClusterError
from ember.provider.backends.store import StoreError
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.names import parse_fine_tuning_job_name, parse_model_name
from ember.provider.domain.records import AddonManifest, BaseModelManifest, FineTuningJobRecord
from ember.provider.domain.rules import dataset_refusal
from ember.provider.domain.spec import JobState
from ember.provider.domain.usage import record_training
from ember.provider.providers.base import EmberError, EmberProvider, base_manifest, progress


class FineTuningJobProvider(EmberProvider):
    spec_cls = FineTuningJobSpec

    def check_known(self, spec: FineTuningJobSpec, unknown: set[str], references: dict[str, Any]) -> list[tuple[str, str]]:
        failures = self._base_failures(spec.base_model, unknown, references)
        for field in ("dataset", "evaluation_dataset"):
            facts = references.get(field)
            refusal = None if field in unknown or not isinstance(facts, dict) else \
                dataset_refusal(getattr(spec, field), facts.get("declared"))
            if refusal:
                failures.append((field, refusal))
        return failures

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
            try:
                result = self.cluster_of(spec.cluster).train(spec, base, store, tmp, adapter)
            except ClusterError as exc:
                raise EmberError(str(exc)) from None
            digest, _ = store.put_directory(adapter, progress)
        return CreateResult(spec.name, props | self._record(spec, base, digest, result, props))

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
