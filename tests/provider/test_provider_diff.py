"""check normalises and validates without touching the store; diff says replace, update or nothing."""

import pytest
from tests.provider.provider_helpers import config, make_models, provider
from pulumi.runtime import rpc

BASE = "accounts/acme/models/base"


@pytest.fixture
def cfg(tmp_path):
    return config(tmp_path)


def checked(p, news, olds=None):
    result = p.check(olds or {}, news | {"__provider": "x"})
    assert not result.failures, [(f.property, f.reason) for f in result.failures]
    return {k: v for k, v in result.inputs.items() if k != "__provider"}


def deployment(**overrides):
    return {"account_id": "acme", "deployment_id": "prod", "base_model": BASE} | overrides


def test_check_normalises_floats_and_defaults_and_touches_no_store(cfg):
    p = provider("Deployment", cfg)
    inputs = checked(p, deployment(min_replicas=2.0, max_replicas=3.0, max_lora_rank=16.0))
    assert (inputs["min_replicas"], inputs["max_replicas"], inputs["max_lora_rank"]) == (2, 3, 16)
    assert type(inputs["min_replicas"]) is int and inputs["precision"] == "fp32"
    assert not (cfg.state_dir / "store").exists()


def test_a_reformatted_program_gives_no_diff(cfg, tmp_path):
    models = make_models(tmp_path / "m")
    p = provider("LoRAAddon", cfg)
    a = checked(p, {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["pirate"]),
                    "deployments": ["accounts/acme/deployments/b", "accounts/acme/deployments/a"]})
    b = checked(p, {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["pirate"]) + "/",
                    "deployments": ["accounts/acme/deployments/a", "accounts/acme/deployments/b", "accounts/acme/deployments/a"],
                    "serverless": False})
    assert a == b
    diff = p.diff("id", a | {"state": "READY", "digest": "sha256:0"}, b)
    assert not diff.changes and not diff.replaces
    d = provider("Deployment", cfg)
    assert not d.diff("id", checked(d, deployment(min_replicas=1)), checked(d, deployment(min_replicas=1.0))).changes


@pytest.mark.parametrize(
    "change, replaces",
    [
        ({"min_replicas": 2, "max_replicas": 2}, []),
        ({"description": "new words"}, []),
        ({"autoscaling": {"target_concurrent_requests": 4}}, []),
        ({"accelerator_type": "NVIDIA_H100_80GB", "cluster": "kubernetes"}, ["accelerator_type", "cluster", "precision"]),
        ({"base_model": "accounts/acme/models/other"}, ["base_model"]),
        ({"max_lora_rank": 128}, ["max_lora_rank"]),
        ({"base_model_digest": "sha256:" + "1" * 64}, ["base_model_digest"]),
    ],
)
def test_deployment_diff_rules(cfg, change, replaces):
    p = provider("Deployment", cfg)
    old = checked(p, deployment(base_model_digest="sha256:" + "0" * 64))
    new = checked(p, deployment(base_model_digest="sha256:" + "0" * 64) | change)
    diff = p.diff("id", old | {"ready_replicas": 1}, new)
    assert diff.changes and sorted(diff.replaces) == sorted(replaces)


def test_model_source_digest_decides_replacement(cfg, tmp_path):
    models = make_models(tmp_path / "a")
    other = make_models(tmp_path / "b", seed=5)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in models["base"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    p = provider("Model", cfg)
    old = checked(p, {"account_id": "acme", "model_id": "base", "source": str(models["base"])})
    assert old["source_digest"].startswith("sha256:")
    moved = checked(p, {"account_id": "acme", "model_id": "base", "source": str(copy)})
    diff = p.diff("id", old, moved)
    assert diff.changes and not diff.replaces  # same bytes elsewhere: no new weights
    changed = checked(p, {"account_id": "acme", "model_id": "base", "source": str(other["base"])})
    assert p.diff("id", old, changed).replaces == ["source_digest"]
    remote = [checked(p, {"account_id": "acme", "model_id": "base", "source": f"s3://bucket/{v}"}) for v in ("v1", "v2")]
    assert p.diff("id", remote[0], remote[1]).replaces == ["source"]


def test_addon_base_change_replaces(cfg, tmp_path):
    models = make_models(tmp_path / "m")
    p = provider("LoRAAddon", cfg)
    old = checked(p, {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["pirate"])})
    new = checked(p, {"account_id": "acme", "model_id": "pirate", "base_model": "accounts/acme/models/b2",
                      "source": str(models["pirate"])})
    assert p.diff("id", old, new).replaces == ["base_model"]
    moved = checked(p, {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["pirate"]),
                        "deployments": ["accounts/acme/deployments/x"]})
    diff = p.diff("id", old, moved)
    assert diff.changes and not diff.replaces


def test_unknown_values_are_tolerated_in_preview(cfg):
    p = provider("Deployment", cfg)
    result = p.check({}, deployment(base_model=rpc.UNKNOWN, min_replicas=3, max_replicas=rpc.UNKNOWN) | {"__provider": "x"})
    assert not result.failures and result.inputs["base_model"] == rpc.UNKNOWN
    bad = p.check({}, deployment(base_model=rpc.UNKNOWN, accelerator_type="TPU") | {"__provider": "x"})
    assert [f.property for f in bad.failures] == ["accelerator_type"]  # known fields are still checked
    old = checked(p, deployment())
    diff = p.diff("id", old, dict(result.inputs))
    assert diff.changes and "base_model" in diff.replaces


def test_refresh_drift_makes_the_next_up_update(cfg):
    p = provider("Deployment", cfg)
    inputs = checked(p, deployment(min_replicas=2, max_replicas=2))
    assert not p.diff("id", inputs | {"ready_replicas": 2}, inputs).changes
    diff = p.diff("id", inputs | {"ready_replicas": 1}, inputs)
    assert diff.changes and not diff.replaces
