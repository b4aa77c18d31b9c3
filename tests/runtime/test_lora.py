"""Multi-LoRA: PEFT's numbers, mixed batches, hot load/unload, slot and host caches, bad adapters."""

import random
import shutil

import pytest
import torch
from tests.provider.file_edits import edit_json, edit_tensors
from tests.runtime.runtime_helpers import make, peft_model

from ember.runtime.devtools import tinymodels
from ember.runtime.devtools.bench_precisions import prompt_logits
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.lora.adapters import AdapterError, load_adapter
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.sampling import SamplingParams

peft = pytest.importorskip("peft")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # different ranks, modules and scalings
    "accounts/acme/models/pirate": dict(rank=4, target_modules=("q_proj", "v_proj")),
    "accounts/acme/models/poet": dict(rank=8, target_modules=ALL, use_rslora=True),
    "accounts/acme/models/terse": dict(rank=16, target_modules=("o_proj", "down_proj"), alpha=8),
}
PIRATE, POET, TERSE = ADAPTERS
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: tinymodels.make_lora(base, root / name.rsplit("/", 1)[1], seed=i + 1, init_std=0.1, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


def engine(base, adapters, **config):
    eng = Engine.from_dir(base, EngineConfig(**({"kv_cache_tokens": 4096, "max_loras": 4, "max_lora_rank": 16} | config)))
    for name, path in adapters.items():
        eng.lora.add(name, path)
    return eng


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(16, 500) for _ in range(rng.randint(4, 40))] for _ in range(n)]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_logits_match_peft_and_merged_weights(base, adapters, name):
    eng = engine(base, adapters)
    tokens = list(range(20, 80))
    model = peft_model(base, adapters[name])
    with torch.no_grad():
        unmerged = model(torch.tensor([tokens])).logits[0]
        merged = model.merge_and_unload()(torch.tensor([tokens])).logits[0]
    ours = prompt_logits(eng, tokens, name)
    torch.testing.assert_close(ours, unmerged, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ours, merged, atol=5e-5, rtol=1e-5)


def test_a_mixed_batch_gives_each_row_its_tokens_alone(base, adapters):
    eng = engine(base, adapters)
    work = prompts(8)
    names = [None, PIRATE, POET, TERSE, PIRATE, None, TERSE, POET]
    mixed = eng.generate(work, GREEDY, names)
    alone = [eng.generate([p], GREEDY, [n])[0].token_ids for p, n in zip(work, names)]
    assert [m.token_ids for m in mixed] == alone
    plain = eng.generate(work[1:4], GREEDY)
    assert all(p.token_ids != m.token_ids for p, m in zip(plain, mixed[1:4]))  # the adapters do something


def test_hot_load_and_unload_during_generation_lose_nothing(base, adapters):
    reference = engine(base, adapters)
    work = prompts(3, seed=1)
    expected = [reference.generate([p], GREEDY, [n])[0].token_ids for p, n in zip(work, [PIRATE, POET, TERSE])]

    eng = engine(base, {PIRATE: adapters[PIRATE], POET: adapters[POET]})
    got = {}
    first = eng.add_request(work[0], GREEDY, adapter=PIRATE)
    second = eng.add_request(work[1], GREEDY, adapter=POET)
    for step in range(40):
        if step == 3:
            eng.lora.add(TERSE, adapters[TERSE])  # hot load while two requests decode
            third = eng.add_request(work[2], GREEDY, adapter=TERSE)
        if step == 5:
            eng.lora.remove(PIRATE)  # hot unload while its request still runs
            assert PIRATE not in eng.lora.served and eng.lora.loaded(PIRATE)
            with pytest.raises(ValueError, match="is not an addon loaded on this deployment"):
                eng.add_request(work[0], GREEDY, adapter=PIRATE)
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert not eng.has_unfinished
    assert [got[first], got[second], got[third]] == expected
    assert not eng.lora.loaded(PIRATE) and PIRATE not in eng.lora.slots  # dropped once its request ended


