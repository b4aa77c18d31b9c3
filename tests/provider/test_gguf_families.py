"""GGUF imports beyond plain Llama and Qwen2: Llama 3's RoPE scaling tensor, SentencePiece vocabularies and more
model families, each checked against transformers (the original model's logits, or its own GGUF loader)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.numpy import load_file
from tests.provider.gguf_helpers import (GEMMA_SPECIALS, LLAMA2_SPECIALS, llama3_rope_freqs, sentencepiece_metadata,
                                         write_gguf)
from tokenizers import Tokenizer

from ember.provider.domain.gguf_model import _open, convert_gguf, read_gguf
from ember.provider.domain.gguf_tokenizer import GGUFVocabulary
from ember.provider.domain.model_files import ModelFilesError
from ember.runtime.devtools import tinymodels
from ember.runtime.model.tokenizer import TextTokenizer

IDS = [[1, 17, 300, 42, 5, 99, 250, 7, 7, 130, 64, 200]]


def logits(directory) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))
    return directory


# -- Llama 3.1's rope_freqs --------------------------------------------------------------------------------

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    """A tiny Llama 3.1: 64-wide heads and theta 500000, so several frequencies fall in the smooth band."""
    model = tinymodels.make_model(tmp_path_factory.mktemp("llama31") / "hf", "tiny", seed=3, hidden_size=256,
                                  intermediate_size=256, rope_theta=500000.0, max_position_embeddings=16384)
    return _edit_config(model, rope_scaling=LLAMA31_SCALING)


def test_llama3_rope_freqs_become_the_rope_scaling_that_produced_them(llama31, tmp_path):
    gguf = write_gguf(llama31, tmp_path / "llama31.gguf")
    assert "rope_freqs.weight" in {t.name for t in GGUFReader(gguf).tensors}
    converted = convert_gguf(gguf, tmp_path / "converted")
    config = json.loads((converted / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA31_SCALING
    assert config["rope_theta"] == 500000.0
    assert not any("rope" in name for name in load_file(str(converted / "model.safetensors")))
    np.testing.assert_allclose(logits(converted), logits(llama31), atol=1e-5, rtol=0)
    # without the scaling the model is a different one: the check above is not vacuous
    assert not np.allclose(logits(_edit_config(converted, rope_scaling=None)), logits(llama31), atol=1e-4)


@pytest.mark.parametrize("scaling", [{"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                                     {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
                                     {"factor": 4.0, "low_freq_factor": 1.5, "high_freq_factor": 6.0}],
                         ids=["llama32", "low2-high8", "factor4-low1.5"])
def test_other_llama3_scalings_are_recovered(llama31, tmp_path, scaling):
    config = json.loads((llama31 / "config.json").read_text())
    scaling = {"rope_type": "llama3", **scaling, "original_max_position_embeddings": 8192}
    gguf = write_gguf(_edit_config(llama31, rope_scaling=scaling), tmp_path / "scaled.gguf")
    try:
        assert read_gguf(gguf).config["rope_scaling"] == scaling
    finally:
        _edit_config(llama31, rope_scaling=config["rope_scaling"])


def test_the_original_context_comes_from_metadata_when_a_converter_writes_it(tmp_path):
    model = tinymodels.make_model(tmp_path / "hf", "tiny", seed=4, llama3_rope_scaling=True)
    scaling = json.loads((model / "config.json").read_text())["rope_scaling"]
    assert scaling["original_max_position_embeddings"] == 64
    _edit_config(model, original_max_position_embeddings=64)  # llama.cpp reads it from the top level
    gguf = write_gguf(model, tmp_path / "m.gguf", metadata={"llama.rope.scaling.original_context_length": 64})
    converted = convert_gguf(gguf, tmp_path / "converted")
    assert json.loads((converted / "config.json").read_text())["rope_scaling"] == scaling
    np.testing.assert_allclose(logits(converted), logits(model), atol=1e-5, rtol=0)


def test_rope_freqs_that_no_llama3_scaling_produces_are_refused(llama31, tmp_path):
    config = json.loads((llama31 / "config.json").read_text())
    freqs = llama3_rope_freqs(config)
    freqs[len(freqs) // 2] *= 1.5
    bad = write_gguf(llama31, tmp_path / "bad.gguf", extra_tensors={"rope_freqs.weight": freqs})
    with pytest.raises(ModelFilesError, match="tensor rope_freqs.weight is not Llama 3's RoPE scaling"):
        read_gguf(bad)
    wrong = write_gguf(llama31, tmp_path / "wrong.gguf", extra_tensors={"rope_freqs.weight": freqs[:-2]})
    with pytest.raises(ModelFilesError, match=r"tensor rope_freqs.weight has type F32 and shape \[30\]"):
        read_gguf(wrong)


# -- SentencePiece vocabularies ---------------------------------------------------------------------------

SPM_CORPUS = ["Hello world, the model serves tokens.", "  leading spaces and\ttabs\n\nnewlines  ", "a  b   c    d",
              "Ünïcödé: 日本語のテキスト, русский текст, العربية", "emoji 🚀🔥👩‍💻 and symbols ∑∫√",
              "def f(x):\n    return {'a': [1, 2, 3]}  # code", "numbers 42 2024 3.14159 1,000,000",
              "<s>special</s> tokens inline <tool> and <unk> <bos><eos>", " ", "", "\n"]


def _spm_gguf(tmp_path, architecture="llama", **options):
    vocabulary = sentencepiece_metadata(**options)
    model = tinymodels.make_model(tmp_path / "hf", "tiny", seed=6, vocab_size=len(vocabulary["tokenizer.ggml.tokens"]))
    return write_gguf(model, tmp_path / "spm.gguf", architecture=architecture, metadata=vocabulary)


def _same_as_transformers(ours: Tokenizer, gguf):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert ours.get_vocab(with_added_tokens=True) == theirs.get_vocab()
    for text in SPM_CORPUS:
        ids = theirs.encode(text)
        assert ours.encode(text).ids == ids, text
        assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    return theirs


def test_a_sentencepiece_vocabulary_tokenizes_as_transformers_gguf_loader_does(tmp_path):
    gguf = _spm_gguf(tmp_path)
    converted = convert_gguf(gguf, tmp_path / "converted")
    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    theirs = _same_as_transformers(ours, gguf)
    # byte fallback really is exercised: the rocket is four <0xNN> tokens, and decodes back whole
    assert [ours.id_to_token(i) for i in ours.encode("🚀", add_special_tokens=False).ids][-4:] == \
        ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    assert theirs.decode(ours.encode("x 🚀").ids, skip_special_tokens=True) == "x 🚀"
    rebuilt = TextTokenizer.from_dir(converted)
    assert rebuilt.bos_token == "<s>" and rebuilt.eos_token == "</s>"
    assert rebuilt.token_bytes(ours.token_to_id("<0x0A>")) == b"\n"
    assert json.loads((converted / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3", "phi3"])
def test_sentencepiece_flavours_of_gemma_and_phi3_tokenize_as_transformers_does(tmp_path, architecture):
    gemma = architecture.startswith("gemma")
    gguf = _spm_gguf(tmp_path, architecture, spaces=" " if gemma else "▁", specials=GEMMA_SPECIALS if gemma else
                     LLAMA2_SPECIALS)
    metadata, _ = _open(gguf)
    ours = GGUFVocabulary.from_metadata(metadata, str(gguf)).build()
    _same_as_transformers(ours, gguf)
    if gemma:
        assert ours.encode("a  b").tokens == ["<bos>", "a", "▁", "▁b"]  # no "▁" before the text, spaces kept


def test_a_sentencepiece_vocabulary_needs_its_scores(tmp_path):
    gguf = _spm_gguf(tmp_path / "a")
    path = write_gguf(gguf.parent / "hf", tmp_path / "noscores.gguf",
                      metadata=sentencepiece_metadata() | {"tokenizer.ggml.scores": None})
    with pytest.raises(ModelFilesError, match="metadata tokenizer.ggml.scores is missing"):
        read_gguf(path)


# -- more families ----------------------------------------------------------------------------------------

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
             pad_token_id=2, tie_word_embeddings=False)


def _configs():
    from transformers import (Gemma2Config, Gemma3TextConfig, MixtralConfig, Phi3Config, Qwen3Config,
                              Qwen3MoeConfig)

    experts = dict(num_experts_per_tok=2)
    phi3 = {k: v for k, v in SMALL.items() if k != "head_dim"} | dict(
        max_position_embeddings=256, original_max_position_embeddings=64, sliding_window=None,
        rope_scaling={"type": "longrope", "long_factor": [1.0 + i / 4 for i in range(8)],
                      "short_factor": [1.0 + i / 16 for i in range(8)]})
    gemma = SMALL | dict(query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True)
    return {
        # transformers' GGUF loader reads no head_dim for Qwen3 (it takes Qwen3Config's 128), so the heads are 128 wide
        "qwen3": Qwen3Config(**SMALL | {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
                                        "head_dim": 128}),
        # and no moe_intermediate_size for Qwen3-MoE (Qwen3MoeConfig's 768)
        "qwen3moe": Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=768, norm_topk_prob=True, **experts),
        "mixtral": MixtralConfig(**SMALL, num_local_experts=4, **experts),
        "phi3": Phi3Config(**phi3),
        "gemma2": Gemma2Config(**gemma, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        # six layers: five local (sliding window, base 10000) and one global (base 1e6, linear scaling)
        "gemma3": Gemma3TextConfig(**gemma | {"num_hidden_layers": 6},
                                   rope_scaling={"rope_type": "linear", "factor": 4.0}),
    }


def _family_model(directory, config, seed: int = 0):
    """A tiny transformers model of this family, saved as the Hub has it, with random norms and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # Gemma's norms scale by 1 + weight, the others by weight
                parameter.copy_((0 if gemma else 1) + 0.2 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tinymodels._write_tokenizer(directory, tinymodels.TinyConfig(vocab_size=config.vocab_size), seed, False)
    return directory


def _converted(family: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny model of the family, written as llama.cpp's converter writes it, converted back: (original, GGUF
    file, converted directory)."""
    original = _family_model(tmp_path / "hf", _configs()[family])
    gguf = write_gguf(original, tmp_path / "model.gguf")
    return original, gguf, convert_gguf(gguf, tmp_path / "converted")


FAMILY_CONFIG_KEYS = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "attention_bias": False},
    "qwen3moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 768, "norm_topk_prob": True},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "original_max_position_embeddings": 64,
             "max_position_embeddings": 256},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "query_pre_attn_scalar": 16,
               "sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "query_pre_attn_scalar": 16,
               "sliding_window": 4, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "hidden_activation": "gelu_pytorch_tanh"},
}
# where transformers' own GGUF loader reads the family (it reads Mixtral's files as Llama)
TRANSFORMERS_READS = ("qwen3", "qwen3moe", "phi3", "gemma2", "gemma3")


@pytest.mark.parametrize("family", list(FAMILY_CONFIG_KEYS))
def test_a_family_converts_to_the_model_it_came_from(family, tmp_path):
    from transformers import AutoModelForCausalLM

    original, gguf, converted = _converted(family, tmp_path)
    config = json.loads((converted / "config.json").read_text())
    assert {k: config.get(k) for k in FAMILY_CONFIG_KEYS[family]} == FAMILY_CONFIG_KEYS[family]
    ours = load_file(str(converted / "model.safetensors"))
    theirs = load_file(str(original / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)  # the Hub's names: per expert, Phi-3's fused qkv_proj and gate_up_proj
    np.testing.assert_allclose(logits(converted), logits(original), atol=1e-4, rtol=0)
    if family in TRANSFORMERS_READS:  # every weight as transformers' own GGUF loader reads it
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name).state_dict()
        ours = AutoModelForCausalLM.from_pretrained(converted).state_dict()
        assert sorted(ours) == sorted(loaded)
        assert [n for n in ours if not torch.equal(ours[n], loaded[n])] == []


def test_phi3_longrope_factors_go_back_into_rope_scaling(tmp_path):
    config = _configs()["phi3"]
    gguf = write_gguf(_family_model(tmp_path / "hf", config), tmp_path / "phi3.gguf")
    scaling = read_gguf(gguf).config["rope_scaling"]
    assert scaling == {"type": "longrope", "long_factor": config.rope_parameters["long_factor"],
                       "short_factor": config.rope_parameters["short_factor"]}


def test_gemma_1_is_refused_by_name(tiny_model, tmp_path):
    with pytest.raises(ModelFilesError, match="general.architecture 'gemma': Gemma 1 .* is not served"):
        read_gguf(write_gguf(tiny_model, tmp_path / "gemma.gguf", architecture="gemma"))


@pytest.mark.parametrize("family", list(FAMILY_CONFIG_KEYS))
def test_ember_generates_from_a_converted_family_what_it_does_from_the_original(family, tmp_path):
    from ember.runtime.engine.engine import Engine
    from ember.runtime.engine.sequence import SamplingParams

    original, gguf, converted = _converted(family, tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 5, 9, 14, 30, 2, 7], [3, 300, 42]]
    expected = [c.token_ids for c in Engine.from_dir(original).generate(prompts, params)]
    assert [c.token_ids for c in Engine.from_dir(converted).generate(prompts, params)] == expected
