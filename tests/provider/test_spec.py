"""The resource spec: every domain rule accepts what it should and refuses the rest, naming field and value."""

import pytest

from ember.provider.domain import catalog, spec
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.lora_addon import LoRAAddonSpec
from ember.provider.domain.kinds.model import ModelSpec
from ember.provider.domain.names import deployment_name, model_name, parse_deployment_name, parse_model_name
from ember.provider.domain.stack import StackSpec

BASE = "accounts/acme/models/my-llama"
CATALOG_8B = "accounts/platform/models/llama-v3p1-8b-instruct"


def errors(cls, data):
    with pytest.raises(spec.SpecError) as info:
        spec.parse(cls, data)
    return dict(info.value.errors), str(info.value)


# --- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["a", "acme", "llama-v3p1-8b-instruct", "0", "a" * 63, "a-b-c", "9lives"])
def test_valid_ids(value):
    assert spec.parse(ModelSpec, {"account_id": value, "source": "x"}).account_id == value


@pytest.mark.parametrize(
    "value", ["", "-a", "a-", "A", "acme_corp", "a" * 64, "a.b", "a b", "ünï", "a/b"]
)
def test_invalid_ids_name_field_and_value(value):
    found, message = errors(ModelSpec, {"account_id": "acme", "model_id": value, "source": "x"})
    assert list(found) == ["model_id"]
    assert repr(value) in found["model_id"] and "[a-z0-9-]" in found["model_id"]


def test_model_names_round_trip():
    assert model_name("acme", "m-1") == "accounts/acme/models/m-1"
    parsed = parse_model_name("accounts/acme/models/m-1")
    assert (parsed.account_id, parsed.resource_id) == ("acme", "m-1")
    assert str(parse_deployment_name(deployment_name("acme", "d"))) == "accounts/acme/deployments/d"


@pytest.mark.parametrize(
    "value",
    [
        "acme/models/m",
        "accounts/acme/model/m",
        "accounts/acme/deployments/m",
        "accounts/Acme/models/m",
        "accounts/acme/models/m/",
        "accounts/acme/models/-m",
        "accounts//models/m",
    ],
)
def test_bad_model_names(value):
    found, _ = errors(DeploymentSpec, {"account_id": "acme", "base_model": value})
    assert repr(value) in found["base_model"] or "ID" in found["base_model"]


# --- models -------------------------------------------------------------------------------------------

def test_model_from_path_and_url_are_normalised():
    local = spec.parse(ModelSpec, {"account_id": "acme", "model_id": "m", "source": "./weights//m/"})
    assert local.source == "weights/m" and local.name == "accounts/acme/models/m"
    remote = spec.parse(ModelSpec, {"account_id": "acme", "model_id": "m", "source": "s3://bucket/m/"})
    assert remote.source == "s3://bucket/m"
    assert local.kind == "HF_BASE_MODEL"


def test_catalog_model_takes_its_catalog_id():
    model = spec.parse(ModelSpec, {"account_id": "platform", "catalog_id": "qwen2p5-7b-instruct"})
    assert model.model_id == "qwen2p5-7b-instruct" and model.is_catalog


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({"account_id": "acme", "catalog_id": "gpt-5"}, "catalog_id", "'gpt-5' is not a catalog model"),
        ({"account_id": "acme"}, "source", "exactly one of source"),
        ({"account_id": "acme", "source": "x", "catalog_id": "llama-v3p1-8b-instruct"}, "source", "exactly one"),
        ({"account_id": "acme", "model_id": "other", "catalog_id": "llama-v3p1-8b-instruct"}, "model_id", "'other' must equal"),
        ({"account_id": "acme", "model_id": "llama-v3p1-8b-instruct", "source": "x"}, "model_id", "reserved"),
        ({"account_id": "acme", "source": "x", "kind": "HF_PEFT_ADDON"}, "kind", "declare it as a LoRAAddon"),
        ({"account_id": "acme", "source": "x", "kind": "GGUF"}, "kind", "'GGUF'"),
        ({"account_id": "acme", "source": "ftp2://host/x"}, "source", "'ftp2'"),
        ({"account_id": "acme", "source": "   "}, "source", "empty"),
        ({"account_id": "acme", "source": "x", "weights": "y"}, "weights", "not a known property"),
        ({"account_id": "acme", "source": "x", "display_name": ""}, "display_name", "''"),
        ({"source": "x"}, "account_id", "is required"),
    ],
)
def test_bad_models(data, field, fragment):
    found, _ = errors(ModelSpec, data)
    assert field in found, found
    assert fragment in found[field]


