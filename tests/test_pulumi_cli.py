"""With the real Pulumi CLI installed, `ember preview|up|destroy` go through the Automation API and the engine."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import engine_env, requires_pulumi

REPO = Path(__file__).resolve().parents[1]
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
