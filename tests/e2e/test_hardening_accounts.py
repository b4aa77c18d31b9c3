"""Accounts are sealed: no deployment, fine-tuning job or addon of one account builds on another account's private
model — refused at preview from the name, at create from the store's manifest, and by the replica itself. And
nothing unauthenticated names a tenant: /health says only whether the replica is ready, /metrics is the operator's."""

import json
import re
import textwrap

import httpx
import pytest
from tests.engine.engine_helpers import EngineStack, requires_pulumi
from tests.provider.provider_helpers import config, provider
from tests.runtime.server_helpers import PIRATE, POET, start, write_addon_manifest

from ember.provider.domain.accounts import DeploymentAccess
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.kinds.lora_addon import LoRAAddonSpec
from ember.provider.domain.records import BaseModelManifest
from ember.provider.domain.spec import SpecError, parse, parse_known
from ember.provider.providers.base import EmberError, base_manifest
from ember.provider.tools.runner import OfflineRunner, RunError
from ember.runtime.devtools import tinymodels
from ember.runtime.engine.engine import EngineConfig
from ember.runtime.serving.app import create_app
from ember.runtime.serving.replica import ServerConfig

STOLEN = "accounts/acme/models/base-s1"
CATALOG_ELSEWHERE = "accounts/platform/models/llama-v3p1-8b-instruct"
SPECS = {
    "deployment": (DeploymentSpec, {"account_id": "globex", "base_model": STOLEN}),
    "fine-tuning job": (FineTuningJobSpec, {"account_id": "globex", "base_model": STOLEN, "output_model": "tuned",
                                            "dataset": "accounts/globex/datasets/chats"}),
    "addon": (LoRAAddonSpec, {"account_id": "globex", "base_model": STOLEN, "source": "adapter"}),
}


@pytest.mark.parametrize("kind", SPECS)
def test_the_spec_refuses_another_accounts_model_and_takes_own_and_catalog_ones(kind):
    cls, data = SPECS[kind]
    with pytest.raises(SpecError) as info:
        parse(cls, data)
    [(field, message)] = info.value.errors
    assert field == "base_model" and STOLEN in message and "'globex'" in message
    parse(cls, data | {"base_model": "accounts/globex/models/own"})
    parse(cls, data | {"base_model": CATALOG_ELSEWHERE})  # catalog models are everyone's
    # in preview: judged as soon as the account and the base are known, whatever else is not known yet
    unknown_source = {"source"} if "source" in data else {"dataset"}
    assert parse_known(cls, data, unknown_source)[1] == [(field, message)]
    assert parse_known(cls, data, {"account_id"})[1] == []


ACME = textwrap.dedent('''
    from ember.provider import Model, ModelArgs
    Model("base", ModelArgs(account_id="acme", model_id="base-s1", source="models/base"))
''')
GLOBEX = textwrap.dedent('''
    import json
    from ember.provider import (Dataset, DatasetArgs, Deployment, DeploymentArgs, FineTuningJob, FineTuningJobArgs,
                                LoRAAddon, LoRAAddonArgs, Model)
    path = json.load(open("path.json"))
    stolen = Model.get("stolen", "accounts/acme/models/base-s1")
    if path == "deployment":
        Deployment("mine", DeploymentArgs(account_id="globex", base_model=stolen))
    elif path == "fine-tuning job":
        data = Dataset("chats", DatasetArgs(account_id="globex", source="chats.jsonl"))
        FineTuningJob("tune", FineTuningJobArgs(account_id="globex", base_model=stolen, dataset=data, output_model="v1"))
    else:
        LoRAAddon("addon", LoRAAddonArgs(account_id="globex", base_model=stolen, source="models/addon"))
''')


def _two_programs(tmp_path):
    """acme's program (its private base model) and globex's (which adopts it with Model.get and builds on it)."""
    acme, globex = tmp_path / "acme", tmp_path / "globex"
    for root, program in ((acme, ACME), (globex, GLOBEX)):
        root.mkdir()
        (root / "Pulumi.yaml").write_text(f"name: {root.name}\nruntime: python\n")
        (root / "__main__.py").write_text(program)
    base = tinymodels.make_model(acme / "models" / "base", "tiny", seed=0)
    tinymodels.make_lora(base, globex / "models" / "addon", rank=4, seed=1)  # shapes that fit acme's base
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}
    (globex / "chats.jsonl").write_text("\n".join(json.dumps(chat) for _ in range(4)) + "\n")
    return acme, globex


def test_two_accounts_on_one_store_none_builds_on_the_others_private_model(tmp_path):
    cfg = config(tmp_path)
    acme, globex = _two_programs(tmp_path)
    OfflineRunner(acme, config=cfg, log=lambda _: None).up()
    try:
        for path in SPECS:
            (globex / "path.json").write_text(json.dumps(path))
            for preview in (True, False):
                runner = OfflineRunner(globex, config=cfg, log=lambda _: None)
                with pytest.raises(RunError) as info:
                    runner.up(preview=preview)
                assert f"base_model: {STOLEN} is not a model account 'globex' may use" in str(info.value), path
                runner.destroy()
        store = cfg.state_dir / "store"
        # nothing of globex's was made on acme's weights: no deployment, no replica, no trained or uploaded addon
        assert not (store / "deployments" / "globex").exists() and not (cfg.state_dir / "replicas" / "globex").exists()
        assert not (store / "models" / "globex").exists() or not list((store / "models" / "globex").iterdir())
    finally:
        OfflineRunner(acme, config=cfg, log=lambda _: None).destroy()