# --- LoRA addons --------------------------------------------------------------------------------------

def addon(**overrides):
    return {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": "adapters/pirate"} | overrides


def test_addon_deployments_are_sorted_and_deduplicated():
    d1, d2 = "accounts/acme/deployments/b", "accounts/acme/deployments/a"
    parsed = spec.parse(LoRAAddonSpec, addon(deployments=[d1, d2, d1]))
    assert parsed.deployments == (d2, d1)
    assert parsed.kind == "HF_PEFT_ADDON" and parsed.name == "accounts/acme/models/pirate"


def test_serverless_addon_on_a_popular_catalog_base():
    parsed = spec.parse(LoRAAddonSpec, addon(base_model=CATALOG_8B, serverless=True))
    assert parsed.serverless


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"deployments": ["accounts/other/deployments/d"]}, "deployments[0]", "belongs to account 'other'"),
        ({"serverless": True}, "serverless", "does not accept serverless addons"),
        ({"base_model": "accounts/p/models/llama-v3p1-405b-instruct", "serverless": True}, "serverless", "405b"),
        ({"base_model": "my-llama"}, "base_model", "'my-llama'"),
        ({"model_id": "qwen2p5-7b-instruct"}, "model_id", "reserved"),
        ({"kind": "HF_BASE_MODEL"}, "kind", "HF_PEFT_ADDON"),
        ({"source": None}, "source", "string"),
        ({"deployments": ["nope"]}, "deployments[0]", "'nope'"),
    ],
)
def test_bad_addons(overrides, field, fragment):
    found, _ = errors(LoRAAddonSpec, addon(**overrides))
    assert field in found, found
    assert fragment in found[field]


def lora_config(**overrides):
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]} | overrides


def test_lora_config_scaling_and_modules():
    config = spec.parse(spec.LoRAConfig, lora_config())
    assert config.target_modules == ("q_proj", "v_proj") and config.scaling == 2.0
    assert spec.parse(spec.LoRAConfig, lora_config(use_rslora=True, r=16)).scaling == 4.0
    assert spec.parse(spec.LoRAConfig, lora_config(target_modules="all-linear")).target_modules == spec.LORA_TARGET_MODULES


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"r": 0}, "r", "(got 0)"),
        ({"r": 512}, "r", "(got 512)"),
        ({"r": 8.5}, "r", "(got 8.5)"),
        ({"lora_alpha": 0}, "lora_alpha", "(got 0)"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules", "['lm_head']"),
        ({"target_modules": []}, "target_modules", "empty"),
        ({"target_modules": ".*proj"}, "target_modules", "'.*proj'"),
        ({"peft_type": "IA3"}, "peft_type", "'IA3'"),
        ({"use_dora": True}, "use_dora", "True"),
        ({"bias": "all"}, "bias", "'all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save", "lm_head"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern", "q_proj"),
    ],
)
def test_bad_lora_configs(overrides, field, fragment):
    found, _ = errors(spec.LoRAConfig, lora_config(**overrides))
    assert field in found, found
    assert fragment in found[field]


# --- deployments --------------------------------------------------------------------------------------

def deployment(**overrides):
    return {"account_id": "acme", "deployment_id": "prod", "base_model": BASE} | overrides


