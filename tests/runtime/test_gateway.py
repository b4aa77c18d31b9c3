"""The gateway in front of stand-in replicas: routing by model name and account, balancing, retries, streaming,
disconnects, rate limits, bad input, metrics and privacy. Real replicas behind it are in tests/e2e/test_gateway.py."""

import asyncio
import json
import logging
import time

import httpx
import pytest
from tests.runtime.gateway_helpers import FakeStore, StandIn, free_port, servers, start_gateway, store

from ember.runtime.gateway import directory, snapshots
from ember.runtime.gateway.balancer import affinity_key
from ember.runtime.serving.limits import Limits

ACME_BASE = "accounts/acme/models/base"
ACME_ADDON = "accounts/acme/models/pirate"
ACME_PROD = "accounts/acme/deployments/prod"
ACME_CANARY = "accounts/acme/deployments/canary"
SHARED = "accounts/platform/deployments/shared"
CATALOG = "accounts/platform/models/llama-v3p1-8b-instruct"
GLOBEX_ADDON = "accounts/globex/models/legal"
__all__ = ["servers", "store"]  # the fixtures every test here uses


@pytest.fixture
def replicas():
    def start(*answers, port=None) -> StandIn:
        return StandIn(list(answers) or ["ok"]).start(port)

    return start


def complete(front, account: str, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{front.url}/v1/completions", headers=front.headers(account), timeout=10,
                      json={"model": model, "prompt": "hello", "max_tokens": 4} | extra)


def test_routes_by_model_own_dedicated_first_then_serverless_and_pins_a_deployment(store, replicas):
    prod, canary, shared = replicas(), replicas(), replicas()
    store.deployment(ACME_PROD, ACME_BASE, addons=(ACME_ADDON,))
    store.deployment(ACME_CANARY, ACME_BASE)
    store.deployment(SHARED, CATALOG, addons=(ACME_ADDON.replace("pirate", "tenant-bot"), GLOBEX_ADDON), serverless=True)
    store.register(ACME_PROD, prod)
    store.register(ACME_CANARY, canary)
    store.register(SHARED, shared)
    front = start_gateway(store)
    assert complete(front, "acme", ACME_ADDON).status_code == 200 and prod.seen[-1].body["model"] == ACME_ADDON
    # the pin goes exactly there, the body forwarded as it came (the replica reads the pin of its own deployment)
    pinned = complete(front, "acme", f"{ACME_BASE}#{ACME_CANARY}")
    assert pinned.status_code == 200 and pinned.headers["x-ember-deployment"] == ACME_CANARY
    assert canary.seen[-1].body["model"] == f"{ACME_BASE}#{ACME_CANARY}"
    # a serverless base: any account, through the platform's deployment
    answer = complete(front, "globex", CATALOG)
    assert answer.status_code == 200 and answer.headers["x-ember-deployment"] == SHARED
    assert complete(front, "globex", GLOBEX_ADDON).status_code == 200 and shared.seen[-1].body["model"] == GLOBEX_ADDON
    # the replica still checks the key itself: it is forwarded
    assert shared.seen[-1].headers["authorization"] == f"Bearer {store.key('globex')}"


