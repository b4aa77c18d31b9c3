"""The Pulumi resources as the engine sees them (set_mocks): type tokens, typed args, dependencies."""

import asyncio
import dataclasses

import pulumi
import pytest

import ember.provider
from ember.provider import RequestLoggingArgs, resources
from ember.provider.domain.kinds.dataset import DatasetOutputs, DatasetSpec
from ember.provider.domain.kinds.deployment import AutoscalingPolicy, DeploymentOutputs, DeploymentSpec, RequestLogging
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobOutputs, FineTuningJobSpec
from ember.provider.domain.kinds.lora_addon import LoRAAddonOutputs, LoRAAddonSpec
from ember.provider.domain.kinds.model import ModelOutputs, ModelSpec
from ember.provider.resources import Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs, default_id
from ember.provider.tools import args_sdk


class Recorder(pulumi.runtime.Mocks):
    def __init__(self):
        self.resources = {}

    def new_resource(self, args):
        self.resources[args.name] = (args.typ, dict(args.inputs))
        outputs = dict(args.inputs)
        if args.typ.endswith("ember:Model"):
            outputs |= {"name": f"accounts/{args.inputs['account_id']}/models/{args.inputs['model_id']}",
                        "digest": "sha256:" + "b" * 64, "source_digest": "sha256:" + "a" * 64}
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
        # the resource as its stack knows it: a replacement takes over only its own stack's name
        assert inputs["references"] == {"base_model": {"declared": True, "source": "models/base"},
                                        "owner": f"{pulumi.get_organization()}/{pulumi.get_project()}/"
                                                 f"{pulumi.get_stack()}/local"}
        typ, inputs = mocks.resources["pirate"]
        assert typ == "pulumi-python:dynamic/ember:LoRAAddon" and inputs["model_id"] == "pirate"
        assert addon_deployments == [deployment_name] == ["accounts/acme/deployments/local"]
        assert inputs["references"]["deployments"] == {"accounts/acme/deployments/local": {
            "base_model": "accounts/acme/models/my-base-model", "max_lora_rank": 64, "cluster": "local"}}

    return pulumi.Output.all(local.name, addon.deployed_on.apply(lambda _: mocks.resources["pirate"][1]["deployments"])).apply(check)


def test_default_ids():
    assert default_id("Tiny Llama!") == "tiny-llama"
    assert default_id("-" * 3) == "resource"
    assert len(default_id("x" * 100)) == 63


def test_a_program_that_raised_half_way_does_not_stall_the_next(tmp_path, mocks):
    import threading

    from tests.provider.provider_helpers import config

    from ember.provider.tools.runner import OfflineRunner

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


class PreviewOfAnUpdate(pulumi.runtime.Mocks):
    """The engine's preview of a dynamic resource's update: its outputs are its inputs, nothing more."""

    def __init__(self):
        self.resources = {}

    def new_resource(self, args):
        self.resources[args.name] = dict(args.inputs)
        return args.name, dict(args.inputs)  # no name, no digest: in preview those outputs are unknown

    def call(self, args):
        return {}, None


@pulumi.runtime.test
def test_references_are_known_in_a_preview_of_an_update():
    """Issue 12 item 5: a Model edit that keeps its weights must not make its dependents' inputs unknown."""
    mocks = PreviewOfAnUpdate()
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(mocks, project="test", stack="test", preview=True)
    base = Model("base", ModelArgs(account_id="acme", source="models/base", description="edited"))
    remote = Model("remote", ModelArgs(account_id="acme", source="s3://bucket/weights/"))
    local = Deployment("local", DeploymentArgs(account_id="acme", base_model=base))
    addon = LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source="a", deployments=[local]))
    on_remote = Deployment("on-remote", DeploymentArgs(account_id="acme", base_model=remote))

    def check(_):
        assert mocks.resources["local"]["base_model"] == "accounts/acme/models/base"
        assert mocks.resources["pirate"]["base_model"] == "accounts/acme/models/base"
        assert mocks.resources["pirate"]["deployments"] == ["accounts/acme/deployments/local"]
        assert mocks.resources["on-remote"]["base_model_digest"] == "source:s3://bucket/weights"

    return pulumi.Output.all(local.urn, addon.urn, on_remote.urn).apply(check)


