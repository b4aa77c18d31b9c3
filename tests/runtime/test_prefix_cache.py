"""Prefix caching: shared prompt prefixes reuse cached K/V blocks, outputs unchanged, nothing shared across
models, addons or addon versions, evicted least recently used."""

import random

import pytest
from tests.runtime.runtime_helpers import make

from ember.runtime.devtools import tinymodels
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.engine.kv_cache import BlockAllocator, block_hashes
from ember.runtime.model.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
BLOCK = 16
ACME, GLOBEX = "accounts/acme/models/pirate", "accounts/globex/models/pirate"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make(tmp_path_factory.mktemp("prefix") / "base")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    # Only o_proj and down_proj: k_proj and v_proj untouched, and still the K/V of later layers differ.
    return {name: tinymodels.make_lora(base, root / f"a{i}", seed=i + 1, rank=4, init_std=0.1,
                                       target_modules=("o_proj", "down_proj"))
            for i, name in enumerate([ACME, GLOBEX])}


def engine(base, adapters=None, **config):
    eng = Engine.from_dir(base, EngineConfig(**({"kv_cache_tokens": 2048, "block_size": BLOCK, "max_loras": 2,
                                                "max_lora_rank": 8} | config)))
    for name, path in (adapters or {}).items():
        eng.lora.add(name, path)
    return eng


