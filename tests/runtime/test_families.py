"""Every family Ember serves, against transformers: logits through the paged cache, greedy tokens in a mixed
batch (the compiled step too), and a PEFT LoRA on every module PEFT targets there.

The tiny models are built by transformers itself from configs shaped like the real ones, every switch on:
sliding windows shorter than the sequences, Gemma's soft caps low enough to bite, Gemma 3's local RoPE base and
linear-scaled global one, Phi-3's LongRoPE and fused checkpoint, Mixtral's and Qwen3-MoE's routing (with a
dense layer among Qwen3-MoE's experts).
"""

import random

import pytest
import torch
from tests.runtime.runtime_helpers import hf_greedy, hf_model, peft_logits
from tests.runtime.test_runtime_model import CPU, engine_parts, force_kernel, run

from ember.provider.domain.families import module_shapes
from ember.runtime.devtools import tinymodels
from ember.runtime.devtools.bench_precisions import prompt_logits
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.model.sampling import SamplingParams

peft = pytest.importorskip("peft")
FAMILIES = list(tinymodels.FAMILIES)
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: tinymodels.make_family_model(root / family, family, seed=3) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_for_prefill_chunks_and_decode(models, family):
    model, cache = engine_parts(models[family])
    # 100 tokens: past every sliding window (16, Phi-3's 48), within Phi-3's pre-training context (128)
    tokens = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        reference = hf_model(models[family])(torch.tensor([tokens])).logits[0]
    whole = run(model, cache, list(tokens), 0, 100, all_rows=True)
    torch.testing.assert_close(whole, reference, atol=2e-5, rtol=1e-5)
    again = list(tokens)
    chunked = torch.cat([run(model, cache, again, 0, 60, all_rows=True), run(model, cache, again, 60, 39, all_rows=True),
                         run(model, cache, again, 99, 1)])
    torch.testing.assert_close(chunked, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "qwen3", "mixtral", "qwen3_moe"])
