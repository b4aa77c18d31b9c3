"""GGUF model sources: conversion checked against the original weights and transformers' GGUF loader, the
rebuilt tokenizer, the refusals at check, and a GGUF Model through the provider."""

import json
import subprocess
import sys

import numpy as np
import pytest
from tests.provider.gguf_helpers import write_gguf
from safetensors.numpy import load_file

from ember.provider.domain.digests import file_digests, tree_digest
from ember.provider.domain.gguf_model import SUPPORTED_TENSOR_TYPES, convert_gguf, read_gguf
from ember.provider.domain.model_files import ModelFilesError, inspect_base_model
from ember.runtime.devtools import tinymodels
from ember.runtime.model.tokenizer import TextTokenizer

# every supported type at least once; K-quants need rows of 256 values
ALL_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "ffn_up": "Q2_K", "ffn_down": "Q3_K",
             "ffn_gate": "Q8_0", "token_embd": "Q4_1", "attn_output": "BF16", "output.": "Q5_0"}  # first match wins
MORE_TYPES = {"attn_q": "Q4_0", "attn_k": "Q5_1", "attn_v": "F16", "token_embd": "F16"}
IQ_TYPES = {"attn_q": "IQ2_XXS", "attn_k": "IQ2_XS", "attn_v": "IQ2_S", "attn_output": "IQ3_XXS", "ffn_gate": "IQ3_S",
            "ffn_up": "IQ1_S", "ffn_down": "IQ1_M", "token_embd": "IQ4_NL", "output.": "IQ4_XS"}
TERNARY_FP4_TYPES = {"attn_q": "TQ1_0", "attn_k": "TQ2_0", "attn_v": "MXFP4", "attn_output": "NVFP4"}
CORPUS = ["Hello world, the model serves tokens.", "  leading spaces and\ttabs\n\nnewlines  ",
          "Ünïcödé: 日本語のテキスト, русский текст, العربية", "emoji 🚀🔥👩‍💻 and symbols ∑∫√",
          "def f(x):\n    return {'a': [1, 2, 3]}  # code", "numbers 42 2024 3.14159 1,000,000",
          "<|begin_of_text|>special<|eot_id|> tokens inline"]


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    """A tiny Llama whose rows are 256 wide, so every quantized type fits."""
    return tinymodels.make_model(tmp_path_factory.mktemp("k") / "hf", "tiny", seed=5, hidden_size=256,
                                 intermediate_size=512)


