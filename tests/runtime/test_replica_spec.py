"""One replica spec: a deployment's spec file becomes the runtime's configs, the hand flags build the same spec, and a
bad one is refused naming the field and its value."""

import inspect
import json

import fsspec
import pytest

from ember.provider.domain.accounts import DeploymentAccess
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.replica_spec import (DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, ReplicaSpec, replica_spec,
                                                serve_command, write_replica_spec)
from ember.provider.domain.store_layout import StoreLayout
from ember.provider.tools import cli
from ember.runtime.__main__ import build_parser, replica_spec_of
from ember.runtime.engine.engine import EngineConfig
from ember.runtime.lora.manager import LoRAManager
from ember.runtime.serving.replica_config import ProcessOptions, server_config

STORE = StoreLayout("s3://bucket/ember")
HAND = ["serve", "--model-dir", "/models/tiny", "--deployment", "accounts/acme/deployments/tiny",
        "--base-model", "accounts/acme/models/tiny-llama", "--keys", "/s/keys.json", "--usage", "/s/usage",
        "--store", "/s", "--desired-addons", "/s/addons.json", "--addon=accounts/acme/models/pirate=/a/pirate",
        "--max-queue", "3", "--max-loras", "4", "--max-lora-rank", "8", "--max-model-len", "512", "--dtype", "int8",
        "--no-prefix-caching", "--request-log", "/logs/requests.jsonl", "--retention-days", "7"]


def spec_of(argv: list[str]) -> ReplicaSpec:
    return replica_spec_of(build_parser().parse_args(argv))


def test_a_deployment_round_trips_through_its_spec_file_to_the_runtime_configs(tmp_path):
    deployment = DeploymentSpec(account_id="acme", deployment_id="tiny", base_model="accounts/acme/models/tiny-llama",
                                precision="int8", max_loras=4, max_lora_rank=16,
                                request_logging={"enabled": True, "retention_days": 7})
    spec = replica_spec(deployment, "/models/tiny", STORE, "/logs/requests.jsonl")
    path = tmp_path / "replica.json"
    write_replica_spec(spec, path)
    assert json.loads(path.read_text())["precision"] == "int8"  # one name in the spec, the file and the engine
    read = spec_of(serve_command(str(path)))
    assert read == spec
    config = server_config(read, ProcessOptions())
    assert config.deployment == DeploymentAccess("accounts/acme/deployments/tiny", "acme",
                                                 "accounts/acme/models/tiny-llama", False)
    assert (config.model_dir, config.keys_url, config.usage_url, config.store_url, config.desired_addons_url) == (
        "/models/tiny", "s3://bucket/ember/keys.json", "s3://bucket/ember/usage", "s3://bucket/ember",
        "s3://bucket/ember/deployments/acme/tiny/addons.json")
    assert (config.request_log_url, config.retention_days) == ("/logs/requests.jsonl", 7)
    assert (config.accelerator_type, config.accelerator_count) == ("CPU", 1)
    engine = config.engine
    assert (engine.precision, engine.max_loras, engine.max_lora_rank, engine.prefix_caching) == ("int8", 4, 16, True)
    assert engine.max_num_seqs == EngineConfig().max_num_seqs  # a knob the spec leaves unset keeps the engine's

    # an fsspec URL reads the same; a deployment without the opt-in names no request log
    with fsspec.open("memory://ember/replica.json", "w") as f:
        without = DeploymentSpec.model_validate(deployment.model_dump() | {"request_logging": {}})
        f.write(replica_spec(without, "/m", STORE, None).to_json())
    assert spec_of(serve_command("memory://ember/replica.json")).request_log is None
    with pytest.raises(ValueError, match="request_log: accounts/acme/deployments/tiny opts in"):
        replica_spec(deployment, "/m", STORE, None)