def test_greedy_tokens_in_a_mixed_batch_match_transformers(models, family, compiled):
    if compiled and family in ("mixtral", "qwen3_moe"):
        pytest.skip("a Mixture of Experts' step runs eagerly (engine.compile_decode)")
    rng = random.Random(5)
    work = [[rng.randrange(16, 500) for _ in range(rng.randint(3, 50))] for _ in range(5)]
    lengths = [30, 7, 24, 30, 12]  # decoding past the 16-token windows
    eng = Engine.from_dir(models[family], EngineConfig(kv_cache_tokens=2048, compile=compiled,
                                                       max_num_batched_tokens=64))
    outputs = eng.generate(work, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths])
    hf = hf_model(models[family])
    assert [o.token_ids for o in outputs] == [hf_greedy(hf, p, n) for p, n in zip(work, lengths)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_lora_on_every_targetable_module_matches_peft(models, family, tmp_path):
    base = models[family]
    targets = tuple(module_shapes(tinymodels.json.loads((base / "config.json").read_text())))
    adapter = tinymodels.make_lora(base, tmp_path / "lora", seed=4, init_std=0.1, rank=4, target_modules=targets)
    eng = Engine.from_dir(base, EngineConfig(kv_cache_tokens=1024, max_loras=2, max_lora_rank=8))
    eng.lora.add("accounts/acme/models/addon", adapter)
    tokens = list(range(20, 80))
    ours = prompt_logits(eng, tokens, "accounts/acme/models/addon")
    torch.testing.assert_close(ours, peft_logits(base, adapter, tokens), atol=5e-5, rtol=1e-5)
    assert not torch.allclose(ours, prompt_logits(eng, tokens), atol=1e-3)  # the adapter changes the logits


def test_a_sliding_window_on_every_layer_holds_only_the_windows_blocks(models):
    """Mistral's 16-token window: 6 blocks of 16 serve two 110-token sequences (each would need 7 without the window)
    with no preemption, the same tokens as transformers; Gemma's global layers keep every block."""
    eng = Engine.from_dir(models["mistral"], EngineConfig(kv_cache_tokens=6 * 16, block_size=16,
                                                          max_num_batched_tokens=32, max_num_seqs=4))
    assert eng.cache.allocator.window == 16
    rng = random.Random(7)
    work = [[rng.randrange(16, 500) for _ in range(20)] for _ in range(2)]
    held = []
    for i, prompt in enumerate(work):
        eng.add_request(prompt, SamplingParams(max_tokens=90, **GREEDY), request_id=f"r{i}")
    outputs = {}
    while eng.has_unfinished:
        for out in eng.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        held.append(max((sum(b != eng.cache.allocator.hole for b in s.block_table) for s in eng.scheduler.running),
                        default=0))
    assert eng.scheduler.num_preemptions == 0 and max(held) <= 3  # the window's block, the one filling, one between
    hf = hf_model(models["mistral"])
    assert [outputs[f"r{i}"] for i in range(2)] == [hf_greedy(hf, p, 90) for p in work]
    assert eng.cache.allocator.num_free == 6  # every block back at the end
    gemma = Engine.from_dir(models["gemma2"], EngineConfig(kv_cache_tokens=512))
    assert gemma.cache.allocator.window is None


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_precisions_quantize_the_experts_and_serve_their_values(tmp_path, monkeypatch, family, precision):
    """The experts are quantized like every projection (the routers stay), and the quantized step (bf16) gives the
    logits of an fp32 model holding the quantized values within what bf16 alone costs this model against fp32
    (0.029 of the largest logit, 1 argmax of 41, measured): the experts serve what was quantized. The dequantizing
    kernel is chosen, whose product is the weight's own; each kernel's accuracy is test_runtime_model's."""
    import dataclasses

    from ember.runtime.model.decoder import Decoder
    from ember.runtime.model.quantized import Int8Weight, QuantizedWeight

    size = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64, "intermediate_size": 192}}
    directory = tinymodels.make_family_model(tmp_path / family, family, seed=3, **size[family])  # int4: groups of 32
    force_kernel(monkeypatch, "dequantize")
    eng = Engine.from_dir(directory, EngineConfig(kv_cache_tokens=512, precision=precision))
    w = eng.model.weights
    experts = [x for layer in w.layers for x in layer.expert_gate_up + layer.expert_down]
    assert experts and all(isinstance(x, QuantizedWeight) for x in experts)
    assert all(isinstance(layer.router, torch.Tensor) for layer in w.layers if layer.router is not None)

    def exact(x):
        if isinstance(x, Int8Weight):
            return x.q.float() * x.scale.float()[:, None]
        if isinstance(x, QuantizedWeight):
            return x.dequantize().float()
        if isinstance(x, list):
            return list(map(exact, x))
        return x if x is None else x.float()

    layers = [dataclasses.replace(layer, **{k: exact(v) for k, v in vars(layer).items()}) for layer in w.layers]
    reference = Decoder(dataclasses.replace(w, embed=w.embed.float(), layers=layers, norm=w.norm.float(),
                                            lm_head=exact(w.lm_head)), max_positions=512)
    c = w.config
    cache = KVCache(c.num_hidden_layers, 8, 16, c.num_key_value_heads, c.head_dim, torch.float32, CPU)
    tokens = list(range(20, 61))
    expected = run(reference, cache, tokens, 0, len(tokens), all_rows=True)
    ours = prompt_logits(eng, tokens)
    assert float((ours - expected).abs().max() / expected.abs().max()) <= 0.04
    assert int((ours.argmax(-1) != expected.argmax(-1)).sum()) <= 2


EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_lora_on_the_experts_matches_peft_in_a_mixed_batch(models, family, tmp_path):
    """PEFT's LoRA on the experts (`target_parameters`, as PEFT targets transformers 5's stacked experts), alone and
    with the attention's, in a batch beside other adapters and the base model."""
    base = models[family]
    adapters = {"accounts/acme/models/experts": tinymodels.make_lora(base, tmp_path / "experts", seed=5, init_std=0.1,
                                                                      rank=4, target_modules=(), target_parameters=EXPERTS),
                "accounts/acme/models/both": tinymodels.make_lora(base, tmp_path / "both", seed=6, init_std=0.1, rank=8,
                                                                  target_modules=("q_proj", "o_proj"),
                                                                  target_parameters=EXPERTS[1:])}
    eng = Engine.from_dir(base, EngineConfig(kv_cache_tokens=2048, max_loras=2, max_lora_rank=8))
    for name, path in adapters.items():
        eng.lora.add(name, path)
    tokens = list(range(20, 80))
    for name, path in adapters.items():
        torch.testing.assert_close(prompt_logits(eng, tokens, name), peft_logits(base, path, tokens),
                                   atol=5e-5, rtol=1e-5)
    rng = random.Random(9)
    work = [[rng.randrange(16, 500) for _ in range(rng.randint(3, 30))] for _ in range(6)]
    names = [None, *adapters, *adapters, None]
    greedy = SamplingParams(max_tokens=12, **GREEDY)
    mixed = [o.token_ids for o in eng.generate(work, greedy, names)]
    assert mixed == [eng.generate([p], greedy, [n])[0].token_ids for p, n in zip(work, names)]
    assert mixed[1] != eng.generate([work[1]], greedy)[0].token_ids  # the experts' adapter changes the answer
