"""The README's two commands are the ones CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def _tree_table() -> list[tuple[list[str], str]]:
    """The "What is here" table: (the paths of the first column, the whole row) per row."""
    text = (REPO / "README.md").read_text()
    section = text.split("## What is here", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [(re.findall(r"`([^`]+)`", row.split("|")[1]), row) for row in rows]


def test_the_what_is_here_table_names_every_module_and_only_real_paths():
    table = _tree_table()
    for paths, _ in table:
        for path in paths:
            assert (REPO / path).exists(), f"README's table names {path}, which does not exist"
    modules = [p for half in ("provider", "runtime") for p in (REPO / half).rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "provider"]
    for module in modules:
        relative = module.relative_to(REPO).as_posix()
        folder = module.parent.relative_to(REPO).as_posix() + "/"
        assert any(relative in paths or (folder in paths and f"`{module.name}`" in row) for paths, row in table), \
            f"README's table does not say what {relative} holds"
