"""JSON Schemas of the resources, generated from the kinds' specs and checked in under schema/.

tests/provider/test_schemas.py fails when the checked-in files differ from what the spec generates now;
`ember schema --out schema` regenerates them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ember.provider.domain.kinds import KINDS
from ember.provider.domain.replica_spec import ReplicaSpec
from ember.provider.domain.spec import Spec
from ember.provider.domain.stack import StackSpec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _schema(cls: type[Spec], title: str, mode: str) -> dict:
    body = cls.model_json_schema(mode=mode)
    body["title"] = title
    return {"$schema": SCHEMA_DIALECT, **body}


def generate() -> dict[str, dict]:
    """File name → JSON Schema, for every resource's inputs and outputs and for a whole stack."""
    schemas = {}
    for kind in KINDS:
        schemas[f"{kind.schema_key}.args.json"] = _schema(kind.spec, kind.spec.__name__, "validation")
        schemas[f"{kind.schema_key}.outputs.json"] = _schema(kind.outputs, kind.outputs.__name__, "serialization")
    schemas["stack.json"] = _schema(StackSpec, "StackSpec", "validation")
    schemas["replica_spec.json"] = _schema(ReplicaSpec, "ReplicaSpec", "validation")
    return schemas


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in generate().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of the schema files in `directory` that are missing, different, or no longer generated."""
    expected = {name: render(schema) for name, schema in generate().items()}
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    wrong = [n for n, text in expected.items() if n not in present or (directory / n).read_text() != text]
    return sorted(wrong + [n for n in present - set(expected)])
