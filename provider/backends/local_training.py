"""Fine-tuning on the local cluster: the training runs in a child process, never in the provider's.

The child is `python -m ember.runtime finetune --job job.json --result result.json`: the job's settings in,
a PEFT adapter in the job's output directory and its metrics out. Its progress lines are passed on as they
come; when it fails, its last error line (which names a line number or a setting, never a dataset's text)
becomes the error the user sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ember.provider.backends.cluster import ClusterError
from ember.provider.backends.store import Store
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.names import parse_dataset_name
from ember.provider.domain.records import BaseModelManifest, DatasetRecord
from ember.provider.domain.store_layout import DATASET_FILE


class TrainingError(RuntimeError):
    pass


def training_job(spec: FineTuningJobSpec, base: BaseModelManifest, store: Store, output_dir: Path) -> dict:
    """The training process's settings (runtime.training.trainer.TrainingJob): the base and the datasets as files of
    this machine's store."""
    return spec.training_settings | {
        "base_model": spec.base_model, "base_dir": str(store.local_path(base.object)),
        "dataset": _dataset_file(store, spec.dataset, "dataset"),
        "evaluation_dataset": (_dataset_file(store, spec.evaluation_dataset, "evaluation_dataset")
                               if spec.evaluation_dataset else None),
        "output_dir": str(output_dir)}


def _dataset_file(store: Store, name: str, field: str) -> str:
    parsed = parse_dataset_name(name)
    record: DatasetRecord | None = store.read_dataset_record(parsed.account_id, parsed.resource_id)
    if record is None:
        raise ClusterError(f"{field}: {name} is not in the store; declare it as a Dataset first")
    return str(store.local_path(record.object) / DATASET_FILE)


def run_training(job: dict, workdir: Path, progress: Callable[[str], None]) -> dict:
    """Train in a child process; returns the result's metrics. The adapter is in job["output_dir"]."""
    job_file, result_file, log_file = workdir / "job.json", workdir / "result.json", workdir / "training.log"
    job_file.write_text(json.dumps(job, indent=2))
    command = [sys.executable, "-m", "ember.runtime", "finetune", "--job", str(job_file), "--result", str(result_file)]
    with log_file.open("w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        try:
            for line in child.stdout:
                progress(line.rstrip())
            code = child.wait()
        except BaseException:  # a cancelled `up`: the training stops with it
            child.kill()
            child.wait()
            raise
    if code != 0 or not result_file.exists():
        raise TrainingError(_last_error(log_file.read_text()) or f"the training process exited with code {code}")
    return json.loads(result_file.read_text())


def _last_error(log: str) -> str:
    """The exception line of a Python traceback, without its class path: what went wrong, in words."""
    lines = [line for line in log.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    name, _, message = last.partition(": ")
    return message if message and name.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last