def test_another_accounts_models_are_answered_as_unknown_ones_and_never_listed(store, replicas):
    prod, shared = replicas(), replicas()
    store.deployment(ACME_PROD, ACME_BASE, addons=(ACME_ADDON,))
    store.deployment(SHARED, CATALOG, addons=(GLOBEX_ADDON,), serverless=True)
    store.register(ACME_PROD, prod)
    store.register(SHARED, shared)
    front = start_gateway(store)
    listed = httpx.get(f"{front.url}/v1/models", headers=front.headers("globex")).json()["data"]
    assert {m["id"] for m in listed} == {CATALOG, GLOBEX_ADDON}
    assert {m["id"] for m in httpx.get(f"{front.url}/v1/models", headers=front.headers("acme")).json()["data"]} == {
        ACME_BASE, ACME_ADDON, CATALOG}
    unknown = complete(front, "globex", "accounts/acme/models/nothing-here")
    for name in (ACME_ADDON, ACME_BASE):  # acme's dedicated deployment: the same 404 as a name that does not exist
        refused = complete(front, "globex", name)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert refused.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
            "accounts/acme/models/nothing-here", name)
    assert complete(front, "acme", GLOBEX_ADDON).status_code == 404  # a tenant's addon on the shared deployment
    pinned = complete(front, "globex", f"{ACME_BASE}#{ACME_PROD}")
    assert pinned.status_code == 404 and ACME_PROD in pinned.json()["error"]["message"]
    assert httpx.get(f"{front.url}/v1/models/{ACME_ADDON}", headers=front.headers("globex")).status_code == 404
    assert not prod.seen and len(shared.seen) == 0


def test_bad_input_is_refused_before_anything_is_forwarded(store, replicas):
    prod = replicas()
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, prod)
    front = start_gateway(store, limits=Limits(max_body_bytes=4096))
    headers = front.headers("acme")
    cases = [(b"not json", 400, "invalid_json"), (b"[1, 2]", 400, "invalid_json"),
             (json.dumps({"prompt": "x"}).encode(), 400, "invalid_parameter"),
             (json.dumps({"model": "llama", "prompt": "x"}).encode(), 400, "invalid_parameter"),
             (json.dumps({"model": f"{ACME_BASE}#prod"}).encode(), 400, "invalid_parameter"),
             (json.dumps({"model": ACME_BASE, "prompt": "x" * 5000}).encode(), 413, "request_too_large"),
             (b"[" * 3000, 400, "invalid_json")]
    for body, status, code in cases:
        answer = httpx.post(f"{front.url}/v1/completions", content=body, headers=headers)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), body[:40]
    assert httpx.post(f"{front.url}/v1/completions", json={"model": ACME_BASE}).status_code == 401
    assert httpx.post(f"{front.url}/v1/completions", json={"model": ACME_BASE},
                      headers={"Authorization": "Bearer ek-wrong"}).json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{front.url}/v1/embeddings", headers=headers).status_code == 404
    named = httpx.post(f"{front.url}/v1/completions", json={"model": "accounts/acme/models/"}, headers=headers)
    assert named.json()["error"]["param"] == "model"
    assert not prod.seen


def test_least_outstanding_requests_spreads_a_burst_and_addon_slots_attract(store, replicas):
    busy, idle = replicas("slow-stream"), replicas("ok")
    store.deployment(ACME_PROD, ACME_BASE, addons=(ACME_ADDON,))
    store.register(ACME_PROD, busy, slots=(ACME_ADDON,))
    store.register(ACME_PROD, idle)
    front = start_gateway(store)
    # the replica holding the addon in a device slot gets it while it is not much busier than the other
    with httpx.stream("POST", f"{front.url}/v1/completions", headers=front.headers("acme"), timeout=10,
                      json={"model": ACME_ADDON, "prompt": "x", "stream": True}) as held:
        assert held.status_code == 200 and len(busy.seen) == 1
        # the base model: no slot to prefer, so the replica with nothing outstanding
        for _ in range(3):
            assert complete(front, "acme", ACME_BASE).status_code == 200
        assert len(idle.seen) == 3 and len(busy.seen) == 1


