"""The serverless lifecycle (issue 34): a catalog file's deprecation and shutdown dates, the preview's warning in the
notice period, the check's refusal from the shutdown date, the date carried to the deployment's record by an in-place
update, the cost note, and no SLA on serverless outside the platform account. The clock moves by monkeypatching
`catalog_lifecycle.today`, which every rule reads."""

import dataclasses
import json
from datetime import date, timedelta
from pathlib import Path

import pytest
from tests.provider.provider_helpers import config, provider

from ember.provider.backends.cluster import ReplicaStatus
from ember.provider.backends.store import Store
from ember.provider.domain import catalog_lifecycle
from ember.provider.domain.catalog_lifecycle import CatalogFileError, Lifecycle
from ember.provider.domain.records import BaseModelManifest
from ember.provider.providers.base import ProviderConfig
from ember.provider.tools import cli, cost
from ember.provider.tools.runner import OfflineRunner, RunError

MODEL = "llama-v3p1-8b-instruct"
CATALOG_8B = f"accounts/platform/models/{MODEL}"
DEPRECATED, SHUTDOWN = date(2027, 1, 1), date(2027, 1, 15)


def write_catalog(path: Path, deprecation=DEPRECATED, shutdown=SHUTDOWN, **extra) -> Path:
    path.write_text(json.dumps({"models": {MODEL: {"deprecation_date": str(deprecation), "shutdown_date": str(shutdown)}}}
                               | extra))
    return path


@pytest.fixture
def clock(monkeypatch):
    """Sets the day every lifecycle rule judges by."""
    def move(day: date) -> None:
        monkeypatch.setattr(catalog_lifecycle, "today", lambda: day)
    return move


# ---------------------------------------------------------------------------------------------------------
# the file


def test_a_model_is_active_then_deprecated_then_shut_down(tmp_path):
    lifecycle = catalog_lifecycle.load(write_catalog(tmp_path / "catalog.json")).lifecycle(MODEL)
    assert [lifecycle.phase(DEPRECATED - timedelta(days=1)), lifecycle.phase(DEPRECATED),
            lifecycle.phase(SHUTDOWN - timedelta(days=1)), lifecycle.phase(SHUTDOWN)] == \
        ["active", "deprecated", "deprecated", "shut_down"]
    assert catalog_lifecycle.load(tmp_path / "catalog.json").lifecycle("qwen3-8b") is None
    assert catalog_lifecycle.load(None).platform_account == "platform"  # no file: no dates
    exactly_14 = Lifecycle(deprecation_date=DEPRECATED, shutdown_date=DEPRECATED + timedelta(days=14))
    assert exactly_14.phase(DEPRECATED) == "deprecated"


BAD_FILES = [
    ({"models": {MODEL: {"deprecation_date": "2027-01-01", "shutdown_date": "2027-01-10"}}},
     f"models.{MODEL}.shutdown_date: 2027-01-10 is 9 days after deprecation_date 2027-01-01; serverless models get "
     f"at least 14 days of notice"),
    ({"models": {MODEL: {"deprecation_date": "2027-01-15", "shutdown_date": "2027-01-01"}}},
     f"models.{MODEL}.shutdown_date: 2027-01-01 is before deprecation_date 2027-01-15"),
    ({"models": {"gpt-9": {"deprecation_date": "2027-01-01", "shutdown_date": "2027-02-01"}}},
     "models.gpt-9: 'gpt-9' is not a catalog model"),
    ({"models": {MODEL: {"deprecation_date": "2027-13-01", "shutdown_date": "2027-02-01"}}},
     f"models.{MODEL}.deprecation_date: Input should be a valid date"),
    ({"models": {MODEL: {"shutdown_date": "2027-02-01"}}}, f"models.{MODEL}.deprecation_date: is required"),
    ({"platform_account": "Platform"}, "platform_account: 'Platform' is not a valid ID"),
    ({"modles": {}}, "modles: is not a known property"),
]


@pytest.mark.parametrize("content, message", BAD_FILES, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_FILES)])
def test_a_bad_catalog_file_names_the_file_the_field_and_the_value(tmp_path, content, message):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CatalogFileError) as caught:
        catalog_lifecycle.load(path)
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)
    if "got" in message or "Input should" in message:
        assert "'2027-13-01'" in str(caught.value)


