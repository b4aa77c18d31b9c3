"""The import rules that keep the two halves apart (see the README's "What is here").

- `ember.provider.domain` is pure: it imports neither pulumi nor torch, nor any other part of Ember.
- `ember.provider.backends` (the store and the clusters the providers call) imports only the domain and itself:
  never the resources, the providers, the Kubernetes components or the tools above it.
- The runtime imports nothing of the provider but the domain, and importing any runtime module never
  loads pulumi (the runtime image runs without it).
- Importing any provider module never loads torch (a preview must not pay for it); only the tools that
  run the runtime (`ember serve`, `ember tiny-model`) import it, inside the function that needs it.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HALVES = {"provider": "ember.provider", "runtime": "ember.runtime"}


def _modules(folder: str) -> list[str]:
    names = []
    for path in sorted((REPO / folder).rglob("*.py")):
        parts = path.relative_to(REPO / folder).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names.append(".".join([HALVES[folder], *parts]))
    return names


def _imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, imported module) for each import in a file; top_level_only leaves out imports inside functions."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = "; ".join(f"import {m}" for m in modules) + "; import sys; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return {name.split(".")[0] for name in out.stdout.split()} | set(out.stdout.split())


def _violations(folder: str, allowed, top_level_only: bool) -> list[str]:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in _imports(path, top_level_only):
            if module.startswith("ember.") and not allowed(module):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


def test_the_domain_imports_no_other_part_of_ember():
    assert _violations("provider/domain", lambda m: m.startswith("ember.provider.domain."), top_level_only=False) == []


def test_the_backends_import_only_the_domain_and_themselves():
    allowed = ("ember.provider.domain.", "ember.provider.backends.")
    assert _violations("provider/backends", lambda m: m.startswith(allowed), top_level_only=False) == []


# The gateway beside the local cluster's replicas starts and drains them as `up` does, with the local cluster's own
# process code (which imports neither pulumi nor torch: the slow test below loads every runtime module to check).
LOCAL_CLUSTER = ("ember.provider.backends.local_cluster", "ember.provider.backends.local_processes",
                 "ember.provider.backends.processes")


def test_the_runtime_imports_only_the_domain_of_the_provider():
    bad = _violations("runtime", lambda m: m.startswith(("ember.runtime.", "ember.provider.domain.")),
                      top_level_only=False)
    assert [line for line in bad if not (line.startswith("runtime/gateway/scalers.py:")
                                         and line.split(" imports ")[1].startswith(LOCAL_CLUSTER))] == []


def test_no_provider_module_imports_the_runtime_when_it_loads():
    assert _violations("provider", lambda m: not m.startswith("ember.runtime"), top_level_only=True) == []


def test_the_domain_loads_neither_pulumi_nor_torch():
    loaded = _loaded_after_importing([m for m in _modules("provider") if m.startswith("ember.provider.domain")])
    assert not {"pulumi", "torch", "ember.runtime"} & loaded


def test_importing_every_provider_module_never_loads_torch():
    loaded = _loaded_after_importing(_modules("provider"))
    assert "pulumi" in loaded  # the check below is about a real import of the provider
    assert not {"torch", "ember.runtime"} & loaded


@pytest.mark.slow
def test_importing_every_runtime_module_never_loads_pulumi():
    loaded = _loaded_after_importing(_modules("runtime"))
    assert "torch" in loaded
    assert not {"pulumi", "pulumi_policy", "pulumi_kubernetes", "ember.provider.resources"} & loaded


def test_the_public_api_loads_lazily():
    assert "pulumi" not in _loaded_after_importing(["ember.provider"])
    out = subprocess.run([sys.executable, "-c", "from ember.provider import Model, ModelArgs, LoRAAddon, LoRAAddonArgs, "
                          "Deployment, DeploymentArgs, KubernetesDeployment; print(Model.__module__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ember.provider.resources"
