"""The README's two commands are the ones CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", text)
    assert match, f"README.md has no ```bash block after <!-- {marker} -->"
    return match.group(1)


def test_ci_runs_the_readme_commands_in_order():
    ci = (REPO / ".ci/run").read_text().splitlines()
    setup, test = readme_command("setup-command"), readme_command("test-command")
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)
    assert "pytest" in test