@pytest.mark.engine
@pytest.mark.slow
@requires_pulumi
def test_under_the_pulumi_engine_another_accounts_model_is_refused_at_preview_and_up(tmp_path):
    state = tmp_path / "state"
    acme, globex = _two_programs(tmp_path)
    (globex / "path.json").write_text(json.dumps("deployment"))
    stacks = {}
    for root in (acme, globex):
        stacks[root.name] = EngineStack(root, tmp_path / f"home-{root.name}")
        stacks[root.name].env["EMBER_STATE_DIR"] = str(state)  # one store for both accounts
    stacks["acme"].up()
    try:
        for command in (("preview",), ("up", "--yes", "--skip-preview")):
            out = stacks["globex"].pulumi(*command, check=False)
            text = out.stdout + out.stderr
            assert out.returncode != 0 and "Traceback" not in text, text
            assert re.search(r"ember:Deployment resource 'mine': property base_model value .* has a problem: "
                             rf"{STOLEN} is not a model account 'globex' may use", text), text
        assert not (state / "store" / "deployments" / "globex").exists() and not (state / "replicas" / "globex").exists()
    finally:
        stacks["acme"].pulumi("destroy", "--yes")


def test_create_judges_the_stores_manifest_and_says_the_same_of_a_model_that_does_not_exist(tmp_path):
    cfg = config(tmp_path)
    store = provider("Deployment", cfg).store
    lookalike = "accounts/acme/models/llama-v3p1-8b-instruct"  # a catalog ID, but the manifest is no catalog model
    for name, catalog_id in ((lookalike, None), (CATALOG_ELSEWHERE, "llama-v3p1-8b-instruct")):
        store.write_manifest(BaseModelManifest(name=name, digest="sha256:" + "0" * 64, object="objects/x",
                                               architecture="LlamaForCausalLM", parameter_count=1, config={},
                                               catalog_id=catalog_id))
    with pytest.raises(EmberError) as forged:
        base_manifest(store, lookalike, "globex")
    with pytest.raises(EmberError) as missing:
        base_manifest(store, "accounts/acme/models/nothing-here", "globex")
    assert str(forged.value) == str(missing.value).replace("nothing-here", "llama-v3p1-8b-instruct")
    assert base_manifest(store, CATALOG_ELSEWHERE, "globex").catalog_id == "llama-v3p1-8b-instruct"
    # and the Deployment's create refuses before touching the store or the cluster
    deployments = provider("Deployment", cfg)
    with pytest.raises(EmberError, match="base_model: .* is not a model account 'globex' may use"):
        deployments.create({"account_id": "globex", "deployment_id": "d", "base_model": lookalike})
    assert store.read_deployment_record("globex", "d") is None


def test_a_replica_refuses_to_serve_another_accounts_base_model(tmp_path):
    from fastapi.testclient import TestClient

    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    model = tinymodels.make_model(tmp_path / "base", "tiny", seed=0)
    config_ = ServerConfig(model_dir=str(model), keys_url=str(keys), usage_url=str(tmp_path / "usage"),
                           deployment=DeploymentAccess("accounts/globex/deployments/d", "globex", STOLEN),
                           engine=EngineConfig())
    app = create_app(config_)
    with TestClient(app) as http:
        for _ in range(200):
            if app.state.replica.failure:
                break
            http.get("/health")
        assert app.state.replica.engine is None and "is not a model account 'globex' may use" in app.state.replica.failure
        assert http.get("/health").json() == {"status": "failed"}  # the reason is in the log, not unauthenticated


def test_health_names_nothing_metrics_are_the_operators_and_a_replica_loads_only_its_accounts_addons(tmp_path):
    desired = tmp_path / "desired.json"
    server = start(tmp_path / "srv", extra=["--desired-addons", str(desired), "--reconcile-interval", "3600"])
    try:
        theirs = "accounts/other/models/theirs"
        write_addon_manifest(server.root / "store", theirs, server.adapters[POET])
        # the desired set (as if the store were tampered with) asks for another account's addon: refused, not loaded
        desired.write_text(json.dumps({PIRATE: str(server.adapters[PIRATE]), theirs: str(server.adapters[POET]),
                                       POET: "/somewhere/else"}))
        owner = {"Authorization": f"Bearer {server.keys['acme']}"}
        result = httpx.post(f"{server.url}/admin/reconcile", headers=owner).json()
        assert result["served"] == [PIRATE] and set(result["failed"]) == {theirs, POET}
        assert "not the object the store's manifest names" in result["failed"][POET]

        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200 and health.json() == {"status": "ready"}
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        other = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.keys['other']}"})
        assert other.status_code == 403
        metrics = httpx.get(f"{server.url}/metrics", headers=owner)
        assert metrics.status_code == 200 and "ember_loaded_adapters 1.0" in metrics.text
    finally:
        server.stop()
