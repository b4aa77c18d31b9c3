"""Billing arithmetic against hand-computed figures, price tables, the stop at a serverless model's shutdown date, and
`ember usage` output (CSV, JSON, PNG)."""

import csv
import io
import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ember.provider.domain.records import DeploymentRecord
from ember.provider.domain.spec import SpecError
from ember.provider.domain.store_layout import StoreLayout
from ember.provider.domain.usage import Meter, read_shutdowns, read_usage
from ember.provider.tools import billing, cli

T0 = datetime(2026, 11, 24, 23, 30, tzinfo=timezone.utc).timestamp()  # 30 minutes before a day boundary
SHARED_8B = "accounts/platform/deployments/shared-8b"
SHARED_70B = "accounts/platform/deployments/shared-70b"
PRIVATE = "accounts/acme/deployments/private"


def replica(name, deployment, base, kind, accelerator="NVIDIA_H100_80GB", count=1, start=T0, end=T0 + 3600):
    return {"replica": name, "deployment": deployment, "base_model": base, "deployment_type": kind,
            "accelerator_type": accelerator, "accelerator_count": count, "started": start, "last_seen": end}


def request(replica_name, account, model, prompt, completion, at):
    return {"time": at, "account_id": account, "model": model, "deployment": "", "prompt_tokens": prompt,
            "completion_tokens": completion, "latency_s": 0.1, "status": "ok", "replica": replica_name}


REPLICAS = [
    replica("s8", SHARED_8B, "accounts/platform/models/llama-v3p1-8b-instruct", "serverless", count=8),
    replica("s70", SHARED_70B, "accounts/platform/models/llama-v3p1-70b-instruct", "serverless", count=8),
    # 2 x H100 from 23:30 to 01:00: 1,800 s x 2 on the 24th, 3,600 s x 2 on the 25th
    replica("d1", PRIVATE, "accounts/acme/models/custom", "dedicated", count=2, end=T0 + 5400),
]
RECORDS = [
    request("s8", "acme", "accounts/acme/models/pirate", 600_000, 400_000, T0 + 60),  # 1M tokens, 8B tier
    request("s8", "globex", "accounts/platform/models/llama-v3p1-8b-instruct", 1_500_000, 500_000, T0 + 1800),
    request("s70", "globex", "accounts/globex/models/legal", 1_000_000, 0, T0 + 2000),  # 70B tier
    request("d1", "acme", "accounts/acme/models/custom", 999, 1, T0 + 100),  # dedicated: paid per GPU-second
]


def test_bills_match_hand_computed_figures():
    charges = billing.bill(RECORDS, REPLICAS, period="month")
    # default prices: 8B -> $0.20 / M tokens, 70B -> $0.90 / M, H100 -> $4.00 / accelerator-hour
    assert billing.totals(charges) == {("acme", "2026-11"): 0.20 + 12.00, ("globex", "2026-11"): 0.40 + 0.90}
    private = [c for c in charges if c.kind == billing.ACCELERATOR_SECONDS]
    assert [(c.account_id, c.item, c.quantity, c.amount) for c in private] == [("acme", PRIVATE, 10_800, 12.0)]
    tokens = {(c.account_id, c.item): (c.quantity, c.unit_price) for c in charges if c.kind == billing.TOKENS}
    assert tokens == {("acme", "accounts/acme/models/pirate"): (1_000_000, 0.20),
                      ("globex", "accounts/platform/models/llama-v3p1-8b-instruct"): (2_000_000, 0.20),
                      ("globex", "accounts/globex/models/legal"): (1_000_000, 0.90)}
    # serverless replicas' own GPU time is the platform's cost, not a tenant's
    assert not any(c.item.startswith("accounts/platform/deployments") for c in charges)


def test_time_is_split_across_periods():
    by_day = billing.totals(billing.bill(RECORDS, REPLICAS, period="day"))
    assert by_day == {("acme", "2026-11-24"): 0.20 + 4.00, ("acme", "2026-11-25"): 8.00,
                      ("globex", "2026-11-25"): 1.30}
    hours = list(billing.split_interval(T0, T0 + 5400, "hour"))
    assert hours == [("2026-11-24T23", 1800), ("2026-11-25T00", 3600)]
    new_year = datetime(2026, 12, 31, 23, 0, tzinfo=timezone.utc).timestamp()
    assert list(billing.split_interval(new_year, new_year + 7200, "month")) == [("2026-12", 3600), ("2027-01", 3600)]


