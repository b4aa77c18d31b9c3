"""ApiKey resources through the offline runner and the provider: a key made once as a secret output (only its hash in
the store, never the key in state), its role and expiry in the store, rotation that keeps both keys working until the
old one is revoked, revocation by delete, and the refusals at preview, each naming the field and the value."""

import json
import os
import re
import stat
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ember.provider.domain.accounts import Accounts, hash_key
from ember.provider.domain.audit import AuditLog
from ember.provider.providers.api_key import ApiKeyProvider
from ember.provider.tools.runner import SECRET, OfflineRunner, RunError
from tests.provider.provider_helpers import config

LATER = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)


def program(directory: Path, body: str, project: str = "keys") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Pulumi.yaml").write_text(f"name: {project}\nruntime: python\n")
    (directory / "__main__.py").write_text("import pulumi\nfrom ember.provider import *\n" + textwrap.dedent(body))
    return directory


def keys_in_store(cfg) -> list[dict]:
    path = Path(cfg.store_url.removeprefix("file://")) / "keys.json"
    return json.loads(path.read_text())["keys"] if path.exists() else []


def everything_under(*roots: Path) -> str:
    return "".join(p.read_text(errors="replace") for root in roots for p in root.rglob("*") if p.is_file())


def state_key(runner: OfflineRunner, name: str) -> str:
    return next(k for k in runner.state.resources if k.endswith(f"ApiKey::{name}"))


def secret_of(runner: OfflineRunner, name: str) -> str:
    return json.loads(runner.state.secrets_path.read_text())[state_key(runner, name)]["key"]


def run(root: Path, cfg, body: str, project: str = "keys") -> tuple[OfflineRunner, dict]:
    runner = OfflineRunner(program(root, body, project), config=cfg, log=lambda _: None)
    return runner, runner.up()


def test_a_key_is_made_once_as_a_secret_output_and_only_its_hash_reaches_the_store(tmp_path):
    cfg = config(tmp_path)
    body = f"""
        ci = ApiKey("ci", ApiKeyArgs(account_id="acme", role="admin", expires_at="{LATER.isoformat()}"))
        app = ApiKey("app", ApiKeyArgs(account_id="acme", display_name="the web app"))
        pulumi.export("ci_key", ci.key)
        pulumi.export("app_key", app.key)
        pulumi.export("app_hint", app.key_hint)
        pulumi.export("headers", {{"Authorization": pulumi.Output.concat("Bearer ", app.key)}})  # made with a key
    """
    runner, outputs = run(tmp_path / "program", cfg, body)
    assert outputs["ci_key"] == SECRET and outputs["app_key"] == SECRET  # shown as the engine shows a secret
    assert outputs["headers"] == {"Authorization": SECRET}
    secrets_file = runner.state.secrets_path
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600
    ci_key, app_key = secret_of(runner, "ci"), secret_of(runner, "app")
    assert outputs["app_hint"] == app_key[:8]
    # never in the state file, the store, or the provider's state directory's logs and records
    assert ci_key not in runner.state.path.read_text() and app_key not in runner.state.path.read_text()
    store = Path(cfg.store_url.removeprefix("file://"))
    assert ci_key not in everything_under(store) and app_key not in everything_under(store)
    records = {r["key_id"]: r for r in keys_in_store(cfg)}
    assert records["accounts/acme/apiKeys/ci"]["sha256"] == hash_key(ci_key)
    assert records["accounts/acme/apiKeys/ci"]["role"] == "admin"
    assert datetime.fromisoformat(records["accounts/acme/apiKeys/ci"]["expires_at"]) == LATER
    assert records["accounts/acme/apiKeys/app"]["role"] == "inference"  # the default: the OpenAI routes only
    caller = Accounts.load(store / "keys.json").authenticate(app_key)
    assert (caller.account, caller.key_id, caller.role) == ("acme", "accounts/acme/apiKeys/app", "inference")
    # a second up changes nothing and keeps the key (from the secrets file, as the engine decrypts its state)
    again = OfflineRunner(runner.program_dir, config=cfg, log=lambda _: None)
    again.up()
    assert again.state.resources[state_key(again, "ci")]["outputs"]["key"] == ci_key
    assert [s.op for s in again.steps if s.type == "ApiKey"] == ["same", "same"]
    # the audit log says who made them, not the keys
    audit = AuditLog(cfg.store_url).read(account="acme")
    assert {(r.action, r.target) for r in audit} >= {("key.created", "accounts/acme/apiKeys/ci"),
                                                    ("key.created", "accounts/acme/apiKeys/app")}
    assert all(r.actor == "stack:keys/dev" for r in audit if r.action == "key.created")  # no organization offline
    assert ci_key not in everything_under(store / "audit")


