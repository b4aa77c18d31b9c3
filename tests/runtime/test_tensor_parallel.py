"""Tensor parallelism on the CPU (gloo): a model split across 2 (and 3, unevenly) ranks answers as it does on one.

Every engine here starts real rank processes; each test closes its engines so the next can form its own group.
"""

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from tests.runtime.runtime_helpers import make, peft_logits, peft_model
from tests.runtime.server_helpers import BASE, PIRATE, POET, make_models, start

from ember.provider.domain.families import expert_parameter_shapes, module_shapes
from ember.provider.domain.tensor_parallel import even, refusal, shard_of
from ember.runtime.devtools import tinymodels
from ember.runtime.devtools.bench_precisions import prompt_logits
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # the three kinds of split: column-parallel only, every projection, row-parallel only
    "accounts/acme/models/pirate": dict(rank=4, target_modules=("q_proj", "v_proj")),
    "accounts/acme/models/poet": dict(rank=8, target_modules=ALL, use_rslora=True),
    "accounts/acme/models/terse": dict(rank=16, target_modules=("o_proj", "down_proj"), alpha=8),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # intermediate 192: features split in units of 32 (int4's groups); the tiny preset's 172 would split by one
    return make(tmp_path_factory.mktemp("tp") / "base", intermediate_size=192)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-adapters")
    return {name: tinymodels.make_lora(base, root / name.rsplit("/", 1)[1], seed=i + 1, init_std=0.1, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


@contextlib.contextmanager
def engine(directory, size=1, adapters=None, **config):
    eng = Engine.from_dir(directory, EngineConfig(**({"kv_cache_tokens": 4096, "tensor_parallel_size": size}
                                                     | ({"max_loras": 4, "max_lora_rank": 16} if adapters else {})
                                                     | config)))
    try:
        for name, path in (adapters or {}).items():
            eng.lora.add(name, path)
        yield eng
    finally:
        eng.close()


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(16, 500) for _ in range(rng.randint(4, 40))] for _ in range(n)]


def answers(eng, work, names=None):
    return [c.token_ids for c in eng.generate(work, GREEDY, names)]


def test_shares_cover_the_model_once_and_kv_heads_follow_their_query_heads():
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
                                    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                    "vocab_size": 49152})  # SmolLM2-135M's shape: 9 heads do not split 2 ways evenly
    shards = [shard_of(config, 2, rank) for rank in range(2)]
    assert [list(s.heads) for s in shards] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]  # whole KV groups: 2 and 1
    assert [list(s.kv_heads) for s in shards] == [[0, 1], [2]]
    assert [len(s.intermediate) for s in shards] == [768, 768] and [len(s.vocab) for s in shards] == [24576, 24576]
    assert not even(config, 2) and even(config, 3)
    # more ranks than KV heads: a group's 3 query heads over several ranks, each holding the group's KV head
    shards = [shard_of(config, 4, rank) for rank in range(4)]
    assert [list(s.heads) for s in shards] == [[0, 1], [2], [3, 4, 5], [6, 7, 8]]
    assert [list(s.kv_heads) for s in shards] == [[0], [0], [1], [2]]
    assert refusal(config, 9) is None and "use at most 9" in refusal(config, 16)


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_give_the_logits_and_greedy_answers_of_one_device(base, size):
    # 3 ranks split the 4 heads, the 2 KV heads and the 512-token vocabulary unevenly
    work = prompts(6)
    with engine(base) as one:
        expected_logits = prompt_logits(one, list(range(20, 90)))
        expected = answers(one, work)
    with engine(base, size) as split:
        torch.testing.assert_close(prompt_logits(split, list(range(20, 90))), expected_logits, atol=2e-5, rtol=1e-5)
        assert answers(split, work) == expected


def test_a_mixed_batch_of_three_adapters_equals_peft_on_two_ranks(base, adapters):
    pytest.importorskip("peft")
    tokens = list(range(20, 80))
    work = prompts(8, seed=1)
    names = [None, *ADAPTERS, *ADAPTERS, None][:8]
    with engine(base, adapters=adapters) as one:
        expected = answers(one, work, names)
    with engine(base, 2, adapters=adapters) as split:
        for name, directory in adapters.items():
            torch.testing.assert_close(prompt_logits(split, tokens, name), peft_logits(base, directory, tokens),
                                       atol=5e-5, rtol=1e-5)
        mixed = answers(split, work, names)
        assert mixed == expected
        # slots emptied and filled again: every rank's slots follow
        for name in ADAPTERS:
            split.lora.device_slots.evict(split.lora.current[name])
        assert answers(split, work, names) == expected