def test_a_price_table_of_ones_own(tmp_path):
    prices = tmp_path / "prices.json"
    table = {"currency": "EUR",
             "serverless_tiers": [{"up_to_billion_params": 10, "usd_per_million_tokens": 1.0},
                                  {"up_to_billion_params": None, "usd_per_million_tokens": 2.0}],
             "usd_per_accelerator_hour": {a: 10.0 for a in ("CPU", "NVIDIA_A100_80GB", "NVIDIA_H100_80GB",
                                                             "NVIDIA_H200_141GB", "AMD_MI300X_192GB")}}
    prices.write_text(json.dumps(table))
    charges = billing.bill(RECORDS, REPLICAS, billing.load_prices(prices))
    # acme: 1M tokens x 1.0 + 3 accelerator-hours x 10; globex: 2M x 1.0 + 1M (70B: second tier) x 2.0
    assert billing.totals(charges) == {("acme", "2026-11"): 31.0, ("globex", "2026-11"): 4.0}


@pytest.mark.parametrize("change, field, words", [
    (lambda t: t["serverless_tiers"].reverse(), "serverless_tiers[0].up_to_billion_params", "tiers must grow"),
    (lambda t: t["serverless_tiers"].pop(), "serverless_tiers[1].up_to_billion_params", "the last tier must be null"),
    (lambda t: t["usd_per_accelerator_hour"].pop("CPU"), "usd_per_accelerator_hour", "has no price for CPU"),
    (lambda t: t["serverless_tiers"][0].update(usd_per_million_tokens=-1), "serverless_tiers[0].usd_per_million_tokens",
     "greater than or equal to 0"),
])
def test_a_bad_price_table_is_refused_by_field(tmp_path, change, field, words):
    table = billing.DEFAULT_PRICES.model_dump(mode="json")
    table["serverless_tiers"] = [dict(t) for t in table["serverless_tiers"]][:2] + [table["serverless_tiers"][-1]]
    change(table)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(table))
    with pytest.raises(SpecError) as info:
        billing.load_prices(path)
    assert any(f == field and words in m for f, m in info.value.errors), info.value.errors


def test_a_bad_period_is_named():
    with pytest.raises(billing.BillingError, match="period: 'week'"):
        billing.bill([], [], period="week")