def shared_prefix_prompts(n, prefix_len=70, seed=0):
    rng = random.Random(seed)
    system = [rng.randrange(16, 512) for _ in range(prefix_len)]
    return [system + [rng.randrange(16, 512) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def run_one(eng, prompt, adapter=None):
    """Generate one request alone; returns (tokens, prompt tokens it took from the cache)."""
    request_id = eng.add_request(prompt, GREEDY, adapter=adapter)
    seq = eng.requests[request_id]
    tokens = []
    while eng.has_unfinished:
        tokens += [t for out in eng.step() for t in out.token_ids]
    return tokens, seq.num_cached


def test_the_allocator_shares_held_blocks_and_evicts_the_least_recently_used():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    hashes = block_hashes(tokens, len(tokens), 2, b"", [])
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    first: list[int] = []
    alloc.grow(first, 5)
    alloc.register(first[:2], hashes)
    second: list[int] = []
    assert alloc.match(hashes, second) == 2 and second == first[:2]
    shared = list(second)
    alloc.release(first)  # the third block was never registered: free at once; the shared two stay held
    assert alloc.num_free == 2 and not alloc.evictable
    alloc.release(second)
    assert alloc.num_free == 4 and list(alloc.evictable) == shared
    taken: list[int] = []
    alloc.grow(taken, 8)  # needs every block: the two cached ones are evicted, oldest first
    assert sorted(taken) == [0, 1, 2, 3] and not alloc.by_hash and not alloc.hash_of
    assert alloc.match(hashes, []) == 0
    alloc.release(taken)
    again: list[int] = []
    alloc.grow(again, 4)
    alloc.register(again[:2], hashes)
    alloc.release(again)
    alloc.forget_cached()
    assert alloc.num_free == 4 == len(alloc.free) and not alloc.by_hash and alloc.match(hashes, []) == 0


def test_hashes_cover_the_whole_prefix_and_the_namespace():
    a = block_hashes([1, 2, 3, 4], 4, 2, b"", [])
    assert block_hashes([9, 2, 3, 4], 4, 2, b"", [])[1] != a[1]  # same second block, different first
    assert block_hashes([1, 2, 3, 4], 4, 2, b"accounts/acme/models/x#0", []) != a
    assert block_hashes([1, 2, 3, 4, 5], 3, 2, b"", []) == a[:1]  # only full blocks of the counted tokens


def test_shared_prefix_outputs_equal_uncached_and_skip_the_prefix(base):
    work = shared_prefix_prompts(6)
    cold = engine(base, prefix_caching=False)
    expected = [run_one(cold, p)[0] for p in work]
    assert cold.scheduler.prefix_hit_tokens == 0
    eng = engine(base)
    got = [run_one(eng, p) for p in work]
    assert [tokens for tokens, _ in got] == expected
    assert got[0][1] == 0
    assert all(cached == 64 for _, cached in got[1:])  # 70 shared tokens: four full 16-token blocks
    # A burst: the first request computes the prefix, the others wait one step and take it from the cache.
    burst = engine(base)
    assert [c.token_ids for c in burst.generate(work, GREEDY)] == expected
    assert burst.scheduler.prefix_hit_tokens == 5 * 64


def test_a_whole_cached_prompt_still_computes_its_last_token(base):
    prompt = shared_prefix_prompts(1, prefix_len=2 * BLOCK)[0][: 2 * BLOCK]
    eng = engine(base)
    first, _ = run_one(eng, prompt)
    again, cached = run_one(eng, prompt)
    assert again == first and cached == BLOCK  # the last block holds the token whose logits are sampled


def test_no_blocks_shared_across_addons_accounts_or_the_base_model(base, adapters):
    prompt = shared_prefix_prompts(1, prefix_len=64)[0]
    reference = {name: run_one(engine(base, adapters, prefix_caching=False), prompt, name)[0]
                 for name in [None, ACME, GLOBEX]}
    assert len({tuple(t) for t in reference.values()}) == 3  # the addons change the output
    eng = engine(base, adapters)
    assert run_one(eng, prompt, ACME) == (reference[ACME], 0)
    assert run_one(eng, prompt, GLOBEX) == (reference[GLOBEX], 0)  # same name in another account: not shared
    assert run_one(eng, prompt, None) == (reference[None], 0)
    for name in [ACME, GLOBEX, None]:  # each finds only its own blocks: all of the prompt's but the last
        tokens, cached = run_one(eng, prompt, name)
        assert tokens == reference[name] and cached == (len(prompt) - 1) // BLOCK * BLOCK


def test_new_weights_under_an_addon_name_start_a_new_cache(base, adapters, tmp_path):
    prompt = shared_prefix_prompts(1, prefix_len=48)[0]
    eng = engine(base, adapters)
    run_one(eng, prompt, ACME)
    assert run_one(eng, prompt, ACME)[1] == (len(prompt) - 1) // BLOCK * BLOCK
    replacement = tinymodels.make_lora(base, tmp_path / "v2", seed=7, rank=4, init_std=0.1, target_modules=("o_proj",))
    eng.lora.add(ACME, replacement)
    expected = run_one(engine(base, {ACME: replacement}, prefix_caching=False), prompt, ACME)[0]
    assert run_one(eng, prompt, ACME) == (expected, 0)


def test_a_small_cache_evicts_and_preempts_without_changing_outputs(base):
    work = shared_prefix_prompts(12, prefix_len=40, seed=3) + shared_prefix_prompts(12, prefix_len=40, seed=4)
    expected = [c.token_ids for c in engine(base, prefix_caching=False, kv_cache_tokens=4096).generate(work, GREEDY)]
    eng = engine(base, kv_cache_tokens=256, max_model_len=128)  # 16 blocks: far less than the work needs
    assert [c.token_ids for c in eng.generate(work, GREEDY)] == expected
    alloc = eng.cache.allocator
    assert eng.scheduler.num_preemptions > 0 and eng.scheduler.prefix_hit_tokens > 0
    assert alloc.num_free == alloc.num_blocks and all(r == 0 for r in alloc.refs)
    assert len(alloc.by_hash) == len(alloc.hash_of) == len(alloc.evictable) <= alloc.num_blocks


def test_requests_of_different_salts_share_nothing(base):
    prompt = shared_prefix_prompts(1, prefix_len=64)[0]
    eng = engine(base)
    params = SamplingParams(max_tokens=1, temperature=0)

    def cached(salt):
        request_id = eng.add_request(prompt, params, cache_salt=salt)
        seq = eng.requests[request_id]
        while eng.has_unfinished:
            eng.step()
        return seq.num_cached

    whole = (len(prompt) - 1) // BLOCK * BLOCK
    assert (cached("acme"), cached("globex"), cached("acme"), cached("globex")) == (0, 0, whole, whole)


def test_a_serverless_replica_never_shares_cached_prompts_across_accounts(tmp_path):
    httpx = pytest.importorskip("httpx")
    from tests.runtime.server_helpers import SERVERLESS_BASE, start

    server = start(tmp_path / "serverless", serverless=True, deployment="accounts/platform/deployments/shared")
    try:
        def cached_tokens(account):
            answer = httpx.post(f"{server.url}/v1/completions", timeout=60,
                                headers={"Authorization": f"Bearer {server.keys[account]}"},
                                json={"model": SERVERLESS_BASE, "prompt": "canary-prefix-secret " * 20, "max_tokens": 1})
            assert answer.status_code == 200, answer.text
            return answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        first, other, again = cached_tokens("acme"), cached_tokens("other"), cached_tokens("acme")
    finally:
        server.stop()
    assert first == 0 and other == 0 and again > 0
