"""One distribution, `ember`: every package folder is listed, and both halves import after any install."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in mapping.items():
        for directory, _, files in os.walk(REPO / folder):
            if "__pycache__" in directory:
                continue
            relative = Path(directory).relative_to(REPO / folder)
            if any(f.endswith(".py") for f in files):
                assert "__init__.py" in files, f"{directory} has modules but no __init__.py"
                found.add(".".join([package, *relative.parts]))
    assert found == listed, f"pyproject.toml packages: add {sorted(found - listed)}, drop {sorted(listed - found)}"


def test_console_script_is_declared():
    assert PYPROJECT["project"]["scripts"]["ember"] == "ember.provider.tools.cli:main"


def test_ember_help_runs():
    out = subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "schema" in out.stdout and "quickstart" in out.stdout


@pytest.mark.slow
def test_non_editable_install_imports(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    assert not (target / "provider").exists(), "top-level folders must install under ember/"
    code = "import ember.provider, ember.runtime, ember.provider.domain.spec; print(ember.provider.__file__, ember.runtime.__file__)"
    env = os.environ | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    for path in out.stdout.split():
        assert path.startswith(str(target)), path
    for module in ("provider/domain/spec.py", "provider/domain/kinds/deployment.py", "runtime/devtools/tinymodels.py"):
        assert (target / "ember" / module).exists(), module