def test_deployment_defaults_are_the_local_cluster():
    d = spec.parse(DeploymentSpec, deployment())
    assert d.accelerator_type is spec.AcceleratorType.CPU and d.precision is spec.Precision.FP32
    assert d.deployment_type is spec.DeploymentType.DEDICATED and d.name == "accounts/acme/deployments/prod"
    assert not d.request_logging.enabled


def test_numbers_arriving_as_floats_are_normalised():
    d = spec.parse(
        DeploymentSpec,
        deployment(accelerator_type="NVIDIA_H100_80GB", accelerator_count=2.0, min_replicas=1.0, max_replicas=3.0,
                   max_lora_rank=16.0, autoscaling={"scale_up_window_s": 10.0}),
    )
    assert (d.accelerator_count, d.min_replicas, d.max_replicas, d.max_lora_rank) == (2, 1, 3, 16)
    assert type(d.accelerator_count) is int and d.precision is spec.Precision.BF16


def test_serverless_catalog_deployment_and_scale_to_zero():
    d = spec.parse(DeploymentSpec, deployment(base_model=CATALOG_8B, deployment_type="serverless",
                                                   accelerator_type="NVIDIA_A100_80GB"))
    assert d.deployment_type is spec.DeploymentType.SERVERLESS
    z = spec.parse(DeploymentSpec, deployment(min_replicas=0, autoscaling={"scale_to_zero_window_s": 600}))
    assert z.min_replicas == 0


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"deployment_type": "serverless"}, "deployment_type", "refuses custom base model 'accounts/acme/models/my-llama'"),
        ({"deployment_type": "serverless", "base_model": "accounts/p/models/mistral-7b-instruct-v0p3",
          "request_logging": {"enabled": True, "retention_days": 3}}, "request_logging.enabled", "shared across"),
        ({"deployment_type": "spot"}, "deployment_type", "'spot'"),
        ({"accelerator_type": "NVIDIA_T4"}, "accelerator_type", "'NVIDIA_T4'"),
        ({"accelerator_type": "NVIDIA_H100_80GB", "accelerator_count": 3}, "accelerator_count", "3 is not allowed"),
        ({"accelerator_count": 3}, "accelerator_count", "3 is not allowed for CPU"),
        ({"accelerator_count": 1.5}, "accelerator_count", "(got 1.5)"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas", "3 is more than max_replicas 2"),
        ({"max_replicas": 0}, "max_replicas", "(got 0)"),
        ({"max_replicas": 65}, "max_replicas", "(got 65)"),
        ({"min_replicas": -1}, "min_replicas", "(got -1)"),
        ({"min_replicas": 0}, "autoscaling.scale_to_zero_window_s", "required when min_replicas is 0"),
        ({"autoscaling": {"scale_to_zero_window_s": 600}}, "autoscaling.scale_to_zero_window_s", "600 given"),
        ({"autoscaling": {"target_concurrent_requests": 0}}, "autoscaling.target_concurrent_requests", "(got 0)"),
        ({"autoscaling": {"scale_down_window_s": 4}}, "autoscaling.scale_down_window_s", "(got 4)"),
        ({"precision": "int3"}, "precision", "'int3'"),
        ({"max_lora_rank": 48}, "max_lora_rank", "48 is not one of"),
        ({"max_loras": 0}, "max_loras", "(got 0)"),
        ({"request_logging": {"enabled": True}}, "request_logging.retention_days", "required"),
        ({"request_logging": {"enabled": True, "retention_days": 400}}, "request_logging.retention_days", "(got 400)"),
        ({"request_logging": {"retention_days": 7}}, "request_logging.retention_days", "not enabled"),
        ({"base_model": "accounts/p/models/llama-v3p1-70b-instruct", "accelerator_type": "NVIDIA_A100_80GB"},
         "accelerator_count", "needs 141 GB on its fullest device in bf16"),
        ({"base_model": "accounts/p/models/llama-v3p1-405b-instruct", "accelerator_type": "NVIDIA_H100_80GB",
          "accelerator_count": 8}, "accelerator_count", "8 x NVIDIA_H100_80GB"),
    ],
)
def test_bad_deployments(overrides, field, fragment):
    found, message = errors(DeploymentSpec, deployment(**overrides))
    assert field in found, found
    assert fragment in found[field]
    assert field in message  # the rendered error names the field too