def test_new_weights_under_a_served_name_leave_running_requests_on_the_old(base, adapters):
    """Version 2 of an addon (POET's weights under PIRATE's name) loads beside version 1: the request running
    on version 1 ends with exactly its tokens alone, one added after the swap gets version 2's, and version 1
    is dropped from host memory and the device slots when its request ends."""
    work = prompts(2, seed=4)
    v1 = engine(base, {PIRATE: adapters[PIRATE]}).generate(work, GREEDY, [PIRATE, PIRATE])
    v2 = engine(base, {PIRATE: adapters[POET]}).generate(work, GREEDY, [PIRATE, PIRATE])
    assert v1[0].token_ids != v2[0].token_ids  # a swap in place would show in the first request's tokens

    eng = engine(base, {PIRATE: adapters[PIRATE]})
    first = eng.add_request(work[0], GREEDY, adapter=PIRATE)
    old = eng.requests[first].adapter
    got, dropped_at_finish = {}, None
    for step in range(40):
        if step == 3:
            eng.lora.add(PIRATE, adapters[POET])
            assert eng.lora.served == [PIRATE]  # the name answers throughout
            second = eng.add_request(work[1], GREEDY, adapter=PIRATE)
            assert eng.requests[second].adapter != old
            assert eng.requests[second].cache_namespace != eng.requests[first].cache_namespace
        if step == 4:
            assert eng.lora.slots.count(PIRATE) == 2  # both versions on the device for this step
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
            if out.request_id == first and out.finished:
                dropped_at_finish = old not in eng.lora.host and old not in eng.lora.device_slots.names
    assert not eng.has_unfinished
    assert got[first] == v1[0].token_ids and got[second] == v2[1].token_ids
    assert dropped_at_finish and list(eng.lora.versions) == [eng.lora.current[PIRATE]]
    assert eng.lora.slots.count(PIRATE) == 1 and list(eng.lora.host) == [eng.lora.current[PIRATE]]


def test_a_bad_new_version_leaves_the_old_one_serving(base, adapters, tmp_path):
    work = prompts(2, seed=5)
    expected = engine(base, {PIRATE: adapters[PIRATE]}).generate(work, GREEDY, [PIRATE, PIRATE])
    eng = engine(base, {PIRATE: adapters[PIRATE]})
    running = eng.add_request(work[0], GREEDY, adapter=PIRATE)
    got = {running: [t for out in eng.step() for t in out.token_ids]}
    bad = shutil.copytree(adapters[POET], tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="no safetensors header"):
        eng.lora.add(PIRATE, bad)
    assert list(eng.lora.reconcile({PIRATE: bad})) == [PIRATE]
    assert eng.lora.served == [PIRATE] and len(eng.lora.versions) == 1
    later = eng.add_request(work[1], GREEDY, adapter=PIRATE)
    while eng.has_unfinished:
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert [got[running], got[later]] == [c.token_ids for c in expected]


def test_more_adapters_than_slots_and_host_memory(base, adapters, tmp_path):
    extra = {f"accounts/acme/models/extra-{i}": tinymodels.make_lora(base, tmp_path / f"x{i}", seed=10 + i, rank=4, init_std=0.1)
             for i in range(3)}
    everything = adapters | extra
    eng = engine(base, everything, max_loras=2, max_cpu_loras=2)
    work = prompts(6, seed=2)
    names = list(everything)
    mixed = eng.generate(work, GREEDY, names)
    roomy = engine(base, everything, max_loras=8)
    assert [m.token_ids for m in mixed] == [roomy.generate([p], GREEDY, [n])[0].token_ids for p, n in zip(work, names)]
    assert eng.lora.loads > 0  # adapters evicted from host memory were read again on demand
    assert len(eng.lora.host) <= 2 and sum(s is not None for s in eng.lora.slots) <= 2


