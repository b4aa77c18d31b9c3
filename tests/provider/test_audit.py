"""The audit log (domain/audit.py): one object per record, read back by account and time, never raising into the
action it records; and `ember audit` (table and JSON)."""

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from ember.provider.domain.audit import AuditLog, AuditRecord, parse_since
from ember.provider.tools import cli

KEY = "accounts/acme/apiKeys/ops"
ADDON = "accounts/acme/models/pirate"
DEPLOYMENT = "accounts/acme/deployments/chat"


def at(text: str, **fields) -> AuditRecord:
    record = {"time": text, "account": "acme", "actor": KEY, "action": "addon.loaded", "target": ADDON, "result": "ok"}
    return AuditRecord(**(record | fields))


def test_records_are_one_object_each_read_back_by_account_and_time(tmp_path):
    log = AuditLog(f"file://{tmp_path}")
    for record in (at("2025-05-02T09:00:00Z", action="addon.unloaded"), at("2025-05-01T12:00:03Z"),
                   at("2025-05-01T12:00:03Z", account="globex", actor="autoscaler:accounts/platform/gateways/front",
                      action="deployment.scaled", target="accounts/globex/deployments/chat", detail="1 -> 2 replicas")):
        assert log.append(record)
    files = sorted(p.relative_to(tmp_path).parts[:3] for p in tmp_path.rglob("*.json"))
    assert files == [("audit", "acme", "2025-05-01"), ("audit", "acme", "2025-05-02"),
                     ("audit", "globex", "2025-05-01")]
    assert not list(tmp_path.rglob("*.tmp"))  # written aside, then moved into place
    assert [(r.account, r.time) for r in log.read()] == [
        ("acme", "2025-05-01T12:00:03Z"), ("globex", "2025-05-01T12:00:03Z"), ("acme", "2025-05-02T09:00:00Z")]
    assert [r.action for r in log.read(account="acme")] == ["addon.loaded", "addon.unloaded"]
    assert [r.account for r in log.read(since=datetime(2025, 5, 1, 12, 0, 3, tzinfo=UTC))] == ["acme", "globex", "acme"]
    assert [r.action for r in log.read(since=datetime(2025, 5, 1, 12, 0, 4, tzinfo=UTC))] == ["addon.unloaded"]
    assert log.read(account="acme", since=datetime(2025, 5, 3)) == []  # a naive time is UTC
    assert log.read(account="nobody") == []


def test_records_made_in_one_second_read_back_in_the_order_they_were_made(tmp_path):
    log = AuditLog(str(tmp_path))
    for action in ("addon.loaded", "addon.unloaded", "addon.loaded", "addon.refused"):
        log.append(at("2025-05-01T12:00:03Z", action=action))
    assert [r.action for r in log.read()] == ["addon.loaded", "addon.unloaded", "addon.loaded", "addon.refused"]


def test_record_stamps_the_time_and_shortens_the_detail(tmp_path):
    log = AuditLog(str(tmp_path))
    before = datetime.now(UTC).replace(microsecond=0)
    made = log.record(account="acme", actor="replica:accounts/acme/deployments/chat", action="addon.refused",
                      target=ADDON, result="refused", detail="adapter_config.json is missing\n" + "x" * 500)
    assert before <= made.at <= datetime.now(UTC) and made.time.endswith("Z") and len(made.time) == 20
    assert len(made.detail) == 300 and "\n" not in made.detail and made.detail.endswith("…")
    assert log.read() == [made]
    assert "result" in json.loads(next(tmp_path.rglob("*.json")).read_text())


@pytest.mark.parametrize("field, value", [
    ("action", "addon.poked"), ("account", "Acme"), ("actor", "ek-secret-looking-key"), ("actor", "someone"),
    ("target", "say hello to the pirate"), ("target", "/etc/passwd"), ("result", "not ok"),
    ("detail", "two\nlines"), ("detail", "x" * 301), ("time", "2025-05-01 12:00"),
    ("time", "2025-05-01T12:00:03+02:00"),
])
def test_every_field_but_detail_keeps_to_a_grammar_of_names(field, value):
    with pytest.raises(ValidationError, match=field):
        at("2025-05-01T12:00:03Z", **{field: value})
    with pytest.raises(ValidationError, match="extra"):
        at("2025-05-01T12:00:03Z", prompt="hello")


@pytest.mark.parametrize("actor", [KEY, "stack:organization/quickstart/dev", "stack:quickstart/dev", "provider",
                                   "autoscaler:accounts/platform/gateways/front",
                                   "replica:accounts/acme/deployments/chat"])
def test_the_kinds_of_actor(actor):
    assert at("2025-05-01T12:00:03Z", actor=actor).actor == actor