def test_f32_conversion_gives_back_the_original_weights_with_qk_rows_restored(tiny_model, tmp_path):
    gguf = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    converted = convert_gguf(gguf, tmp_path / "converted")
    original, ours = load_file(str(tiny_model / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert sorted(original) == sorted(ours)
    assert all(np.array_equal(original[name], ours[name]) for name in original)
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert inspect_base_model(converted).parameter_count == read_gguf(gguf).parameter_count


def test_qwen2_keeps_its_rows_and_biases(tmp_path):
    model = tinymodels.make_model(tmp_path / "qwen", "tiny", seed=2, architecture="qwen2")
    converted = convert_gguf(write_gguf(model, tmp_path / "qwen.gguf"), tmp_path / "converted")
    original, ours = load_file(str(model / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in ours
    assert all(np.array_equal(original[name], ours[name]) for name in original)
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("types", [ALL_TYPES, MORE_TYPES, IQ_TYPES, TERNARY_FP4_TYPES],
                         ids=["k-quants-q8-q4_1-q5_0-bf16", "q4_0-q5_1-f16", "iq", "tq-mxfp4-nvfp4"])
def test_dequantized_weights_equal_transformers_gguf_loader(k_model, tmp_path, types):
    from transformers import AutoModelForCausalLM

    gguf = write_gguf(k_model, tmp_path / "model.gguf", types)
    used = {t.type_name for t in read_gguf(gguf).tensors}
    assert used >= set(types.values())
    ours = load_file(str(convert_gguf(gguf, tmp_path / "converted") / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name).state_dict()
    assert sorted(ours) == sorted(theirs)
    unequal = [n for n in ours if not np.array_equal(ours[n].astype(np.float32), theirs[n].float().numpy())]
    assert unequal == []


def test_every_supported_type_is_exercised():
    exercised = {"F32"} | {t for types in (ALL_TYPES, MORE_TYPES, IQ_TYPES, TERNARY_FP4_TYPES) for t in types.values()}
    assert set(SUPPORTED_TENSOR_TYPES) == exercised


def test_conversion_is_deterministic(k_model, tmp_path):
    gguf = write_gguf(k_model, tmp_path / "model.gguf", ALL_TYPES)
    first, second = convert_gguf(gguf, tmp_path / "a"), convert_gguf(gguf, tmp_path / "b")
    assert tree_digest(file_digests(first)) == tree_digest(file_digests(second))


def test_large_models_are_written_in_shards(k_model, tmp_path, monkeypatch):
    from ember.provider.domain import gguf_model

    monkeypatch.setattr(gguf_model, "SHARD_BYTES", 1_000_000)
    converted = convert_gguf(write_gguf(k_model, tmp_path / "model.gguf"), tmp_path / "converted")
    shards = sorted(p.name for p in converted.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (converted / "model.safetensors").exists()
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert inspect_base_model(converted).parameter_count == read_gguf(tmp_path / "model.gguf").parameter_count


def test_rebuilt_tokenizer_and_chat_template_match_the_original(tiny_model, tmp_path):
    converted = convert_gguf(write_gguf(tiny_model, tmp_path / "tiny.gguf"), tmp_path / "converted")
    original, rebuilt = TextTokenizer.from_dir(tiny_model), TextTokenizer.from_dir(converted)
    for text in CORPUS:
        assert rebuilt.encode(text) == original.encode(text), text
        ids = original.encode(text, add_special_tokens=False)
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    messages = [{"role": "user", "content": "hello"}]
    assert rebuilt.encode_chat(messages) == original.encode_chat(messages)
    assert rebuilt.eos_token == original.eos_token == tinymodels.EOT
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == \
        original.token_id(tinymodels.EOT)


def test_the_converted_model_generates_what_the_original_does(tiny_model, tmp_path):
    from ember.runtime.engine.engine import Engine
    from ember.runtime.engine.sequence import SamplingParams

    converted = convert_gguf(write_gguf(tiny_model, tmp_path / "tiny.gguf"), tmp_path / "converted")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 5, 9, 14], [1, 30, 2, 7, 7, 100]]
    original = [c.token_ids for c in Engine.from_dir(tiny_model).generate(prompts, params)]
    assert [c.token_ids for c in Engine.from_dir(converted).generate(prompts, params)] == original


# -- refusals ----------------------------------------------------------------------------------------------


def _refused(path, *fragments):
    with pytest.raises(ModelFilesError) as info:
        read_gguf(path)
    assert all(f in str(info.value) for f in fragments), str(info.value)
    return str(info.value)


def test_bad_files_are_refused_naming_what_is_wrong(tiny_model, tmp_path):
    good = write_gguf(tiny_model, tmp_path / "good.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good.read_bytes()[4:])
    _refused(tmp_path / "magic.gguf", "magic bytes 'GGUF'")
    (tmp_path / "truncated.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(tmp_path / "truncated.gguf", "truncated or damaged")
    (tmp_path / "header.gguf").write_bytes(good.read_bytes()[:100])
    _refused(tmp_path / "header.gguf", "truncated or damaged")
    _refused(write_gguf(tiny_model, tmp_path / "gemma.gguf", architecture="gemma"), "general.architecture 'gemma'")
    _refused(write_gguf(tiny_model, tmp_path / "shape.gguf", metadata={"llama.feed_forward_length": 180}),
             "tensor blk.0.ffn_down.weight has shape [64, 172]", "metadata implies [64, 180]")
    _refused(write_gguf(tiny_model, tmp_path / "missing.gguf", skip=("blk.1.ffn_up.weight",)),
             "model.layers.1.mlp.up_proj.weight")
    _refused(write_gguf(tiny_model, tmp_path / "bert.gguf", tokenizer_model="bert"), "tokenizer.ggml.model 'bert'")
    _refused(write_gguf(tiny_model, tmp_path / "pre.gguf", metadata={"tokenizer.ggml.pre": "chatglm-bpe"}),
             "tokenizer.ggml.pre 'chatglm-bpe'")
    _refused(write_gguf(tiny_model, tmp_path / "notok.gguf", metadata={"tokenizer.ggml.merges": None}),
             "tokenizer.ggml.merges is missing")
    _refused(write_gguf(tiny_model, tmp_path / "scaled.gguf", metadata={"llama.rope.scaling.type": "yarn"}),
             "llama.rope.scaling.type 'yarn'")


def test_an_unsupported_tensor_type_is_refused(k_model, tmp_path):
    path = write_gguf(k_model, tmp_path / "q8_1.gguf", {"ffn_up": "Q8_1"})  # llama.cpp's activation type
    _refused(path, "tensor blk.0.ffn_up.weight has type Q8_1", "Q4_K", "IQ2_XXS")


def test_a_failed_conversion_leaves_nothing(tiny_model, tmp_path):
    bad = write_gguf(tiny_model, tmp_path / "bad.gguf", architecture="gemma")
    with pytest.raises(ModelFilesError):
        convert_gguf(bad, tmp_path / "out" / "converted")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(ModelFilesError, match="already exists"):
        convert_gguf(write_gguf(tiny_model, tmp_path / "good.gguf"), tmp_path / "exists")


def test_ember_import_gguf_writes_a_servable_directory(tiny_model, tmp_path):
    gguf = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    out = subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", "import-gguf", str(gguf),
                          str(tmp_path / "hf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "hf") and "converting tiny.gguf: 21/21 tensors" in out.stderr
    assert inspect_base_model(tmp_path / "hf").architecture == "LlamaForCausalLM"
    out = subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", "import-gguf", str(tmp_path / "nope.gguf"),
                          str(tmp_path / "hf2")], capture_output=True, text=True)
    assert out.returncode == 1 and "nope.gguf is not a file" in out.stderr and not (tmp_path / "hf2").exists()


# -- through the provider ---------------------------------------------------------------------------------

PROGRAM = '''
from ember.provider import Model, ModelArgs, LoRAAddon, LoRAAddonArgs
base = Model("gguf-base", ModelArgs(account_id="acme", source="{source}"))
LoRAAddon("addon", LoRAAddonArgs(account_id="acme", base_model=base, source="models/addon"))
'''


def _program(tmp_path, tiny_model, source):
    program = tmp_path / "program"
    (program / "models").mkdir(parents=True)
    tinymodels.make_lora(tiny_model, program / "models" / "addon")
    (program / "Pulumi.yaml").write_text("name: gguf\nruntime: python\n")
    (program / "__main__.py").write_text(PROGRAM.format(source=source))
    return program


def test_a_gguf_model_is_checked_at_preview_and_converted_on_upload(tiny_model, tmp_path, capsys):
    from tests.provider.provider_helpers import store_entries

    from ember.provider.tools import cli
    from ember.provider.tools.runner import OfflineRunner

    write_gguf(tiny_model, tmp_path / "tiny.gguf")
    program = _program(tmp_path, tiny_model, str(tmp_path / "tiny.gguf"))
    assert cli.main(["up", str(program), "--offline", "--no-demo"]) == 0
    config = OfflineRunner(program, log=lambda _: None).config
    state = json.loads(next((config.state_dir / "stacks").glob("*.json")).read_text())
    [model] = [r for r in state["resources"].values() if r["type"].endswith("Model")]
    assert model["outputs"]["architecture"] == "LlamaForCausalLM"
    converted = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "again")
    assert model["outputs"]["digest"] == tree_digest(file_digests(converted))  # the stored model is the conversion
    assert any(entry.endswith("/tokenizer.json") for entry in store_entries(config))
    assert list((config.state_dir / "scratch").iterdir()) == []  # the converted copy is gone after the upload
    capsys.readouterr()
    assert cli.main(["preview", str(program), "--offline"]) == 0
    assert "same     Model  gguf-base" in capsys.readouterr().out
    assert cli.main(["destroy", str(program), "--offline"]) == 0


def test_a_bad_gguf_fails_preview_by_name_and_leaves_the_store_empty(tiny_model, tmp_path, capsys):
    from tests.provider.provider_helpers import store_entries

    from ember.provider.tools import cli
    from ember.provider.tools.runner import OfflineRunner

    write_gguf(tiny_model, tmp_path / "bad.gguf", metadata={"llama.feed_forward_length": 180})
    program = _program(tmp_path, tiny_model, str(tmp_path / "bad.gguf"))
    for command in (["preview"], ["up", "--no-demo"]):
        assert cli.main([*command, str(program), "--offline"]) == 1
        err = capsys.readouterr().err
        assert "source" in err and "tensor blk.0.ffn_down.weight has shape [64, 172]" in err, err
    assert store_entries(OfflineRunner(program, log=lambda _: None).config) == []


def test_a_remote_gguf_is_downloaded_then_converted(tiny_model, tmp_path):
    import fsspec

    from ember.provider.providers.model import ModelProvider

    gguf = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    with fsspec.open("memory://models/tiny.gguf", "wb") as f:
        f.write(gguf.read_bytes())
    provider = ModelProvider()
    provider._config = type(provider.config)(tmp_path / "state", f"file://{tmp_path / 'store'}")
    props = provider.check({}, {"account_id": "acme", "model_id": "remote", "source": "memory://models/tiny.gguf"}).inputs
    created = provider.create(props)
    assert created.outs["digest"] == tree_digest(file_digests(convert_gguf(gguf, tmp_path / "local")))
    provider.delete(created.id, created.outs)
    fsspec.filesystem("memory").rm("/models", recursive=True)
