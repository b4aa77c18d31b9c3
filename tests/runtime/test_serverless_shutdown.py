"""A serverless model past its shutdown date: the replica answers 410 (OpenAI's format, naming the model and the date)
for its base and every addon on it, after the key is checked and before anything is tokenized or metered; the gateway
passes a replica's 410 through as it is and answers one itself from its snapshot. Billing is in
tests/provider/test_billing.py."""

import json
import logging
import time
from datetime import date
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.runtime.gateway_helpers import StandIn, servers, start_gateway, store
from tests.runtime.server_helpers import PIRATE, SERVERLESS_BASE, make_models, write_addon_manifest

from ember.provider.domain import catalog_lifecycle
from ember.provider.domain.accounts import Accounts, DeploymentAccess
from ember.provider.domain.records import DeploymentRecord
from ember.provider.domain.store_layout import StoreLayout
from ember.runtime.engine.engine import EngineConfig
from ember.runtime.serving import shutdown
from ember.runtime.serving.app import create_app
from ember.runtime.serving.replica import ServerConfig

__all__ = ["servers", "store"]  # the gateway tests' fixtures

SHARED = "accounts/platform/deployments/shared"
SHUTDOWN = date(2027, 1, 15)
CANARY = "canary-7f3e91 the prompt of a shut-down model"
SHUT_DOWN_ERROR = {"message": "llama-v3p1-8b-instruct was shut down for serverless use on 2027-01-15; deploy it on a "
                              "dedicated deployment or move to another model",
                   "type": "invalid_request_error", "param": "model", "code": "model_shut_down"}


@pytest.fixture
def clock(monkeypatch):
    """Moves the one clock the shutdown is judged by (the catalog lifecycle's): `clock(day)`."""
    return lambda day: monkeypatch.setattr(catalog_lifecycle, "today", lambda: day)


def write_record(store: Path, shutdown_date: date | None) -> None:
    path = Path(StoreLayout(str(store)).deployment_record("platform", "shared"))
    path.parent.mkdir(parents=True, exist_ok=True)
    record = DeploymentRecord(name=SHARED, base_model=SERVERLESS_BASE, serverless=True, shutdown_date=shutdown_date)
    path.write_text(json.dumps(record.to_json()))


def serverless_replica(root: Path) -> tuple[object, dict[str, str]]:
    """An in-process serverless replica of the tiny model with the pirate addon, its store holding its record; the keys
    of two accounts."""
    base, adapters = make_models(root)
    store = root / "store"
    write_addon_manifest(store, PIRATE, adapters[PIRATE], SERVERLESS_BASE)
    write_record(store, SHUTDOWN)
    keys = {account: Accounts.add_key(root / "keys.json", account) for account in ("acme", "globex")}
    config = ServerConfig(model_dir=str(base), keys_url=str(root / "keys.json"), usage_url=str(root / "usage"),
                          deployment=DeploymentAccess(SHARED, "platform", SERVERLESS_BASE, serverless=True),
                          engine=EngineConfig(device="cpu", max_model_len=256, kv_cache_tokens=2048, max_loras=2,
                                              max_lora_rank=8),
                          addons={PIRATE: str(adapters[PIRATE])}, store_url=str(store),
                          heartbeat_interval_s=0.1, reconcile_interval_s=3600)
    return create_app(config), keys


def usage_lines(root: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((root / "usage").rglob("requests-*.jsonl"))
            for line in path.read_text().splitlines() if line]