def test_an_unreadable_catalog_file_is_named(tmp_path):
    with pytest.raises(CatalogFileError, match=r"missing\.json: \(file\): cannot be read"):
        catalog_lifecycle.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CatalogFileError, match=r"broken\.json: \(file\): is not JSON"):
        catalog_lifecycle.load(tmp_path / "broken.json")


def test_the_file_is_found_through_pulumi_config_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(catalog_lifecycle.ENV, raising=False)
    assert ProviderConfig.load({}, default_root=tmp_path).catalog_file is None
    monkeypatch.setenv(catalog_lifecycle.ENV, "from-env.json")
    assert ProviderConfig.load({}, default_root=tmp_path).catalog_file == tmp_path / "from-env.json"
    # relative to the program's folder, as ember:stateDir is; config before the environment
    loaded = ProviderConfig.load({"ember:catalogFile": "ops/catalog.json"}, default_root=tmp_path)
    assert loaded.catalog_file == tmp_path / "ops" / "catalog.json"


# ---------------------------------------------------------------------------------------------------------
# the provider's check: refusals


def serverless(**kw):
    return {"account_id": "platform", "deployment_id": "shared", "base_model": CATALOG_8B,
            "deployment_type": "serverless"} | kw


def tenant_addon(**kw):
    return {"account_id": "acme", "model_id": "bot", "base_model": CATALOG_8B, "source": "s3://acme/bot",
            "serverless": True} | kw


def check(cfg, kind, news, olds=None):
    result = provider(kind, cfg).check(olds or {}, news | {"__provider": "x"})
    return {f.property: f.reason for f in result.failures}, {k: v for k, v in result.inputs.items() if k != "__provider"}


@pytest.fixture
def cfg(tmp_path):
    return dataclasses.replace(config(tmp_path), catalog_file=write_catalog(tmp_path / "catalog.json"))


def test_from_the_shutdown_date_serverless_use_is_refused_naming_the_model_and_the_date(cfg, clock):
    clock(SHUTDOWN - timedelta(days=1))  # the last day of notice: still served
    assert check(cfg, "Deployment", serverless())[0] == {}
    assert check(cfg, "LoRAAddon", tenant_addon())[0] == {}
    clock(SHUTDOWN)
    failures, _ = check(cfg, "Deployment", serverless())
    assert list(failures) == ["base_model"]
    assert failures["base_model"].startswith(f"{MODEL} was shut down for serverless use on 2027-01-15: a serverless "
                                             f"deployment of it is refused")
    failures, _ = check(cfg, "LoRAAddon", tenant_addon())
    assert list(failures) == ["serverless"] and f"{MODEL} was shut down for serverless use on 2027-01-15" in \
        failures["serverless"]
    # dedicated use is not the serverless offering's: neither is refused, nor reads the file
    assert check(cfg, "Deployment", serverless(deployment_type="dedicated", account_id="acme"))[0] == {}
    assert check(cfg, "LoRAAddon", tenant_addon(serverless=False, source="s3://acme/bot"))[0] == {}


def test_a_bad_catalog_file_fails_the_check_of_every_resource_that_reads_it(cfg, tmp_path):
    write_catalog(cfg.catalog_file, shutdown=DEPRECATED + timedelta(days=9))
    expected = f"catalog file {cfg.catalog_file}: models.{MODEL}.shutdown_date: 2027-01-10 is 9 days after"
    failures, _ = check(cfg, "Deployment", serverless())
    assert failures["deployment_type"].startswith(expected)
    failures, _ = check(cfg, "LoRAAddon", tenant_addon())
    assert failures["serverless"].startswith(expected)
    assert check(cfg, "Deployment", serverless(deployment_type="dedicated"))[0] == {}


NO_SLA = [
    ({"min_replicas": 2.0, "max_replicas": 4.0}, "min_replicas", "2 is set"),
    ({"autoscaling": {"target_concurrent_requests": 4.0}}, "autoscaling", "{'target_concurrent_requests': 4.0} is set"),
    ({"min_replicas": 0.0, "max_replicas": 2.0, "autoscaling": {"scale_to_zero_window_s": 60.0}}, "autoscaling",
     "{'scale_to_zero_window_s': 60} is set"),
]


