"""The Gateway resource: its check, one per store, its process on the local cluster (kept across updates, restarted
when its port moves or it died), settings read again without a restart, and what `up` says of a store it cannot read."""

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from tests.provider.provider_helpers import alive, config, gateway_pid, provider, store_entries
from tests.runtime.gateway_helpers import free_port

from ember.provider.providers.base import EmberError


def checked(cfg, props: dict) -> dict:
    result = provider("Gateway", cfg).check({}, props)
    assert not result.failures, result.failures
    return result.inputs


def failures(cfg, props: dict) -> dict[str, str]:
    return {f.property: f.reason for f in provider("Gateway", cfg).check({}, props).failures}


def test_check_names_the_field_and_value(tmp_path):
    cfg = config(tmp_path)
    assert failures(cfg, {"account_id": "platform", "port": 80.0}) == {
        "port": "Input should be greater than or equal to 1024 (got 80)"}
    assert failures(cfg, {"account_id": "platform", "cluster": "kubernetes", "replicas": 1.0}) == {
        "replicas": "1 is too few on Kubernetes: at least 2 keep the endpoint up while a pod goes"}
    assert failures(cfg, {"account_id": "platform", "cluster": "kubernetes", "port": 9000.0})["port"].startswith(
        "9000 given, but a Kubernetes gateway")
    assert "account_rate_limits.Acme" in failures(cfg, {"account_id": "platform",
                                                        "account_rate_limits": {"Acme": {"requests_per_minute": 5}}})
    assert failures(cfg, {"account_id": "platform", "rate_limits": {"requests_per_minute": 0.0}}) == {
        "rate_limits.requests_per_minute": "Input should be greater than or equal to 1 (got 0)"}
    # numbers arrive as floats from the engine and are normalised; a reformatted input is no change
    inputs = checked(cfg, {"account_id": "platform", "gateway_id": "front", "max_attempts": 2.0,
                           "account_rate_limits": {"acme": {"tokens_per_minute": 5000.0}}})
    assert inputs["max_attempts"] == 2 and inputs["account_rate_limits"] == {"acme": {"tokens_per_minute": 5000}}
    assert provider("Gateway", cfg).diff("x", inputs, dict(inputs)).changes is False
    changed = provider("Gateway", cfg).diff("x", inputs, inputs | {"max_attempts": 3})
    assert changed.changes and not changed.replaces  # settings change in place
    assert provider("Gateway", cfg).diff("x", inputs, inputs | {"gateway_id": "other"}).replaces == ["gateway_id"]


@pytest.mark.slow
def test_a_local_gateway_runs_keeps_its_process_across_updates_and_is_one_per_store(tmp_path):
    cfg = config(tmp_path)
    gateways = provider("Gateway", cfg)
    inputs = checked(cfg, {"account_id": "platform", "gateway_id": "front"})
    created = gateways.create(inputs)
    try:
        url, pid = created.outs["url"], gateway_pid(cfg, "platform", "front")
        assert created.outs["state"] == "READY" and httpx.get(f"{url}/health").json() == {"status": "ready"}
        # a second gateway in the same store is refused, naming the first, and touches nothing of it
        with pytest.raises(EmberError, match="has a gateway already, accounts/platform/gateways/front"):
            gateways.create(checked(cfg, {"account_id": "other", "gateway_id": "second"}))
        assert alive(pid) and gateway_pid(cfg, "other", "second") is None
        # new limits: the record changes and the same process reads them (no restart)
        limited = checked(cfg, {"account_id": "platform", "gateway_id": "front",
                                "rate_limits": {"requests_per_minute": 7}})
        assert gateways.update("x", created.outs, limited).outs["url"] == url and gateway_pid(cfg, "platform",
                                                                                              "front") == pid
        record = json.loads((cfg.state_dir / "store" / "gateways" / "platform" / "front.json").read_text())
        assert record["spec"]["rate_limits"]["requests_per_minute"] == 7
        # a killed gateway is drift; the next up starts it again on its port
        os.kill(pid, signal.SIGKILL)
        read = gateways.read("accounts/platform/gateways/front", created.outs)
        assert read.outs["state"] == "FAILED" and gateways.diff("x", read.outs, limited).changes
        again = gateways.update("x", read.outs, limited)
        assert again.outs["url"] == url and gateway_pid(cfg, "platform", "front") != pid
        # Gateway.get reads it by name
        got = gateways.read("accounts/platform/gateways/front", {"account_id": "platform", "gateway_id": "front"})
        assert got.outs["url"] == url
        # a port of the user's: the gateway moves there (an update, with a restart)
        port = free_port()
        moved = gateways.update("x", again.outs, checked(cfg, {"account_id": "platform", "gateway_id": "front",
                                                                "port": port}))
        assert moved.outs["url"] == f"http://127.0.0.1:{port}" and httpx.get(f"{moved.outs['url']}/health").is_success
        created, pid = moved, gateway_pid(cfg, "platform", "front")
    finally:
        gateways.delete("x", created.outs)
    assert store_entries(cfg) == [] and gateway_pid(cfg, "platform", "front") is None and not alive(pid)


@pytest.mark.slow
def test_up_says_when_the_gateway_cannot_read_the_store_and_leaves_nothing(tmp_path):
    cfg = config(tmp_path)
    # a document the gateway must read that cannot be read (a folder where a record should be)
    (Path(cfg.state_dir) / "store" / "deployments" / "acme" / "prod" / "deployment.json").mkdir(parents=True)
    with pytest.raises(EmberError, match="cannot serve: cannot read the store"):
        provider("Gateway", cfg).create(checked(cfg, {"account_id": "platform", "gateway_id": "front"}))
    assert gateway_pid(cfg, "platform", "front") is None
    assert not (cfg.state_dir / "store" / "gateways" / "platform" / "front.json").exists()


def test_a_program_declares_one_gateway():
    import asyncio

    import pulumi

    from ember.provider.resources import Gateway, GatewayArgs, ProgramError

    class Mocks(pulumi.runtime.Mocks):
        def new_resource(self, args):
            return args.name, dict(args.inputs)

        def call(self, args):
            return {}, None

    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_mocks(Mocks(), project="p", stack="s", preview=True)
    Gateway("front", GatewayArgs(account_id="platform"))
    with pytest.raises(ProgramError, match="Gateway back: gateway_id: this program declares a gateway already, front"):
        Gateway("back", GatewayArgs(account_id="platform"))
