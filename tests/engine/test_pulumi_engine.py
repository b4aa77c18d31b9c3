"""The engine conformance suite: programs through the real Pulumi CLI and through Ember's offline runner,
which must plan the same step for every resource (the engine is the judge)."""

import json
import re
from pathlib import Path

import openai
import pytest
from tests.engine.engine_helpers import EngineStack, Twin, copy_program, requires_pulumi
from tests.provider.provider_helpers import (alive, gateway_pid, make_models, replica_pids, served_addons,
                                             store_entries)

from ember.provider.providers.base import ProviderConfig
from ember.provider.tools import cli
from ember.provider.tools.runner import RunError
from ember.runtime.devtools import tinymodels

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.engine, pytest.mark.slow, requires_pulumi]
# The policy pack with the example guardrails, as a platform team runs it on every up
GUARDRAILS = ["--policy-pack", str(REPO / "provider/policy"),
              "--policy-pack-config", str(REPO / "examples/policy/policy-config.json")]

PROGRAM = '''
import json
import pulumi
from ember.provider import (Deployment, DeploymentArgs, Gateway, GatewayArgs, LoRAAddon, LoRAAddonArgs, Model,
                            ModelArgs)

s = json.load(open("settings.json"))
base = Model("base", ModelArgs(account_id="acme", model_id=s["model_id"], source=s["base_source"],
                               description=s["description"]))
local = Deployment("local", DeploymentArgs(account_id="acme", base_model=base, min_replicas=s["replicas"],
                                           max_replicas=s["replicas"], max_loras=4, max_lora_rank=s["max_lora_rank"],
                                           accelerator_type=s["accelerator"], precision=s["precision"],
                                           deployment_type=s["deployment_type"]))
targets = [local]
if s["second_deployment"]:
    targets.append(Deployment("second", DeploymentArgs(account_id="acme", base_model=base, max_loras=2)))
for name, source in s["addons"].items():
    LoRAAddon(name, LoRAAddonArgs(account_id="acme", base_model=base, source=source, deployments=targets))
front = Gateway("front", GatewayArgs(account_id="platform", rate_limits={"requests_per_minute": s["gateway_rpm"]}))
pulumi.export("endpoint", local.endpoints.apply(lambda e: e[0] if e else None))
pulumi.export("gateway", front.url)
pulumi.export("names", pulumi.Output.all(base.name, *[t.name for t in targets]))
pulumi.export("serving", local.serving_digest)
'''
SETTINGS = {"model_id": "base", "base_source": "models/base", "description": "first", "replicas": 1,
            "max_lora_rank": 64, "accelerator": "CPU", "precision": "fp32", "deployment_type": "dedicated",
            "second_deployment": False, "addons": {"pirate": "models/pirate", "poet": "models/poet"}, "gateway_rpm": 600}
# (edit, the step each resource gets, or the check failure both must refuse it with)
EDITS = [
    ({"description": "second"}, {"base": "update", "local": "same", "pirate": "same", "poet": "same"}),
    ({"addons": {"pirate": "models/pirate-r16", "poet": "models/poet"}}, {"pirate": "update", "poet": "same"}),
    ({"addons": {"pirate": "models/pirate-r16"}}, {"pirate": "same", "poet": "delete"}),
    ({"addons": {"pirate": "models/pirate-r16", "poet": "models/poet"}}, {"poet": "create"}),
    ({"replicas": 2}, {"base": "same", "local": "update", "pirate": "same", "front": "same"}),
    ({"gateway_rpm": 60}, {"front": "update", "local": "same"}),
    ({"accelerator": "NVIDIA_H100_80GB"}, "the local cluster runs CPU replicas only"),
    ({"precision": "bf16"}, {"local": "replace", "pirate": "same", "poet": "same"}),
    ({"deployment_type": "serverless"}, "only catalog models are served serverless"),
    ({"max_lora_rank": 16}, {"local": "replace", "pirate": "same"}),
    ({"second_deployment": True}, {"second": "create", "pirate": "update", "poet": "update"}),
    ({"base_source": "models-b/base"}, {"base": "replace", "local": "replace", "second": "replace",
                                        "pirate": "replace", "poet": "replace"}),
    ({"model_id": "renamed"}, {"base": "replace", "local": "replace", "pirate": "replace"}),
]

