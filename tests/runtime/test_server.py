"""A real server on a loopback port, driven with the official openai client (sync, async, streaming)."""

import asyncio
import json
import time

import httpx
import pytest
from tests.runtime.server_helpers import BASE, PIRATE, POET, metrics_text, start, usage_records, write_addon_manifest

from ember.runtime.model.tokenizer import TextTokenizer

openai = pytest.importorskip("openai")
MODELS = [BASE, PIRATE, POET]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(server):
    return TextTokenizer.from_dir(server.model_dir)


def client(server, account="acme", **kw):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys[account], max_retries=0, **kw)


@pytest.mark.parametrize("model", MODELS)
def test_completions_for_the_base_and_each_addon(server, tokenizer, model):
    prompt = "Ahoy, the ship sails at dawn"
    out = client(server).completions.create(model=model, prompt=prompt, max_tokens=12, **GREEDY)
    assert out.model == model and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.choices[0].finish_reason == "length"


def test_addons_change_the_output(server):
    prompt = "Tell me about the sea"
    texts = {m: client(server).completions.create(model=m, prompt=prompt, max_tokens=16, logprobs=1, **GREEDY)
             for m in MODELS}
    tokens = {m: tuple(t.choices[0].logprobs.tokens) for m, t in texts.items()}
    assert len(set(tokens.values())) == 3


@pytest.mark.parametrize("model", MODELS)
def test_chat_for_the_base_and_each_addon(server, tokenizer, model):
    messages = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Where is the gold?"}]
    out = client(server).chat.completions.create(model=model, messages=messages, max_tokens=10, **GREEDY)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert out.usage.completion_tokens == 10


