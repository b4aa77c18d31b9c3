"""Fine-tuning: datasets checked by line, the LoRA trainer (PEFT's math and format, deterministic), and
Dataset + FineTuningJob + a LoRAAddon deployed from the job, through the offline runner."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from ember.provider.domain.datasets import DatasetError, parse_dataset
from ember.provider.domain.digests import file_digests, tree_digest
from ember.runtime.devtools import tinymodels
from ember.runtime.model.tokenizer import TextTokenizer
from ember.runtime.training.examples import tokenize_example
from ember.runtime.training.trainer import TrainingJob, train

WORDS = "sea ship pirate sky blue red tree river song gpu model cache".split()


def chat(user: str, answer: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


def write_dataset(path, count: int = 24, seed: int = 0):
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        question = " ".join(rng.choice(WORDS) for _ in range(4))
        lines.append(chat(question, "arr " + question))
    path.write_text("\n".join(lines) + "\n")
    return path


# -- datasets ---------------------------------------------------------------------------------------------


def test_a_dataset_is_read_and_blank_lines_are_skipped():
    text = "\n".join([chat("hi", "hello", system="be kind"), "", chat("a", "b"), chat("c", "d"), ""])
    dataset = parse_dataset(text)
    assert len(dataset.examples) == 3 and dataset.lines == [1, 3, 4] and dataset.message_count == 7


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"messages": []}', 'line 2: "messages" is empty'),
    ('{"prompt": "x"}', 'line 2: needs an object with a "messages" list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: messages[0].role 'robot' is not one of"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}',
     "line 2: messages[0].content is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: the last message is the user's"),
    ('{"messages": [{"role": "user", "content": "x", "name": "n"}, {"role": "assistant", "content": "y"}]}',
     "line 2: messages[0] has unknown keys ['name']"),
])
def test_bad_lines_are_named_by_number(line, message):
    with pytest.raises(DatasetError) as info:
        parse_dataset("\n".join([chat("a", "b"), line, chat("c", "d"), chat("e", "f")]), "data.jsonl")
    assert message in str(info.value) and str(info.value).startswith("data.jsonl: ")


def test_the_first_bad_lines_are_reported_and_the_rest_counted():
    with pytest.raises(DatasetError) as info:
        parse_dataset("\n".join(["{bad"] * 9))
    assert str(info.value).count("not valid JSON") == 5 and "(and 4 more bad lines)" in str(info.value)
    with pytest.raises(DatasetError, match="2 examples; a dataset needs at least 3"):
        parse_dataset("\n".join([chat("a", "b"), chat("c", "d")]))


def test_only_the_assistant_turns_are_learned(tiny_model):
    tokenizer = TextTokenizer.from_dir(tiny_model)
    messages = [{"role": "user", "content": "the sea"}, {"role": "assistant", "content": "blue ship"},
                {"role": "user", "content": "the sky"}, {"role": "assistant", "content": "red song"}]
    example = tokenize_example(tokenizer, messages)
    learned = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m], skip_special_tokens=False)
    assert learned == f"blue ship{tinymodels.EOT}red song{tinymodels.EOT}"


# -- the trainer --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA trained for three epochs on the tiny model (and the job that trained it)."""
    root = tmp_path_factory.mktemp("trained")
    base = tinymodels.make_model(root / "base", "tiny", seed=0)
    job = TrainingJob(base_model="accounts/acme/models/base", base_dir=str(base),
                      dataset=str(write_dataset(root / "train.jsonl")),
                      evaluation_dataset=str(write_dataset(root / "eval.jsonl", 6, seed=1)),
                      output_dir=str(root / "adapter"), epochs=3, learning_rate=1e-2, batch_size=4, lora_rank=4,
                      target_modules=("q_proj", "v_proj", "down_proj"))
    return job, train(job, progress=lambda _: None)


