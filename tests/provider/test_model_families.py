"""Issue 33 at the provider: each family is accepted at preview and uploaded with its parameter count, addons on
it are checked against its modules, and what is still not served is refused at preview by name."""

import json

import pytest
from tests.provider.provider_helpers import config, provider

from ember.provider.domain.catalog import Architecture
from ember.provider.domain.families import expert_parameter_shapes, module_shapes
from ember.provider.providers.base import EmberError
from ember.runtime.devtools import tinymodels

pytest.importorskip("transformers")


def checked(p, news):
    result = p.check({}, news | {"__provider": "x"})
    assert not result.failures, [(f.property, f.reason) for f in result.failures]
    return {k: v for k, v in result.inputs.items() if k != "__provider"}


def failures(p, news):
    return [(f.property, f.reason) for f in p.check({}, news | {"__provider": "x"}).failures]


@pytest.mark.parametrize("family", list(tinymodels.FAMILIES))
def test_each_family_is_accepted_uploaded_and_counted_and_takes_addons_on_its_modules(tmp_path, family):
    from transformers import AutoModelForCausalLM

    source = tinymodels.make_family_model(tmp_path / family, family, seed=3)
    hf = json.loads((source / "config.json").read_text())
    targets = tuple(module_shapes(hf))
    experts = tuple(f"mlp.{p}" for p in expert_parameter_shapes(hf))  # MoE: the experts too, as PEFT targets them
    addon = tinymodels.make_lora(source, tmp_path / "addon", rank=4, target_modules=targets, target_parameters=experts)
    cfg = config(tmp_path)
    m, a = provider("Model", cfg), provider("LoRAAddon", cfg)
    outputs = m.create(checked(m, {"account_id": "acme", "model_id": "base", "source": str(source)})).outs
    expected = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(source).state_dict().values()
                   ) - (hf["vocab_size"] * hf["hidden_size"] if hf["tie_word_embeddings"] else 0)
    assert outputs["architecture"] == hf["architectures"][0] and outputs["parameter_count"] == expected
    # the fit check's count from config.json alone: within the norms Gemma and q/k norms add
    assert abs(Architecture.of(hf).parameter_count - expected) / expected < 0.02
    a.create(checked(a, {"account_id": "acme", "model_id": "addon", "base_model": "accounts/acme/models/base",
                         "source": str(addon)}))


def test_addons_on_modules_a_family_does_not_have_are_refused_by_name(tmp_path):
    cfg = config(tmp_path)
    m, a = provider("Model", cfg), provider("LoRAAddon", cfg)
    phi = tinymodels.make_family_model(tmp_path / "phi3", "phi3", seed=3)
    m.create(checked(m, {"account_id": "acme", "model_id": "phi", "source": str(phi)}))
    llama_style = tinymodels.make_lora(tinymodels.make_model(tmp_path / "llama"), tmp_path / "qv")  # q_proj, v_proj
    with pytest.raises(EmberError, match=r"target_modules \['q_proj', 'v_proj'\] are not modules a Phi3ForCausalLM "
                                         r"serves addons on; use any of qkv_proj, o_proj, gate_up_proj, down_proj"):
        a.create(checked(a, {"account_id": "acme", "model_id": "qv", "base_model": "accounts/acme/models/phi",
                             "source": str(llama_style)}))


@pytest.mark.parametrize("architecture, reason", [
    ("Gemma3ForConditionalGeneration", "image-and-text models are not served"),
    ("GemmaForCausalLM", "Gemma 1 is not served"),
    ("FalconForCausalLM", "is not supported; Ember serves LlamaForCausalLM"),
])
def test_what_is_still_not_served_is_refused_at_preview_by_name(tmp_path, architecture, reason):
    source = tinymodels.make_model(tmp_path / "m")
    hf = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(hf | {"architectures": [architecture]}))
    found = failures(provider("Model", config(tmp_path)), {"account_id": "acme", "model_id": "m", "source": str(source)})
    assert len(found) == 1 and architecture in found[0][1] and reason in found[0][1]


def test_an_experts_lora_that_does_not_fit_is_refused_by_name(tmp_path):
    cfg = config(tmp_path)
    m, a = provider("Model", cfg), provider("LoRAAddon", cfg)
    mixtral = tinymodels.make_family_model(tmp_path / "mixtral", "mixtral", seed=3)
    m.create(checked(m, {"account_id": "acme", "model_id": "moe", "source": str(mixtral)}))
    other = tinymodels.make_family_model(tmp_path / "wider", "mixtral", seed=3, intermediate_size=64)
    addon = tinymodels.make_lora(other, tmp_path / "addon", rank=4, target_modules=(),
                                 target_parameters=("mlp.experts.down_proj",))
    with pytest.raises(EmberError, match=r"are not LoRA of the 4 experts at r=4 the base model needs \(experts.down_proj: "
                                         r"A \[16, 48\] and B \[64, 16\]\)"):
        a.create(checked(a, {"account_id": "acme", "model_id": "addon", "base_model": "accounts/acme/models/moe",
                             "source": str(addon)}))
    dense = tinymodels.make_model(tmp_path / "dense")
    m.create(checked(m, {"account_id": "acme", "model_id": "dense", "source": str(dense)}))
    with pytest.raises(EmberError, match=r"target_parameters \['experts.down_proj'\] are not experts a "
                                         r"LlamaForCausalLM has"):
        a.create(checked(a, {"account_id": "acme", "model_id": "addon2", "base_model": "accounts/acme/models/dense",
                             "source": str(addon)}))
