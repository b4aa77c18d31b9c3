"""Edits of a live stack through the real Pulumi CLI, with clients calling through the gateway all along: the engine
orders a replacement's create before its delete, and no request fails (the offline runner's side, with every edit:
tests/e2e/test_changes_without_downtime.py)."""

import time
from collections import Counter

import pytest
from tests.e2e.test_changes_without_downtime import BASE, PIRATE, SETTINGS, write_program
from tests.e2e.traffic import TrafficLoop, failures, metered_ids
from tests.engine.engine_helpers import EngineStack, requires_pulumi

from ember.provider.providers.base import ProviderConfig

pytestmark = [pytest.mark.engine, pytest.mark.slow, requires_pulumi]

# The edits whose order the engine decides (a replacement's create before its delete, an addon's update), and one count
EDITS = [
    ("an addon's new weights", {"pirate": "models/pirate-v2"}),
    ("a deployment's replacement (precision)", {"precision": "bf16"}),
    ("replica count 1 → 2", {"min_replicas": 2, "max_replicas": 2}),
]


def test_edits_through_the_engine_fail_no_request_and_meter_each_once(tmp_path):
    import json

    program = write_program(tmp_path)
    settings = dict(SETTINGS)
    (program / "settings.json").write_text(json.dumps(settings))
    stack = EngineStack(program, tmp_path)
    cfg = ProviderConfig.load(default_root=program)
    report = []
    try:
        stack.up()
        url = stack.pulumi("stack", "output", "gateway").stdout.strip()
        key = (cfg.state_dir / "keys" / "acme.key").read_text().strip()
        loop = TrafficLoop(url, key, [BASE, PIRATE])
        for what, edit in EDITS:
            settings |= edit
            (program / "settings.json").write_text(json.dumps(settings))
            began = time.monotonic()
            answers = loop.across(stack.up, minimum=200)
            report.append(f"{what}: {len(answers)} requests, {len(failures(answers))} failed, "
                          f"{time.monotonic() - began:.1f} s")
            assert not failures(answers), (what, Counter(a.detail for a in failures(answers)))
        assert set(stack.preview().values()) == {"same"}
    finally:
        stack.pulumi("destroy", "--yes", check=False)
        print("\n".join(report))
    metered = Counter(metered_ids(cfg.state_dir / "store" / "usage"))
    assert all(metered[a.response_id] == 1 for a in loop.answers)
