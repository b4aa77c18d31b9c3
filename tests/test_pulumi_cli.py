"""With the real Pulumi CLI installed, `ember preview` goes through the Automation API and the engine."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("pulumi") is None, reason="the pulumi CLI is not installed here")
@pytest.mark.slow
def test_preview_through_the_pulumi_engine(tmp_path):
    program = tmp_path / "quickstart"
    shutil.copytree(REPO / "examples/quickstart", program, ignore=shutil.ignore_patterns(".ember", "models"))
    subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", "quickstart", "--stack", str(program / "stack.json")],
                   check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", "preview", str(program)],
                         capture_output=True, text=True, env={**__import__("os").environ, "PULUMI_CONFIG_PASSPHRASE": ""})
    assert out.returncode == 0, out.stderr
    # The engine's step list: every resource of the program, with its type token, planned for creation.
    planned = {(line.split()[-3], line.split()[-2]) for line in out.stdout.splitlines()
               if line.strip().startswith("+") and line.split()[-1] == "create"}
    assert planned >= {("pulumi-python:dynamic/ember:Model", "tiny-llama"),
                       ("pulumi-python:dynamic/ember:Deployment", "tiny-llama-local"),
                       ("pulumi-python:dynamic/ember:LoRAAddon", "tiny-llama-pirate"),
                       ("pulumi-python:dynamic/ember:LoRAAddon", "tiny-llama-poet")}, out.stdout