def test_ember_usage_reads_what_replicas_write(tmp_path, capsys):
    store = tmp_path / "store"
    shared = Meter(f"file://{store}/usage", SHARED_8B, "NVIDIA_H100_80GB", 1,
                   "accounts/platform/models/llama-v3p1-8b-instruct", serverless=True)
    shared.record("acme", "accounts/acme/models/pirate", 300_000, 200_000, 0.5, "ok")
    shared.record("globex", "accounts/platform/models/llama-v3p1-8b-instruct", 1_000_000, 0, 0.5, "ok")
    Meter(f"file://{store}/usage", PRIVATE, "NVIDIA_A100_80GB", 4, "accounts/acme/models/custom")

    assert cli.main(["usage", "--store", f"file://{store}", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    amounts = {t["account_id"]: t["amount"] for t in report["totals"]}
    assert amounts["globex"] == pytest.approx(0.20) and amounts["acme"] >= 0.10  # + a moment of 4 x A100
    assert cli.main(["usage", "--store", f"file://{store}", "--format", "csv", "--account", "globex",
                     "--plot", str(tmp_path / "usage.png")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["kind"], float(r["quantity"]), float(r["amount"])) for r in rows] == [(billing.TOKENS, 1e6, 0.2)]
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["usage", "--store", f"file://{store}"]) == 0
    table = capsys.readouterr().out
    assert "globex" in table and "total" in table and "0.2000" in table


def test_a_record_being_appended_is_not_read_half_written(tmp_path):
    store = tmp_path / "store"
    meter = Meter(f"file://{store}/usage", SHARED_8B, serverless=True)
    meter.record("acme", "accounts/acme/models/pirate", 10, 5, 0.1, "ok")
    meter.record("globex", "accounts/globex/models/legal", 7, 3, 0.1, "ok")
    with open(store / "usage" / SHARED_8B.replace("/", "_") / f"requests-{meter.replica}.jsonl", "a") as f:
        f.write('{"time": 1, "account_id": "acme", "prompt_to')  # a replica mid-append
    assert [r["prompt_tokens"] for r in read_usage(f"file://{store}")] == [10, 7]
    assert [r["model"] for r in meter.read("acme")] == ["accounts/acme/models/pirate"]  # one account's only


def test_serverless_tokens_from_a_models_shutdown_date_on_are_not_charged():
    # the 8B model shut down on the 25th: globex's request at 00:00:00 that day is not charged, acme's a minute before
    # midnight is; the 70B deployment and the dedicated one are untouched
    shutdowns = {SHARED_8B: date(2026, 11, 25)}
    charges = billing.bill(RECORDS, REPLICAS, period="month", shutdowns=shutdowns)
    assert billing.totals(charges) == {("acme", "2026-11"): 0.20 + 12.00, ("globex", "2026-11"): 0.90}
    assert not any(c.item == "accounts/platform/models/llama-v3p1-8b-instruct" for c in charges)
    left = billing.uncharged(RECORDS, REPLICAS, shutdowns)
    assert left == [billing.Uncharged("globex", "accounts/platform/models/llama-v3p1-8b-instruct", date(2026, 11, 25),
                                      requests=1, tokens=2_000_000)]
    assert left[0].note() == ("globex: llama-v3p1-8b-instruct was shut down for serverless use on 2026-11-25; "
                              "2,000,000 tokens in 1 request on or after that day are not charged")
    # a date that has not come yet, or one of another deployment, changes nothing
    for later in ({SHARED_8B: date(2026, 11, 26)}, {PRIVATE: date(2020, 1, 1)}):
        assert billing.bill(RECORDS, REPLICAS, shutdowns=later) == billing.bill(RECORDS, REPLICAS)
        assert billing.uncharged(RECORDS, REPLICAS, later) == []


def test_ember_usage_stops_charging_at_the_shutdown_date_in_the_stores_deployment_records(tmp_path, capsys):
    store = tmp_path / "store"
    today = datetime.now(timezone.utc).date()
    layout = StoreLayout(str(store))
    for deployment, base, shutdown in ((SHARED_8B, "accounts/platform/models/llama-v3p1-8b-instruct", today),
                                       (SHARED_70B, "accounts/platform/models/llama-v3p1-70b-instruct",
                                        today + timedelta(days=30))):
        path = Path(layout.deployment_record("platform", deployment.rsplit("/", 1)[1]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(DeploymentRecord(name=deployment, base_model=base, serverless=True,
                                                    shutdown_date=shutdown).to_json()))
        meter = Meter(f"file://{store}/usage", deployment, "NVIDIA_H100_80GB", 1, base, serverless=True)
        meter.record("globex", base, 1_000_000, 0, 0.5, "ok")  # written now: today, on or after the 8B's date
    assert read_shutdowns(f"file://{store}") == {SHARED_8B: today, SHARED_70B: today + timedelta(days=30)}

    assert cli.main(["usage", "--store", f"file://{store}", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["item"], c["amount"]) for c in report["charges"]] == [("accounts/platform/models/llama-v3p1-70b-instruct",
                                                                      0.9)]
    assert report["notes"] == [f"globex: llama-v3p1-8b-instruct was shut down for serverless use on {today}; "
                               f"1,000,000 tokens in 1 request on or after that day are not charged"]
    assert cli.main(["usage", "--store", f"file://{store}"]) == 0
    assert f"note: globex: llama-v3p1-8b-instruct was shut down for serverless use on {today}" in capsys.readouterr().out
    assert cli.main(["usage", "--store", f"file://{store}", "--account", "acme", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []  # another account's tokens are not acme's note

    # a record it cannot read is named, not passed over (it would charge what the record says not to)
    Path(layout.deployment_record("platform", "shared-8b")).write_text('{"name": 3}')
    assert cli.main(["usage", "--store", f"file://{store}"]) == 2
    assert "shared-8b/deployment.json" in capsys.readouterr().err