def test_training_lowers_the_loss_and_reports_per_epoch(trained):
    job, result = trained
    assert len(result.train_loss) == len(result.evaluation_loss) == result.epochs_run == 3
    assert result.train_loss[-1] < result.train_loss[0] and result.evaluation_loss[-1] < result.evaluation_loss[0]
    assert result.trained_tokens == 3 * result.dataset_tokens > 0


def test_the_same_job_and_seed_give_the_same_adapter(trained, tmp_path):
    job, _ = trained
    train(dataclasses.replace(job, output_dir=str(tmp_path / "again")), progress=lambda _: None)
    assert tree_digest(file_digests(tmp_path / "again")) == tree_digest(file_digests(Path(job.output_dir)))


def test_peft_loads_the_adapter_and_answers_as_ember_serves_it(trained):
    from peft import PeftModel
    from tests.runtime.runtime_helpers import hf_greedy, hf_model

    from ember.runtime.engine.engine import Engine, EngineConfig
    from ember.runtime.engine.sequence import SamplingParams

    job, _ = trained
    peft = PeftModel.from_pretrained(hf_model(job.base_dir), job.output_dir).eval()
    engine = Engine.from_dir(job.base_dir, EngineConfig(max_loras=2))
    engine.lora.add("tuned", job.output_dir)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in ("sea ship", "gpu model cache")]
    ours = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                           adapters=["tuned", "tuned"])
    assert [c.token_ids for c in ours] == [hf_greedy(peft, p, 8) for p in prompts]
    with torch.no_grad():  # and the adapter changed the model
        assert not torch.equal(peft(torch.tensor([prompts[0]])).logits,
                               hf_model(job.base_dir)(torch.tensor([prompts[0]])).logits)


# -- through the providers ------------------------------------------------------------------------------------

PROGRAM = '''
import pulumi
from ember.provider import (Dataset, DatasetArgs, Deployment, DeploymentArgs, FineTuningJob, FineTuningJobArgs,
                            LoRAAddon, LoRAAddonArgs, Model, ModelArgs)
base = Model("base", ModelArgs(account_id="acme", source="models/base"))
local = Deployment("local", DeploymentArgs(account_id="acme", base_model=base, max_loras=2, max_lora_rank=MAX_RANK))
train = Dataset("train", DatasetArgs(account_id="acme", source="train.jsonl"))
held_out = Dataset("held-out", DatasetArgs(account_id="acme", source="eval.jsonl"))
job = FineTuningJob("tune", FineTuningJobArgs(account_id="acme", base_model=base, dataset=train, evaluation_dataset=held_out,
                                              output_model="tuned-v1", epochs=2, learning_rate=LR, lora_rank=RANK,
                                              batch_size=8, target_modules=["q_proj", "v_proj"]))
LoRAAddon("tuned", LoRAAddonArgs(account_id="acme", base_model=base, source=job, deployments=[local]))
pulumi.export("train_loss", job.train_loss)
pulumi.export("trained_tokens", job.trained_tokens)
pulumi.export("digest", job.digest)
'''


def _program(root, lr="1e-2", max_rank=64, rank=4):
    program = root / "program"
    program.mkdir(exist_ok=True)
    if not (program / "models" / "base").exists():
        tinymodels.make_model(program / "models" / "base", "tiny", seed=0)
    write_dataset(program / "train.jsonl")
    write_dataset(program / "eval.jsonl", 6, seed=1)
    (program / "Pulumi.yaml").write_text("name: tune\nruntime: python\n")
    text = PROGRAM.replace("MAX_RANK", str(max_rank)).replace("LR", lr).replace("RANK", str(rank))
    (program / "__main__.py").write_text(text)
    return program