def test_a_failing_store_never_raises_into_the_action_and_logs_no_content(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    log = AuditLog(str(blocker / "store"))  # its audit folder cannot be made: a file is in the way
    with caplog.at_level(logging.WARNING, "ember.audit"):
        assert log.record(account="acme", actor=KEY, action="addon.loaded", target=ADDON,
                          detail="on accounts/acme/deployments/chat") is None
        assert not log.append(at("2025-05-01T12:00:03Z"))
        # a writer's mistake is not the action's failure either: the fields it broke are named, not their values
        assert log.record(account="acme", actor="canary-actor", action="addon.loaded", target="canary-target") is None
    text = caplog.text
    assert "audit record of addon.loaded not written" in text and "invalid actor, target" in text
    assert not {ADDON, KEY, "chat", "canary"} & set(text.replace(":", " ").replace("/", " ").split())


def test_an_unreadable_record_is_skipped(tmp_path, caplog):
    log = AuditLog(str(tmp_path))
    log.append(at("2025-05-01T12:00:03Z"))
    (tmp_path / "audit/acme/2025-05-01/120004.000000-00000000.json").write_text('{"half": ')
    with caplog.at_level(logging.WARNING, "ember.audit"):
        assert [r.time for r in log.read()] == ["2025-05-01T12:00:03Z"]
    assert "unreadable" in caplog.text


def test_since_takes_iso_dates_and_times_and_spans_back_from_now():
    now = datetime(2025, 5, 8, 12, 0, tzinfo=UTC)
    assert parse_since("2025-05-01", now) == datetime(2025, 5, 1, tzinfo=UTC)
    assert parse_since("2025-05-01T12:30Z", now) == datetime(2025, 5, 1, 12, 30, tzinfo=UTC)
    assert parse_since("2025-05-01T14:30+02:00", now) == datetime(2025, 5, 1, 12, 30, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("1h", now) == now - timedelta(hours=1) and parse_since("7d", now) == now - timedelta(days=7)
    with pytest.raises(ValueError, match="--since: 'yesterday' is not an ISO date"):
        parse_since("yesterday", now)


def _store_with_records(tmp_path):
    log = AuditLog(f"file://{tmp_path}")
    log.append(at("2025-05-01T12:00:03Z", detail=f"on {DEPLOYMENT}"))
    log.append(at("2025-05-01T12:05:00Z", account="globex", actor="autoscaler:accounts/platform/gateways/front",
                  action="deployment.scaled", target="accounts/globex/deployments/chat", detail="1 -> 2 replicas"))
    log.append(at("2025-05-02T08:00:00Z", action="addon.refused", result="refused"))
    return f"file://{tmp_path}"


def test_ember_audit_prints_an_aligned_table(tmp_path, capsys):
    store = _store_with_records(tmp_path)
    assert cli.main(["audit", "--store", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["time", "account", "actor", "action", "target", "result", "detail"]
    assert lines[1].split() == ["2025-05-01T12:00:03Z", "acme", KEY, "addon.loaded", ADDON, "ok", "on", DEPLOYMENT]
    assert lines[3].split() == ["2025-05-02T08:00:00Z", "acme", KEY, "addon.refused", ADDON, "refused"]
    columns = [lines[0].index(name) for name in ("account", "actor", "action", "target", "result", "detail")]
    for line in lines[1:]:  # each column starts where its heading does
        assert all(line[c - 2:c] == "  " and line[c] != " " for c in columns[:-1])
    assert len(lines) == 4
    assert cli.main(["audit", "--store", store, "--account", "globex"]) == 0
    [heading, row] = capsys.readouterr().out.splitlines()
    assert row.split()[1] == "globex" and row.endswith("ok      1 -> 2 replicas")


def test_ember_audit_as_json_with_filters(tmp_path, capsys):
    store = _store_with_records(tmp_path)
    assert cli.main(["audit", "--store", store, "--format", "json", "--since", "2025-05-01T12:01Z"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["account"], r["action"], r["time"]) for r in records] == [
        ("globex", "deployment.scaled", "2025-05-01T12:05:00Z"), ("acme", "addon.refused", "2025-05-02T08:00:00Z")]
    assert records[0] == {"time": "2025-05-01T12:05:00Z", "account": "globex",
                          "actor": "autoscaler:accounts/platform/gateways/front", "action": "deployment.scaled",
                          "target": "accounts/globex/deployments/chat", "result": "ok", "detail": "1 -> 2 replicas"}
    assert cli.main(["audit", "--store", store, "--format", "json", "--account", "acme", "--since", "2025-05-02"]) == 0
    assert [r["action"] for r in json.loads(capsys.readouterr().out)] == ["addon.refused"]
    assert cli.main(["audit", "--store", store, "--since", "last tuesday"]) == 2
    assert "--since: 'last tuesday' is not an ISO date or time" in capsys.readouterr().err