def test_the_compiled_step_and_prefix_caching_on_two_ranks(base, tmp_path):
    work = prompts(4, seed=2)
    shared = [[7, 8, 9] * 12 + p for p in work]  # a shared prefix: later requests take its cached blocks
    with engine(base) as one:
        expected = answers(one, shared)
    with engine(base, 2, compile=True, compile_cache=tmp_path / "compile") as split:
        assert answers(split, shared) == expected
        assert split.runner.forward.compiled.steps > 0
        assert split.scheduler.prefix_hit_tokens > 0


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_other_precisions_on_two_ranks(base, precision):
    tokens = list(range(20, 90))
    with engine(base, precision=precision) as one:
        expected = prompt_logits(one, tokens).float()
    with engine(base, 2, precision=precision) as split:
        got = prompt_logits(split, tokens).float()
    # bf16 sums in another order, int8's row-parallel scales are per share: close, not equal
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_a_rank_that_dies_fails_the_engine_instead_of_hanging(base):
    with engine(base, 2) as split:
        failures = []
        split.peers.on_failure = failures.append
        split.peers.processes[0].kill()
        split.peers.processes[0].join()
        for _ in range(100):
            if failures:
                break
            time.sleep(0.05)
        assert failures and "rank 1 of 2 exited" in failures[0]
        with pytest.raises(RuntimeError, match="rank 1 of 2"):
            split.generate(prompts(1), GREEDY)


def _rank_processes(pid: int) -> list[int]:
    """The replica's rank processes: its children started by multiprocessing's spawn."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_replica_of_two_ranks_answers_through_the_openai_api_as_one_does(tmp_path):
    openai = pytest.importorskip("openai")
    models = make_models(tmp_path / "models")
    one = start(tmp_path / "one", models=models)
    try:
        split = start(tmp_path / "split", models=models, extra=["--tensor-parallel-size", "2"])
    except BaseException:
        one.stop()
        raise
    try:
        messages = [{"role": "user", "content": "Where is the gold?"}]
        schema = {"type": "object", "properties": {"gold": {"type": "integer"}}, "required": ["gold"],
                  "additionalProperties": False}
        for model in (BASE, PIRATE, POET):
            said = []
            for server in (one, split):
                client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0)
                chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                      extra_body={"ignore_eos": True})
                structured = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=40, temperature=0,
                    response_format={"type": "json_schema", "json_schema": {"name": "gold", "schema": schema}})
                said.append((chat.choices[0].message.content, structured.choices[0].message.content))
            assert said[0] == said[1], model
            assert isinstance(json.loads(said[1][1])["gold"], int)

        # a rank killed: health fails within seconds and the replica's process ends (its cluster restarts it)
        ranks = _rank_processes(split.process.pid)
        assert len(ranks) == 1
        os.kill(ranks[0], signal.SIGKILL)
        began = time.monotonic()
        while time.monotonic() - began < 15:
            try:
                if httpx.get(f"{split.url}/health", timeout=1).status_code != 200:
                    break
            except httpx.HTTPError:
                break
            time.sleep(0.1)
        failed_after = time.monotonic() - began
        print(f"health not ready {failed_after:.2f} s after a rank was killed")
        assert failed_after < 5, f"health still ready {failed_after:.1f} s after a rank died"
        split.process.wait(timeout=30)
        assert "tensor-parallel rank 1 of 2 exited" in split.log.read_text()
    finally:
        one.stop()
        split.stop()


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3_moe"])
def test_other_families_and_their_addons_split_across_two_ranks(tmp_path, family):
    """Gemma's extra norms and caps, Phi-3's fused checkpoint (and fused LoRA), Qwen3-MoE's experts (each split
    by its features, the router whole) on two ranks, against transformers and PEFT."""
    pytest.importorskip("peft")
    base = tinymodels.make_family_model(tmp_path / family, family, seed=3)
    hf = json.loads((base / "config.json").read_text())
    experts = tuple(f"mlp.{p}" for p in expert_parameter_shapes(hf))  # Qwen3-MoE's experts' LoRA splits too
    lora = tinymodels.make_lora(base, tmp_path / "lora", seed=4, init_std=0.1, rank=4,
                                target_modules=tuple(module_shapes(hf)), target_parameters=experts)
    tokens = list(range(20, 100))
    reference = peft_model(base, lora)
    with torch.no_grad():
        with_lora = reference(torch.tensor([tokens])).logits[0]
        with reference.disable_adapter():
            plain = reference(torch.tensor([tokens])).logits[0]
    with engine(base, 2, adapters={"accounts/acme/models/addon": lora}, max_lora_rank=8) as split:
        torch.testing.assert_close(prompt_logits(split, tokens), plain, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(prompt_logits(split, tokens, "accounts/acme/models/addon"), with_lora,
                                   atol=5e-5, rtol=1e-5)