def test_an_addon_goes_to_the_replicas_that_serve_it_before_one_just_attached_has_loaded_it(store, replicas):
    loading, serving = replicas(404), replicas("ok")  # a replica asked for an addon it has not loaded yet answers 404
    store.deployment(ACME_CANARY, ACME_BASE, addons=(ACME_ADDON,))  # the addon just attached
    store.deployment(ACME_PROD, ACME_BASE, addons=(ACME_ADDON,), traffic_weight=0)  # would take it only last
    store.register(ACME_CANARY, loading)
    store.register(ACME_PROD, serving, slots=(ACME_ADDON,))
    front = start_gateway(store)
    for _ in range(10):
        assert complete(front, "acme", ACME_ADDON).status_code == 200
    assert len(serving.seen) == 10 and not loading.seen
    # the base model follows the weights as before
    assert complete(front, "acme", ACME_BASE).status_code == 404 and len(loading.seen) == 1
    # once no replica says it serves the addon, the route's order holds again (registrations can lag behind a load)
    store.register(ACME_PROD, serving)
    time.sleep(0.5)  # the gateway reads the store every 0.1 s here
    assert complete(front, "acme", ACME_ADDON).status_code == 404 and len(loading.seen) == 2


def test_a_shared_prompt_prefix_keeps_to_one_replica_while_it_is_not_overloaded(store, replicas):
    first, second = replicas(), replicas()
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, first)
    store.register(ACME_PROD, second)
    front = start_gateway(store)
    system = "You are a helpful assistant for the ACME company. Answer briefly and politely. " * 2
    for question in ("one", "two", "three", "four", "five", "six"):
        answer = httpx.post(f"{front.url}/v1/chat/completions", headers=front.headers("acme"), timeout=10,
                            json={"model": ACME_BASE, "messages": [{"role": "system", "content": system},
                                                                   {"role": "user", "content": question}]})
        assert answer.status_code == 200
    assert sorted([len(first.seen), len(second.seen)]) == [0, 6]
    # other accounts with the same prompt are hashed apart from acme's (their cached blocks are their own)
    placed = {front.state.balancer.pick(front.state.store.current().deployments[ACME_PROD].replicas, None,
                                        affinity_key(account, ACME_BASE, {"prompt": system}, False)).url
              for account in ("acme", "globex", "initech", "umbrella", "hooli", "wayne", "stark", "tyrell")}
    assert placed == {first.url, second.url}


def test_a_refused_connection_or_a_refusal_before_the_first_byte_is_tried_on_the_next_replica(store, replicas):
    gone = f"http://127.0.0.1:{free_port()}"  # registered, but nothing listens: a replica that died
    full, fine = replicas(503), replicas("ok")
    store.deployment(ACME_PROD, ACME_BASE)
    for order, replica in enumerate((gone, full, fine)):  # listed in this order: the first two are tried first
        store.register(ACME_PROD, replica, replica_id=f"r{order}")
    front = start_gateway(store)
    answer = complete(front, "acme", ACME_BASE)
    assert answer.status_code == 200 and int(answer.headers["x-ember-attempts"]) >= 2 and len(fine.seen) == 1
    for _ in range(4):
        assert complete(front, "acme", ACME_BASE).status_code == 200
    # every replica says "not now": the last one's answer, with its Retry-After and the attempts made
    store.register(ACME_PROD, fine, state="draining", replica_id="r2")  # a draining replica takes nothing new
    busy = replicas(429)
    store.register(ACME_PROD, busy, replica_id="r3")
    time.sleep(0.3)
    refused = complete(front, "acme", ACME_BASE)  # 503 from r1, 429 from r3, then r0 refuses the connection
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["x-ember-attempts"] == "3" and len(fine.seen) == 5
    metrics = httpx.get(f"{front.url}/metrics", headers=front.headers("platform")).text
    assert 'ember_gateway_retries_total{deployment="accounts/acme/deployments/prod",reason="503"}' in metrics
    assert 'reason="ConnectError"' in metrics


def test_no_ready_replica_is_a_503_with_retry_after_and_a_stale_registration_is_ignored(store, replicas):
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, replicas(), last_seen=time.time() - 3600)  # killed an hour ago, never said so
    front = start_gateway(store)
    answer = complete(front, "acme", ACME_BASE)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_ready_replica"
    assert answer.headers["retry-after"] == "5"