@pytest.mark.slow
def test_a_job_trains_stores_and_deploys_its_addon_and_replaces_on_change(tmp_path, capsys):
    from tests.provider.provider_helpers import store_entries

    from ember.provider.domain.usage import read_training
    from ember.provider.tools import billing, cli
    from ember.provider.tools.runner import OfflineRunner

    program = _program(tmp_path)
    config = OfflineRunner(program, log=lambda _: None).config
    try:
        assert cli.main(["up", str(program), "--offline", "--no-demo"]) == 0
        out = capsys.readouterr()
        assert "create   FineTuningJob  tune" in out.out and "epoch 2/2 step" in out.err
        outputs = json.loads(next((config.state_dir / "stacks").glob("*.json")).read_text())["outputs"]
        assert len(outputs["train_loss"]) == 2 and outputs["trained_tokens"] > 0
        state = json.loads(next((config.state_dir / "stacks").glob("*.json")).read_text())
        [job] = [r for r in state["resources"].values() if r["type"].endswith("FineTuningJob")]
        assert job["outputs"]["trained_tokens"] == 2 * job["outputs"]["dataset_tokens"]  # two epochs
        manifests = {p.stem: json.loads(p.read_text()) for p in (config.state_dir / "store" / "models" / "acme").glob("*.json")}
        assert manifests["tuned-v1"]["base_model"] == "accounts/acme/models/base"
        assert manifests["tuned"]["digest"] == manifests["tuned-v1"]["digest"] == outputs["digest"]  # one object
        [record] = read_training(config.store_url)
        assert record["trained_tokens"] == outputs["trained_tokens"] and record["job"] == "accounts/acme/fineTuningJobs/tune"
        [charge] = [c for c in billing.bill([], [], training=[record]) if c.kind == billing.TRAINING]
        assert charge.quantity == outputs["trained_tokens"] and charge.account_id == "acme"
        assert charge.amount == pytest.approx(outputs["trained_tokens"] / 1e6 * 0.50)  # the ≤16B tier
        capsys.readouterr()
        assert cli.main(["usage", str(program), "--format", "json"]) == 0
        [billed] = [c for c in json.loads(capsys.readouterr().out)["charges"] if c["kind"] == "fine-tuning-tokens"]
        assert billed["item"] == "accounts/acme/fineTuningJobs/tune" and billed["quantity"] == charge.quantity

        assert cli.main(["up", str(program), "--offline", "--no-demo"]) == 0  # nothing changed: nothing trains
        assert "FineTuningJob  tune" in capsys.readouterr().out.replace("same     ", "") and len(read_training(config.store_url)) == 1

        _program(tmp_path, lr="2e-2")  # a new learning rate: a new adapter, deployed in place of the old
        assert cli.main(["up", str(program), "--offline", "--no-demo"]) == 0
        printed = capsys.readouterr().out
        assert "replace  FineTuningJob  tune  (learning_rate: 0.01 → 0.02)" in printed
        steps = [line for line in printed.splitlines() if "LoRAAddon  tuned" in line]
        assert steps == ["  update   LoRAAddon  tuned  (source, source_digest)"], steps  # a new version, in place
        assert json.loads(next((config.state_dir / "stacks").glob("*.json")).read_text())["outputs"]["digest"] != \
            outputs["digest"]
    finally:
        assert cli.main(["destroy", str(program), "--offline"]) == 0
    assert store_entries(config) == []


def test_bad_jobs_are_refused_at_preview_by_field(tmp_path, capsys):
    from ember.provider.tools import cli

    def preview_error() -> str:
        assert cli.main(["preview", str(tmp_path / "program"), "--offline"]) == 1
        return capsys.readouterr().err

    program = _program(tmp_path)
    (program / "train.jsonl").write_text(chat("a", "b") + "\n{oops\n")
    assert "Dataset train: source: train.jsonl: line 2: not valid JSON" in preview_error()
    (program / "train.jsonl").write_text(chat("a", "b") + "\n")
    assert "train.jsonl: 1 examples; a dataset needs at least 3" in preview_error()
    _program(tmp_path, lr="0.5")
    assert "FineTuningJob tune: learning_rate: Input should be less than or equal to 0.1 (got 0.5)" in preview_error()
    _program(tmp_path, max_rank=8, rank=16)
    assert "LoRAAddon tuned: source: rank 16 is above accounts/acme/deployments/local's max_lora_rank 8" in preview_error()
    (program / "__main__.py").write_text((program / "__main__.py").read_text().replace("epochs=2", "epochs=0"))
    assert "FineTuningJob tune: epochs: Input should be greater than or equal to 1 (got 0)" in preview_error()


