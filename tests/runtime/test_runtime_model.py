"""The model code and loader: logits match transformers' in fp32, bad directories fail clearly."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from tests.provider.file_edits import edit_json, edit_tensors
from tests.runtime.runtime_helpers import hf_model, make
from safetensors.torch import load_file

from ember.provider.domain.model_files import ModelFilesError
from ember.runtime.engine.batch import ScheduledChunk, build
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.model import matmul as matmul_module
from ember.runtime.model import quantized
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.decoder import Decoder
from ember.runtime.model.loader import load_model
from ember.runtime.model.quantized import quantize_projections

pytest.importorskip("transformers")
CPU = torch.device("cpu")


def run(model, cache, tokens, start, count, all_rows=False):
    table = run.tables.setdefault(id(tokens), [])
    cache.allocator.grow(table, start + count)
    batch = build([ScheduledChunk(tokens, start, count, table)], cache.block_size, CPU)
    if all_rows:
        batch.sample_rows = torch.arange(count)
    return model.forward(batch, cache)


run.tables = {}


def engine_parts(directory, dtype=torch.float32, quantized=None):
    weights = load_model(directory, dtype)
    if quantized:
        quantize_projections(weights, quantized)
    c = weights.config
    return Decoder(weights), KVCache(c.num_hidden_layers, 32, 16, c.num_key_value_heads, c.head_dim, dtype, CPU)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"architecture": "qwen2"}, {"architecture": "mistral"}, {"tie_word_embeddings": True, "llama3_rope_scaling": True},
     {"shards": 3}, {"chat_template_file": True, "num_key_value_heads": 4}],
    ids=["llama", "qwen2", "mistral", "tied-llama3-rope", "sharded", "mha"],
)
def test_logits_match_transformers_for_prefill_chunks_and_decode(tmp_path, overrides):
    directory = make(tmp_path / "m", **overrides)
    model, cache = engine_parts(directory)
    tokens = torch.randint(0, model.config.vocab_size, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        reference = hf_model(directory)(torch.tensor([tokens])).logits[0]
    whole = run(model, cache, list(tokens), 0, 120, all_rows=True)
    torch.testing.assert_close(whole, reference, atol=2e-5, rtol=1e-5)
    # The same sequence computed as two prefill chunks and a decode step, through the paged cache.
    again = list(tokens)
    first = run(model, cache, again, 0, 70, all_rows=True)
    second = run(model, cache, again, 70, 49, all_rows=True)
    last = run(model, cache, again, 119, 1)
    torch.testing.assert_close(torch.cat([first, second, last]), reference, atol=2e-5, rtol=1e-5)


def force_kernel(monkeypatch, name):
    """Make `name` measure fastest in Matmul's timing at load."""
    chosen = {"linear": F.linear, "onednn": matmul_module._onednn, "weight-only": quantized._weight_only,
              "dequantize": quantized._dequantized, "dynamic-int8": quantized._dynamic_int8,
              "scaled-mm": quantized._scaled_mm}[name]
    monkeypatch.setattr(matmul_module, "_seconds", lambda kernel, *args: 0.0 if getattr(kernel, "__wrapped__", kernel) is chosen else 1.0)


@pytest.mark.parametrize("faster", ["onednn", "linear"])
def test_logits_match_whichever_cpu_matmul_kernel_measures_faster(tmp_path, monkeypatch, faster):
    """The kernel is chosen by timing at load, so each choice must give transformers' logits on its own."""
    force_kernel(monkeypatch, faster)
    directory = make(tmp_path / "m")
    model, cache = engine_parts(directory)
    expected = faster if torch.backends.mkldnn.is_available() else "linear"
    assert model.matmul.choice == [expected] * 3
    assert bool(model.matmul.prepared) == (expected == "onednn")  # no packed copy when it is never used
    tokens = list(range(5, 105))
    with torch.no_grad():
        reference = hf_model(directory)(torch.tensor([tokens])).logits[0]
    prefill = run(model, cache, tokens, 0, 99, all_rows=True)  # more rows than Matmul.SMALL_ROWS
    decode = run(model, cache, tokens, 99, 1)
    torch.testing.assert_close(torch.cat([prefill, decode]), reference, atol=2e-5, rtol=1e-5)


# The stated tolerances against fp32 logits, over the 41 positions of a 40-token prompt and its decode step
# on a tiny random model (whose near-tied logits flip easily; the real model's accuracy is in the README):
# the largest difference as a share of the largest logit, and how many positions' argmax may differ.
# Measured on an Intel Xeon with AMX: bf16 0.011 and 0; int8 0.023 and 2-3; int4 0.24 and 11; fp8 0.077 and 5
# (dequantize, the CPU's emulation), 0.098 and 6 with fp8 activations too (scaled-mm, through torch's CPU
# _scaled_mm: its bound, as it is what a GPU runs).
TOLERANCE = {"bf16": (0.02, 0), "int8": (0.04, 4), "int4": (0.35, 15), "fp8": (0.12, 8)}


@pytest.mark.parametrize("precision,kernel", [("bf16", "onednn"), ("bf16", "linear"), ("int8", "weight-only"),
                                              ("int8", "dynamic-int8"), ("int8", "dequantize"), ("int4", "weight-only"), ("int4", "dequantize"),
                                              ("fp8", "dequantize")])
