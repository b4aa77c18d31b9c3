"""The Pulumi resources as the engine sees them (set_mocks): type tokens, typed args, dependencies."""

import asyncio

import pulumi
import pytest

from ember.provider.resources import (Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs,
                                      RequestLoggingArgs, default_id)


class Recorder(pulumi.runtime.Mocks):
    def __init__(self):
        self.resources = {}

    def new_resource(self, args):
        self.resources[args.name] = (args.typ, dict(args.inputs))
        outputs = dict(args.inputs)
        if args.typ.endswith("ember:Model"):
            outputs |= {"name": f"accounts/{args.inputs['account_id']}/models/{args.inputs['model_id']}",
                        "digest": "sha256:" + "a" * 64}
        if args.typ.endswith("ember:Deployment"):
            outputs |= {"name": f"accounts/{args.inputs['account_id']}/deployments/{args.inputs['deployment_id']}"}
        return args.name, outputs

    def call(self, args):
        return {}, None


@pytest.fixture
def mocks():
    recorder = Recorder()
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(recorder, project="test", stack="test", preview=False)
    return recorder


@pulumi.runtime.test
def test_resources_carry_type_tokens_ids_and_dependencies(mocks):
    base = Model("My Base_Model", ModelArgs(account_id="acme", source="models/base"))
    local = Deployment("local", DeploymentArgs(account_id="acme", base_model=base, min_replicas=2, max_replicas=2,
                                               request_logging=RequestLoggingArgs(enabled=True, retention_days=7)))
    addon = LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source="a", deployments=[local]))

    def check(values):
        deployment_name, addon_deployments = values
        typ, inputs = mocks.resources["My Base_Model"]
        assert typ == "pulumi-python:dynamic/ember:Model" and inputs["model_id"] == "my-base-model"
        assert "__provider" in inputs  # the serialized provider travels with the inputs
        typ, inputs = mocks.resources["local"]
        assert typ == "pulumi-python:dynamic/ember:Deployment"
        assert inputs["base_model"] == "accounts/acme/models/my-base-model"
        assert inputs["base_model_digest"] == "sha256:" + "a" * 64
        assert inputs["request_logging"] == {"enabled": True, "retention_days": 7}
        typ, inputs = mocks.resources["pirate"]
        assert typ == "pulumi-python:dynamic/ember:LoRAAddon" and inputs["model_id"] == "pirate"
        assert addon_deployments == [deployment_name] == ["accounts/acme/deployments/local"]

    return pulumi.Output.all(local.name, addon.deployed_on.apply(lambda _: mocks.resources["pirate"][1]["deployments"])).apply(check)


def test_default_ids():
    assert default_id("Tiny Llama!") == "tiny-llama"
    assert default_id("-" * 3) == "resource"
    assert len(default_id("x" * 100)) == 63


def test_a_program_that_raised_half_way_does_not_stall_the_next(tmp_path, mocks):
    import threading

    from ember.provider.runner import OfflineRunner
    from provider_helpers import config

    # a program on its own loop that died before its outputs resolved (nothing awaits them, ever)
    Deployment("orphan", DeploymentArgs(account_id="acme", base_model="accounts/acme/models/base"))
    (tmp_path / "Pulumi.yaml").write_text("name: after\nruntime: python\n")
    (tmp_path / "__main__.py").write_text("import pulumi\npulumi.export('answer', pulumi.Output.from_input(42))\n")
    result = {}
    worker = threading.Thread(daemon=True, target=lambda: result.update(
        OfflineRunner(tmp_path, config=config(tmp_path), log=lambda _: None).up()))
    worker.start()
    worker.join(60)
    assert result == {"answer": 42}
