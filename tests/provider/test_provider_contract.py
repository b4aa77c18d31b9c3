"""Issue 12: the provider contract under the Pulumi engine's rules — nothing live is lost, diffs are exact.

Providers are driven with the requests the engine sends (check → diff → create/update/delete, preview
handing back inputs as outputs), and programs through the offline runner, which follows the engine for
URNs, resource options and deletion order. Slow cases that need replicas are in test_provider_lifecycle.py.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from tests.provider.provider_helpers import alive, config, make_models, provider, store_entries
from pulumi.dynamic import DiffResult

from ember.provider.domain.digests import file_digests, tree_digest
from ember.provider.domain.records import DeploymentRecord
from ember.provider.backends.store import Store
from ember.provider.providers.base import EmberError
from ember.provider.providers.lora_addon import LoRAAddonProvider
from ember.provider.tools.automation import run_with_pulumi
from ember.provider.tools.runner import OfflineRunner, RunError
from ember.runtime.devtools import tinymodels

BASE = "accounts/acme/models/base"


def checked(p, news, olds=None):
    result = p.check(olds or {}, news | {"__provider": "x"})
    assert not result.failures, [(f.property, f.reason) for f in result.failures]
    return {k: v for k, v in result.inputs.items() if k != "__provider"}


# -- 1. a refused create leaves the live resource untouched ------------------------------------------------


def test_a_refused_deployment_create_leaves_the_live_deployment_running(tmp_path):
    cfg = config(tmp_path)
    store = Store(cfg.store_url, cfg.state_dir / "locks")
    record = DeploymentRecord(name="accounts/acme/deployments/prod", base_model=BASE)
    store.write_deployment_record(record)
    store.change_desired_addons("acme", "prod", lambda d: d.update({"accounts/acme/models/pirate": "objects/x"}))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    replicas = cfg.state_dir / "replicas" / "acme" / "prod.json"
    replicas.parent.mkdir(parents=True)
    replicas.write_text(json.dumps([{"pid": live.pid, "port": 1, "log": "x"}]))
    try:
        p = provider("Deployment", cfg)
        with pytest.raises(EmberError, match="accounts/acme/deployments/prod already exists"):
            p.create(checked(p, {"account_id": "acme", "deployment_id": "prod", "base_model": BASE}))
        assert alive(live.pid)  # another stack's replica was not stopped
        assert store.read_deployment_record("acme", "prod") == record
        assert store.desired_addons("acme", "prod") == {"accounts/acme/models/pirate": "objects/x"}
        assert replicas.exists()
    finally:
        os.killpg(live.pid, signal.SIGKILL)
        live.wait()


def test_refused_model_and_addon_creates_leave_the_existing_ones(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    m, a = provider("Model", cfg), provider("LoRAAddon", cfg)
    m.create(checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"])}))
    a.create(checked(a, {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["pirate"])}))
    before = store_entries(cfg)
    with pytest.raises(EmberError, match="already exists"):
        m.create(checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"])}))
    with pytest.raises(EmberError, match="already exists"):
        a.create(checked(a, {"account_id": "acme", "model_id": "pirate", "base_model": BASE, "source": str(models["poet"])}))
    with pytest.raises(EmberError, match="already exists"):  # an addon may not take a base model's ID either
        a.create(checked(a, {"account_id": "acme", "model_id": "base", "base_model": BASE, "source": str(models["poet"])}))
    assert store_entries(cfg) == before


# -- 6. update returns exactly the new state -----------------------------------------------------------------


def test_model_update_returns_exactly_the_new_state(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    m = provider("Model", cfg)
    first = checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"]), "description": "old"})
    created = m.create(first).outs
    second = checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"])})
    assert m.diff(created["name"], created, second).changes
    updated = m.update(created["name"], created, second).outs
    assert "description" not in updated and updated["digest"] == created["digest"]
    assert not m.diff(created["name"], updated, second).changes  # no update forever after


# -- 10, 11, 12: what check accepts, what it writes, what it refuses ---------------------------------------


def test_check_accepts_the_derived_fields_the_engine_copies_in_and_keeps_them(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    m = provider("Model", cfg)
    # ignore_changes=["source_digest"]: the engine puts the old value into the new inputs before check
    inputs = checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"]),
                         "source_digest": "sha256:" + "0" * 64})
    assert inputs["source_digest"] == "sha256:" + "0" * 64


def test_check_writes_nothing_but_its_digest_cache(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    for kind, news in (("Model", {"account_id": "acme", "model_id": "base", "source": str(models["base"])}),
                       ("LoRAAddon", {"account_id": "acme", "model_id": "p", "base_model": BASE, "source": str(models["pirate"])}),
                       ("Deployment", {"account_id": "acme", "deployment_id": "d", "base_model": BASE})):
        checked(provider(kind, cfg), news)
    assert sorted(p.name for p in cfg.state_dir.iterdir()) == ["digest-cache"]


def test_credentials_in_a_source_url_are_refused_and_masked(tmp_path):
    result = provider("Model", config(tmp_path)).check({}, {"account_id": "acme", "model_id": "m", "__provider": "x",
                                                            "source": "s3://AKIAEXAMPLE:s3cr3t-canary@bucket/weights"})
    [failure] = result.failures
    assert failure.property == "source" and "embeds credentials" in failure.reason
    assert "s3cr3t-canary" not in failure.reason and "AKIAEXAMPLE" not in failure.reason
    assert "s3cr3t-canary" not in json.dumps(result.inputs, default=str) or result.failures


def test_no_empty_passphrase_behind_the_users_back(tmp_path, monkeypatch):
    (tmp_path / "Pulumi.yaml").write_text("name: p\nruntime: python\n")
    for name in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE", "PULUMI_BACKEND_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(RunError, match="set PULUMI_CONFIG_PASSPHRASE"):
        run_with_pulumi("preview", tmp_path, "dev")
    assert "PULUMI_CONFIG_PASSPHRASE" not in os.environ


# -- programs through the offline runner, as the engine runs them ---------------------------------------------

PROGRAM = '''
import json
import pulumi
from ember.provider.resources import LoRAAddon, LoRAAddonArgs, Model, ModelArgs

s = json.load(open("settings.json"))
opts = lambda name: pulumi.ResourceOptions(**s.get("options", {}).get(name, {}))
base = Model("base", ModelArgs(account_id="acme", source=s.get("source", "models/base"),
                               description=s.get("description")), opts("base"))
addon = LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source="models/pirate"), opts("pirate"))
for extra in s.get("extra", []):
    Model(extra["name"], ModelArgs(account_id="acme", model_id=extra.get("model_id"), source="models/poet-base"),
          opts(extra["name"]))
if s.get("get"):
    adopted = Model.get("adopted", s["get"])
    pulumi.export("adopted_digest", adopted.digest)
    pulumi.export("adopted_name", adopted.name)
pulumi.export("name", base.name)
'''


@pytest.fixture
def program(tmp_path):
    root = tmp_path / "program"
    make_models(root / "models")
    make_models(root / "models-b", seed=3)
    (root / "models" / "poet-base").symlink_to(root / "models-b" / "base")
    (root / "Pulumi.yaml").write_text("name: contract\nruntime: python\n")
    (root / "__main__.py").write_text(PROGRAM)
    cfg = config(tmp_path)

    def run(settings: dict, action: str = "up", **kwargs):
        (root / "settings.json").write_text(json.dumps(settings))
        runner = OfflineRunner(root, config=cfg, log=lambda _: None)
        result = getattr(runner, action)(**kwargs)
        return runner, result, {s.name: (s.op, s.detail) for s in runner.steps}

    yield run, cfg
    try:
        OfflineRunner(root, config=cfg, log=lambda _: None).destroy()
    except RunError:
        pass


def test_a_description_edit_previews_as_an_update_of_that_model_only(program):
    run, cfg = program
    run({"description": "first"})
    _, _, steps = run({"description": "second"}, preview=True)
    assert steps == {"base": ("update", "(description)"), "pirate": ("same", "")}
    _, _, steps = run({"description": "second"})
    assert steps == {"base": ("update", "(description)"), "pirate": ("same", "")}
    _, _, steps = run({"description": "second"})
    assert steps == {"base": ("same", ""), "pirate": ("same", "")}


def test_a_replace_names_the_field_and_its_old_and_new_value(program):
    run, cfg = program
    _, _, steps = run({})
    _, _, steps = run({"source": "models-b/base"}, preview=True)
    op, detail = steps["base"]
    assert op == "replace" and detail.startswith('(source_digest: "sha256:') and " → " in detail
    assert detail.endswith("replacing the model replaces every deployment and addon on it: clients get "
                           "model_not_found until the new ones are ready")


def test_duplicate_urns_and_ids_are_refused(program):
    run, cfg = program
    with pytest.raises(Exception, match="duplicate resource URN: this program declares two Model resources named 'base'"):
        run({"extra": [{"name": "base", "model_id": "other"}]}, preview=True)
    with pytest.raises(Exception, match="accounts/acme/models/pirate is already declared by LoRAAddon pirate"):
        run({"extra": [{"name": "x", "model_id": "pirate"}]}, preview=True)


def test_up_does_not_refresh_unless_asked(program):
    run, cfg = program
    run({})
    _, _, steps = run({}, refresh=False)
    assert {op for op, _ in steps.values()} == {"same"}
    runner, _, _ = run({}, refresh=True)
    assert {s.op for s in runner.steps} == {"same"}  # the steps of the up itself; the refresh ran first


def test_destroy_deletes_dependents_first_honouring_protect_and_retain(program):
    run, cfg = program
    order = []
    run({})
    runner, _, _ = run({"options": {"base": {"protect": True}}})
    with pytest.raises(RunError, match="refusing to delete protected resources base"):
        runner.destroy()
    assert len(runner.state.resources) == 2 and store_entries(cfg)  # nothing was deleted
    runner, _, _ = run({"options": {"pirate": {"retain_on_delete": True}}})
    runner.log = lambda line: order.append(line.split()[2]) if line.strip().startswith("delete") else None
    # the addon was created last but its base first: reorder the state so creation order would be wrong
    runner.state.order.reverse()
    runner.destroy()
    assert order == ["pirate", "base"]  # the dependent first, whatever the creation order
    manifests = sorted(p.name for p in (cfg.state_dir / "store" / "models" / "acme").iterdir())
    assert manifests == ["pirate.json"]  # retained: dropped from the stack, left in the store


def test_ignore_changes_on_the_source_digest_keeps_the_old_weights(program, tmp_path):
    run, cfg = program
    run({"options": {"base": {"ignore_changes": ["source_digest"]}}})
    _, _, steps = run({"source": "models-b/base", "options": {"base": {"ignore_changes": ["source_digest"]}}},
                      preview=True)
    assert steps["base"][0] in ("same", "update")  # the path changed; the ignored digest did not replace


def test_delete_before_replace_false_creates_the_replacement_first(program, monkeypatch):
    run, cfg = program
    run({})
    calls = []
    for kind in ("create", "delete"):
        original = getattr(LoRAAddonProvider, kind)
        monkeypatch.setattr(LoRAAddonProvider, kind,
                            lambda self, *a, _k=kind, _o=original: (calls.append(_k), _o(self, *a))[1])
    monkeypatch.setattr(LoRAAddonProvider, "diff", lambda self, *a: DiffResult(
        changes=True, replaces=["source_digest"], delete_before_replace=False))
    with pytest.raises(EmberError, match="already exists"):  # a same-name replacement needs the old one gone first
        run({})
    assert calls == ["create"]  # and the refused create-first left the live addon alone
    assert (cfg.state_dir / "store" / "models" / "acme" / "pirate.json").exists()
    _, _, steps = run({"options": {"pirate": {"delete_before_replace": True}}})
    assert calls[1:] == ["delete", "create"] and steps["pirate"][0] == "replace"


def test_import_is_refused_as_the_engine_refuses_it(program, tmp_path):
    """The engine imports a dynamic resource by calling Read without the serialized provider, which the Python
    SDK's provider server needs (tests/engine/test_pulumi_engine.py sees it fail): the offline runner refuses it too."""
    run, cfg = program
    run({})
    state = cfg.state_dir / "stacks" / "contract-dev.json"
    state.unlink()  # the store entries outlive the stack (as after retain_on_delete)
    with pytest.raises(EmberError, match="already exists"):  # the entry is someone else's
        run({})
    with pytest.raises(RunError, match="import_ of accounts/acme/models/base is not possible .* Model.get"):
        run({"options": {"base": {"import_": "accounts/acme/models/base"}}}, preview=True)
    assert store_entries(cfg)  # nothing was touched


