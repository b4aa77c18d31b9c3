"""The continuous-batching engine: same tokens as transformers, however requests are batched."""

import random

import pytest
import torch
from tests.runtime.runtime_helpers import hf_greedy, hf_model, make

from ember.runtime.engine.engine import ContextLengthExceeded, Engine, EngineConfig
from ember.runtime.model.sampling import SamplingParams

pytest.importorskip("transformers")
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make(tmp_path_factory.mktemp("engine") / "m")


@pytest.fixture(scope="module")
def reference(model_dir):
    hf = hf_model(model_dir)
    cache = {}

    def greedy(prompt, n):
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = hf_greedy(hf, prompt, n)
        return cache[key]

    return greedy


def prompts(n, seed=0, lengths=(3, 90)):
    rng = random.Random(seed)
    return [[rng.randrange(16, 512) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def engine(model_dir, **config):
    return Engine.from_dir(model_dir, EngineConfig(**({"kv_cache_tokens": 4096} | config)))


def test_batched_requests_of_different_lengths_match_transformers(model_dir, reference):
    work = prompts(8)
    lengths = [5, 40, 17, 33, 1, 28, 40, 9]
    outputs = engine(model_dir).generate(work, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths])
    for prompt, n, out in zip(work, lengths, outputs):
        assert out.token_ids == reference(prompt, n)
        assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


def test_requests_joining_mid_generation_match_transformers(model_dir, reference):
    eng = engine(model_dir, max_num_batched_tokens=48, max_num_seqs=4)  # chunked prefill, a full batch
    work = prompts(7, seed=1)
    got = {}
    pending = list(enumerate(work))
    steps = 0
    while pending or eng.has_unfinished:
        if pending and steps % 3 == 0:  # a new request every third step, while others are decoding
            i, prompt = pending.pop(0)
            eng.add_request(prompt, SamplingParams(max_tokens=24, **GREEDY), request_id=str(i))
        for out in eng.step():
            got.setdefault(int(out.request_id), []).extend(out.token_ids)
        steps += 1
    assert steps > 24 + 2 * len(work)
    for i, prompt in enumerate(work):
        assert got[i] == reference(prompt, 24), i


def test_preemption_under_a_small_cache_loses_nothing(model_dir, reference):
    eng = engine(model_dir, kv_cache_tokens=256, max_model_len=200, max_num_batched_tokens=64, max_num_seqs=8)
    work = prompts(8, seed=2, lengths=(20, 60))
    outputs = eng.generate(work, SamplingParams(max_tokens=30, **GREEDY))
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == [reference(p, 30) for p in work]
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks


def test_abort_frees_the_request_and_spares_the_others(model_dir, reference):
    eng = engine(model_dir)
    work = prompts(3, seed=3)
    ids = [eng.add_request(p, SamplingParams(max_tokens=20, **GREEDY)) for p in work]
    got = {i: [] for i in ids}
    for _ in range(5):
        for out in eng.step():
            got[out.request_id] += out.token_ids
    assert eng.abort(ids[1]) and not eng.abort(ids[1])
    while eng.has_unfinished:
        for out in eng.step():
            assert out.request_id != ids[1]
            got[out.request_id] += out.token_ids
    assert got[ids[0]] == reference(work[0], 20) and got[ids[2]] == reference(work[2], 20)
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(model_dir):
    eng = engine(model_dir)
    prompt = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=25, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    alone = eng.generate([prompt], params)[0].token_ids
    crowded = eng.generate([prompt] + prompts(5, seed=5), [params] + [SamplingParams(max_tokens=30, temperature=1.0)] * 5)
    assert crowded[0].token_ids == alone
    other_seed = eng.generate([prompt], SamplingParams(max_tokens=25, temperature=0.9, seed=99, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(model_dir, reference):
    eng = engine(model_dir)
    prompt = prompts(1, seed=6)[0]
    for params in (SamplingParams(max_tokens=15, temperature=1.5, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=15, temperature=1.0, top_p=1e-6, ignore_eos=True)):
        assert eng.generate([prompt], params)[0].token_ids == reference(prompt, 15)


def test_logprobs_are_the_models(model_dir):
    eng = engine(model_dir)
    prompt = prompts(1, seed=7)[0]
    out = eng.generate([prompt], SamplingParams(max_tokens=3, temperature=0, logprobs=3, ignore_eos=True))[0]
    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([prompt + out.token_ids])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + 2], dim=-1)
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(expected[step, lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == expected[step].topk(3).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy picks the best


def test_stop_strings_end_the_text_before_them(model_dir):
    eng = engine(model_dir)
    prompt = prompts(1, seed=8)[0]
    full = eng.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0]
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = eng.generate([prompt], SamplingParams(max_tokens=40, stop=[stop, "never-seen-stop"], **GREEDY))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_stop_tokens_and_eos(model_dir, reference):
    eng = engine(model_dir)
    prompt = prompts(1, seed=9)[0]
    expected = reference(prompt, 10)
    out = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[expected[3]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == expected[: expected.index(expected[3]) + 1]
    eos = next(iter(eng.output.stop_token_ids))
    assert eos in eng.model.config.eos_token_ids


def test_requests_that_cannot_fit_are_refused_without_their_text(model_dir):
    eng = engine(model_dir, max_model_len=128)
    with pytest.raises(ContextLengthExceeded, match="max_tokens: the prompt's 120 tokens plus max_tokens 20 exceed") as info:
        eng.add_request([42] * 120, SamplingParams(max_tokens=20))
    assert "42" not in str(info.value) and info.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded, match="prompt: the prompt is 128 tokens; this model's context is 128"):
        eng.add_request([42] * 128, SamplingParams(max_tokens=1))
    assert eng.room(120) == 8 and eng.room(120, 8) == 8 and not eng.requests
    with pytest.raises(ValueError, match="prompt: token id .* is outside this model's vocabulary of"):
        eng.add_request([10**6], SamplingParams())
    with pytest.raises(ValueError, match="prompt: is empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="kv_cache_tokens: 64 cannot hold one request"):
        engine(model_dir, kv_cache_tokens=64, max_model_len=128)


def test_a_requests_logit_tensors_are_built_once_when_it_is_added(model_dir):
    eng = engine(model_dir)
    params = SamplingParams(max_tokens=3, logit_bias=((9, 100.0),), min_tokens=2, stop_token_ids=(4,), **GREEDY)
    request = eng.add_request([5, 6, 7], params)
    fixed = eng.requests[request].logit_tensors
    assert fixed.bias_ids.tolist() == [9] and fixed.biases.tolist() == [100.0] and fixed.biases.device == eng.device
    assert fixed.held_back.tolist() == sorted((set() if params.ignore_eos else eng.stop_token_ids) | {4})
    tokens = []
    while eng.has_unfinished:
        tokens += [t for out in eng.step() for t in out.token_ids]
        assert request not in eng.requests or eng.requests[request].logit_tensors is fixed  # not rebuilt by a step
    assert tokens == [9, 9, 9]
    assert eng.requests[eng.add_request([5, 6, 7], SamplingParams(max_tokens=3))].logit_tensors is None