def test_big_models_fit_on_enough_accelerators():
    for accelerator, count in [("NVIDIA_H200_141GB", 8), ("AMD_MI300X_192GB", 8)]:
        spec.parse(DeploymentSpec, deployment(base_model="accounts/p/models/llama-v3p1-405b-instruct",
                                                   accelerator_type=accelerator, accelerator_count=count))
    spec.parse(DeploymentSpec, deployment(base_model="accounts/p/models/llama-v3p1-70b-instruct",
                                               accelerator_type="NVIDIA_H100_80GB", accelerator_count=2))
    # Weight-only int4 fits 70B on one H100 (35 GB of weights), where bf16 (140 GB) does not.
    one = dict(base_model="accounts/p/models/llama-v3p1-70b-instruct", accelerator_type="NVIDIA_H100_80GB")
    assert spec.parse(DeploymentSpec, deployment(precision="int4", **one)).precision is spec.Precision.INT4
    assert "needs 141 GB on its fullest device in bf16" in str(errors(DeploymentSpec, deployment(precision="bf16", **one)))


def test_the_fit_check_is_per_device_with_the_embedding_on_every_one():
    seventy = dict(base_model="accounts/p/models/llama-v3p1-70b-instruct", accelerator_type="NVIDIA_H100_80GB")
    # 70B in bf16 on 2 H100s: 69.5 GB of projections halved, plus the 2.1 GB embedding on both
    found, _ = errors(DeploymentSpec, deployment(accelerator_count=1, precision="fp16", **seventy))
    assert "split" not in found["accelerator_count"]
    spec.parse(DeploymentSpec, deployment(accelerator_count=2, **seventy))
    four_oh_five = dict(base_model="accounts/p/models/llama-v3p1-405b-instruct", accelerator_type="NVIDIA_H100_80GB")
    found, _ = errors(DeploymentSpec, deployment(accelerator_count=8, **four_oh_five))
    assert "split 8 ways, needs 105 GB on its fullest device in bf16" in found["accelerator_count"]
    spec.parse(DeploymentSpec, deployment(accelerator_count=8, precision="fp8", **four_oh_five))
    # 24 heads split 8 ways (3 each), on the CPU too (ranks share its cores)
    spec.parse(DeploymentSpec, deployment(base_model="accounts/p/models/llama-v3p2-3b-instruct",
                                          accelerator_type="NVIDIA_H100_80GB", accelerator_count=8))
    assert spec.parse(DeploymentSpec, deployment(accelerator_count=2)).accelerator_count == 2


@pytest.mark.parametrize("accelerator", ["NVIDIA_H100_80GB", "NVIDIA_H200_141GB", "AMD_MI300X_192GB"])
def test_fp8_is_accepted_on_accelerators_with_fp8(accelerator):
    d = spec.parse(DeploymentSpec, deployment(precision="fp8", accelerator_type=accelerator))
    assert d.precision is spec.Precision.FP8 and d.accelerator_type.has_fp8


@pytest.mark.parametrize("accelerator", ["CPU", "NVIDIA_A100_80GB"])
def test_fp8_is_refused_on_accelerators_without_fp8(accelerator):
    found, message = errors(DeploymentSpec, deployment(precision="fp8", accelerator_type=accelerator))
    assert list(found) == ["precision"]
    assert "'fp8'" in found["precision"] and accelerator in found["precision"]
    assert "NVIDIA_H100_80GB, NVIDIA_H200_141GB, AMD_MI300X_192GB" in found["precision"]