def test_a_damaged_model_object_shows_in_refresh_and_the_next_up_repairs_it(program):
    run, cfg = program
    runner, _, _ = run({})
    digest = runner.state.resources["pulumi-python:dynamic/ember:Model::base"]["outputs"]["digest"]
    weights = cfg.state_dir / "store" / "objects" / digest.removeprefix("sha256:") / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    steps = {s.name: s.detail for s in runner.refresh()}
    assert steps["base"].startswith("drift: ") and "state" in steps["base"]
    _, _, steps = run({})
    assert steps["base"] == ("update", "(drift)")
    assert OfflineRunner(runner.program_dir, config=cfg, log=lambda _: None).refresh()[0].detail == ""


def test_get_reads_an_entry_the_stack_does_not_own(program):
    run, cfg = program
    runner, _, _ = run({"extra": [{"name": "other", "model_id": "other"}], "options": {"other": {"retain_on_delete": True}}})
    digest = runner.state.resources["pulumi-python:dynamic/ember:Model::other"]["outputs"]["digest"]
    runner, outputs, steps = run({"get": "accounts/acme/models/other"})
    assert steps["other"] == ("delete", "(retained: dropped from the stack, left running)")
    assert steps["adopted"] == ("read", "") and outputs["adopted_name"] == "accounts/acme/models/other"
    assert outputs["adopted_digest"] == digest
    assert "pulumi-python:dynamic/ember:Model::adopted" not in runner.state.resources  # read, not owned
    with pytest.raises(Exception, match="accounts/acme/models/gone does not exist"):
        run({"get": "accounts/acme/models/gone"}, preview=True)



