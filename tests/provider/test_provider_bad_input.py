"""A catalog of bad input: each fails at check or at create with a message naming the problem, and leaves
nothing behind (no store entry, no replica)."""

import json
import re
import shutil

import pytest
from tests.provider.file_edits import edit_json
from tests.provider.provider_helpers import config, make_models, provider, store_entries

from ember.provider.domain.records import DeploymentRecord
from ember.provider.backends.store import Store
from ember.provider.providers.base import EmberError
from ember.runtime.devtools import tinymodels

BASE = "accounts/acme/models/base"


@pytest.fixture
def env(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    return cfg, models, tmp_path


def check_failures(cfg, kind, news):
    result = provider(kind, cfg).check({}, news | {"__provider": "x"})
    return {f.property: f.reason for f in result.failures}


def model(models, **kw):
    return {"account_id": "acme", "model_id": "base", "source": str(models["base"])} | kw


def deployment(**kw):
    return {"account_id": "acme", "deployment_id": "prod", "base_model": BASE} | kw


def addon(models, **kw):
    return {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["pirate"])} | kw


CHECK_CASES = [
    ("Model", lambda m: model(m, account_id="Acme"), "account_id", "'Acme'"),
    ("Model", lambda m: model(m, model_id="-bad"), "model_id", "'-bad'"),
    ("Model", lambda m: model(m, model_id="x" * 64), "model_id", "1-63 characters"),
    ("Model", lambda m: model(m, kind="HF_PEFT_ADDON"), "kind", "declare it as a LoRAAddon"),
    ("Model", lambda m: {"account_id": "acme", "model_id": "x"}, "source", "exactly one of source"),
    ("Model", lambda m: model(m, catalog_id="llama-v3p1-8b-instruct"), "source", "exactly one"),
    ("Model", lambda m: {"account_id": "acme", "catalog_id": "gpt-9"}, "catalog_id", "'gpt-9' is not a catalog model"),
    ("Model", lambda m: model(m, model_id="qwen2p5-7b-instruct"), "model_id", "reserved for the catalog"),
    ("Model", lambda m: model(m, source="/no/such/dir"), "source", "'/no/such/dir' does not exist"),
    ("Model", lambda m: model(m, source="nosuch://bucket/x"), "source", "'nosuch'"),
    ("Deployment", lambda m: deployment(deployment_type="serverless"), "deployment_type", "refuses custom base model"),
    ("Deployment", lambda m: deployment(min_replicas=3.0, max_replicas=2.0), "min_replicas", "3 is more than max_replicas 2"),
    ("Deployment", lambda m: deployment(accelerator_type="NVIDIA_H100_80GB", accelerator_count=3.0), "accelerator_count", "3 is not allowed"),
    ("Deployment", lambda m: deployment(accelerator_type="TPU_V5"), "accelerator_type", "'TPU_V5'"),
    ("Deployment", lambda m: deployment(precision="fp8"), "precision", "'fp8' needs an accelerator with FP8, and CPU has none"),
    ("Deployment", lambda m: deployment(max_lora_rank=48.0), "max_lora_rank", "48 is not one of"),
    ("Deployment", lambda m: deployment(request_logging={"enabled": True}), "request_logging.retention_days", "required"),
    ("Deployment", lambda m: deployment(base_model="accounts/p/models/llama-v3p1-8b-instruct", deployment_type="serverless",
                                        request_logging={"enabled": True, "retention_days": 3}),
     "request_logging.enabled", "shared across accounts"),
    ("Deployment", lambda m: deployment(base_model="accounts/p/models/llama-v3p1-70b-instruct",
                                        accelerator_type="NVIDIA_A100_80GB"), "accelerator_count", "needs 141 GB"),
    ("Deployment", lambda m: deployment(base_model="models/base"), "base_model", "'models/base'"),
    ("Deployment", lambda m: deployment(replicas=2), "replicas", "not a known property"),
    ("LoRAAddon", lambda m: addon(m, deployments=["accounts/other/deployments/d"]), "deployments[0]", "belongs to account 'other'"),
    ("LoRAAddon", lambda m: addon(m, serverless=True), "serverless", "does not accept serverless addons"),
    ("LoRAAddon", lambda m: addon(m, source="/no/adapter"), "source", "does not exist"),
    ("LoRAAddon", lambda m: addon(m, kind="HF_BASE_MODEL"), "kind", "HF_PEFT_ADDON"),
]