@pulumi.runtime.test
def test_duplicate_model_ids_are_refused_in_the_program(mocks):
    """Issue 12 item 4: two Models (or a Model and an addon) with one ID; the second is refused by name."""
    Model("first", ModelArgs(account_id="acme", model_id="shared", source="models/base"))
    with pytest.raises(ValueError, match="model_id: accounts/acme/models/shared is already declared by Model first; "
                                         "model IDs are globally unique"):
        Model("second", ModelArgs(account_id="acme", model_id="shared", source="models/other"))
    with pytest.raises(ValueError, match="already declared by Model first"):
        LoRAAddon("shared", LoRAAddonArgs(account_id="acme", base_model="accounts/acme/models/x", source="a"))


def test_the_checked_in_args_are_what_the_specs_generate():
    """Issue 29: a field is written once, in its kind's spec; args.py is generated from it (regenerate with
    `python -m ember.provider.tools.args_sdk`)."""
    assert args_sdk.ARGS_FILE.read_text() == args_sdk.generate(), "stale: run python -m ember.provider.tools.args_sdk"


# The program's typed Args and the spec that validates them are two views of one resource: pinned here.
ARGS_AND_SPECS = [(resources.ModelArgs, ModelSpec), (resources.DeploymentArgs, DeploymentSpec),
                  (resources.LoRAAddonArgs, LoRAAddonSpec), (ember.provider.AutoscalingPolicyArgs, AutoscalingPolicy),
                  (ember.provider.RequestLoggingArgs, RequestLogging), (resources.DatasetArgs, DatasetSpec),
                  (resources.FineTuningJobArgs, FineTuningJobSpec)]


@pytest.mark.parametrize("args, spec_cls", ARGS_AND_SPECS, ids=lambda c: c.__name__)
def test_args_have_the_fields_of_the_spec(args, spec_cls):
    fields = {f.name: f for f in dataclasses.fields(args)}
    # `kind` is implied by the resource class (a Model is a base model, a LoRAAddon an addon)
    assert set(fields) == set(spec_cls.model_fields) - {"kind"}
    required = {name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required == {name for name, f in spec_cls.model_fields.items() if f.is_required()}


def test_the_public_api_is_every_kind_its_args_and_the_kubernetes_components():
    namespace = {}
    exec("from ember.provider import *", namespace)
    public = {name for name in namespace if not name.startswith("__")}
    assert public == set(ember.provider.__all__) == {
        "Model", "ModelArgs", "LoRAAddon", "LoRAAddonArgs", "Deployment", "DeploymentArgs", "Dataset", "DatasetArgs",
        "FineTuningJob", "FineTuningJobArgs", "Gateway", "GatewayArgs", "ApiKey", "ApiKeyArgs", "AutoscalingPolicyArgs",
        "RequestLoggingArgs",
        "KubernetesWorkloadArgs", "RateLimitsArgs", "AccountRateLimitsArgs", "KubernetesDeployment", "KubernetesArgs",
        "KubernetesFineTuningJob", "KubernetesGateway", "KubernetesGatewayArgs"}


@pytest.mark.parametrize("resource, outputs", [(resources.Model, ModelOutputs), (resources.Deployment, DeploymentOutputs),
                                               (resources.LoRAAddon, LoRAAddonOutputs),
                                               (resources.Dataset, DatasetOutputs),
                                               (resources.FineTuningJob, FineTuningJobOutputs)],
                         ids=lambda c: c.__name__)
def test_resource_outputs_are_the_spec_outputs(resource, outputs):
    typed = [name for name, kind in resource.__annotations__.items() if str(kind).startswith("pulumi.Output")]
    assert sorted(typed) == sorted(outputs.model_fields) and resource._OUTPUTS == list(outputs.model_fields)
