"""Overload, serverless isolation, reconcile from the store and loading states, on real servers."""

import asyncio
import json

import httpx
import pytest
from tests.runtime.server_helpers import BASE, PIRATE, POET, SERVERLESS_BASE, start, usage_records

from ember.provider.domain.accounts import DeploymentAccess
from ember.provider.domain.audit import AuditLog
from ember.runtime.engine.engine import EngineConfig
from ember.runtime.serving.app import create_app
from ember.runtime.serving.replica import ServerConfig

openai = pytest.importorskip("openai")


def test_a_burst_beyond_the_queue_gets_429_and_every_accepted_request_is_metered_once(tmp_path):
    server = start(tmp_path, max_queue=3)
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                headers = {"Authorization": f"Bearer {server.keys['acme']}"}
                body = {"model": BASE, "prompt": "load", "max_tokens": 48, "ignore_eos": True}
                return await asyncio.gather(*[http.post(f"{server.url}/v1/completions", json=body, headers=headers)
                                              for _ in range(40)])

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}, statuses
        shed = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in shed)
        accepted = [r for r in responses if r.status_code == 200]
        assert all(r.json()["usage"]["completion_tokens"] == 48 for r in accepted)
        assert len({r.json()["id"] for r in accepted}) == len(accepted)
        records = usage_records(server)
        assert len(records) == len(accepted) and all(r["status"] == "ok" for r in records)
    finally:
        server.stop()


def test_serverless_serves_every_account_but_addons_only_to_their_owner(tmp_path):
    server = start(tmp_path, deployment="accounts/platform/deployments/shared", serverless=True)
    try:
        acme = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0)
        other = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["other"], max_retries=0)
        assert other.completions.create(model=SERVERLESS_BASE, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        assert acme.completions.create(model=PIRATE, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        # another account's addon is answered exactly as a name that does not exist (no oracle of which do)
        with pytest.raises(openai.NotFoundError) as theirs:
            other.completions.create(model=PIRATE, prompt="hi", max_tokens=3)
        with pytest.raises(openai.NotFoundError) as unknown:
            other.completions.create(model="accounts/acme/models/nothing", prompt="hi", max_tokens=3)
        assert theirs.value.body["param"] == "model"
        assert theirs.value.body == unknown.value.body | {"message": unknown.value.body["message"].replace(
            "accounts/acme/models/nothing", PIRATE)}
        assert {m.id for m in other.models.list().data} == {SERVERLESS_BASE}  # another account's addons stay unlisted
        assert {m.id for m in acme.models.list().data} == {SERVERLESS_BASE, PIRATE, POET}
        admin = httpx.get(f"{server.url}/admin/adapters", headers={"Authorization": f"Bearer {server.keys['acme']}"})
        assert admin.status_code == 403  # the platform administers a serverless deployment, not its users
        billed = {(r["account_id"], r["model"]) for r in usage_records(server)}
        assert billed == {("other", SERVERLESS_BASE), ("acme", PIRATE)}
    finally:
        server.stop()


def test_addons_follow_the_desired_set_in_the_store(tmp_path):
    desired = tmp_path / "store" / "addons.json"
    desired.parent.mkdir(parents=True)
    # Not written yet (a Kubernetes deployment's pods start before it is registered): an empty set, not a failure.
    server = start(tmp_path / "srv", extra=["--desired-addons", str(desired), "--reconcile-interval", "0.5"])
    try:
        headers = {"Authorization": f"Bearer {server.keys['acme']}"}
        assert httpx.get(f"{server.url}/health").json()["status"] == "ready"
        # started with PIRATE and POET from --addon, but the store wants none: the timer reconciles them away
        def adapters():
            return httpx.get(f"{server.url}/admin/adapters", headers=headers).json()

        for _ in range(40):
            if adapters()["served"] == []:
                break
            asyncio.run(asyncio.sleep(0.25))
        assert adapters()["served"] == []
        desired.write_text(json.dumps({PIRATE: str(server.adapters[PIRATE]), "accounts/acme/models/broken": str(tmp_path)}))
        result = httpx.post(f"{server.url}/admin/reconcile", headers=headers).json()
        # the 0.5 s timer may have reconciled first, so judge the outcome, not who did it
        assert result["loaded"] in ([PIRATE], []) and list(result["failed"]) == ["accounts/acme/models/broken"]
        assert adapters()["served"] == [PIRATE] and adapters()["failed"].keys() == {"accounts/acme/models/broken"}
        # the audit log: the addons it started with and the timer's reconcile, by the replica itself; a refusal that
        # lasts over the timer's ticks, once
        asyncio.run(asyncio.sleep(1.2))
        own, records = "replica:accounts/acme/deployments/tiny", AuditLog(str(server.root / "store")).read()
        assert [(r.action, r.target, r.actor) for r in records[:4]] == [
            ("addon.loaded", PIRATE, own), ("addon.loaded", POET, own), ("addon.unloaded", PIRATE, own),
            ("addon.unloaded", POET, own)]
        # (the key's or the timer's, whichever came first: the outcome is judged, not who did it)
        assert [(r.action, r.target) for r in records[4:]] == [("addon.loaded", PIRATE),
                                                               ("addon.refused", "accounts/acme/models/broken")]
    finally:
        server.stop()


def test_health_and_requests_say_503_until_the_model_loads(tmp_path):
    from fastapi.testclient import TestClient

    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    config = ServerConfig(model_dir=str(tmp_path / "missing"), keys_url=str(keys), usage_url=str(tmp_path / "usage"),
                          deployment=DeploymentAccess("accounts/a/deployments/d", "a", "accounts/a/models/m"),
                          engine=EngineConfig())
    app = create_app(config)
    replica = app.state.replica
    with TestClient(app) as http:
        for _ in range(100):
            if replica.failure:
                break
            asyncio.run(asyncio.sleep(0.05))
        health = http.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "failed"}  # names no file: the log does
        assert "config.json is missing" in replica.failure
    replica.failure = None  # as while still loading
    with pytest.raises(Exception) as info:
        replica.ready()
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "5"
