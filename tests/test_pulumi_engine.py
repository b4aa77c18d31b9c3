"""The engine conformance suite: programs through the real Pulumi CLI and through Ember's offline runner,
which must plan the same step for every resource (the engine is the judge)."""

import json
import urllib.request
from pathlib import Path

import pytest
from engine_helpers import EngineStack, copy_program, offline_preview, requires_pulumi
from provider_helpers import alive, config, make_models, replica_pids, store_entries

from ember.provider.tools import cli
from ember.provider.tools.runner import OfflineRunner, RunError
from ember.runtime import tinymodels

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.engine, pytest.mark.slow, requires_pulumi]

PROGRAM = '''
import json
import pulumi
from ember.provider import Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

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
pulumi.export("endpoint", local.endpoints.apply(lambda e: e[0] if e else None))
'''
SETTINGS = {"model_id": "base", "base_source": "models/base", "description": "first", "replicas": 1,
            "max_lora_rank": 64, "accelerator": "CPU", "precision": "fp32", "deployment_type": "dedicated",
            "second_deployment": False, "addons": {"pirate": "models/pirate", "poet": "models/poet"}}
# (edit, the step each resource gets, or the check failure both must refuse it with)
EDITS = [
    ({"description": "second"}, {"base": "update", "local": "same", "pirate": "same", "poet": "same"}),
    ({"addons": {"pirate": "models/pirate-r16", "poet": "models/poet"}}, {"pirate": "replace", "poet": "same"}),
    ({"addons": {"pirate": "models/pirate-r16"}}, {"pirate": "same", "poet": "delete"}),
    ({"addons": {"pirate": "models/pirate-r16", "poet": "models/poet"}}, {"poet": "create"}),
    ({"replicas": 2}, {"base": "same", "local": "update", "pirate": "same"}),
    ({"accelerator": "NVIDIA_H100_80GB"}, "the local cluster runs CPU replicas only"),
    ({"precision": "bf16"}, {"local": "replace", "pirate": "same", "poet": "same"}),
    ({"deployment_type": "serverless"}, "only catalog models are served serverless"),
    ({"max_lora_rank": 16}, {"local": "replace", "pirate": "same"}),
    ({"second_deployment": True}, {"second": "create", "pirate": "update", "poet": "update"}),
    ({"base_source": "models-b/base"}, {"base": "replace", "local": "replace", "second": "replace",
                                        "pirate": "replace", "poet": "replace"}),
    ({"model_id": "renamed"}, {"base": "replace", "local": "replace", "pirate": "replace"}),
]


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
    engine_program = make_program(tmp_path / "engine")
    offline_program = copy_program(engine_program, tmp_path / "offline" / "program")
    stack = EngineStack(engine_program, tmp_path / "engine")
    cfg = config(tmp_path / "offline")
    runner = lambda: OfflineRunner(offline_program, config=cfg, log=lambda _: None)  # noqa: E731
    settings = dict(SETTINGS)

    def write(settings):
        for program in (engine_program, offline_program):
            (program / "settings.json").write_text(json.dumps(settings))

    try:
        write(settings)
        first = stack.preview()
        assert first == offline_preview(runner()) and set(first.values()) == {"create"}
        stack.up()
        runner().up()
        for edit, expected in EDITS:
            candidate = settings | edit
            write(candidate)
            if isinstance(expected, str):  # refused at preview by both, and nothing changes
                out = stack.pulumi("preview", check=False)
                assert out.returncode != 0 and expected in out.stdout + out.stderr, (edit, out.stdout)
                with pytest.raises(RunError, match=expected):
                    runner().up(preview=True)
                write(settings)
                continue
            engine, offline = stack.preview(), offline_preview(runner())
            assert engine == offline, f"{edit}: engine {engine} != offline {offline}"
            assert {k: v for k, v in by_name(engine).items() if k in expected} == expected, (edit, engine)
            stack.up()
            runner().up()
            settings = candidate
            assert set(stack.preview().values()) == {"same"}, edit  # converged
    finally:
        stack.pulumi("destroy", "--yes", check=False)
        runner().destroy()


def test_quickstart_up_refresh_policy_and_destroy_through_the_engine(tmp_path):
    program = copy_program(REPO / "examples/quickstart", tmp_path / "quickstart")
    assert cli.main(["quickstart", "--stack", str(program / "stack.json")]) == 0
    stack = EngineStack(program, tmp_path)
    cfg = config(tmp_path)
    state = program / ".ember"
    try:
        assert set(stack.preview().values()) == {"create"}
        stack.up()
        endpoint = stack.pulumi("stack", "output", "endpoint").stdout.strip()
        with urllib.request.urlopen(f"{endpoint}/health", timeout=10) as response:
            assert set(json.loads(response.read())["addons"]) == {
                "accounts/quickstart/models/tiny-llama-pirate", "accounts/quickstart/models/tiny-llama-poet"}
        stack.pulumi("preview", "--expect-no-changes")
        stack.pulumi("refresh", "--yes", "--expect-no-changes")
        policy = stack.pulumi("preview", "--policy-pack", str(REPO / "provider/policy"))
        assert "ember@v0.1.0" in policy.stdout
        pids = replica_pids(cfg.__class__(state, f"file://{state / 'store'}"), "quickstart", "tiny-llama-local")
        assert pids and all(alive(p) for p in pids)
        stack.pulumi("destroy", "--yes")
        assert not any(alive(p) for p in pids)
        assert store_entries(cfg.__class__(state, "")) == []
    finally:
        stack.pulumi("destroy", "--yes", check=False)
