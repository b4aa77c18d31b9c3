"""A replica's registration in the store, which the gateway routes by: written once it is ready (its address and the
addons it holds), kept fresh, marked draining when it is told to stop, removed as it exits."""

import json
import signal
import time

import httpx
import pytest
from tests.runtime.server_helpers import BASE, PIRATE, POET, start

from ember.provider.domain.records import REGISTRATION_INTERVAL_S, ReplicaRegistration
from ember.runtime.serving.registration import advertised_url


def registrations(root) -> list[ReplicaRegistration]:
    found = []
    for path in (root / "store" / "replicas" / "acme" / "tiny").glob("*.json"):
        try:
            found.append(ReplicaRegistration.model_validate(json.loads(path.read_text())))
        except FileNotFoundError:
            pass
    return found


def wait_for(condition, what: str, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_replica_registers_keeps_it_fresh_drains_and_leaves(tmp_path):
    server = start(tmp_path)  # returns once /health says ready
    try:
        [registration] = registrations(tmp_path)  # registered before it said so: a gateway asked now finds it
        assert registration.url == server.url and registration.state == "ready"
        assert registration.deployment == "accounts/acme/deployments/tiny"
        assert set(registration.served) == {PIRATE, POET}
        first = registration.last_seen
        [again] = wait_for(lambda: [r for r in registrations(tmp_path) if r.last_seen > first], "a fresher one",
                           timeout_s=3 * REGISTRATION_INTERVAL_S)
        assert again.replica == registration.replica
        key = server.keys["acme"]
        with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          timeout=60, json={"model": BASE, "prompt": "hi", "max_tokens": 300, "ignore_eos": True,
                                            "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            server.process.send_signal(signal.SIGTERM)  # told to stop while it streams
            [draining] = wait_for(lambda: [r for r in registrations(tmp_path) if r.state == "draining"], "draining")
            assert draining.url == server.url
            assert list(lines)[-2:] == ["data: [DONE]", ""]  # the stream it runs finishes
        server.process.wait(timeout=30)
        assert registrations(tmp_path) == []  # removed as it exits
    finally:
        server.stop()


def test_only_a_replica_that_knows_its_address_registers():
    assert advertised_url("127.0.0.1", 8000, None) == "http://127.0.0.1:8000"
    assert advertised_url("::1", 8000, None) == "http://[::1]:8000"
    assert advertised_url("0.0.0.0", 8000, None) is None  # every interface: which one the gateway reaches is unknown
    assert advertised_url("0.0.0.0", 8000, "http://10.1.2.3:8000/") == "http://10.1.2.3:8000"
