"""API keys where requests arrive: roles on a replica's routes, an expired key's 401 (saying it expired, not which key),
and revocation measured on a replica and on the gateway against the stated bound."""

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from tests.runtime.gateway_helpers import StandIn, servers, start_gateway, store  # noqa: F401
from tests.runtime.server_helpers import BASE, start

from ember.provider.domain.accounts import KEYS_REFRESH_S, Accounts, hash_key
from ember.provider.domain.audit import AuditLog
from ember.runtime.gateway.config import GatewayConfig
from ember.runtime.gateway.directory import read_directory

ACME_BASE, ACME_PROD = "accounts/acme/models/base", "accounts/acme/deployments/prod"
STORE_READ_SLACK_S = 1.5  # a loaded CI machine's store read and request on top of the bound itself


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("keys"))
    yield server
    server.stop()


def add_key(keys_file, key_id: str, role: str = "inference", expires_at=None) -> str:
    return Accounts.add_key(keys_file, "acme", key_id=key_id, role=role, expires_at=expires_at)


def revoke(keys_file, key: str) -> None:
    Accounts.change(keys_file, lambda records: [r for r in records if r.sha256 != hash_key(key)])


def call(url: str, key: str, path: str = "/v1/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if path == "/v1/completions":
        return httpx.post(url + path, headers=headers, timeout=30,
                          json={"model": BASE, "prompt": "hello", "max_tokens": 2})
    return httpx.get(url + path, headers=headers, timeout=30)


def test_an_inference_key_calls_the_openai_routes_and_only_an_admin_key_the_admin_routes(server):
    keys_file = server.root / "keys.json"
    app, ops = add_key(keys_file, "app"), add_key(keys_file, "ops", role="admin")
    assert call(server.url, app).status_code == 200
    refused = call(server.url, app, "/admin/adapters")
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == ("this key's role is 'inference': the admin routes need a key of "
                                                  "role 'admin'")
    assert call(server.url, app, "/metrics").status_code == 403
    assert call(server.url, ops, "/admin/adapters").status_code == 200
    assert call(server.url, server.keys["acme"], "/admin/adapters").status_code == 200  # the implicit key: admin


def test_an_expired_key_gets_401_saying_it_expired_and_not_which_key(server):
    keys_file = server.root / "keys.json"
    old = add_key(keys_file, "old-ci", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    for _ in range(2):
        answer = call(server.url, old)
        assert answer.status_code == 401
        error = answer.json()["error"]
        assert error["code"] == "expired_api_key" and "expired" in error["message"]
        assert "old-ci" not in answer.text and old not in answer.text
    deadline = time.monotonic() + 10
    while not (records := AuditLog(str(server.root / "store")).read(account="acme")) and time.monotonic() < deadline:
        time.sleep(0.1)
    expired = [r for r in records if r.action == "key.expired"]
    assert [(r.target, r.result) for r in expired] == [("accounts/acme/apiKeys/old-ci", "refused")]  # once, not per call
    assert old not in server.log.read_text()


def test_a_revoked_key_stops_working_on_the_replica_within_the_bound(server):
    keys_file = server.root / "keys.json"
    key = add_key(keys_file, "leaving")
    assert call(server.url, key).status_code == 200
    revoked_at = time.monotonic()
    revoke(keys_file, key)
    while call(server.url, key).status_code == 200:
        assert time.monotonic() - revoked_at < KEYS_REFRESH_S + STORE_READ_SLACK_S, "the revoked key still works"
        time.sleep(0.05)
    took = time.monotonic() - revoked_at
    print(f"replica: a revoked key was refused {took:.2f} s after its record left the store "
          f"(bound {KEYS_REFRESH_S:.1f} s)")
    assert call(server.url, key).status_code == 401


def test_a_revoked_key_stops_working_at_the_gateway_within_its_refresh_interval(store):  # noqa: F811
    prod = StandIn(["ok"]).start()
    store.deployment(ACME_PROD, ACME_BASE)
    store.register(ACME_PROD, prod)
    bound = GatewayConfig(store_url=store.url).refresh_interval_s  # the gateway's default, which the README states
    front = start_gateway(store, refresh_interval_s=bound)
    keys_file = store.root / "keys.json"
    key = add_key(keys_file, "leaving")
    body = {"model": ACME_BASE, "prompt": "hello", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{front.url}/v1/completions", headers=headers, json=body, timeout=10).status_code == 200
    assert read_directory(store.url, None).accounts.authenticate(key) is not None
    revoked_at = time.monotonic()
    revoke(keys_file, key)
    while httpx.post(f"{front.url}/v1/completions", headers=headers, json=body, timeout=10).status_code == 200:
        assert time.monotonic() - revoked_at < bound + STORE_READ_SLACK_S, "the revoked key still works"
        time.sleep(0.05)
    took = time.monotonic() - revoked_at
    print(f"gateway: a revoked key was refused {took:.2f} s after its record left the store (bound {bound:.1f} s)")


def test_the_gateway_answers_an_expired_key_401_and_only_an_admin_key_of_its_account_reads_metrics(store):  # noqa: F811
    front = start_gateway(store)
    keys_file = store.root / "keys.json"
    old = add_key(keys_file, "old-app", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    for _ in range(2):
        answer = httpx.get(f"{front.url}/v1/models", headers={"Authorization": f"Bearer {old}"}, timeout=10)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "expired_api_key"
        assert "old-app" not in answer.text
    deadline = time.monotonic() + 10
    while not (records := AuditLog(store.url).read(account="acme")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(r.action, r.actor, r.detail) for r in records] == [("key.expired", "accounts/acme/apiKeys/old-app",
                                                               "at the gateway")]
    platform_app = Accounts.add_key(keys_file, "platform", key_id="app", role="inference")
    metrics = httpx.get(f"{front.url}/metrics", headers={"Authorization": f"Bearer {platform_app}"}, timeout=10)
    assert metrics.status_code == 403  # the platform's account, but an inference key
    assert httpx.get(f"{front.url}/metrics", headers=front.headers("platform"), timeout=10).status_code == 200