def test_a_shut_down_model_answers_410_for_its_base_and_addons_unmetered_and_naming_no_prompt(
        tmp_path, clock, caplog):
    caplog.set_level(logging.DEBUG)
    clock(date(2027, 1, 14))  # the day before
    app, keys = serverless_replica(tmp_path)
    replica = app.state.replica
    assert replica.shutdown_date == SHUTDOWN  # read from its record at start
    acme, globex = ({"Authorization": f"Bearer {keys[a]}"} for a in ("acme", "globex"))
    completion = {"model": SERVERLESS_BASE, "prompt": CANARY, "max_tokens": 3}
    chat = {"model": PIRATE, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 3}
    with TestClient(app) as http:
        for _ in range(400):
            if replica.engine or replica.failure:
                break
            time.sleep(0.05)
        assert replica.engine is not None, replica.failure
        assert http.post("/v1/completions", json=completion, headers=globex).status_code == 200
        assert http.post("/v1/chat/completions", json=chat, headers=acme).status_code == 200
        assert len(usage_lines(tmp_path)) == 2

        clock(SHUTDOWN)  # the day itself: shut down from its first second
        refused = [http.post("/v1/completions", json=completion, headers=globex),
                   http.post("/v1/chat/completions", json=chat, headers=acme),
                   http.post("/v1/completions", json=completion | {"model": PIRATE, "stream": True}, headers=acme),
                   # addressed by the deployment's pin, or malformed past the model: still the shutdown, not the body
                   http.post("/v1/completions", json=completion | {"model": f"{SERVERLESS_BASE}#{SHARED}"},
                             headers=globex),
                   http.post("/v1/chat/completions", json={"model": SERVERLESS_BASE, "messages": CANARY},
                             headers=globex)]
        for answer in refused:
            assert answer.status_code == 410 and answer.json() == {"error": SHUT_DOWN_ERROR}
            assert CANARY not in answer.text
        # the key is checked first: a request without a valid one learns nothing
        assert http.post("/v1/completions", json=completion).status_code == 401
        bad = http.post("/v1/completions", json=completion, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert len(usage_lines(tmp_path)) == 2  # nothing metered for a refused request

        # the platform moves the date on: the heartbeat reads the record again, and the model answers again
        write_record(tmp_path / "store", date(2027, 3, 1))
        for _ in range(100):
            if replica.shutdown_date == date(2027, 3, 1):
                break
            time.sleep(0.05)
        assert replica.shutdown_date == date(2027, 3, 1)
        assert http.post("/v1/chat/completions", json=chat, headers=acme).status_code == 200
        assert len(usage_lines(tmp_path)) == 3
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    assert CANARY not in caplog.text and CANARY not in written


def test_a_dedicated_deployment_and_a_record_without_a_date_are_never_shut_down(tmp_path, clock):
    clock(date(2099, 1, 1))
    assert shutdown.shut_down(SERVERLESS_BASE, None) is None
    assert shutdown.shut_down(SERVERLESS_BASE, date(2099, 1, 2)) is None
    assert shutdown.shut_down(SERVERLESS_BASE, date(2099, 1, 1)).status == 410
    store = tmp_path / "store"
    write_record(store, date(2020, 1, 1))
    (tmp_path / "keys.json").write_text('{"keys": []}')
    config = ServerConfig(model_dir=str(tmp_path / "unused"), keys_url=str(tmp_path / "keys.json"),
                          usage_url=str(tmp_path / "usage"), store_url=str(store),
                          deployment=DeploymentAccess(SHARED, "platform", SERVERLESS_BASE, serverless=False))
    dedicated = create_app(config).state.replica
    assert dedicated.shutdown_date is None
    dedicated.refuse_if_shut_down()  # no 410: its owner chose the model, the catalog's serverless dates do not bind it


CATALOG = SERVERLESS_BASE
GLOBEX_ADDON = "accounts/globex/models/legal"
OWN = "accounts/acme/deployments/own-8b"


def complete(front, account: str, model: str) -> httpx.Response:
    return httpx.post(f"{front.url}/v1/completions", headers=front.headers(account), timeout=10,
                      json={"model": model, "prompt": CANARY, "max_tokens": 4})


def test_the_gateway_passes_a_replicas_410_through_untried_elsewhere(store):
    first, second = StandIn([410]).start(), StandIn([410]).start()
    store.deployment(SHARED, CATALOG, serverless=True)  # no date in its record yet: the replicas know first
    store.register(SHARED, first, replica_id="r0")
    store.register(SHARED, second, replica_id="r1")
    front = start_gateway(store)
    answer = complete(front, "globex", CATALOG)
    assert answer.status_code == 410 and answer.json()["error"]["message"] == "not now"  # the replica's own body
    assert answer.headers["x-ember-attempts"] == "1" and len(first.seen) + len(second.seen) == 1


def test_the_gateway_answers_410_itself_and_routes_to_a_dedicated_deployment_of_the_model(store, clock, caplog):
    caplog.set_level(logging.DEBUG)
    clock(SHUTDOWN)
    shared, own = StandIn(["ok"]).start(), StandIn(["ok"]).start()
    store.deployment(SHARED, CATALOG, addons=(GLOBEX_ADDON,), serverless=True, shutdown_date=SHUTDOWN)
    store.deployment(OWN, CATALOG)  # acme's dedicated deployment of the same catalog model
    store.register(SHARED, shared)
    store.register(OWN, own)
    front = start_gateway(store)
    for model in (CATALOG, GLOBEX_ADDON, f"{CATALOG}#{SHARED}"):
        answer = complete(front, "globex", model)
        assert answer.status_code == 410 and answer.json() == {"error": SHUT_DOWN_ERROR}, answer.text
    assert not shared.seen  # no replica was asked (nor woken from zero) to say it
    answer = complete(front, "acme", CATALOG)
    assert answer.status_code == 200 and answer.headers["x-ember-deployment"] == OWN
    assert complete(front, "acme", f"{CATALOG}#{SHARED}").status_code == 410
    unknown_key = httpx.post(f"{front.url}/v1/completions", headers={"Authorization": "Bearer nope"}, timeout=10,
                             json={"model": CATALOG, "prompt": CANARY})
    assert unknown_key.status_code == 401  # the key first
    clock(date(2027, 1, 14))  # the day before: the serverless deployment still answers
    assert complete(front, "globex", CATALOG).status_code == 200 and len(shared.seen) == 1
    assert CANARY not in caplog.text