# settings → the property `pulumi preview --diff` must show changing
DIFF_FIELDS = {"description": "description", "replicas": "min_replicas", "precision": "precision",
               "max_lora_rank": "max_lora_rank"}


def make_program(root: Path) -> Path:
    program = root / "program"
    make_models(program / "models")
    make_models(program / "models-b", seed=7)
    tinymodels.make_lora(program / "models-b" / "base", program / "models" / "pirate-r16", rank=16, seed=3)
    (program / "Pulumi.yaml").write_text("name: conformance\nruntime: python\n")
    (program / "__main__.py").write_text(PROGRAM)
    return program


def by_name(steps: dict) -> dict[str, str]:
    return {name: op for (_, name), op in steps.items()}


def test_every_edit_gets_the_same_step_from_the_engine_and_the_offline_runner(tmp_path):
    twin = Twin(make_program(tmp_path / "engine"), tmp_path)
    settings = dict(SETTINGS)
    try:
        twin.write(settings)
        engine, offline = twin.previews()
        assert engine == offline and set(engine.values()) == {"create"}
        twin.up()
        for edit, expected in EDITS:
            twin.write(settings | edit)
            if isinstance(expected, str):  # refused at preview by both, and nothing changes
                out = twin.stack.pulumi("preview", check=False)
                assert out.returncode != 0 and expected in out.stdout + out.stderr, (edit, out.stdout)
                with pytest.raises(RunError, match=expected):
                    twin.runner().up(preview=True)
                twin.write(settings)
                continue
            engine, offline = twin.previews()
            assert engine == offline, f"{edit}: engine {engine} != offline {offline}"
            assert {k: v for k, v in by_name(engine).items() if k in expected} == expected, (edit, engine)
            for setting, field in DIFF_FIELDS.items():  # `preview --diff` names the changed property
                if setting in edit:
                    shown = twin.stack.pulumi("preview", "--diff").stdout
                    assert re.search(rf"~ {field} *: ", shown), f"{edit}:\n{shown}"
            engine_outputs, offline_outputs = twin.up()
            # the same outputs, but for the ports each side's replica and gateway listen on
            for outputs in (engine_outputs, offline_outputs):
                assert outputs.pop("endpoint").startswith("http://127.0.0.1:")
                assert outputs.pop("gateway").startswith("http://127.0.0.1:")
            assert engine_outputs == offline_outputs and engine_outputs["serving"].startswith("sha256:"), edit
            settings |= edit
            assert set(twin.stack.preview().values()) == {"same"}, edit  # converged
    finally:
        twin.destroy()