@pytest.mark.parametrize("kind, make, field, fragment", CHECK_CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CHECK_CASES)])
def test_check_refuses(env, kind, make, field, fragment):
    cfg, models, _ = env
    failures = check_failures(cfg, kind, make(models))
    assert field in failures, failures
    assert fragment in failures[field]
    assert not (cfg.state_dir / "store").exists()  # check never touches the store


def _create(cfg, kind, props):
    p = provider(kind, cfg)
    result = p.check({}, props | {"__provider": "x"})
    assert not result.failures, [(f.property, f.reason) for f in result.failures]
    return p.create({k: v for k, v in result.inputs.items() if k != "__provider"})


def damaged_model(tmp_path, models, damage):
    target = shutil.copytree(models["base"], tmp_path / "damaged")
    damage(target)
    return target


def fake_deployment(cfg, name, base, max_lora_rank=64):
    """A deployment record as Deployment.create writes it (no replica needed to test the refusals)."""
    account, _, deployment_id = name.split("/")[1:4]
    Store(cfg.store_url, cfg.state_dir / "locks").write_deployment_record(
        DeploymentRecord(name=name, base_model=base, max_lora_rank=max_lora_rank))


# (name, kind, make, fragment, the field whose check refuses it at preview too, or None where only create can know)
CREATE_CASES = [
    ("truncated-weights", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-1000])))), "is truncated", "source"),
    ("no-config", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: (d / "config.json").unlink()))),
     "config.json is missing", "source"),
    ("gpt2", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: (d / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"]}))))), "'GPT2LMHeadModel'] is not supported", "source"),
    ("no-tokenizer", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: (d / "tokenizer.json").unlink()))),
     "tokenizer.json is missing", "source"),
    ("lying-config", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: edit_json(d / "config.json", hidden_size=128)))),
     "config.json says", "source"),
    ("heads-do-not-divide", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: edit_json(
        d / "config.json", num_attention_heads=5, head_dim=None)))), "is not divisible by num_attention_heads 5", "source"),
    ("heads-disagree-with-weights", "Model", lambda t, m: model(m, source=str(damaged_model(t, m, lambda d: edit_json(
        d / "config.json", num_attention_heads=2, num_key_value_heads=1)))), "self_attn.q_proj.weight has shape", "source"),
    ("catalog-not-in-store", "Model", lambda t, m: {"account_id": "platform", "catalog_id": "llama-v3p1-8b-instruct"},
     "are not in the store", None),
    ("deployment-without-model", "Deployment", lambda t, m: deployment(base_model="accounts/acme/models/missing"),
     "is not a base model in the store", None),
    ("deployment-on-undeclared-model", "Deployment", lambda t, m: deployment(
        base_model="accounts/acme/models/missing", references={"base_model": {"declared": False, "source": None}}),
     "is not a base model in the store", "base_model"),
    ("gpu-on-local-cluster", "Deployment", lambda t, m: deployment(accelerator_type="NVIDIA_H100_80GB"),
     "the local cluster runs CPU replicas only", "accelerator_type"),
    ("addon-without-base", "LoRAAddon", lambda t, m: addon(m, base_model="accounts/acme/models/missing"),
     "is not a base model in the store", None),
    ("addon-from-another-base", "LoRAAddon", lambda t, m: addon(m, source=str(tinymodels.make_lora(
        tinymodels.make_model(t / "other", hidden_size=96, num_attention_heads=6), t / "other-lora")),
        references={"base_model": {"declared": True, "source": str(m["base"])}}),
     "the adapter does not fit its base model", "source"),
    ("addon-on-missing-deployment", "LoRAAddon", lambda t, m: addon(m, deployments=["accounts/acme/deployments/nope"]),
     "accounts/acme/deployments/nope does not exist", None),
    ("corrupt-adapter", "LoRAAddon", lambda t, m: addon(m, source=str(_corrupt_adapter(t, m))), "is implausible (corrupt file?)",
     "source"),
    ("truncated-adapter", "LoRAAddon", lambda t, m: addon(m, source=str(_truncated_adapter(t, m))), "is truncated", "source"),
    ("adapter-bad-rank", "LoRAAddon", lambda t, m: addon(m, source=str(_adapter_config(t, m, r=1000))), "less than or equal to 256",
     "source"),
]


def _corrupt_adapter(tmp_path, models):
    target = shutil.copytree(models["pirate"], tmp_path / "corrupt")
    (target / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"junk")
    return target


def _adapter_config(tmp_path, models, **changes):
    target = shutil.copytree(models["pirate"], tmp_path / "bad-config")
    edit_json(target / "adapter_config.json", **changes)
    return target


