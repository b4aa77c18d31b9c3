"""Every edit of a live stack, with clients calling through the gateway all along: none of their requests fails, every
answer is whole, and each is metered exactly once. Also: a replica killed during a replacement, and a deployment that
scales to zero and back under the same loop. (The same loop through the real Pulumi CLI: tests/engine.)"""

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.e2e.traffic import TrafficLoop, failures, metered_ids
from tests.provider.provider_helpers import alive, config, make_models, replica_pids

from ember.provider.tools.runner import OfflineRunner
from ember.runtime.devtools import tinymodels

pytestmark = pytest.mark.slow

BASE, PIRATE = "accounts/acme/models/base", "accounts/acme/models/pirate"
PROGRAM = '''
import json
import pulumi
from ember.provider import Deployment, DeploymentArgs, Gateway, GatewayArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

s = json.load(open("settings.json"))
base = Model("base", ModelArgs(account_id="acme", source="models/base", description=s["description"]))
prod = Deployment("prod", DeploymentArgs(account_id="acme", base_model=base, min_replicas=s["min_replicas"],
                                         max_replicas=s["max_replicas"], max_loras=2, precision=s["precision"],
                                         autoscaling=s["autoscaling"], traffic_weight=s["prod_weight"]))
targets = [prod]
if s["canary"]:
    targets.append(Deployment("canary", DeploymentArgs(account_id="acme", base_model=base, max_loras=2,
                                                       traffic_weight=s["canary_weight"])))
LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source=s["pirate"],
                                  deployments=targets if s["pirate_on_canary"] else [prod]))
gateway = Gateway("front", GatewayArgs(account_id="platform", rate_limits={"requests_per_minute": 100000,
                                                                           "tokens_per_minute": 10000000}))
pulumi.export("gateway", gateway.url)
'''
SETTINGS = {"description": "first", "min_replicas": 1, "max_replicas": 1, "precision": "fp32", "autoscaling": {},
            "prod_weight": 100, "canary": False, "canary_weight": 100, "pirate": "models/pirate",
            "pirate_on_canary": False}
# (what changes, the settings it changes, the step it is for the deployment or addon)
EDITS = [
    ("an addon's new weights", {"pirate": "models/pirate-v2"}),
    ("a deployment's replacement (precision)", {"precision": "bf16"}),
    ("replica count 1 → 2", {"min_replicas": 2, "max_replicas": 2}),
    ("a model description", {"description": "second"}),
    ("a deployment added beside", {"canary": True}),
    ("an addon attached to it", {"pirate_on_canary": True}),
    ("a canary split 90/10", {"prod_weight": 90, "canary_weight": 10}),
    ("the canary at 100/0", {"prod_weight": 100, "canary_weight": 0}),
    ("the addon detached from it", {"pirate_on_canary": False}),
    ("autoscaling on (1 to 2)", {"min_replicas": 1, "max_replicas": 2,
                                 "autoscaling": {"target_concurrent_requests": 1, "scale_up_window_s": 0,
                                                 "scale_down_window_s": 5}}),
]


def write_program(root: Path) -> Path:
    program = root / "program"
    models = make_models(program / "models")
    tinymodels.make_lora(models["base"], program / "models" / "pirate-v2", rank=4, seed=11)
    (program / "Pulumi.yaml").write_text("name: without-downtime\nruntime: python\n")
    (program / "__main__.py").write_text(PROGRAM)
    return program


def live_replicas(cfg) -> list[int]:
    return [p for p in replica_pids(cfg, "acme", "prod") if alive(p)]


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.2)


def key(cfg, account: str) -> str:
    return (cfg.state_dir / "keys" / f"{account}.key").read_text().strip()