@pytest.mark.slow
def test_the_pirate_example_learns_its_voice(tmp_path, capsys):
    """examples/fine-tuning end to end on SmolLM2-135M-Instruct: the addon begins ≥90% of its held-out answers
    with "Arr!", the base ≤10% (evaluate.py exits 1 otherwise)."""
    import shutil
    import subprocess
    import sys

    from ember.provider.tools import cli, quickstart

    try:
        quickstart.smollm2_gguf()
    except quickstart.QuickstartError as exc:
        pytest.skip(str(exc))
    repo = Path(__file__).resolve().parents[2]
    program = tmp_path / "fine-tuning"
    shutil.copytree(repo / "examples/fine-tuning", program, ignore=shutil.ignore_patterns(".ember", "data", "*.png"))
    subprocess.run([sys.executable, str(program / "make_dataset.py")], check=True, capture_output=True)
    try:
        assert cli.main(["up", str(program), "--offline"]) == 0
        assert "answer from accounts/pirates/models/smollm2-pirate" in capsys.readouterr().out
        evaluate = subprocess.run([sys.executable, str(program / "evaluate.py")], capture_output=True, text=True)
        assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr  # the rates above, or exit 1
        print(evaluate.stdout)
        assert (program / "loss.png").stat().st_size > 10_000
    finally:
        assert cli.main(["destroy", str(program), "--offline"]) == 0


def test_a_kubernetes_jobs_pod_output_is_stored_as_the_local_cluster_would(trained, tmp_path):
    """What a KubernetesFineTuningJob's pod runs (`finetune --job-json … --upload URL`), then the Ember resource
    storing what it wrote: the same adapter digest as the same job trained by the local cluster."""
    import subprocess
    import sys

    from tests.provider.provider_helpers import config, provider

    from ember.provider.domain.records import BaseModelManifest

    job, _ = trained
    settings = {k: v for k, v in dataclasses.asdict(job).items() if k != "device"}
    settings |= {"output_dir": str(tmp_path / "pod-adapter"), "target_modules": list(job.target_modules)}
    run_url = f"file://{tmp_path}/store/fine-tuning-runs/acme/tune/abc"
    pod = subprocess.run([sys.executable, "-m", "ember.runtime", "finetune", "--job-json", json.dumps(settings),
                          "--upload", run_url], capture_output=True, text=True)
    assert pod.returncode == 0, pod.stderr
    assert f"uploaded the adapter and its metrics to {run_url}" in pod.stdout

    cfg = config(tmp_path)
    jobs = provider("FineTuningJob", cfg)
    store = jobs.store
    digest, _ = store.put_directory(Path(job.base_dir))
    store.write_manifest(BaseModelManifest(name="accounts/acme/models/base", digest=digest,
                                           object=store.urls.object(digest), architecture="LlamaForCausalLM",
                                           parameter_count=1, config={}))
    props = jobs.check({}, {"account_id": "acme", "job_id": "tune", "base_model": "accounts/acme/models/base",
                            "dataset": "accounts/acme/datasets/train", "output_model": "tuned-v1",
                            "lora_rank": 4, "cluster": "kubernetes", "training_url": run_url}).inputs
    created = jobs.create(props)
    assert created.outs["digest"] == tree_digest(file_digests(Path(job.output_dir)))
    written = json.loads((tmp_path / "store/fine-tuning-runs/acme/tune/abc/result.json").read_text())
    assert created.outs["trained_tokens"] == written["trained_tokens"] > 0
    props["training_url"] = f"file://{tmp_path}/nowhere"
    jobs.delete(created.id, created.outs)
    with pytest.raises(Exception, match="the Kubernetes Job wrote no result"):
        jobs.create(jobs.check({}, props).inputs)
