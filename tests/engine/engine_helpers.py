"""Driving the real Pulumi CLI (and engine) the way a user's CI does, beside Ember's offline runner.

The CLI comes from PATH: tools/pulumi-cli/install.sh builds one where Go is installed (`.ci/run` does).
Each stack gets its own file backend, PULUMI_HOME and a real (non-empty) passphrase; plugins are never
downloaded; the program runs with this virtualenv's Python (PULUMI_PYTHON_CMD), as a CI job would set it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.provider.provider_helpers import config

from ember.provider.tools.runner import OfflineRunner

PULUMI = shutil.which("pulumi")
requires_pulumi = pytest.mark.skipif(
    PULUMI is None, reason="no Pulumi CLI on PATH (tools/pulumi-cli/install.sh builds one where Go is installed)")
REPLACE_OPS = {"replace", "create-replacement", "delete-replaced"}


def engine_env(home: Path) -> dict[str, str]:
    (home / "backend").mkdir(parents=True, exist_ok=True)
    return os.environ | {
        "PULUMI_HOME": str(home / "pulumi-home"),
        "PULUMI_BACKEND_URL": f"file://{home / 'backend'}",
        "PULUMI_CONFIG_PASSPHRASE": "ember engine tests",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_PYTHON_CMD": sys.executable,
        "EMBER_READY_TIMEOUT": "120",
    }


class EngineStack:
    """One program and stack under the real engine."""

    def __init__(self, program: Path, home: Path, stack: str = "dev"):
        self.program, self.env, self.stack = program, engine_env(home), stack
        self.pulumi("stack", "init", stack)

    def pulumi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        stack = [] if args[0] == "stack" and args[1] in ("init", "rm") else ["--stack", self.stack]
        out = subprocess.run([PULUMI, *args, *stack, "--non-interactive", "--cwd", str(self.program)], env=self.env,
                             capture_output=True, text=True, timeout=600)
        if check and out.returncode != 0:
            raise AssertionError(f"pulumi {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def preview(self) -> dict[tuple[str, str], str]:
        """The engine's planned step per (resource type, name), from `pulumi preview --json`."""
        out = self.pulumi("preview", "--json", "--show-sames")
        return steps_of(json.loads(out.stdout)["steps"])

    def up(self) -> subprocess.CompletedProcess:
        return self.pulumi("up", "--yes", "--skip-preview")


def steps_of(steps: list[dict]) -> dict[tuple[str, str], str]:
    ops: dict[tuple[str, str], str] = {}
    for step in steps:
        _, _, types, name = step["urn"].split("::")
        kind = types.rsplit("$", 1)[-1]  # a child's URN names its parents' types first
        if kind == "pulumi:pulumi:Stack":
            continue
        key = (kind.rsplit(":", 1)[-1], name)
        ops[key] = "replace" if step["op"] in REPLACE_OPS or ops.get(key) == "replace" else step["op"]
    return ops


def offline_preview(runner: OfflineRunner) -> dict[tuple[str, str], str]:
    runner.up(preview=True)
    return {(s.type, s.name): s.op for s in runner.steps}


def copy_program(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".ember", "__pycache__"), symlinks=True)
    return target


class Twin:
    """One program run side by side: under the engine (in `<root>/engine`) and the offline runner (in a copy
    with its own state), each edit written to both as settings.json."""

    def __init__(self, program: Path, root: Path):
        self.offline_program = copy_program(program, root / "offline" / "program")
        self.stack = EngineStack(program, root / "engine")
        self.programs = (program, self.offline_program)
        self.config = config(root / "offline")

    def runner(self) -> OfflineRunner:
        return OfflineRunner(self.offline_program, config=self.config, log=lambda _: None)

    def write(self, settings: dict) -> None:
        for program in self.programs:
            (program / "settings.json").write_text(json.dumps(settings))

    def previews(self) -> tuple[dict, dict]:
        return self.stack.preview(), offline_preview(self.runner())

    def up(self) -> tuple[dict, dict]:
        """Apply the program with both; their stack outputs."""
        self.stack.up()
        return json.loads(self.stack.pulumi("stack", "output", "--json").stdout), self.runner().up()

    def destroy(self) -> None:
        self.stack.pulumi("destroy", "--yes", check=False)
        self.runner().destroy()
