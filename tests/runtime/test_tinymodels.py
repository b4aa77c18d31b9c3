"""The tiny-model kit writes directories that transformers and PEFT load exactly as real ones."""

import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember.provider.domain import catalog, spec
from ember.runtime.devtools import tinymodels

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = tinymodels.make_model(tmp_path / "a", seed=7)
    b = tinymodels.make_model(tmp_path / "b", seed=7)
    c = tinymodels.make_model(tmp_path / "c", seed=8)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]


def test_model_loads_in_transformers(tiny_model):
    model = load_hf(tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    ours = load_file(tiny_model / "model.safetensors")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in ours.values())
    for name, tensor in ours.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config["vocab_size"]) and torch.isfinite(logits).all()


def test_tokenizer_has_exactly_the_model_vocab_and_a_chat_template(tiny_model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    ids = tokenizer("Hello world, the pirate sings.").input_ids
    assert ids[0] == config["bos_token_id"] and len(ids) < 20  # merges learnt: 30 characters, fewer tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world, the pirate sings."
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tokenizer.convert_ids_to_tokens(config["eos_token_id"]) == ["<|end_of_text|>", "<|eot_id|>"]


def test_chat_template_file_form(tmp_path):
    directory = tinymodels.make_model(tmp_path / "m", chat_template_file=True)
    assert "chat_template" not in json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).endswith("x<|eot_id|>")


def test_sharded_model_equals_single_file(tmp_path, tiny_model):
    sharded = tinymodels.make_model(tmp_path / "sharded", seed=0, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(load_hf(sharded)(x).logits, load_hf(tiny_model)(x).logits)


@pytest.mark.parametrize(
    "overrides",
    [
        {"architecture": "qwen2"},
        {"architecture": "mistral"},
        {"tie_word_embeddings": True, "llama3_rope_scaling": True},
    ],
    ids=["qwen2", "mistral", "tied-llama3-rope"],
)
def test_other_architectures_load(tmp_path, overrides):
    directory = tinymodels.make_model(tmp_path / "m", seed=1, **overrides)
    model = load_hf(directory)
    ours = load_file(directory / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in ours.values())
    if overrides.get("architecture") == "qwen2":
        assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, ours["model.layers.0.self_attn.q_proj.bias"])
    if overrides.get("llama3_rope_scaling"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert "llama3" in json.dumps(model.config.to_dict())


def test_bench_preset_is_about_100m_parameters():
    c = tinymodels.PRESETS["bench-100m"]
    dims = catalog.Architecture("LlamaForCausalLM", c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                                c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
                                c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)
    assert 90e6 < dims.parameter_count < 110e6


def test_too_small_a_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        tinymodels.make_model(tmp_path / "m", vocab_size=100)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_loads_in_peft_with_every_weight(tmp_path, tiny_model, rslora):
    targets = ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")
    adapter = tinymodels.make_lora(tiny_model, tmp_path / "lora", rank=4, alpha=8, target_modules=targets,
                                   use_rslora=rslora, seed=3)
    config = spec.parse(spec.LoRAConfig, json.loads((adapter / "adapter_config.json").read_text()))
    assert config.r == 4 and config.target_modules == targets
    ours = load_file(adapter / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.PeftModel.from_pretrained(load_hf(tiny_model), adapter).eval()
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(ours)
    for key, tensor in ours.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], tensor), key
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(config.scaling)
    x = torch.tensor([[1, 9, 40, 200]])
    with torch.no_grad():
        with_adapter = model(x).logits
        with model.disable_adapter():
            without = model(x).logits
    assert (with_adapter - without).abs().max() > 1e-3


def test_lora_for_a_module_the_model_lacks_is_refused(tmp_path, tiny_model):
    with pytest.raises(ValueError, match=r"\['lm_head'\]"):
        tinymodels.make_lora(tiny_model, tmp_path / "lora", target_modules=("q_proj", "lm_head"))
