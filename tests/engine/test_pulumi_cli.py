"""With the real Pulumi CLI installed, `ember preview|up|destroy` go through the Automation API and the engine."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.engine.engine_helpers import engine_env, requires_pulumi

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.engine, pytest.mark.slow, requires_pulumi]


def ember(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_ember_commands_run_the_pulumi_engine(tmp_path):
    program = tmp_path / "quickstart"
    shutil.copytree(REPO / "examples/quickstart", program, ignore=shutil.ignore_patterns(".ember", "models"))
    env = engine_env(tmp_path)
    assert ember("quickstart", "--stack", str(program / "stack.json"), env=env).returncode == 0
    try:
        out = ember("preview", str(program), env=env)
        assert out.returncode == 0, out.stderr
        # The engine's step list: every resource of the program, with its type token, planned for creation.
        planned = {(line.split()[-3], line.split()[-2]) for line in out.stdout.splitlines()
                   if line.strip().startswith("+") and line.split()[-1] == "create"}
        assert planned >= {("pulumi-python:dynamic/ember:Model", "smollm2-135m-instruct"),
                           ("pulumi-python:dynamic/ember:Deployment", "smollm2-local"),
                           ("pulumi-python:dynamic/ember:LoRAAddon", "smollm2-pirate"),
                           ("pulumi-python:dynamic/ember:LoRAAddon", "smollm2-poet"),
                           ("pulumi-python:dynamic/ember:Dataset", "pirate-chats"),
                           ("pulumi-python:dynamic/ember:FineTuningJob", "smollm2-pirate-sft")}, out.stdout
        up = ember("up", str(program), env=env)
        assert up.returncode == 0, up.stderr
        # the demo answered through the endpoint, the pirate addon as it was trained to
        assert "answer from accounts/quickstart/models/smollm2-pirate" in up.stdout and "Arr!" in up.stdout
    finally:
        destroyed = ember("destroy", str(program), env=env)
    assert destroyed.returncode == 0, destroyed.stderr


COSTED = '''
from ember.provider import Deployment, DeploymentArgs, Model, ModelArgs
base = Model("base", ModelArgs(account_id="acme", source="models/base"))
Deployment("cpu", DeploymentArgs(account_id="acme", base_model=base, min_replicas=1, max_replicas=REPLICAS))
'''


def test_the_cost_diff_reads_the_pulumi_backends_state(tmp_path):
    """Under the CLI, `ember cost --diff` and `ember preview` compare the plan with the stack in Pulumi's backend."""
    import json

    from ember.runtime.devtools import tinymodels

    program = tmp_path / "costed"
    tinymodels.make_model(program / "models" / "base", "tiny")
    (program / "Pulumi.yaml").write_text("name: costed\nruntime: python\n")
    (program / "__main__.py").write_text(COSTED.replace("REPLICAS", "1"))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"serverless_tiers": [{"up_to_billion_params": None, "usd_per_million_tokens": 1}],
                                  "usd_per_accelerator_hour": {"CPU": 1.0, "NVIDIA_A100_80GB": 1, "NVIDIA_H100_80GB": 1,
                                                               "NVIDIA_H200_141GB": 1, "AMD_MI300X_192GB": 1}}))
    env = engine_env(tmp_path)
    try:
        assert ember("up", str(program), "--no-demo", env=env).returncode == 0
        (program / "__main__.py").write_text(COSTED.replace("REPLICAS", "2"))
        out = ember("cost", str(program), "--diff", "--prices", str(prices), "--format", "json", env=env)
        assert out.returncode == 0, out.stderr
        diff = json.loads(out.stdout)["diff"]
        assert diff["cpu"].startswith("+$730/month at max replicas")  # one more CPU replica-hour x 730 at $1
        preview = ember("preview", str(program), env=env)
        assert preview.returncode == 0 and "cost:\n  total: +$0/month" in preview.stdout  # list prices: CPUs are free
    finally:
        assert ember("destroy", str(program), env=env).returncode == 0