@pytest.mark.parametrize("inputs, field, value", NO_SLA, ids=[f for _, f, _ in NO_SLA])
def test_no_capacity_promise_on_serverless_outside_the_platform_account(cfg, inputs, field, value):
    failures, _ = check(cfg, "Deployment", serverless(account_id="acme", **inputs))
    assert failures[field].startswith(f"{value} on a serverless deployment of account 'acme': serverless is "
                                      f"best-effort with no SLA, and its capacity belongs to the platform account "
                                      f"'platform'; for guaranteed capacity declare a dedicated deployment"), failures
    # the platform's own capacity, the defaults, and dedicated deployments promise what they like
    assert check(cfg, "Deployment", serverless(**inputs))[0] == {}
    assert check(cfg, "Deployment", serverless(account_id="acme"))[0] == {}
    assert check(cfg, "Deployment", serverless(account_id="acme", deployment_type="dedicated", **inputs))[0] == {}


def test_the_platform_account_comes_from_the_catalog_file(cfg, tmp_path):
    write_catalog(cfg.catalog_file, platform_account="ops")
    assert "min_replicas" in check(cfg, "Deployment", serverless(min_replicas=2.0, max_replicas=2.0))[0]
    assert check(cfg, "Deployment", serverless(account_id="ops", min_replicas=2.0, max_replicas=2.0))[0] == {}
    no_file = config(tmp_path / "none")  # no file: the platform account is "platform"
    assert check(no_file, "Deployment", serverless(min_replicas=2.0, max_replicas=2.0))[0] == {}
    assert "min_replicas" in check(no_file, "Deployment", serverless(account_id="acme", min_replicas=2.0,
                                                                     max_replicas=2.0))[0]


# ---------------------------------------------------------------------------------------------------------
# the shutdown date reaches the deployment's record: an in-place update


class StubCluster:
    """Runs nothing: what the record says is the subject here, not replicas."""

    def scale(self, spec, base, store):
        return ReplicaStatus(endpoints=("http://127.0.0.1:1",), ready=spec.min_replicas)

    def reconcile_addons(self, *args):
        pass

    def stop(self, account, deployment):
        pass


def test_a_new_shutdown_date_is_an_update_that_rewrites_the_record(cfg, clock):
    clock(date(2026, 6, 1))
    store = Store(cfg.store_url, cfg.state_dir / "locks")
    store.write_manifest(BaseModelManifest(name=CATALOG_8B, digest="sha256:" + "0" * 64, object="file:///weights",
                                           architecture="LlamaForCausalLM", parameter_count=8, config={},
                                           catalog_id=MODEL))
    deployments = provider("Deployment", cfg)
    deployments.cluster_of = lambda name: StubCluster()
    _, inputs = check(cfg, "Deployment", serverless())
    assert inputs["base_model_shutdown_date"] == "2027-01-15"
    created = deployments.create(inputs)
    assert store.read_deployment_record("platform", "shared").shutdown_date == SHUTDOWN

    assert not deployments.diff(created.id, created.outs, check(cfg, "Deployment", serverless())[1]).changes
    later = SHUTDOWN + timedelta(days=30)  # the platform team gives tenants a month more
    write_catalog(cfg.catalog_file, shutdown=later)
    _, news = check(cfg, "Deployment", serverless(), created.outs)
    diff = deployments.diff(created.id, created.outs, news)
    assert diff.changes and diff.replaces == []  # the replicas keep serving: an update, no replacement
    updated = deployments.update(created.id, created.outs, news)
    assert store.read_deployment_record("platform", "shared").shutdown_date == later
    assert updated.outs["base_model_shutdown_date"] == later.isoformat()

    cfg.catalog_file.write_text("{}")  # the dates withdrawn: the record no longer carries one
    _, news = check(cfg, "Deployment", serverless(), updated.outs)
    assert "base_model_shutdown_date" not in news and deployments.diff(created.id, updated.outs, news).changes
    deployments.update(created.id, updated.outs, news)
    assert store.read_deployment_record("platform", "shared").shutdown_date is None


# ---------------------------------------------------------------------------------------------------------
# the program's warning, as the offline runner and `ember preview --offline` show it; the cost note