# -- issue 31: an addon's new weights are a new version of it, in place ---------------------------------------


def test_new_addon_weights_are_an_update_and_a_version_a_deployment_refuses_leaves_the_old_one(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    wide = tinymodels.make_lora(models["base"], tmp_path / "models" / "wide", rank=16, seed=5)
    m, a = provider("Model", cfg), provider("LoRAAddon", cfg)
    m.create(checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"])}))
    store = Store(cfg.store_url, cfg.state_dir / "locks")
    store.write_deployment_record(DeploymentRecord(name="accounts/acme/deployments/prod", base_model=BASE,
                                                   max_lora_rank=8))  # no replica runs: the store says what it serves
    addon = {"account_id": "acme", "model_id": "pirate", "base_model": BASE,
             "deployments": ["accounts/acme/deployments/prod"]}
    v1 = a.create(checked(a, addon | {"source": str(models["pirate"])})).outs
    news = checked(a, addon | {"source": str(models["poet"])})
    diff = a.diff(v1["name"], v1, news)
    assert diff.changes and not diff.replaces  # the name answers throughout: no delete, no create
    v2 = a.update(v1["name"], v1, news).outs
    assert v2["digest"] != v1["digest"] and v2["rank"] == 8 and v2["deployed_on"] == ["accounts/acme/deployments/prod"]
    assert store.desired_addons("acme", "prod") == {v1["name"]: store.urls.object(v2["digest"])}
    assert not store.fs.exists(store.paths.object(v1["digest"]))  # the old version's files are gone with it
    refused = checked(a, addon | {"source": str(wide)})
    with pytest.raises(EmberError, match="max_lora_rank"):  # rank 16 on a deployment of max_lora_rank 8
        a.update(v2["name"], v2, refused)
    assert store.read_manifest("acme", "pirate").digest == v2["digest"]
    assert store.desired_addons("acme", "prod") == {v1["name"]: store.urls.object(v2["digest"])}
    assert store.fs.exists(store.paths.object(v2["digest"]))
    assert not store.fs.exists(store.paths.object(tree_digest(file_digests(wide))))  # the refused one is not kept


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """A Deployment provider on a store with a base model, whose local cluster runs nothing: (provider, config, the
    deployments it was told to stop)."""
    from ember.provider.backends.cluster import ReplicaStatus
    from ember.provider.backends.local_cluster import LocalCluster

    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")
    m, d = provider("Model", cfg), provider("Deployment", cfg)
    m.create(checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"])}))
    stopped = []
    monkeypatch.setattr(LocalCluster, "scale", lambda self, spec, base, store: ReplicaStatus(("http://x",), 1, None))
    monkeypatch.setattr(LocalCluster, "stop", lambda self, account, deployment: stopped.append(deployment))
    return d, cfg, stopped


def test_a_failed_update_keeps_the_record_and_destroy_still_stops_the_deployment(fake_cluster, monkeypatch):
    """The record says what runs: an update whose replicas failed leaves the old one, and the resource's delete (its
    state has the old inputs) is no replaced resource's: it stops the deployment."""
    from ember.provider.backends.cluster import ClusterError
    from ember.provider.backends.local_cluster import LocalCluster

    d, cfg, stopped = fake_cluster
    first = checked(d, {"account_id": "acme", "deployment_id": "prod", "base_model": BASE})
    created = d.create(first | {"references": {"owner": "org/p/s/prod"}}).outs
    store = Store(cfg.store_url, cfg.state_dir / "locks")
    before = store.read_deployment_record("acme", "prod")
    assert before.generation == created["generation"] and before.owner == "org/p/s/prod"

    def fail(self, spec, base, store):
        raise ClusterError("replica on port 1 was not ready within 1 s")

    monkeypatch.setattr(LocalCluster, "scale", fail)
    with pytest.raises(EmberError, match="not ready"):
        d.update("accounts/acme/deployments/prod", created, checked(d, first | {"min_replicas": 2, "max_replicas": 2}))
    assert store.read_deployment_record("acme", "prod") == before
    d.delete("accounts/acme/deployments/prod", created)
    assert stopped == ["prod"] and store.read_deployment_record("acme", "prod") is None


def test_a_replaced_deployments_delete_leaves_the_new_one(fake_cluster):
    d, cfg, stopped = fake_cluster
    owner = {"references": {"owner": "org/p/s/prod"}}
    inputs = checked(d, {"account_id": "acme", "deployment_id": "prod", "base_model": BASE})
    old = d.create(inputs | owner).outs
    with pytest.raises(EmberError, match="already exists"):  # another stack's resource of that name
        d.create(inputs | {"references": {"owner": "org/p/other/prod"}})
    new = d.create(checked(d, {"account_id": "acme", "deployment_id": "prod", "base_model": BASE,
                               "precision": "bf16"}) | owner).outs  # the engine creates the replacement first
    assert new["generation"] != old["generation"]
    d.delete("accounts/acme/deployments/prod", old)  # ... then deletes the old resource
    record = Store(cfg.store_url, cfg.state_dir / "locks").read_deployment_record("acme", "prod")
    assert stopped == [] and record.generation == new["generation"] and record.inputs["precision"] == "bf16"
    d.delete("accounts/acme/deployments/prod", new)  # destroy
    assert stopped == ["prod"]


def test_a_count_that_cannot_split_a_custom_model_is_refused_in_preview_and_at_create(tmp_path):
    cfg = config(tmp_path)
    models = make_models(tmp_path / "models")  # the tiny base: 4 attention heads
    m, d = provider("Model", cfg), provider("Deployment", cfg)
    m.create(checked(m, {"account_id": "acme", "model_id": "base", "source": str(models["base"])}))
    news = {"account_id": "acme", "deployment_id": "wide", "base_model": BASE, "accelerator_count": 8}
    result = d.check({}, news | {"__provider": "x"})
    assert [(f.property, f.reason) for f in result.failures] == [
        ("accelerator_count", f"8 cannot split {BASE}: 8 ranks cannot share the model's 4 attention heads (2 KV "
                              "heads) so that each holds one; use at most 4")]
    with pytest.raises(EmberError, match="accelerator_count: 8 cannot split"):
        d.create(news)
    assert Store(cfg.store_url, cfg.state_dir / "locks").read_deployment_record("acme", "wide") is None
    assert not d.check({}, news | {"accelerator_count": 4, "__provider": "x"}).failures
