"""The dynamic-provider gRPC server the Pulumi engine starts, driven as the engine drives it."""

import asyncio
import subprocess
import sys

import grpc
import pytest
from google.protobuf import struct_pb2
from tests.provider.provider_helpers import config, make_models, store_entries
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime import rpc
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

from ember.provider.providers.base import has_unknown
from ember.provider.providers.deployment import DeploymentProvider
from ember.provider.providers.lora_addon import LoRAAddonProvider
from ember.provider.providers.model import ModelProvider


@pytest.fixture(scope="module")
def stub():
    process = subprocess.Popen([sys.executable, "-u", "-m", "pulumi.dynamic"], stdout=subprocess.PIPE, text=True)
    port = process.stdout.readline().strip()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield provider_pb2_grpc.ResourceProviderStub(channel)
    channel.close()
    process.terminate()
    process.wait(timeout=10)


def struct(props: dict) -> struct_pb2.Struct:
    return asyncio.run(rpc.serialize_properties(props, {}))


def plain(message) -> dict:
    return rpc.deserialize_properties(message, keep_unknowns=True)


def configure(stub, cfg) -> None:
    stub.Configure(provider_pb2.ConfigureRequest(args=struct({"ember:stateDir": str(cfg.state_dir),
                                                              "ember:storeUrl": cfg.store_url})))


TYPE = "pulumi-python:dynamic/ember:"


def test_check_normalises_floats_and_reports_failures_by_property(stub, tmp_path):
    configure(stub, config(tmp_path))
    provider = serialize_provider(DeploymentProvider())
    news = {"__provider": provider, "account_id": "acme", "deployment_id": "prod",
            "base_model": "accounts/acme/models/m", "min_replicas": 2.0, "max_replicas": 4.0, "max_lora_rank": 32.0}
    response = stub.Check(provider_pb2.CheckRequest(urn=f"urn:{TYPE}Deployment::prod", type=f"{TYPE}Deployment",
                                                    olds=struct({}), news=struct(news)))
    assert list(response.failures) == []
    inputs = plain(response.inputs)
    assert inputs["min_replicas"] == 2 and inputs["precision"] == "fp32"
    bad = stub.Check(provider_pb2.CheckRequest(type=f"{TYPE}Deployment", olds=struct({}),
                                               news=struct(news | {"max_replicas": 1.0, "accelerator_count": 2.5})))
    failures = {f.property: f.reason for f in bad.failures}
    assert "accelerator_count" in failures and "(got 2.5)" in failures["accelerator_count"]


def test_unknowns_during_preview(stub, tmp_path):
    configure(stub, config(tmp_path))
    provider = serialize_provider(LoRAAddonProvider())
    news = {"__provider": provider, "account_id": "acme", "model_id": "pirate", "base_model": rpc.UNKNOWN,
            "source": rpc.UNKNOWN, "deployments": [rpc.UNKNOWN]}
    response = stub.Check(provider_pb2.CheckRequest(type=f"{TYPE}LoRAAddon", olds=struct({}), news=struct(news)))
    assert list(response.failures) == []
    assert has_unknown(plain(response.inputs)["base_model"])
    olds = {"__provider": provider, "account_id": "acme", "model_id": "pirate", "base_model": "accounts/acme/models/b",
            "source": "/x", "deployments": []}
    diff = stub.Diff(provider_pb2.DiffRequest(id="x", olds=struct(olds), news=struct(news)))
    assert diff.changes == provider_pb2.DiffResponse.DIFF_SOME and "base_model" in diff.replaces


def test_create_read_update_delete_a_model(stub, tmp_path):
    cfg = config(tmp_path)
    configure(stub, cfg)
    models = make_models(tmp_path / "models")
    provider = serialize_provider(ModelProvider())
    news = {"__provider": provider, "account_id": "acme", "model_id": "base", "source": str(models["base"])}
    checked = stub.Check(provider_pb2.CheckRequest(type=f"{TYPE}Model", olds=struct({}), news=struct(news)))
    inputs = plain(checked.inputs)
    created = stub.Create(provider_pb2.CreateRequest(type=f"{TYPE}Model", properties=checked.inputs))
    outputs = plain(created.properties)
    assert created.id == "accounts/acme/models/base" and outputs["state"] == "READY"
    assert outputs["parameter_count"] == 156480 and outputs["digest"].startswith("sha256:")
    read = stub.Read(provider_pb2.ReadRequest(id=created.id, properties=created.properties))
    assert plain(read.properties)["state"] == "READY"
    changed = inputs | {"description": "now described"}
    diff = stub.Diff(provider_pb2.DiffRequest(id=created.id, olds=created.properties, news=struct(changed)))
    assert diff.changes == provider_pb2.DiffResponse.DIFF_SOME and list(diff.replaces) == []
    updated = stub.Update(provider_pb2.UpdateRequest(id=created.id, olds=created.properties, news=struct(changed)))
    assert plain(updated.properties)["description"] == "now described"
    assert plain(updated.properties)["digest"] == outputs["digest"]
    stub.Delete(provider_pb2.DeleteRequest(id=created.id, properties=updated.properties))
    assert store_entries(cfg) == []
    gone = stub.Read(provider_pb2.ReadRequest(id=created.id, properties=updated.properties))
    assert gone.id == ""


def test_check_judges_the_references_a_program_sends(stub, tmp_path):
    """Issue 12 item 3 over the wire: an addon on a deployment of another base is refused at preview."""
    configure(stub, config(tmp_path))
    models = make_models(tmp_path / "models")
    provider = serialize_provider(LoRAAddonProvider())
    target = "accounts/acme/deployments/other"
    news = {"__provider": provider, "account_id": "acme", "model_id": "pirate", "base_model": "accounts/acme/models/base",
            "source": str(models["pirate"]), "deployments": [target],
            "references": {"base_model": {"declared": True, "source": str(models["base"])},
                           "deployments": {target: {"base_model": "accounts/acme/models/b2", "max_lora_rank": 64.0,
                                                    "cluster": "local"}}}}
    response = stub.Check(provider_pb2.CheckRequest(type=f"{TYPE}LoRAAddon", olds=struct({}), news=struct(news)))
    assert {f.property: f.reason for f in response.failures} == {
        "deployments[0]": f"{target} serves base model accounts/acme/models/b2, not this addon's base "
                          f"accounts/acme/models/base; attach it to a deployment of accounts/acme/models/base"}
    # ignore_changes=["source_digest"]: the engine sends the old digest in the news; check keeps it
    model = {"__provider": serialize_provider(ModelProvider()), "account_id": "acme", "model_id": "base",
             "source": str(models["base"]), "source_digest": "sha256:" + "0" * 64}
    response = stub.Check(provider_pb2.CheckRequest(type=f"{TYPE}Model", olds=struct({}), news=struct(model)))
    assert list(response.failures) == [] and plain(response.inputs)["source_digest"] == "sha256:" + "0" * 64