PROGRAM = '''
from ember.provider import Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs
base = Model("llama-8b", ModelArgs(account_id="platform", catalog_id="llama-v3p1-8b-instruct"))
Deployment("shared", DeploymentArgs(account_id="platform", base_model=base, deployment_type="serverless"))
Deployment("mine", DeploymentArgs(account_id="platform", base_model=base, deployment_id="mine"))  # dedicated: no warning
LoRAAddon("bot", LoRAAddonArgs(account_id="acme", base_model="accounts/platform/models/llama-v3p1-8b-instruct",
                               source="s3://acme/bot", serverless=True))
'''


@pytest.fixture
def program(tmp_path):
    program = tmp_path / "program"
    program.mkdir()
    (program / "Pulumi.yaml").write_text("name: lifecycle\nruntime: python\n")
    (program / "Pulumi.dev.yaml").write_text("config:\n  ember:catalogFile: ops/catalog.json\n")  # from the program
    (program / "__main__.py").write_text(PROGRAM)
    (program / "ops").mkdir()
    write_catalog(program / "ops" / "catalog.json")
    return program


def preview_lines(program: Path) -> list[str]:
    lines = []
    OfflineRunner(program, log=lines.append).up(preview=True)
    return lines


def test_the_preview_warns_in_the_notice_period_and_fails_from_the_shutdown_date(program, clock, capsys):
    clock(DEPRECATED - timedelta(days=1))
    assert not [line for line in preview_lines(program) if line.startswith("warning")]
    clock(DEPRECATED)
    warnings = sorted(line for line in preview_lines(program) if line.startswith("warning"))
    assert warnings == [f"warning: {what}: {MODEL} is deprecated for serverless use: it shuts down on 2027-01-15; move "
                        f"it to another catalog model, or to a dedicated deployment, before then"
                        for what in ("Deployment shared", "LoRAAddon bot")]
    assert cli.main(["preview", str(program), "--offline"]) == 0
    out = capsys.readouterr().out
    assert f"warning: Deployment shared: {MODEL} is deprecated for serverless use: it shuts down on 2027-01-15" in out
    clock(SHUTDOWN)
    with pytest.raises(RunError, match=f"serverless: {MODEL} was shut down for serverless use on 2027-01-15"):
        preview_lines(program)


def test_ember_cost_notes_serverless_uses_of_deprecated_models(program, clock, capsys):
    clock(DEPRECATED - timedelta(days=1))
    _, planned = cost.preview_costs(OfflineRunner(program, log=lambda _: None))
    assert planned.notes == []
    clock(DEPRECATED)
    assert cli.main(["cost", str(program), "--offline"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert sorted(notes) == [f"note: serverless addon bot: {MODEL} is deprecated for serverless use: it shuts down on "
                             f"2027-01-15",
                             f"note: serverless shared: {MODEL} is deprecated for serverless use: it shuts down on "
                             f"2027-01-15"]


def test_the_policy_is_advisory_unless_configured_mandatory(program, tmp_path, capsys):
    # The pack runs in its own process, on the real clock: dates around today.
    today = date.today()
    write_catalog(program / "ops" / "catalog.json", today - timedelta(days=1), today + timedelta(days=20))
    shutdown = today + timedelta(days=20)
    assert cli.main(["preview", str(program), "--offline", "--policy-pack", "ember"]) == 0
    violations = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("["))
    assert violations == [
        f"[advisory] ember-no-deprecated-serverless-models (bot): LoRAAddon bot: {MODEL} is deprecated for serverless "
        f"use: it shuts down on {shutdown}; move it to another catalog model, or to a dedicated deployment",
        f"[advisory] ember-no-deprecated-serverless-models (shared): Deployment shared: {MODEL} is deprecated for "
        f"serverless use: it shuts down on {shutdown}; move it to another catalog model, or to a dedicated deployment"]
    mandatory = tmp_path / "policy-config.json"
    mandatory.write_text(json.dumps({"ember-no-deprecated-serverless-models": "mandatory"}))
    assert cli.main(["preview", str(program), "--offline", "--policy-pack", "ember",
                     "--policy-pack-config", str(mandatory)]) == 1
    assert "2 mandatory and 0 advisory violations" in capsys.readouterr().out
