"""The compiled decode step (compiled_step.py) gives what the eager step gives: greedy tokens in fp32, with
logits processors, mixed addons, padded shapes (as on CUDA) and a quantized precision, and a replica
started with it answers as an eager one does. Slow: each engine compiles its graphs (10–25 s each, cold)."""

import os
import random

import pytest
import torch
from tests.runtime.runtime_helpers import make

from ember.runtime.devtools import tinymodels
from ember.runtime.engine.compiled_step import use_cache_folder
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.model.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One inductor cache for the module (then restored): engines with the same graphs compile once. And
    dynamo made to fail rather than quietly run a step eagerly when it would not compile it again."""
    before = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    folder = tmp_path_factory.mktemp("compile-cache")
    use_cache_folder(folder)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield folder
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make(tmp_path_factory.mktemp("compiled") / "base", intermediate_size=192)


def run(engine: Engine, requests) -> list[list[int]]:
    """Each (prompt, params, adapter) request's tokens, all submitted at once so decode batches vary in size
    as requests of different lengths finish (down to a single row)."""
    ids = [engine.add_request(prompt, params, adapter=adapter) for prompt, params, adapter in requests]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def requests(n, seed=0, adapters=(None,)):
    rng = random.Random(seed)
    made = []
    for i in range(n):
        prompt = [rng.randrange(16, 500) for _ in range(rng.randint(3, 60))]
        params = SamplingParams(max_tokens=rng.randint(4, 40), temperature=0, ignore_eos=True,
                                repetition_penalty=1.3 if i % 3 == 0 else 1.0,
                                logit_bias=((prompt[0], 5.0),) if i % 4 == 1 else ())
        made.append((prompt, params, adapters[i % len(adapters)]))
    return made


def engines(directory, **config):
    base = {"kv_cache_tokens": 4096, "max_num_seqs": 8} | config
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    made = (Engine.from_dir(directory, EngineConfig(**base)),
            Engine.from_dir(directory, EngineConfig(**base, compile=True)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # one row, several: compiled
    return made


def test_compiled_decode_gives_eager_greedy_tokens_in_fp32(base):
    eager, compiled = engines(base)
    assert compiled.runner.forward.compiled.compile_seconds > 0  # compiled at start, before any request
    work = requests(10)
    assert run(compiled, work) == run(eager, work)
    steps = compiled.runner.forward.compiled.steps
    assert steps > 25  # decode steps ran compiled: batches of 8 down to 1
    # The log-probabilities too, not only their argmax.
    assert_same_logprobs(eager, compiled, atol=1e-4)
    assert compiled.runner.forward.compiled.steps > steps


def assert_same_logprobs(eager: Engine, compiled: Engine, atol: float) -> None:
    """A request's top-5 log-probabilities at each of its decode steps, compiled against eager."""
    outputs = []
    for engine in (eager, compiled):
        engine.add_request(list(range(20, 90)), SamplingParams(max_tokens=4, temperature=0, logprobs=5, ignore_eos=True))
        got = []
        while engine.has_unfinished:
            got += [lp for out in engine.step() for lp in out.logprobs]
        outputs.append(got)
    assert len(outputs[0]) == len(outputs[1]) == 4
    for ours, theirs in zip(*outputs):
        assert ours.token_id == theirs.token_id
        mine, reference = dict(ours.top), dict(theirs.top)
        shared = sorted(mine.keys() & reference.keys())  # near-ties may swap the fifth for the sixth
        assert len(shared) >= 4
        torch.testing.assert_close(torch.tensor([mine[t] for t in shared]), torch.tensor([reference[t] for t in shared]),
                                   atol=atol, rtol=0)


def test_compiled_decode_serves_mixed_addons_with_shapes_padded_as_on_cuda(base, tmp_path):
    targets = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    adapters = {f"accounts/acme/models/a{i}": tinymodels.make_lora(base, tmp_path / f"a{i}", seed=i + 1, init_std=0.1,
                                                                   rank=4 * (i + 1), target_modules=modules)
                for i, modules in enumerate(targets)}
    eager, compiled = engines(base, max_loras=2, max_lora_rank=8)
    compiled.runner.forward.compiled.pad_to_buckets = True  # rows and widths padded to powers of two, as on CUDA
    for engine in (eager, compiled):
        for name, path in adapters.items():
            engine.lora.add(name, path)
    work = requests(9, seed=1, adapters=(None, *adapters))
    assert run(compiled, work) == run(eager, work)
    assert compiled.runner.forward.compiled.steps > 20


def test_compiled_decode_in_int8_stays_within_rounding_of_eager(base):
    """The same kernels, but the compiler may round the activations' row scaling differently from eager
    (a reciprocal multiplied rather than a division), so int8 roundings, and near-tied greedy tokens, can
    differ: the log-probabilities are compared, within a few int8 steps."""
    eager, compiled = engines(base, precision="int8")
    assert_same_logprobs(eager, compiled, atol=0.05)
    assert compiled.runner.forward.compiled.steps >= 3


def test_a_replica_started_compiled_answers_as_an_eager_one(tmp_path):
    """`ember.runtime serve` compiles before it reports ready (and says how long it took), then answers
    concurrent requests, base and addons, with the eager replica's greedy text."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from tests.runtime.server_helpers import BASE, PIRATE, POET, make_models, start

    models = make_models(tmp_path / "models")
    servers = {mode: start(tmp_path / mode, models=models, extra=[f"--{mode}"]) for mode in ("compile", "no-compile")}
    try:
        assert "compiled decode step ready in" in servers["compile"].log.read_text()
        assert "compiled decode step" not in servers["no-compile"].log.read_text()

        def ask(server, i):
            body = {"model": (BASE, PIRATE, POET)[i % 3], "prompt": f"request {i}", "max_tokens": 6 + 3 * i,
                    "temperature": 0, "ignore_eos": True}
            reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60,
                               headers={"Authorization": f"Bearer {server.keys['acme']}"})
            reply.raise_for_status()
            return reply.json()["choices"][0]["text"]

        answers = {}
        for mode, server in servers.items():
            with ThreadPoolExecutor(6) as pool:
                answers[mode] = list(pool.map(lambda i: ask(server, i), range(6)))
        assert answers["compile"] == answers["no-compile"]
    finally:
        for server in servers.values():
            server.stop()