def _truncated_adapter(tmp_path, models):
    target = shutil.copytree(models["pirate"], tmp_path / "truncated")
    weights = target / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return target


@pytest.mark.parametrize("name, kind, make, fragment, check_field", CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
def test_create_refuses_and_leaves_nothing(env, name, kind, make, fragment, check_field):
    cfg, models, tmp_path = env
    if kind != "Model":
        _create(cfg, "Model", model(models))
    before = store_entries(cfg)
    p = provider(kind, cfg)
    result = p.check({}, make(tmp_path, models) | {"__provider": "x"})
    failures = {f.property: f.reason for f in result.failures}
    if check_field is None:
        assert failures == {}
    else:  # refused at preview, and create refuses it too (a program run with another engine skipped check)
        assert list(failures) == [check_field], failures
    with pytest.raises(EmberError, match=re.escape(fragment)):
        p.create({k: v for k, v in result.inputs.items() if k != "__provider"})
    assert store_entries(cfg) == before
    assert not list((cfg.state_dir / "replicas").rglob("*.json")) if (cfg.state_dir / "replicas").exists() else True


def test_check_sees_the_references_a_program_passes(env):
    """What spans resources is refused at preview from the facts the program computed from their inputs."""
    cfg, models, tmp_path = env
    other = {"base_model": "accounts/acme/models/other", "max_lora_rank": 64, "cluster": "local"}
    small = {"base_model": BASE, "max_lora_rank": 8, "cluster": "local"}
    big = tinymodels.make_lora(models["base"], tmp_path / "big", rank=16)
    refs = {"base_model": {"declared": True, "source": str(models["base"])},
            "deployments": {"accounts/acme/deployments/other-base": other, "accounts/acme/deployments/small-rank": small}}
    failures = check_failures(cfg, "LoRAAddon", addon(models, source=str(big), references=refs, deployments=[
        "accounts/acme/deployments/other-base", "accounts/acme/deployments/small-rank"]))
    assert failures["deployments[0]"] == ("accounts/acme/deployments/other-base serves base model "
                                          "accounts/acme/models/other, not this addon's base accounts/acme/models/base; "
                                          "attach it to a deployment of accounts/acme/models/base")
    assert failures["source"] == ("rank 16 is above accounts/acme/deployments/small-rank's max_lora_rank 8; raise it or "
                                  "train a smaller adapter")
    on_addon = check_failures(cfg, "Deployment", deployment(references={"base_model": {"declared": True, "addon": True}}))
    assert on_addon == {"base_model": "accounts/acme/models/base is a LoRA addon, not a base model"}
    # a catalog base needs no declaration; facts that are not known yet are not judged
    assert check_failures(cfg, "Deployment", deployment(base_model="accounts/acme/models/llama-v3p1-8b-instruct",
                                                        references={"base_model": {"declared": False}})) == {}
    assert not (cfg.state_dir / "store").exists()


def test_addon_on_a_deployment_of_another_base_or_rank(env):
    cfg, models, tmp_path = env
    _create(cfg, "Model", model(models))
    fake_deployment(cfg, "accounts/acme/deployments/other-base", "accounts/acme/models/other")
    fake_deployment(cfg, "accounts/acme/deployments/small-rank", BASE, max_lora_rank=8)
    before = store_entries(cfg)
    with pytest.raises(EmberError, match="serves base model accounts/acme/models/other, not this addon's base"):
        _create(cfg, "LoRAAddon", addon(models, deployments=["accounts/acme/deployments/other-base"]))
    big = tinymodels.make_lora(models["base"], tmp_path / "big", rank=16)
    with pytest.raises(EmberError, match="rank 16 is above accounts/acme/deployments/small-rank's max_lora_rank 8"):
        _create(cfg, "LoRAAddon", addon(models, model_id="big", source=str(big),
                                        deployments=["accounts/acme/deployments/small-rank"]))
    assert store_entries(cfg) == before


def test_model_ids_are_globally_unique_in_the_store(env):
    cfg, models, _ = env
    _create(cfg, "Model", model(models))
    before = store_entries(cfg)
    with pytest.raises(EmberError, match="accounts/acme/models/base already exists"):
        _create(cfg, "Model", model(models, description="again"))
    assert store_entries(cfg) == before


def test_there_are_at_least_thirty_cases():
    assert len(CHECK_CASES) + len(CREATE_CASES) + 3 >= 30