def test_streaming_equals_the_whole_answer(server):
    c = client(server)
    messages = [{"role": "user", "content": "Sing a verse"}]
    whole = c.chat.completions.create(model=POET, messages=messages, max_tokens=20, **GREEDY)
    chunks = list(c.chat.completions.create(model=POET, messages=messages, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    streamed = list(c.completions.create(model=BASE, prompt="abc", max_tokens=8, stream=True, **GREEDY))
    plain = c.completions.create(model=BASE, prompt="abc", max_tokens=8, **GREEDY)
    assert "".join(s.choices[0].text for s in streamed) == plain.choices[0].text


def test_async_client_concurrent_requests(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0)
        calls = [c.completions.create(model=MODELS[i % 3], prompt=f"request {i}", max_tokens=10, **GREEDY)
                 for i in range(9)]
        results = await asyncio.gather(*calls)
        stream = await c.chat.completions.create(model=PIRATE, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=5, stream=True, **GREEDY)
        streamed = [chunk async for chunk in stream]
        await c.close()
        return results, streamed

    results, streamed = asyncio.run(run())
    sync = client(server)
    for i, r in enumerate(results):
        again = sync.completions.create(model=MODELS[i % 3], prompt=f"request {i}", max_tokens=10, logprobs=0, **GREEDY)
        assert r.choices[0].text == again.choices[0].text  # batching with others changes nothing
    assert streamed[-1].choices[0].finish_reason == "length"


def test_stop_strings(server):
    c = client(server)
    full = c.completions.create(model=BASE, prompt="The pirate", max_tokens=40, **GREEDY).choices[0].text
    assert len(full) > 10
    stop = full[5:8]
    cut = c.completions.create(model=BASE, prompt="The pirate", max_tokens=40, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_seeds_are_reproducible_and_n_gives_choices(server):
    c = client(server)
    kwargs = dict(model=PIRATE, prompt="Once upon a time", max_tokens=15, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True})
    first, second = c.completions.create(**kwargs), c.completions.create(**kwargs)
    assert first.choices[0].text == second.choices[0].text
    many = c.completions.create(n=3, **kwargs)
    assert len(many.choices) == 3 and many.choices[0].text == first.choices[0].text
    assert many.usage.completion_tokens == 45 and len({ch.text for ch in many.choices}) > 1


def error_of(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


def test_errors_have_the_right_status_and_body(server):
    c = client(server)
    status, body = error_of(lambda: c.completions.create(model="accounts/acme/models/nope", prompt="x", max_tokens=2))
    assert status == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    status, body = error_of(lambda: c.completions.create(model=BASE, prompt="x", temperature=3))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    status, body = error_of(lambda: c.completions.create(model=BASE, prompt="word " * 600, max_tokens=2))
    assert status == 400 and body["code"] == "context_length_exceeded" and "word" not in body["message"]
    status, body = error_of(lambda: c.completions.create(model=BASE, prompt="x", max_tokens=600))
    assert status == 400 and body["param"] == "max_tokens"
    status, body = error_of(lambda: c.chat.completions.create(model=BASE, messages=[]))
    assert status == 400 and body["param"] == "messages"
    raw = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404


def test_keys_and_accounts(server):
    status, body = error_of(lambda: openai.OpenAI(base_url=f"{server.url}/v1", api_key="ek-unknown", max_retries=0)
                            .completions.create(model=BASE, prompt="x"))
    assert status == 401 and body["code"] == "invalid_api_key"
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": "x"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    status, body = error_of(lambda: client(server, "other").completions.create(model=BASE, prompt="x"))
    assert status == 403 and body["type"] == "permission_error"  # a dedicated deployment is its account's only
    stored = json.loads((server.root / "keys.json").read_text())
    assert all(server.keys[a] not in json.dumps(stored) for a in server.keys)  # only hashes are kept


def test_models_health_and_metrics(server):
    models = client(server).models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == set(MODELS)
    assert by_id[PIRATE].model_extra["parent"] == BASE and by_id[BASE].model_extra["parent"] is None
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}  # unauthenticated: names no addon
    metrics = metrics_text(server)
    assert f'ember_requests_total{{model="{PIRATE}",status="ok"}}' in metrics
    assert "ember_request_latency_seconds_bucket" in metrics and "ember_loaded_adapters 2.0" in metrics


def test_usage_records_every_request_with_metadata_only(server):
    before = len(usage_records(server))
    out = client(server).completions.create(model=POET, prompt="count me", max_tokens=7, **GREEDY)
    records = usage_records(server)
    assert len(records) == before + 1
    last = records[-1]
    assert last["account_id"] == "acme" and last["model"] == POET and last["deployment"] == "accounts/acme/deployments/tiny"
    assert (last["prompt_tokens"], last["completion_tokens"], last["status"]) == (out.usage.prompt_tokens, 7, "ok")
    replicas = list((server.root / "usage").rglob("replica-*.json"))
    info = json.loads(replicas[0].read_text())
    assert info["accelerator_type"] == "CPU" and info["accelerator_count"] == 1 and info["last_seen"] >= info["started"]


def test_admin_hot_loads_and_unloads_addons_by_name(server, tmp_path):
    headers = {"Authorization": f"Bearer {server.keys['acme']}"}
    extra = "accounts/acme/models/extra"
    write_addon_manifest(server.root / "store", extra, server.adapters[PIRATE])
    loaded = httpx.post(f"{server.url}/admin/adapters", json={"name": extra}, headers=headers)
    assert loaded.status_code == 200 and extra in loaded.json()["served"]
    assert client(server).completions.create(model=extra, prompt="x", max_tokens=3).usage.completion_tokens >= 1
    bad = tmp_path / "bad"
    bad.mkdir()
    write_addon_manifest(server.root / "store", "accounts/acme/models/bad", bad)
    refused = httpx.post(f"{server.url}/admin/adapters", json={"name": "accounts/acme/models/bad"}, headers=headers)
    assert refused.status_code == 400 and "adapter_config.json is missing" in refused.json()["error"]["message"]
    other = httpx.post(f"{server.url}/admin/adapters", json={"name": extra},
                       headers={"Authorization": f"Bearer {server.keys['other']}"})
    assert other.status_code == 403
    gone = httpx.delete(f"{server.url}/admin/adapters/{extra}", headers=headers)
    assert gone.status_code == 200 and extra not in gone.json()["served"]
    status, body = error_of(lambda: client(server).completions.create(model=extra, prompt="x", max_tokens=3))
    assert status == 404 and body["code"] == "model_not_found"
    assert client(server).completions.create(model=PIRATE, prompt="x", max_tokens=3).usage.completion_tokens >= 1


def test_the_admin_api_opens_no_path_or_url_from_a_request(server, tmp_path):
    """Only model names of the deployment's own account, resolved through the store: a path outside it, a
    probe of /etc, a URL (server-side request forgery) and another tenant's addon are all refused with a 4xx,
    and nothing is fetched."""
    import socket
    import threading

    headers = {"Authorization": f"Bearer {server.keys['acme']}"}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    reached, done = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(listener, reached, done), daemon=True)
    watcher.start()
    trap = f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"
    write_addon_manifest(server.root / "store", "accounts/other/models/theirs", server.adapters[POET])
    cases = {
        "a path": ({"name": "accounts/acme/models/stolen", "source": str(server.adapters[POET])}, 400, "source"),
        "/etc": ({"name": "accounts/acme/models/etc", "source": "/etc"}, 400, "source"),
        "a URL": ({"name": "accounts/acme/models/ssrf", "source": trap}, 400, "source"),
        "a name that is a path": ({"name": "/etc/passwd"}, 400, "name"),
        "a name that climbs": ({"name": "accounts/acme/models/../../etc"}, 400, "name"),
        "another account's addon": ({"name": "accounts/other/models/theirs"}, 404, "name"),  # as an unknown one
        "an unknown addon": ({"name": "accounts/acme/models/nothing"}, 404, "name"),
        "a base model": ({"name": BASE}, 404, "name"),
    }
    for case, (body, status, param) in cases.items():
        answer = httpx.post(f"{server.url}/admin/adapters", json=body, headers=headers)
        assert (answer.status_code, answer.json()["error"]["param"]) == (status, param), (case, answer.text)
    time.sleep(0.3)
    done.set()
    watcher.join(5)
    listener.close()
    assert reached == []  # the listener saw no connection, all along
    served = httpx.get(f"{server.url}/admin/adapters", headers=headers).json()["served"]
    assert not {"accounts/acme/models/stolen", "accounts/acme/models/etc", "accounts/other/models/theirs"} & set(served)


def _watch(listener, reached: list, done) -> None:
    """Record every connection the listener gets until `done`."""
    while not done.is_set():
        try:
            reached.append(listener.accept())
        except OSError:  # the 0.1 s timeout: nobody came
            pass


def test_benchmark_drives_the_server_over_http(server, tmp_path, capsys):
    from ember.runtime.devtools import bench

    report = tmp_path / "http.json"
    assert bench.main(["--url", server.url, "--api-key", server.keys["acme"], "--served-model", PIRATE,
                       "--requests", "6", "--concurrency", "3", "--prompt-len", "4", "30", "--output-len", "4", "12",
                       "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    work = bench.make_workload(6, (4, 30), (4, 12), 256, 0)
    assert figures["output_tokens"] == work.output_tokens and figures["output_tokens_per_s"] > 0
    assert 0 < figures["ttft_p50_ms"] <= figures["latency_p50_ms"] and figures["itl_p50_ms"] > 0
    assert "itl" in capsys.readouterr().out


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(server):
    system = {"role": "system", "content": "You are a ship's cook who answers in rhyme. " * 12}
    answers = [client(server).chat.completions.create(
        model=BASE, messages=[system, {"role": "user", "content": question}], max_tokens=4, **GREEDY)
        for question in ["What is for supper?", "Is there any rum left?"]]
    first, second = (a.usage.prompt_tokens_details.cached_tokens for a in answers)
    assert first < second and second >= 100  # the second finds the first's system prompt in the cache
    metrics = metrics_text(server)
    hits = next(line for line in metrics.splitlines() if line.startswith("ember_prefix_cache_hit_tokens "))
    assert float(hits.split()[1]) >= second
