"""`ember preview/up/refresh/destroy` through Pulumi's Automation API and the real engine, when the Pulumi
CLI is installed (the offline runner stands in for it otherwise)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ember.provider.providers.base import ProviderConfig
from ember.provider.tools.runner import SECRET, RunError


def pulumi_cli_available() -> bool:
    return shutil.which("pulumi") is not None


def run_with_pulumi(command: str, program_dir: Path, stack: str, log: Callable[[str], None] = print,
                    policy_packs: list[Path] = (), policy_pack_config: Path | None = None, refresh: bool = False) -> dict:
    """The same commands through Pulumi's Automation API and the real engine (when the CLI is installed)."""
    workspace_stack = _stack(program_dir, stack)
    if command == "preview":
        configs = [str(policy_pack_config)] if policy_pack_config else None
        workspace_stack.preview(on_output=log, policy_packs=[str(p) for p in policy_packs] or None,
                                policy_pack_configs=configs)
        return {}
    if command == "refresh":
        workspace_stack.refresh(on_output=log)
        return {}
    if command == "destroy":
        workspace_stack.destroy(on_output=log)
        return {}
    result = workspace_stack.up(on_output=log, refresh=refresh)
    return {k: SECRET if v.secret else v.value for k, v in result.outputs.items()}  # as `pulumi up` shows them


def _stack(program_dir: Path, stack: str):
    """The program's stack in its Pulumi backend (a local one beside the program unless PULUMI_BACKEND_URL says)."""
    from pulumi import automation as auto

    config = ProviderConfig.load(default_root=Path(program_dir).resolve())
    os.environ.setdefault("PULUMI_BACKEND_URL", f"file://{config.state_dir / 'pulumi'}")
    if os.environ["PULUMI_BACKEND_URL"].startswith("file://") and not (
            os.environ.get("PULUMI_CONFIG_PASSPHRASE") is not None or os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE")):
        # Never an empty passphrase behind the user's back: it would encrypt the stack's secrets with nothing.
        raise RunError("the local Pulumi backend encrypts stack secrets with a passphrase: set "
                       "PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE (or PULUMI_BACKEND_URL to a "
                       "backend with its own secrets provider)")
    (config.state_dir / "pulumi").mkdir(parents=True, exist_ok=True)
    return auto.create_or_select_stack(stack_name=stack, work_dir=str(program_dir))


def stack_resources(program_dir: Path, stack: str) -> list[tuple[str, str, dict, dict]]:
    """(type, name, inputs, outputs) of every resource in the stack's current state in its Pulumi backend."""
    deployment = _stack(program_dir, stack).export_stack().deployment or {}
    return [(r["type"], r["urn"].rsplit("::", 1)[-1], r.get("inputs") or {}, r.get("outputs") or {})
            for r in deployment.get("resources") or []]