def test_reduced_precision_logits_stay_within_the_stated_tolerance_of_fp32(tmp_path, monkeypatch, precision, kernel):
    directory = make(tmp_path / "m", intermediate_size=192)  # int4 packs widths in multiples of 32
    reference_model, reference_cache = engine_parts(directory)
    tokens = list(range(5, 46))
    reference = torch.cat([run(reference_model, reference_cache, tokens, 0, 40, all_rows=True),
                           run(reference_model, reference_cache, tokens, 40, 1)])
    run.tables.pop(id(tokens))
    force_kernel(monkeypatch, kernel)
    model, cache = engine_parts(directory, torch.bfloat16, None if precision == "bf16" else precision)
    if kernel != "onednn" or torch.backends.mkldnn.is_available():
        assert model.matmul.choice == [kernel] * 3
    ours = torch.cat([run(model, cache, tokens, 0, 40, all_rows=True), run(model, cache, tokens, 40, 1)])
    share, flips = TOLERANCE[precision]
    assert (ours - reference).abs().max() <= share * reference.abs().max()
    assert (ours.argmax(-1) != reference.argmax(-1)).sum() <= flips


@pytest.mark.parametrize("capability, hip_arch, offered", [
    (None, None, False), ((8, 0), None, False), ((8, 6), None, False), ((8, 9), None, True), ((9, 0), None, True),
    ((10, 0), None, True), ((9, 4), "gfx942:sramecc+:xnack-", True), ((9, 0), "gfx90a:sramecc+:xnack-", False)],
    ids=["cpu", "a100", "a10", "l4", "h100", "b200", "mi300x", "mi200"])
def test_fp8_offers_scaled_mm_only_on_gpus_with_fp8(capability, hip_arch, offered):
    assert set(quantized.fp8_kernels(capability, hip_arch)) == ({"dequantize", "scaled-mm"} if offered else {"dequantize"})
    assert quantized.fp8_dtype(hip_arch) is (torch.float8_e4m3fnuz if hip_arch == "gfx942:sramecc+:xnack-"
                                             else torch.float8_e4m3fn)


def test_fp8_scaled_mm_pads_shapes_that_do_not_fit():
    """The kernel's own arithmetic (row scales, padding to multiples of 16) through torch's CPU _scaled_mm;
    on the CPU only the dequantizing path is offered."""
    generator = torch.Generator().manual_seed(0)
    weight = quantized.Fp8Weight.quantize(torch.randn(50, 40, generator=generator), torch.bfloat16)
    assert set(weight.kernels()) == {"dequantize"}
    x, bias = torch.randn(3, 40, generator=generator).bfloat16(), torch.randn(50, generator=generator).bfloat16()
    operand = quantized._prepare_scaled_mm(weight)
    assert operand.q_t.shape == (48, 64) and operand.q_t.stride(0) == 1  # column-major, padded
    out = quantized._scaled_mm(x, operand, bias)
    expected = weight.dequantized_matmul(x, bias).float()
    assert out.shape == (3, 50) and out.dtype is torch.bfloat16
    # Only the activations' fp8 rounding differs: 0.017 of the largest output, measured.
    assert (out.float() - expected).abs().max() <= 0.03 * expected.abs().max()


def test_parameter_count_matches_the_checkpoint(tiny_model):
    weights = load_model(tiny_model)
    assert weights.parameter_count == sum(t.numel() for t in load_file(tiny_model / "model.safetensors").values())


# --- bad directories ------------------------------------------------------------------------------------

def broken(tmp_path, tiny_model):
    target = tmp_path / "broken"
    shutil.copytree(tiny_model, target)
    return target


def rewrite_config(directory, **changes):
    edit_json(directory / "config.json", **changes)


def rewrite_tensors(directory, change):
    edit_tensors(directory / "model.safetensors", change)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), r"config\.json is missing"),
        (lambda d: (d / "config.json").write_text("{oops"), r"config\.json is not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda d: rewrite_config(d, architectures=["GPT2LMHeadModel"]), r"\['GPT2LMHeadModel'\] is not supported"),
        (lambda d: rewrite_config(d, hidden_act="gelu"), "hidden_act 'gelu'"),
        (lambda d: rewrite_config(d, hidden_size=0), "hidden_size must be a positive int, got 0"),
        (lambda d: rewrite_config(d, num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
        (lambda d: rewrite_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (lambda d: rewrite_config(d, intermediate_size=100),
         r"model.layers.0.mlp.gate_proj.weight has shape \(172, 64\), but config.json needs \(100, 64\)"),
        (lambda d: rewrite_tensors(d, lambda t: t.pop("model.norm.weight")), "model.norm.weight is missing"),
        (lambda d: rewrite_tensors(d, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)})),
         r"\['model.layers.0.extra.weight'\] do not belong to a LlamaForCausalLM"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
         "not a readable safetensors file"),
    ],
    ids=["no-config", "bad-json", "no-weights", "architecture", "activation", "zero-size", "gqa", "rope",
         "wrong-shape", "missing-tensor", "extra-tensor", "corrupt-header"],
)
def test_bad_model_directories_fail_with_a_clear_message(tmp_path, tiny_model, damage, message):
    directory = broken(tmp_path, tiny_model)
    damage(directory)
    with pytest.raises(ModelFilesError, match=message):
        load_model(directory)


def test_missing_shard_is_named(tmp_path):
    directory = make(tmp_path / "m", shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="model-00002-of-00002.safetensors is missing"):
        load_model(directory)


def test_transformers_5_rope_parameters_are_read():
    config = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 300,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    })
    assert config.rope.theta == 500000.0 and config.rope.scaling == "llama3" and config.rope.factor == 8.0
