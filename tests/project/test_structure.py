"""The structure the code keeps (issue 29), checked so that it stays kept:

- every registry comes from the one list of kinds: the JSON Schemas, the providers, the diff rules, the policy pack,
  the generated Args and the public API;
- the providers call the Cluster interface and never ask which cluster they have;
- no function is longer than 80 lines.
"""

import ast
from pathlib import Path

import ember.provider
from ember.provider.domain.kinds import KINDS
from ember.provider.policy.policies import KIND, SPECS
from ember.provider.providers.base import CLUSTERS, EmberProvider
from ember.provider.tools import args_sdk, schemas

REPO = Path(__file__).resolve().parents[2]
CLUSTER_NAMES = set(CLUSTERS)
LONGEST_FUNCTION = 80


def test_every_registry_comes_from_the_list_of_kinds():
    names = {kind.name for kind in KINDS}
    assert {f"{kind.schema_key}.args.json" for kind in KINDS} <= set(schemas.generate())
    for kind in KINDS:
        provider = kind.provider_class
        assert issubclass(provider, EmberProvider) and provider.spec_cls is kind.spec, kind.name
        assert kind.replace <= set(kind.spec.model_fields) | set(kind.derived), kind.name
    assert set(SPECS) == {kind.type_token for kind in KINDS} and set(KIND.values()) == names
    assert {f"{name}Args" for name in names} <= set(args_sdk.arg_classes())
    assert names | {f"{name}Args" for name in names} <= set(ember.provider.__all__)


def _compared_strings(path: Path) -> list[tuple[int, str]]:
    """(line, string) of every string constant a comparison (==, !=, in) in the file is made against."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and isinstance(operand.value, str):
                    found.append((node.lineno, operand.value))
    return found


def test_the_providers_never_ask_which_cluster_they_have():
    asked = [f"{path.relative_to(REPO)}:{line} compares with {value!r}"
             for path in sorted((REPO / "provider" / "providers").glob("*.py"))
             for line, value in _compared_strings(path) if value in CLUSTER_NAMES]
    assert asked == []


def test_no_function_is_longer_than_80_lines():
    long = []
    for folder in ("provider", "runtime", "tests", "tools", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LONGEST_FUNCTION:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} is {lines} lines")
    assert long == []