def test_reconcile_to_a_desired_set(base, adapters, tmp_path):
    eng = engine(base, {})
    bad = shutil.copytree(adapters[PIRATE], tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    failed = eng.lora.reconcile({PIRATE: adapters[PIRATE], POET: adapters[POET], "accounts/acme/models/bad": bad})
    assert list(failed) == ["accounts/acme/models/bad"] and "no safetensors header" in failed["accounts/acme/models/bad"]
    assert eng.lora.served == [PIRATE, POET]
    assert eng.lora.reconcile({POET: adapters[POET]}) == {}
    assert eng.lora.served == [POET]


def damage_config(path, **changes):
    edit_json(path / "adapter_config.json", **changes)


def damage_tensors(path, change):
    edit_tensors(path / "adapter_model.safetensors", change)


FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda p: damage_config(p, r=512), r"r: Input should be less than or equal to 256 \(got 512\)"),
        (lambda p: damage_config(p, r=32), r"rank r=32 is above the deployment's max_lora_rank 16"),
        (lambda p: damage_config(p, target_modules=["q_proj", "lm_head"]), r"\['lm_head'\] are not supported"),
        (lambda p: damage_config(p, peft_type="IA3"), "peft_type"),
        (lambda p: damage_config(p, use_dora=True), "use_dora"),
        (lambda p: damage_config(p, target_modules=["v_proj"]), "q_proj, which target_modules does not list"),
        (lambda p: damage_tensors(p, lambda t: t.update({FIRST_A: torch.zeros(4, 99)})),
         r"has shape \[4, 99\], but the base model needs \[4, 64\]"),
        (lambda p: damage_tensors(p, lambda t: t.pop(FIRST_A)), r"1 LoRA weights are missing, e.g. layer 0 q_proj.lora_A"),
        (lambda p: damage_tensors(p, lambda t: t.update({FIRST_A.replace("layers.0", "layers.7"): torch.zeros(4, 64)})),
         "is for layer 7, but the base model has 2"),
        (lambda p: damage_tensors(p, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})),
         "is not a LoRA weight of a module Ember serves addons on"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:500]),
         "not a safetensors file"),
    ],
    ids=["no-config", "no-weights", "rank-range", "rank-above-max", "module", "peft-type", "dora", "unlisted-module",
         "wrong-shape", "missing-layer", "extra-layer", "foreign-tensor", "truncated"],
)
def test_bad_adapters_are_refused_and_the_rest_keep_serving(base, adapters, tmp_path, damage, message):
    eng = engine(base, {POET: adapters[POET]})
    bad = shutil.copytree(adapters[PIRATE], tmp_path / "bad")
    damage(bad)
    with pytest.raises(AdapterError, match=message):
        eng.lora.add("accounts/acme/models/bad", bad)
    assert eng.lora.served == [POET]
    assert eng.generate([[20, 21, 22]], GREEDY, [POET])[0].finish_reason == "length"


def test_adapter_for_another_base_model_is_refused(tmp_path, adapters):
    other = make(tmp_path / "other", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(AdapterError, match="the adapter does not fit its base model"):
        load_adapter("x", adapters[PIRATE], ModelConfig.from_dir(other))


def test_requests_for_unknown_addons_are_refused(base, adapters):
    eng = engine(base, adapters)
    with pytest.raises(ValueError, match="model: 'accounts/acme/models/nope' is not an addon loaded"):
        eng.add_request([1, 2, 3], GREEDY, adapter="accounts/acme/models/nope")
    plain = Engine.from_dir(base, EngineConfig(kv_cache_tokens=4096))
    with pytest.raises(ValueError, match="serves no addons"):
        plain.add_request([1, 2, 3], GREEDY, adapter=PIRATE)


def test_a_retiring_version_in_use_stays_in_host_memory_when_its_files_are_gone(base, adapters, tmp_path):
    """The provider deletes an old version's object once every replica serves the new one: a request still running on
    the old version must not need to read it again, however many other addons pass through host memory."""
    work = prompts(1, seed=6)
    expected = engine(base, {PIRATE: adapters[PIRATE]}).generate(work, GREEDY, [PIRATE])[0].token_ids
    old_files = shutil.copytree(adapters[PIRATE], tmp_path / "v1")
    eng = engine(base, {PIRATE: old_files}, max_loras=1, max_cpu_loras=1)
    running = eng.add_request(work[0], GREEDY, adapter=PIRATE)
    old = eng.requests[running].adapter
    got = [t for out in eng.step() for t in out.token_ids]
    eng.lora.add(PIRATE, adapters[POET])  # version 2; then the old version's files go
    shutil.rmtree(old_files)
    eng.lora.add(TERSE, adapters[TERSE])  # another addon through the one host slot
    assert old in eng.lora.host  # kept: its request still runs (the current versions were evicted instead)
    while eng.has_unfinished:
        got += [t for out in eng.step() for t in out.token_ids]
    assert got == expected and old not in eng.lora.host and old not in eng.lora.versions