def test_rotation_makes_the_new_key_before_the_old_one_is_revoked_and_delete_revokes(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    runner, _ = run(tmp_path / "program", cfg, 'ApiKey("ci", ApiKeyArgs(account_id="acme", rotation="one"))\n')
    old = secret_of(runner, "ci")
    store_keys = Path(cfg.store_url.removeprefix("file://")) / "keys.json"
    seen_at_delete = []
    revoke = ApiKeyProvider.delete

    def delete(self, id_, props):
        accounts = Accounts.load(store_keys)  # what replicas and the gateway read just before the old one goes
        seen_at_delete.append([accounts.authenticate(k) is not None for k in (old, new_key())])
        revoke(self, id_, props)

    def new_key():
        return rotated.state.resources[state_key(rotated, "ci")]["outputs"]["key"]

    monkeypatch.setattr(ApiKeyProvider, "delete", delete)
    rotated = OfflineRunner(program(runner.program_dir, 'ApiKey("ci", ApiKeyArgs(account_id="acme", rotation="two"))\n'),
                            config=cfg, log=lambda _: None)
    rotated.up()
    assert [s.op for s in rotated.steps if s.type == "ApiKey"] == ["replace"]
    assert seen_at_delete == [[True, True]]  # both worked in between
    new = secret_of(rotated, "ci")
    accounts = Accounts.load(store_keys)
    assert new != old and accounts.authenticate(old) is None and accounts.authenticate(new).key_id == \
        "accounts/acme/apiKeys/ci"
    # a role or expiry change is the same key, changed in place
    program(runner.program_dir, 'ApiKey("ci", ApiKeyArgs(account_id="acme", rotation="two", role="admin"))\n')
    changed = OfflineRunner(runner.program_dir, config=cfg, log=lambda _: None)
    changed.up()
    assert [s.op for s in changed.steps if s.type == "ApiKey"] == ["update"]
    assert Accounts.load(store_keys).authenticate(new).role == "admin"
    updated = [r for r in AuditLog(cfg.store_url).read() if r.action == "key.updated"]
    assert [(r.target, r.detail) for r in updated] == [("accounts/acme/apiKeys/ci", "role inference -> admin")]
    changed.destroy()
    assert Accounts.load(store_keys).authenticate(new) is None and keys_in_store(cfg) == []
    assert ("key.revoked", "accounts/acme/apiKeys/ci") in {(r.action, r.target) for r in AuditLog(cfg.store_url).read()}


@pytest.mark.parametrize("args, field, words", [
    ('role="root"', "role", "'inference' or 'admin' (got 'root')"),
    ('expires_at="2020-01-01T00:00:00Z"', "expires_at", "'2020-01-01T00:00:00Z' is in the past"),
    ('expires_at="2030-01-01T00:00:00"', "expires_at", "'2030-01-01T00:00:00' has no UTC offset"),
    ('expires_at="next tuesday"', "expires_at", "next tuesday"),
    ('key_id="default"', "key_id", "'default' is reserved for the account's implicit key"),
    ('key_id="Bad_Id"', "key_id", "Bad_Id"),
], ids=["role", "past", "no-offset", "not-a-date", "implicit", "bad-id"])
def test_bad_input_is_refused_at_preview_naming_the_field_and_the_value(tmp_path, args, field, words):
    runner = OfflineRunner(program(tmp_path / "program", f'ApiKey("ci", ApiKeyArgs(account_id="acme", {args}))\n'),
                           config=config(tmp_path), log=lambda _: None)
    with pytest.raises(RunError) as refused:
        runner.up(preview=True)
    assert re.search(rf"ApiKey ci: .*{re.escape(field)}: .*{re.escape(words)}", str(refused.value)), str(refused.value)
    assert keys_in_store(runner.config) == []


def test_a_key_for_an_account_another_stack_administers_is_refused_at_preview(tmp_path):
    cfg = config(tmp_path)
    run(tmp_path / "platform", cfg, 'ApiKey("ops", ApiKeyArgs(account_id="acme"))\n', project="acme-team")
    intruder = OfflineRunner(program(tmp_path / "other", 'ApiKey("mine", ApiKeyArgs(account_id="acme"))\n',
                                     project="globex-team"), config=cfg, log=lambda _: None)
    with pytest.raises(RunError, match=r"account_id: 'acme' is administered by another stack "
                                       r"\(acme-team/dev\)"):
        intruder.up(preview=True)
    assert len(keys_in_store(cfg)) == 1


def test_a_rotation_cut_short_before_the_old_key_is_revoked_revokes_it_at_the_next_up(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    runner, _ = run(tmp_path / "program", cfg, 'ApiKey("ci", ApiKeyArgs(account_id="acme", rotation="one"))\n')
    old = secret_of(runner, "ci")
    store_keys = Path(cfg.store_url.removeprefix("file://")) / "keys.json"
    revoke = ApiKeyProvider.delete

    def store_down(self, id_, props):
        raise OSError("the store did not answer")

    monkeypatch.setattr(ApiKeyProvider, "delete", store_down)
    program(runner.program_dir, 'ApiKey("ci", ApiKeyArgs(account_id="acme", rotation="two"))\n')
    with pytest.raises(OSError):
        OfflineRunner(runner.program_dir, config=cfg, log=lambda _: None).up()
    assert Accounts.load(store_keys).authenticate(old) is not None  # not revoked yet, and not forgotten:
    monkeypatch.setattr(ApiKeyProvider, "delete", revoke)
    again = OfflineRunner(runner.program_dir, config=cfg, log=lambda _: None)
    again.up()
    assert Accounts.load(store_keys).authenticate(old) is None  # the next up deletes the pending one
    assert [r.key_id for r in Accounts.load(store_keys).records] == ["accounts/acme/apiKeys/ci"]


def test_a_rotation_of_a_key_whose_expiry_has_passed_is_refused_but_the_key_itself_stands(tmp_path):
    provider = ApiKeyProvider()
    provider._config = config(tmp_path)
    olds = {"account_id": "acme", "key_id": "ci", "role": "inference", "expires_at": "2020-01-01T00:00:00Z",
            "rotation": "one"}
    assert provider.check(olds, dict(olds)).failures == []  # nothing changed: it answers that it expired
    rotated = provider.check(olds, olds | {"rotation": "two"}).failures
    assert [(f.property, f.reason) for f in rotated] == [("expires_at", "'2020-01-01T00:00:00Z' is in the past: a new "
                                                                        "key's expiry must be later than now")]


def test_an_expiry_written_without_an_offset_in_the_keys_file_is_utc():
    from ember.provider.domain.accounts import KeyRecord

    record = KeyRecord("acme", "0" * 64, expires_at="2020-01-01T00:00:00")
    assert record.expires_at == datetime(2020, 1, 1, tzinfo=UTC)
    assert Accounts([record]).authenticate("x") is None  # compared without a TypeError
