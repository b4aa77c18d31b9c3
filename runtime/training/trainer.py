"""Supervised fine-tuning of a LoRA: the job's settings in, a PEFT adapter and its metrics out.

Deterministic for a given job and seed on one machine: the LoRA's initial values, the order of examples
in every epoch and the optimizer all follow the seed, so the same inputs give the same adapter bytes (the
provider relies on it: a second `up` finds the same digest). Loss is the mean cross-entropy over the
assistant tokens of a batch. With an evaluation dataset, each epoch ends with its loss; `early_stop` ends the
run when it stops improving and keeps the best epoch's adapter.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.provider.domain.datasets import read_dataset
from ember.provider.domain.model_files import read_config
from ember.runtime.fetch import local_copy
from ember.runtime.model.loader import load_model
from ember.runtime.model.tokenizer import TextTokenizer
from ember.runtime.training.examples import TokenizedExample, tokenize_dataset
from ember.runtime.training.lora_model import LoRATrainingModel


@dataclass(frozen=True)
class TrainingJob:
    """What the provider hands the training process (as JSON)."""

    base_model: str  # its name, written into the adapter's config
    base_dir: str
    dataset: str  # a JSONL file
    output_dir: str
    evaluation_dataset: str | None = None
    epochs: int = 1
    learning_rate: float = 1e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    batch_size: int = 8
    max_context_length: int = 2048
    early_stop: bool = False
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainingResult:
    train_loss: list[float] = field(default_factory=list)  # per epoch
    step_loss: list[float] = field(default_factory=list)  # per optimizer step: the loss curve
    evaluation_loss: list[float] = field(default_factory=list)
    trained_tokens: int = 0  # every token of every example, every epoch (what is billed)
    dataset_tokens: int = 0  # one epoch's
    epochs_run: int = 0
    stopped_early: bool = False
    duration_s: float = 0.0
    device: str = "cpu"


def _batches(examples: list[TokenizedExample], size: int, order: list[int], pad_id: int, device):
    for start in range(0, len(order), size):
        chosen = [examples[i] for i in order[start:start + size]]
        length = max(len(e.input_ids) for e in chosen)
        ids = torch.full((len(chosen), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), length), dtype=torch.bool)
        for row, example in enumerate(chosen):
            ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
            mask[row, : len(example.loss_mask)] = torch.tensor(example.loss_mask)
        yield ids.to(device), mask.to(device), sum(len(e.input_ids) for e in chosen)


def _loss(model: LoRATrainingModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each assistant token from the tokens before it. Logits are computed
    for those positions only: the vocabulary projection is a large share of a small model's work."""
    learned = mask[:, 1:]
    hidden = model.hidden(ids[:, :-1])[learned]
    return F.cross_entropy(model.logits(hidden), ids[:, 1:][learned])


@torch.no_grad()
def _evaluate(model: LoRATrainingModel, examples: list[TokenizedExample], job: TrainingJob, pad_id: int) -> float:
    total, count = 0.0, 0
    for ids, mask, _ in _batches(examples, job.batch_size, list(range(len(examples))), pad_id, model.weights.device):
        n = int(mask[:, 1:].sum())
        total += float(_loss(model, ids, mask)) * n
        count += n
    return total / max(count, 1)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(job: TrainingJob, progress: Callable[[str], None] = print) -> TrainingResult:
    started = time.monotonic()
    device = _device(job.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # on CPU, fp32
    tokenizer = TextTokenizer.from_dir(job.base_dir)
    train_set = tokenize_dataset(tokenizer, read_dataset(job.dataset, "dataset"), job.max_context_length, "dataset")
    eval_set = (tokenize_dataset(tokenizer, read_dataset(job.evaluation_dataset, "evaluation_dataset"),
                                 job.max_context_length, "evaluation_dataset") if job.evaluation_dataset else [])
    pad_id = tokenizer.token_id(tokenizer.eos_token) or 0
    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    weights = load_model(job.base_dir, dtype, device)
    model = LoRATrainingModel(weights, read_config(job.base_dir), job.lora_rank, job.lora_alpha, job.target_modules,
                              generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=0.0)
    result = TrainingResult(dataset_tokens=sum(len(e.input_ids) for e in train_set), device=str(device))
    steps_per_epoch = -(-len(train_set) // job.batch_size)
    total_steps, step, best = steps_per_epoch * job.epochs, 0, None
    progress(f"training a rank-{job.lora_rank} LoRA on {len(train_set)} examples ({result.dataset_tokens} tokens) for "
             f"{job.epochs} epochs, {total_steps} steps, on {device}")
    for epoch in range(1, job.epochs + 1):
        order = torch.randperm(len(train_set), generator=generator).tolist()
        losses, tokens = [], 0
        for ids, mask, count in _batches(train_set, job.batch_size, order, pad_id, device):
            loss = _loss(model, ids, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            result.step_loss.append(round(losses[-1], 6))
            tokens += count
            result.trained_tokens += count
            elapsed = time.monotonic() - started
            if step == 1 or step % 5 == 0 or step == total_steps:
                rate = result.trained_tokens / elapsed
                left = (total_steps - step) * elapsed / step
                progress(f"epoch {epoch}/{job.epochs} step {step}/{total_steps} loss {losses[-1]:.4f} "
                         f"{rate:,.0f} tokens/s, about {left:,.0f} s left")
        result.train_loss.append(round(sum(losses) / len(losses), 6))
        result.epochs_run = epoch
        if eval_set:
            result.evaluation_loss.append(round(_evaluate(model, eval_set, job, pad_id), 6))
            progress(f"epoch {epoch}: training loss {result.train_loss[-1]:.4f}, evaluation loss "
                     f"{result.evaluation_loss[-1]:.4f}")
            if best is None or result.evaluation_loss[-1] < best[0]:
                best = (result.evaluation_loss[-1], copy.deepcopy(model.state_dict()))
            elif job.early_stop:
                result.stopped_early = True
                progress(f"stopping early: the evaluation loss rose from {best[0]:.4f}")
                break
        else:
            progress(f"epoch {epoch}: training loss {result.train_loss[-1]:.4f}")
    if job.early_stop and best is not None:
        model.load_state_dict(best[1])
    model.save_peft(Path(job.output_dir), job.base_model)
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def run(job: dict, result_file: Path | None = None, upload: str | None = None) -> int:
    """The training process: a job's settings in, the adapter in its output_dir and the metrics as JSON out.

    In a cluster the base model is a store URL (fetched to the local cache, digests checked), the datasets are
    URLs fsspec reads, and `upload` names where the adapter (`adapter/`) and the metrics (`result.json`) go."""
    job = dict(job, base_dir=str(local_copy(job["base_dir"])),
               target_modules=tuple(job.get("target_modules") or TrainingJob.target_modules))
    result = json.dumps(asdict(train(TrainingJob(**job), lambda line: print(line, flush=True))), indent=2)
    if result_file is not None:
        result_file.write_text(result)
    if upload is not None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(upload)
        fs.makedirs(f"{root}/adapter", exist_ok=True)
        for path in sorted(Path(job["output_dir"]).iterdir()):
            fs.put_file(str(path), f"{root}/adapter/{path.name}")
        fs.pipe_file(f"{root}/result.json", result.encode())  # last: its presence says the upload is whole
        print(f"uploaded the adapter and its metrics to {upload}", flush=True)
    return 0
