"""The audit log's writers in a replica (in-process): each addon loaded, unloaded or refused, through the admin routes
(the actor: the name of the key that asked) and by the replica's own reconcile at start (replica:<deployment>); and
canaries: no prompt, completion or API key anywhere under the store's audit/ folder."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.runtime.server_helpers import BASE, PIRATE, POET, make_models, write_addon_manifest

from ember.provider.domain.accounts import Accounts, hash_key
from ember.provider.domain.audit import AuditLog, AuditRecord
from ember.provider.domain.replica_spec import ReplicaSpec
from ember.runtime.serving.app import create_app
from ember.runtime.serving.replica_config import ProcessOptions, server_config

DEPLOYMENT = "accounts/acme/deployments/tiny"
ON = f"on {DEPLOYMENT}"
OWN = f"replica:{DEPLOYMENT}"
ACME_KEY = "accounts/acme/apiKeys/default"  # the name of the key Accounts.add_key makes when none is given
BAD = "accounts/acme/models/bad"
CANARY = "zqxauditcanary"


@dataclass
class InProcess:
    http: object  # a fastapi TestClient
    replica: object
    store: Path
    keys: dict[str, str]  # account → plain key
    adapters: dict[str, Path]

    def headers(self, account: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[account]}"}

    def records(self) -> list[AuditRecord]:
        return AuditLog(str(self.store)).read()

    def desire(self, addons: dict[str, str]) -> None:
        (self.store / "deployments/acme/tiny/addons.json").write_text(json.dumps(addons))


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("audit")
    base, adapters = make_models(root)
    store = root / "store"
    for name, directory in adapters.items():
        write_addon_manifest(store, name, directory)
    (root / "bad").mkdir()  # an addon whose files are missing
    write_addon_manifest(store, BAD, root / "bad")
    keys = {account: Accounts.add_key(store / "keys.json", account) for account in ("acme", "other")}
    desired = store / "deployments/acme/tiny/addons.json"
    desired.parent.mkdir(parents=True)
    desired.write_text(json.dumps({PIRATE: str(adapters[PIRATE])}))
    spec = ReplicaSpec(model=str(base), deployment=DEPLOYMENT, base_model=BASE, keys=str(store / "keys.json"),
                       usage=str(store / "usage"), store=str(store), desired_addons=str(desired), max_loras=4,
                       max_lora_rank=8, max_model_len=512)
    # the timer never comes during the tests: each reconcile here is one the test asked for
    app = create_app(server_config(spec, ProcessOptions(reconcile_interval_s=3600)))
    with TestClient(app) as http:
        replica = app.state.replica
        deadline = time.monotonic() + 120
        while replica.engine is None and not replica.failure and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica.engine is not None, replica.failure
        yield InProcess(http, replica, store, keys, adapters)


def new_since(replica: InProcess, count: int) -> list[tuple]:
    return [(r.action, r.target, r.actor, r.result, r.detail) for r in replica.records()[count:]]


def test_the_replicas_own_reconcile_at_start_is_recorded(replica):
    first = replica.records()[0]
    assert (first.account, first.action, first.target, first.actor, first.result, first.detail) == (
        "acme", "addon.loaded", PIRATE, OWN, "ok", ON)


def test_admin_loads_unloads_and_refusals_name_the_key_that_asked(replica):
    http, before = replica.http, len(replica.records())
    assert http.post("/admin/adapters", json={"name": POET}, headers=replica.headers()).status_code == 200
    refused = http.post("/admin/adapters", json={"name": BAD}, headers=replica.headers())
    assert refused.status_code == 400
    theirs = http.post("/admin/adapters", json={"name": "accounts/other/models/theirs"}, headers=replica.headers())
    assert theirs.status_code == 404
    # what changes nothing and names no addon is not an admin action on one: no record
    assert http.post("/admin/adapters", json={"name": "/etc/passwd"}, headers=replica.headers()).status_code == 400
    assert http.post("/admin/adapters", json={"name": POET}, headers=replica.headers("other")).status_code == 403
    assert http.delete(f"/admin/adapters/{BAD}", headers=replica.headers()).status_code == 404
    assert http.delete(f"/admin/adapters/{POET}", headers=replica.headers()).status_code == 200
    assert new_since(replica, before) == [
        ("addon.loaded", POET, ACME_KEY, "ok", ON),
        ("addon.refused", BAD, ACME_KEY, "refused", f"{ON}: {refused.json()['error']['message']}"),
        ("addon.refused", "accounts/other/models/theirs", ACME_KEY, "refused",
         f"{ON}: {theirs.json()['error']['message']}"),
        ("addon.unloaded", POET, ACME_KEY, "ok", ON)]
    assert "adapter_config.json is missing" in refused.json()["error"]["message"]


def test_a_reconcile_records_each_change_and_a_lasting_refusal_once(replica):
    http, before = replica.http, len(replica.records())
    replica.desire({PIRATE: str(replica.adapters[PIRATE]), POET: str(replica.adapters[POET]), BAD: "objects/elsewhere"})
    result = http.post("/admin/reconcile", headers=replica.headers()).json()
    assert result["loaded"] == [POET] and list(result["failed"]) == [BAD]
    assert http.post("/admin/reconcile", headers=replica.headers()).json()["loaded"] == []  # nothing new: no record
    replica.desire({PIRATE: str(replica.adapters[PIRATE])})
    assert http.post("/admin/reconcile", headers=replica.headers()).json()["removed"] == [POET]
    why = "its source is not the object the store's manifest names"
    assert new_since(replica, before) == [("addon.loaded", POET, ACME_KEY, "ok", ON),
                                          ("addon.refused", BAD, ACME_KEY, "refused", f"{ON}: {why}"),
                                          ("addon.unloaded", POET, ACME_KEY, "ok", ON)]


def test_a_store_that_fails_the_audit_write_fails_no_admin_action(replica, monkeypatch):
    def broken(*_, **__):
        raise OSError("the store is down")

    monkeypatch.setattr(replica.replica.audit_log.fs, "pipe_file", broken)
    before = len(replica.records())
    assert replica.http.post("/admin/adapters", json={"name": POET}, headers=replica.headers()).status_code == 200
    assert replica.http.delete(f"/admin/adapters/{POET}", headers=replica.headers()).status_code == 200
    monkeypatch.undo()
    assert len(replica.records()) == before


def test_no_prompt_completion_or_key_reaches_the_audit_folder(replica):
    http = replica.http
    outputs = []
    for i, model in enumerate((BASE, PIRATE)):
        done = http.post("/v1/completions", headers=replica.headers(), json={
            "model": model, "prompt": f"{CANARY}-prompt-{i}", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "user": f"{CANARY}-user"})
        chat = http.post("/v1/chat/completions", headers=replica.headers(), json={
            "model": model, "messages": [{"role": "user", "content": f"{CANARY}-chat-{i}"}], "max_tokens": 16,
            "temperature": 0, "ignore_eos": True})
        assert done.status_code == chat.status_code == 200
        outputs += [done.json()["choices"][0]["text"], chat.json()["choices"][0]["message"]["content"]]
    # addon changes around the requests, and refused ones whose bodies carry the canary where a request could
    for body in ({"name": POET}, {"name": f"{CANARY} load this"}, {"name": POET, "source": f"/tmp/{CANARY}"}):
        http.post("/admin/adapters", json=body, headers=replica.headers())
    http.delete(f"/admin/adapters/{POET}", headers=replica.headers())
    http.post("/admin/reconcile", headers=replica.headers())
    files = [p for p in (replica.store / "audit").rglob("*") if p.is_file()]
    text = "\n".join(p.read_text() for p in files)
    assert len(files) == len(replica.records()) >= 8 and "addon.unloaded" in text
    assert CANARY not in text
    assert not [o for o in outputs if len(o.strip()) >= 8 and o.strip() in text]
    for key in replica.keys.values():  # neither a key nor its hash
        assert key not in text and hash_key(key) not in text