def test_fp8_refusal_waits_for_an_unknown_accelerator_at_preview():
    props = deployment(precision="fp8", accelerator_type="NVIDIA_H100_80GB")
    assert spec.parse_known(DeploymentSpec, props, {"accelerator_type"})[1] == []
    assert [f for f, _ in spec.parse_known(DeploymentSpec, props | {"accelerator_type": "CPU"}, set())[1]] == ["precision"]


# --- stacks -------------------------------------------------------------------------------------------

def stack(**overrides):
    return {
        "models": [{"account_id": "acme", "model_id": "my-llama", "source": "w"}],
        "addons": [addon(deployments=["accounts/acme/deployments/prod"])],
        "deployments": [deployment()],
    } | overrides


def test_a_consistent_stack():
    parsed = spec.parse(StackSpec, stack())
    assert parsed.addons[0].deployments == ("accounts/acme/deployments/prod",)


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"deployments": [deployment(base_model="accounts/acme/models/other")]}, "addons[0].deployments[0]",
         "serves base model accounts/acme/models/other, not this addon's base"),
        ({"models": [{"account_id": "acme", "model_id": "pirate", "source": "w"}]}, "addons[0].model_id",
         "accounts/acme/models/pirate is already declared by models[0]; model IDs are globally unique"),
        ({"deployments": [deployment(), deployment()]}, "deployments[1].deployment_id", "accounts/acme/deployments/prod is already declared by deployments[0]"),
        ({"deployments": [deployment(base_model="accounts/acme/models/pirate")]}, "deployments[0].base_model",
         "is a LoRA addon"),
    ],
)
def test_bad_stacks(overrides, field, fragment):
    found, _ = errors(StackSpec, stack(**overrides))
    assert field in found, found
    assert fragment in found[field]


def test_a_stack_judges_names_as_the_program_the_pack_and_the_store_do():
    """Issue 29: one rule (domain/rules.py) for every channel. A name is its account's: two accounts may each have a
    model `shared` (the store keeps models per account), and one account may not have two."""
    two_accounts = [{"account_id": a, "model_id": "shared", "source": "w"} for a in ("acme", "globex")]
    assert len(spec.parse(StackSpec, stack(models=two_accounts)).models) == 2
    found, _ = errors(StackSpec, stack(models=two_accounts + [two_accounts[0]]))
    assert found == {"models[2].model_id": "accounts/acme/models/shared is already declared by models[0]; model IDs "
                                           "are globally unique, base models and addons alike"}


def test_catalog_ids_are_valid_and_serverless_addons_only_on_serverless_bases():
    for model in catalog.CATALOG.values():
        assert spec.parse(ModelSpec, {"account_id": "p", "catalog_id": model.model_id}).model_id == model.model_id
        assert model.serverless or not model.serverless_addons


def test_the_readme_says_which_shapes_of_each_catalog_model_are_served():
    """Its tensor-parallelism table: the fewest accelerators each catalog model is accepted on, as the spec says."""
    from pathlib import Path

    from ember.provider.domain import catalog
    from ember.provider.domain.kinds.deployment import check_split

    a, p = spec.AcceleratorType, spec.Precision
    columns = [(a.NVIDIA_A100_80GB, p.BF16), (a.NVIDIA_H100_80GB, p.BF16), (a.NVIDIA_H100_80GB, p.FP8),
               (a.NVIDIA_H100_80GB, p.INT4), (a.NVIDIA_H200_141GB, p.BF16), (a.NVIDIA_H200_141GB, p.FP8),
               (a.AMD_MI300X_192GB, p.BF16)]

    def fewest(model, accelerator, precision):
        for count in accelerator.allowed_counts:
            try:
                check_split(model.dims, count, accelerator, precision, model.model_id)
                return str(count)
            except spec.FieldError:
                pass
        return "—"

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for model in catalog.CATALOG.values():
        cells = [fewest(model, *column) for column in columns]
        row = (f"| `{model.model_id}` | {model.dims.num_attention_heads} / {model.dims.num_key_value_heads} | "
               + " | ".join(cells) + " |")
        assert row in readme, row