def test_quickstart_up_refresh_policy_and_destroy_through_the_engine(tmp_path):
    program = copy_program(REPO / "examples/quickstart", tmp_path / "quickstart")
    assert cli.main(["quickstart", "--stack", str(program / "stack.json")]) == 0
    stack = EngineStack(program, tmp_path)
    cfg = ProviderConfig.load(default_root=program)  # the state the dynamic providers keep beside the program
    try:
        assert set(stack.preview().values()) == {"create"}
        stack.up()
        endpoint = stack.pulumi("stack", "output", "endpoint").stdout.strip()
        assert served_addons(endpoint, cfg, "quickstart") == {
            "accounts/quickstart/models/smollm2-pirate", "accounts/quickstart/models/smollm2-poet"}
        # the base and both addons answer through the gateway, with the official client
        gateway = stack.pulumi("stack", "output", "gateway").stdout.strip()
        client = openai.OpenAI(base_url=f"{gateway}/v1", max_retries=0,
                               api_key=(cfg.state_dir / "keys" / "quickstart.key").read_text().strip())
        names = json.loads(stack.pulumi("stack", "output", "models", "--json").stdout)

        def answers() -> list[str]:
            return [client.chat.completions.create(model=name, max_tokens=12, temperature=0, messages=[
                {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
                for name in names]

        on_one = answers()
        assert all(on_one)
        gateway_process = gateway_pid(cfg, "quickstart", "gateway")
        stack.pulumi("up", "--yes", "--expect-no-changes")  # a second up changes nothing
        stack.pulumi("refresh", "--yes", "--expect-no-changes")
        # the model split across 2 ranks (tensor parallelism): a replacement, whose replica answers as one rank did
        main = program / "__main__.py"
        main.write_text(main.read_text().replace('accelerator_type="CPU",', 'accelerator_type="CPU", accelerator_count=2,'))
        assert by_name(stack.preview())["smollm2-local"] == "replace"
        stack.up()
        endpoint = stack.pulumi("stack", "output", "endpoint").stdout.strip()  # the new replica's
        assert served_addons(endpoint, cfg, "quickstart") == set(names[1:])
        assert answers() == on_one
        policy = stack.pulumi("preview", *GUARDRAILS)
        assert "ember@v0.1.0" in policy.stdout
        pids = replica_pids(cfg, "quickstart", "smollm2-local")
        assert pids and all(alive(p) for p in pids)
        stack.pulumi("destroy", "--yes")
        assert not any(alive(p) for p in [*pids, gateway_process])
        assert store_entries(cfg) == []
    finally:
        stack.pulumi("destroy", "--yes", check=False)


def test_the_real_analyzer_blocks_what_the_offline_policy_check_blocks(tmp_path, capsys):
    from tests.provider.test_policy import BAD_PROGRAM

    program = tmp_path / "bad"
    models = make_models(program / "models")
    assert models["base"].exists()
    (program / "Pulumi.yaml").write_text("name: bad\nruntime: python\n")
    (program / "__main__.py").write_text(BAD_PROGRAM)
    pack_config = tmp_path / "policy-config.json"
    pack_config.write_text(json.dumps({"ember-allowed-accelerators": {"allowed": ["CPU", "NVIDIA_H100_80GB"]},
                                       "ember-max-replicas": "advisory",
                                       "ember-monthly-budget": {"maximum": 10**6}}))  # resource-level rules here
    pack = ["--policy-pack", str(REPO / "provider/policy"), "--policy-pack-config", str(pack_config)]
    out = EngineStack(program, tmp_path).pulumi("preview", *pack, check=False)
    assert out.returncode != 0
    # "- [mandatory]  ember-allowed-accelerators  (pulumi-python:dynamic/ember:Deployment: big)", then its message
    lines = out.stdout.splitlines()
    engine = {(line.split()[1].strip("[]"), line.split()[2], line.rsplit(":", 1)[1].strip(" )"), lines[i + 2].strip())
              for i, line in enumerate(lines) if line.strip().startswith("- [")}
    assert cli.main(["preview", str(program), "--offline", *pack]) == 1
    # "[mandatory] ember-allowed-accelerators (big): <message>"
    offline = {(line.split()[0].strip("[]"), line.split()[1], line.split()[2].strip("():"), line.split("): ", 1)[1])
               for line in capsys.readouterr().out.splitlines() if line.startswith("[")}
    assert engine == offline and len(engine) == 4, (engine, offline)


QUOTA_PROGRAM = '''
from ember.provider.resources import *
Deployment("train", DeploymentArgs(account_id="acme", base_model="accounts/platform/models/llama-v3p1-8b-instruct",
           accelerator_type="NVIDIA_H100_80GB", accelerator_count=8, max_replicas=2, cluster="kubernetes"))
'''


def test_the_account_gpu_quota_under_the_engine(tmp_path):
    """Under the engine the pack runs in its own folder: it reads the store the stack's ember:storeUrl names (and
    says so when it can find none), knows this stack's records by their owner, and the engine refuses a bad config
    by the policy's schema."""
    from ember.provider.backends.store import Store
    from ember.provider.domain.records import DeploymentRecord

    program = tmp_path / "quota"
    program.mkdir()
    (program / "Pulumi.yaml").write_text("name: quota\nruntime: python\n")
    (program / "__main__.py").write_text(QUOTA_PROGRAM)
    url, base = f"file://{tmp_path / 'store'}", "accounts/platform/models/llama-v3p1-8b-instruct"
    # another stack's 16 accelerators; this stack's own train (16, declared again) and old (32, no longer declared)
    for name, owner, replicas in (("chat", "organization/chat/prod/chat", 2), ("train", "organization/quota/dev/train", 2),
                                  ("old", "organization/quota/dev/old", 4)):
        Store(url, tmp_path / "locks").write_deployment_record(DeploymentRecord(
            name=f"accounts/acme/deployments/{name}", base_model=base, owner=owner,
            inputs={"account_id": "acme", "base_model": base, "accelerator_type": "NVIDIA_H100_80GB",
                    "accelerator_count": 8, "max_replicas": replicas}))
    stack, pack_config = EngineStack(program, tmp_path), tmp_path / "policy-config.json"

    def preview(config: dict):
        pack_config.write_text(json.dumps({"ember-account-gpu-quota": config}))
        return stack.pulumi("preview", "--policy-pack", str(REPO / "provider/policy"), "--policy-pack-config",
                            str(pack_config), check=False)

    out = preview({"default": 32})
    assert out.returncode != 0 and "no store to read: the store beside the program" in out.stdout
    stack.pulumi("config", "set", "ember:storeUrl", url)
    assert preview({"default": 32}).returncode == 0  # 16 + 16: its own records are not counted again
    out = preview({"default": 31})
    assert out.returncode != 0 and "[mandatory]  ember-account-gpu-quota" in out.stdout
    assert ("account acme: its deployments may hold 32 accelerators at max_replicas across every stack of the store "
            "(16 in this stack, 16 in others), above its quota of 31 (the default)") in out.stdout
    out = preview({"default": -1, "accounts": {"Acme_Corp": 3}})
    assert out.returncode != 0 and "validating policy config" in out.stdout
    assert "ember-account-gpu-quota: default: Must be greater than or equal to 0" in out.stdout
    assert 'Property name of "Acme_Corp" does not match' in out.stdout


OPTIONS_PROGRAM = '''
import json
import pulumi
from ember.provider import LoRAAddon, LoRAAddonArgs, Model, ModelArgs

s = json.load(open("settings.json"))
opts = lambda name: pulumi.ResourceOptions(**s.get("options", {}).get(name, {}))
if s.get("only_get"):
    pulumi.export("adopted_digest", Model.get("adopted", "accounts/acme/models/base").digest)
else:
    base = Model("base", ModelArgs(account_id="acme", source="models/base", description=s.get("description")),
                 opts("base"))
    if s.get("fail"):
        raise RuntimeError("the program failed half-way")
    LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source="models/pirate"), opts("pirate"))
'''
IMPORTS = {"options": {"base": {"import_": "accounts/acme/models/base"},
                       "pirate": {"import_": "accounts/acme/models/pirate"}}}


def test_a_failing_program_protect_and_import_behave_as_under_the_engine(tmp_path):
    program = tmp_path / "engine" / "program"
    make_models(program / "models")
    (program / "Pulumi.yaml").write_text("name: options\nruntime: python\n")
    (program / "__main__.py").write_text(OPTIONS_PROGRAM)
    twin = Twin(program, tmp_path)
    try:
        # A program that raises half-way fails the update; the stack stays consistent and the next up completes.
        twin.write({"fail": True})
        assert twin.stack.pulumi("up", "--yes", "--skip-preview", check=False).returncode != 0
        with pytest.raises(RuntimeError, match="failed half-way"):
            twin.runner().up()
        twin.write({})
        engine, offline = twin.previews()
        assert engine == offline, (engine, offline)
        twin.up()
        assert set(twin.stack.preview().values()) == {"same"}

        # protect: destroy refuses, and deletes nothing
        twin.write({"options": {"base": {"protect": True}}})
        twin.up()
        out = twin.stack.pulumi("destroy", "--yes", check=False)
        assert out.returncode != 0 and "protected" in out.stdout + out.stderr
        with pytest.raises(RunError, match="refusing to delete protected resources base"):
            twin.runner().destroy()
        assert set(twin.stack.preview().values()) == {"same"}

        # Entries that outlive their stack: a create is refused, import_ is refused by both, .get() reads them
        twin.write({})
        twin.up()
        twin.stack.pulumi("stack", "rm", "--force", "--yes")
        twin.stack.pulumi("stack", "init", "dev")
        (twin.config.state_dir / "stacks" / "options-dev.json").unlink()
        out = twin.stack.pulumi("up", "--yes", "--skip-preview", check=False)
        assert out.returncode != 0 and "already exists" in out.stdout + out.stderr
        with pytest.raises(Exception, match="already exists"):
            twin.runner().up()
        twin.write(IMPORTS)
        out = twin.stack.pulumi("preview", check=False)
        assert out.returncode != 0 and "KeyError: '__provider'" in out.stdout + out.stderr  # the engine cannot
        with pytest.raises(RunError, match="import_ of accounts/acme/models/base is not possible"):
            twin.runner().up(preview=True)
        twin.write({"only_get": True})
        twin.stack.up()
        engine_digest = twin.stack.pulumi("stack", "output", "adopted_digest").stdout.strip()
        assert twin.runner().up()["adopted_digest"].startswith("sha256:") and engine_digest.startswith("sha256:")
    finally:
        twin.write({})
        twin.destroy()


def test_serverless_platform_and_tenants_as_real_stacks(tmp_path):
    import httpx

    root = copy_program(REPO / "examples/serverless", tmp_path / "serverless")
    # the operator's one-off step: the catalog model's weights in the store (tiny ones here)
    base = tinymodels.make_model(root / ".ember" / "store" / "catalog" / "llama-v3p1-8b-instruct", "tiny", seed=0)
    tinymodels.make_lora(base, root / "tenant" / "models" / "support-bot", rank=4, seed=1)
    tinymodels.make_lora(base, root / "tenant" / "models" / "legal-drafts", rank=8, seed=2)
    home = tmp_path / "engine"
    platform = EngineStack(root / "platform", home)
    tenants = {"acme": EngineStack(root / "tenant", home, "acme"), "globex": EngineStack(root / "tenant", home, "globex")}
    addons = {"acme": "accounts/acme/models/support-bot", "globex": "accounts/globex/models/legal-drafts"}
    try:
        assert "ember@v0.1.0" in platform.pulumi("up", "--yes", "--skip-preview", *GUARDRAILS).stdout
        endpoint = platform.pulumi("stack", "output", "gateway").stdout.strip()  # the one endpoint, for every account
        for account, stack in tenants.items():
            assert "ember@v0.1.0" in stack.pulumi("up", "--yes", "--skip-preview", *GUARDRAILS).stdout
            outputs = json.loads(stack.pulumi("stack", "output", "--json").stdout)
            # the tenant's stack reads the platform's gateway (Gateway.get) and exports its URL
            assert outputs == {"model": addons[account], "gateway": endpoint,
                               "deployed_on": ["accounts/platform/deployments/llama-8b-serverless"]}
        for account, addon in addons.items():  # each tenant's addon answers its own account only
            key = (root / ".ember" / "keys" / f"{account}.key").read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}
            own = httpx.post(f"{endpoint}/v1/completions", headers=auth, timeout=60,
                             json={"model": addon, "prompt": "hello", "max_tokens": 2})
            assert own.status_code == 200, own.text
            other = next(a for a in addons.values() if a != addon)
            refused = httpx.post(f"{endpoint}/v1/completions", headers=auth, timeout=60,
                                 json={"model": other, "prompt": "hello", "max_tokens": 2})
            assert refused.status_code == 404  # as an unknown name
        for stack in tenants.values():
            stack.pulumi("destroy", "--yes")
        platform.pulumi("destroy", "--yes")
        assert not any(p for p in (root / ".ember" / "store" / "models").rglob("*.json"))
    finally:
        for stack in [*tenants.values(), platform]:
            stack.pulumi("destroy", "--yes", check=False)


DEPRECATED_PROGRAM = '''
from ember.provider import Deployment, DeploymentArgs, Model, ModelArgs
base = Model("llama-8b", ModelArgs(account_id="platform", catalog_id="llama-v3p1-8b-instruct"))
Deployment("shared", DeploymentArgs(account_id="platform", base_model=base, deployment_type="serverless"))
'''


def test_a_preview_warns_of_a_serverless_model_in_its_notice_period(tmp_path):
    """Issue 34: the program's warning (a dynamic provider cannot send one) reaches the engine's diagnostics, naming
    the model and its shutdown date, and the pack reports it, advisory by default; the file is found through the
    stack's config, relative to the program."""
    from datetime import date, timedelta

    program = tmp_path / "program"
    program.mkdir()
    (program / "Pulumi.yaml").write_text("name: lifecycle\nruntime: python\n")
    (program / "Pulumi.dev.yaml").write_text("config:\n  ember:catalogFile: catalog.json\n")
    (program / "__main__.py").write_text(DEPRECATED_PROGRAM)
    shutdown = date.today() + timedelta(days=20)  # the engine's processes run on the real clock
    (program / "catalog.json").write_text(json.dumps({"models": {"llama-v3p1-8b-instruct": {
        "deprecation_date": str(date.today() - timedelta(days=1)), "shutdown_date": str(shutdown)}}}))
    out = EngineStack(program, tmp_path).pulumi("preview", "--policy-pack", str(REPO / "provider/policy"))
    notice = f"llama-v3p1-8b-instruct is deprecated for serverless use: it shuts down on {shutdown}"
    assert f"warning: Deployment shared: {notice}" in out.stdout, out.stdout
    assert "[advisory]  ember-no-deprecated-serverless-models" in out.stdout and \
        f"Deployment shared: {notice}; move it" in out.stdout, out.stdout


def test_the_programs_virtualenv_named_in_pulumi_yaml_runs_it_and_its_providers(tmp_path):
    """As a user's CI sets it up: no PULUMI_PYTHON_CMD, the virtualenv in Pulumi.yaml's runtime options."""
    import sys

    program = copy_program(REPO / "examples/quickstart", tmp_path / "quickstart")
    assert cli.main(["quickstart", "--stack", str(program / "stack.json")]) == 0
    (program / "Pulumi.yaml").write_text(f"name: venv\nruntime:\n  name: python\n  options:\n"
                                         f"    virtualenv: {sys.prefix}\n")
    stack = EngineStack(program, tmp_path)
    del stack.env["PULUMI_PYTHON_CMD"]
    stack.env["PATH"] = ":".join(p for p in stack.env["PATH"].split(":") if not p.startswith(sys.prefix))
    assert set(stack.preview().values()) == {"create"}  # the program and the dynamic providers' checks ran
    (program / "Pulumi.yaml").write_text("name: venv\nruntime:\n  name: python\n  options:\n"
                                         "    virtualenv: no-such-venv\n")
    out = stack.pulumi("preview", check=False)
    assert out.returncode != 0 and "no-such-venv" in out.stdout + out.stderr