def test_hand_flags_and_a_spec_file_give_the_same_configs(tmp_path):
    by_hand = spec_of(HAND)
    assert by_hand.precision.value == "int8" and by_hand.addons == {"accounts/acme/models/pirate": "/a/pirate"}
    assert spec_of([("--precision" if a == "--dtype" else a) for a in HAND]) == by_hand  # --dtype is an alias
    path = tmp_path / "replica.json"
    write_replica_spec(by_hand, path)
    from_file = spec_of(serve_command(str(path)))
    assert from_file == by_hand
    process = ProcessOptions(reconcile_interval_s=5.0)
    assert server_config(from_file, process) == server_config(by_hand, process)


@pytest.mark.parametrize("change, said", [
    ({"precision": "fp64"}, "precision: Input should be 'fp32', 'bf16', 'fp16', 'int8', 'int4' or 'fp8' (got 'fp64')"),
    ({"max_loras": -1}, "max_loras: Input should be greater than or equal to 0 (got -1)"),
    ({"max_lora": 8}, "max_lora: is not a known property (got 8)"),
    ({"deployment": "acme/tiny"}, "deployment: "),
    ({"request_log": {"url": "/l", "retention_days": 400}}, "request_log.retention_days: "),
    # a provider newer than this runtime: said so, before any field it does not know is named
    ({"version": 2, "autoscale": True}, "version: this runtime reads replica spec version 1, not 2: run a runtime as "
                                        "new as the provider that wrote it"),
])
def test_a_bad_spec_file_is_refused_naming_the_field_and_value(tmp_path, capsys, change, said):
    path = tmp_path / "replica.json"
    deployment = DeploymentSpec(account_id="acme", deployment_id="tiny", base_model="accounts/acme/models/tiny-llama")
    good = json.loads(replica_spec(deployment, "/m", STORE, None).to_json())
    path.write_text(json.dumps(good | change))
    assert cli.main(["serve", "--replica-spec", str(path)]) == 2  # `ember serve`, before any torch is loaded
    err = capsys.readouterr().err
    assert f"--replica-spec {path}: {said}" in err, err


@pytest.mark.parametrize("argv, said", [
    (["--replica-spec", "x.json", "--max-loras", "2"], "--max-loras: not with --replica-spec"),
    (["--replica-spec", "/no/such/replica.json"], "--replica-spec /no/such/replica.json: cannot be read"),
    ([a for a in HAND if a not in ("--model-dir", "/models/tiny")][1:], "--model-dir: is required"),
    (HAND[1:] + ["--max-lora-rank", "1000"], "--max-lora-rank: Input should be less than or equal to 256 (got 1000)"),
    ([a for a in HAND if a not in ("--retention-days", "7")][1:], "--request-log needs --retention-days"),
    (HAND[1:] + ["--addon", "pirate"], "--addon 'pirate': use NAME=SOURCE"),
])
def test_bad_serve_arguments_are_refused_naming_the_flag(capsys, argv, said):
    from ember.runtime.__main__ import main

    assert main(["serve", *argv]) == 2
    assert said in capsys.readouterr().err


def test_each_lora_default_is_named_once():
    deployment = DeploymentSpec(account_id="a", deployment_id="d", base_model="accounts/a/models/m")
    manager = inspect.signature(LoRAManager.__init__).parameters
    assert deployment.max_loras == ReplicaSpec.model_fields["max_loras"].default == manager["max_loras"].default \
        == DEFAULT_MAX_LORAS
    assert deployment.max_lora_rank == ReplicaSpec.model_fields["max_lora_rank"].default == \
        EngineConfig().max_lora_rank == manager["max_rank"].default == DEFAULT_MAX_LORA_RANK
    args = build_parser().parse_args(HAND[:11])  # the flags leave unset what they were not given: the spec's applies
    assert (args.max_loras, args.max_lora_rank, args.max_queue, args.precision) == (None, None, None, None)
    spec = spec_of(HAND[:11])
    assert (spec.max_loras, spec.max_lora_rank) == (DEFAULT_MAX_LORAS, DEFAULT_MAX_LORA_RANK)