def test_nothing_is_tried_again_once_a_byte_was_sent(store, replicas):
    cut, spare = replicas("cut"), replicas("ok")
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, cut)
    front = start_gateway(store)
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{front.url}/v1/completions", headers=front.headers("acme"), timeout=10,
                          json={"model": ACME_BASE, "prompt": "x", "stream": True}) as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                pass
    store.register(ACME_PROD, spare)
    time.sleep(0.3)
    assert not spare.seen  # the cut stream was not sent again anywhere


def test_streams_pass_through_as_they_come_and_a_leaving_client_aborts_the_replicas_request(store, replicas):
    slow = replicas("slow-stream")
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, slow)
    front = start_gateway(store)
    started = time.monotonic()
    with httpx.stream("POST", f"{front.url}/v1/completions", headers=front.headers("acme"), timeout=10,
                      json={"model": ACME_BASE, "prompt": "x", "stream": True}) as response:
        first = next(response.iter_lines())
        # the first chunk arrives while the replica's stream has a minute to go: nothing is buffered
        assert first.startswith("data: ") and time.monotonic() - started < 2
    deadline = time.monotonic() + 5
    while not slow.seen[0].aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.seen[0].aborted and not slow.seen[0].finished
    assert front.state.balancer.outstanding(front.state.store.current().deployments[ACME_PROD].replicas[0]) == 0


def test_a_client_leaving_before_the_response_began_aborts_the_request_too(store, replicas):
    async def leave() -> None:
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"{front.url}/v1/completions", headers=front.headers("acme"),
                                  json={"model": ACME_BASE, "prompt": "x", "stream": True})

    slow = replicas("ok")
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, slow)
    front = start_gateway(store)
    slow.answers = ["late"]  # the response's head comes only once the whole completion is done
    asyncio.run(leave())
    deadline = time.monotonic() + 5
    while not (slow.seen and slow.seen[0].aborted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.seen[0].aborted


def test_rate_limits_answer_429_with_openais_headers_and_settle_at_the_usage(store, replicas):
    prod = replicas()
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, prod)
    store.gateway(rate_limits={"requests_per_minute": 3, "tokens_per_minute": 10_000},
                  account_rate_limits={"acme": {"tokens_per_minute": 500}})
    front = start_gateway(store)
    first = complete(front, "acme", ACME_BASE, max_tokens=100)
    assert first.headers["x-ratelimit-limit-requests"] == "3" and first.headers["x-ratelimit-limit-tokens"] == "500"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    # counted at 2 + 100 tokens, settled at the 12 the response's usage says
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 500 - 102
    second = complete(front, "acme", ACME_BASE, max_tokens=100)
    assert 500 - 12 - 102 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 500 - 12 - 102 + 3
    too_big = complete(front, "acme", ACME_BASE, max_tokens=1000)
    assert too_big.status_code == 429 and "can never be admitted" in too_big.json()["error"]["message"]
    complete(front, "acme", ACME_BASE)
    limited = complete(front, "acme", ACME_BASE)
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1 and limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
    assert len(prod.seen) == 3  # refused before the replica


def test_a_noisy_account_cannot_starve_another(store, replicas):
    prod = replicas()
    store.deployment(ACME_PROD, ACME_BASE)
    store.deployment("accounts/globex/deployments/prod", "accounts/globex/models/base")
    store.register(ACME_PROD, prod)
    store.register("accounts/globex/deployments/prod", replicas())
    store.gateway(rate_limits={"requests_per_minute": 20})
    front = start_gateway(store)

    async def flood(account: str, model: str, requests: int) -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers=front.headers(account)) as client:
            answers = await asyncio.gather(*[client.post(f"{front.url}/v1/completions",
                                                         json={"model": model, "prompt": "x", "max_tokens": 2})
                                             for _ in range(requests)])
            return [a.status_code for a in answers]

    async def both():
        return await asyncio.gather(flood("acme", ACME_BASE, 200), flood("globex", "accounts/globex/models/base", 15))

    noisy, quiet = asyncio.run(both())
    assert noisy.count(200) <= 21 and noisy.count(429) >= 179  # acme spends its own bucket, and nothing more
    assert quiet == [200] * 15
    assert len(prod.seen) == noisy.count(200)