def test_every_edit_of_a_live_stack_fails_no_request_and_meters_each_once(tmp_path):
    program, cfg = write_program(tmp_path), config(tmp_path)
    runner = OfflineRunner(program, config=cfg, log=lambda _: None)
    settings = dict(SETTINGS)
    (program / "settings.json").write_text(json.dumps(settings))
    report = []
    try:
        url = runner.up()["gateway"]
        loop = TrafficLoop(url, key(cfg, "acme"), [BASE, PIRATE])
        for what, edit in EDITS:
            settings |= edit
            (program / "settings.json").write_text(json.dumps(settings))
            began = time.monotonic()
            answers = loop.across(lambda: runner.up(), minimum=200)
            steps = {s.name: s.op for s in runner.steps if s.op != "same"}
            report.append(f"{what}: {steps}, {len(answers)} requests, {len(failures(answers))} failed, "
                          f"{time.monotonic() - began:.1f} s")
            assert not failures(answers), (what, Counter(a.detail for a in failures(answers)))
        # The count edit left 2 replicas, which the autoscaler drains to its floor once idle for the down window; then
        # two clients against a target of one request per replica make it start a second again, drained in turn when
        # the load has gone; no request fails meanwhile.
        wait_for(lambda: len(live_replicas(cfg)) == 1, "the scale-down to the floor")
        drift = []

        def scaled_up_then_refreshed() -> None:
            wait_for(lambda: len(live_replicas(cfg)) == 2, "a second replica")
            drift.extend(s.detail for s in runner.refresh() if s.detail)  # the autoscaler's count is no drift

        answers = loop.across(scaled_up_then_refreshed, minimum=50)
        assert not failures(answers) and drift == [], drift
        wait_for(lambda: len(live_replicas(cfg)) == 1, "the scale-down")
        report.append(f"autoscaled 1 → 2 → 1 under and after {len(answers)} requests, 0 failed")
    finally:
        runner.destroy()  # replicas drain and flush their usage records
        print("\n".join(report))
    ids = [a.response_id for a in loop.answers]
    metered = Counter(metered_ids(cfg.state_dir / "store" / "usage"))
    assert len(ids) == len(set(ids)) and all(metered[i] == 1 for i in ids), \
        f"{sum(metered[i] != 1 for i in ids)} of {len(ids)} answers not metered exactly once"


def test_a_replica_killed_during_a_replacement_fails_only_what_it_was_running(tmp_path):
    program, cfg = write_program(tmp_path), config(tmp_path)
    runner = OfflineRunner(program, config=cfg, log=lambda _: None)
    settings = SETTINGS | {"min_replicas": 2, "max_replicas": 2}
    (program / "settings.json").write_text(json.dumps(settings))
    try:
        url = runner.up()["gateway"]
        old = replica_pids(cfg, "acme", "prod")
        loop = TrafficLoop(url, key(cfg, "acme"), [BASE, PIRATE])
        (program / "settings.json").write_text(json.dumps(settings | {"precision": "bf16"}))

        def kill_one_old_replica_once_the_new_ones_start() -> None:
            deadline = time.monotonic() + 60
            while len(replica_pids(cfg, "acme", "prod")) <= len(old) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(old[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_one_old_replica_once_the_new_ones_start)
        killer.start()
        answers = loop.across(lambda: runner.up(), minimum=200)
        killer.join()
        new = replica_pids(cfg, "acme", "prod")
        assert len(new) == 2 and not set(new) & set(old) and not any(alive(p) for p in old)
        # Whole answers are tried again on another replica; only a stream that had begun on the killed one is cut.
        failed = failures(answers)
        assert len(failed) <= 2 and all(a.streamed and a.status == 200 for a in failed), failed
        print(f"killed during a replacement: {len(answers)} requests, {len(failed)} cut streams")
    finally:
        runner.destroy()


def test_a_deployment_scales_to_zero_when_idle_and_the_next_requests_wake_it(tmp_path):
    program, cfg = write_program(tmp_path), config(tmp_path)
    runner = OfflineRunner(program, config=cfg, log=lambda _: None)
    settings = SETTINGS | {"min_replicas": 0, "max_replicas": 1, "autoscaling": {"scale_to_zero_window_s": 5}}
    (program / "settings.json").write_text(json.dumps(settings))
    try:
        outputs = runner.up()
        wait_for(lambda: not live_replicas(cfg), "scaling to zero after the idle window")
        refreshed = runner.refresh()
        assert refreshed and all("drift" not in s.detail for s in refreshed), refreshed  # zero is no drift
        loop = TrafficLoop(outputs["gateway"], key(cfg, "acme"), [BASE, PIRATE])
        began = time.monotonic()
        first = loop.across(lambda: None, minimum=1)
        cold_start = time.monotonic() - began
        answers = first + loop.across(lambda: None, minimum=200)
        assert not failures(answers) and len(live_replicas(cfg)) == 1
        print(f"scale from zero: first answer after {cold_start:.1f} s, {len(answers)} requests, 0 failed")
    finally:
        runner.destroy()
    metered = Counter(metered_ids(cfg.state_dir / "store" / "usage"))
    assert all(metered[a.response_id] == 1 for a in loop.answers)