def test_metrics_are_the_platforms_and_hold_no_key_or_text(store, replicas, caplog):
    canary = "CANARY-gw-7f3a prompt text that must never leave the request"
    prod = replicas("stream")
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, prod)
    front = start_gateway(store)
    with caplog.at_level(logging.DEBUG):
        with httpx.stream("POST", f"{front.url}/v1/completions", headers=front.headers("acme"), timeout=10,
                          json={"model": ACME_BASE, "prompt": canary, "stream": True}) as response:
            assert "t2" in response.read().decode()
        complete(front, "acme", f"accounts/acme/models/{'x' * 40}", prompt=canary)  # unknown: not a label
        complete(front, "acme", "not a model " + canary)
    assert httpx.get(f"{front.url}/metrics").status_code == 401
    assert httpx.get(f"{front.url}/metrics", headers=front.headers("acme")).status_code == 403
    metrics = httpx.get(f"{front.url}/metrics", headers=front.headers("platform")).text
    assert 'ember_gateway_requests_total{deployment="accounts/acme/deployments/prod",model="accounts/acme/models/base",status="200"} 1.0' in metrics
    assert 'ember_gateway_requests_total{deployment="",model="",status="404"} 1.0' in metrics
    assert "ember_gateway_upstream_latency_seconds_count" in metrics and "ember_gateway_open_connections" in metrics
    everything = metrics + caplog.text + json.dumps(httpx.get(f"{front.url}/health").json())
    for secret in (canary, "CANARY", store.key("acme"), store.key("platform"), "x" * 40):
        assert secret not in everything


def test_a_new_deployment_answers_at_once_and_misses_read_the_store_at_most_every_quarter_second(
        tmp_path, replicas, monkeypatch):
    reads = []
    monkeypatch.setattr(snapshots, "read_directory",
                        lambda *a: reads.append(time.monotonic()) or directory.read_directory(*a))
    store = FakeStore(tmp_path / "store")
    store.gateway()
    front = start_gateway(store, refresh_interval_s=30)  # the periodic read will not come in this test
    assert complete(front, "acme", ACME_BASE).status_code == 404
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, replicas())
    assert complete(front, "acme", ACME_BASE).status_code == 200  # no restart, no wait: the miss read the store
    assert httpx.get(f"{front.url}/health").json() == {"status": "ready"}

    async def misses() -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers=front.headers("acme")) as client:
            answers = await asyncio.gather(*[client.post(f"{front.url}/v1/completions", json={
                "model": f"accounts/acme/models/unknown-{i}", "prompt": "x"}) for i in range(40)])
        return [a.status_code for a in answers]

    before, started = len(reads), time.monotonic()
    assert set(asyncio.run(misses())) == {404}
    spent = time.monotonic() - started
    assert len(reads) - before <= spent / 0.25 + 2  # 40 misses, a few reads of the store
    gaps = [b - a for a, b in zip(reads[before:], reads[before + 1:])]
    assert all(gap >= 0.24 for gap in gaps), gaps
    time.sleep(0.3)
    before = len(reads)
    for path in ("/v1/models", f"/v1/models/{ACME_BASE}"):  # unauthenticated: refused before reading the store
        assert httpx.get(f"{front.url}{path}").status_code == 401
    assert len(reads) == before


def test_health_says_when_the_store_cannot_be_read_and_names_no_tenant(tmp_path):
    store = FakeStore(tmp_path / "store")
    store.deployment(ACME_PROD, ACME_BASE)
    (tmp_path / "store" / "keys.json").write_text("{not json")  # a store the gateway cannot read
    front = start_gateway(store, wait=lambda state: state.store.failure is not None)
    health = httpx.get(f"{front.url}/health")
    assert health.status_code == 503 and health.json() == {"status": "failing", "reason": "cannot read the store"}
    assert complete(front, "acme", ACME_BASE).status_code == 503
