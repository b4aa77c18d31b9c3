"""The program's typed `…Args` (provider/args.py), generated from the kinds' JSON Schemas the way pulumi-kubernetes'
Python SDK is generated from its schema, so that each field is written once: in its kind's spec.

tests/provider/test_provider_resources.py fails when the checked-in file differs from what the specs generate now;
`python -m ember.provider.tools.args_sdk` regenerates it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ember.provider.domain.kinds import KINDS
from ember.provider.domain.names import DATASET_NAME_PATTERN, DEPLOYMENT_NAME_PATTERN, MODEL_NAME_PATTERN

ARGS_FILE = Path(__file__).resolve().parents[1] / "args.py"
# A field that names another resource also takes the resource itself, which makes the dependency explicit and
# carries what the referencing resource must know of it (a base model's digest).
NAMES_OF = {MODEL_NAME_PATTERN: "Model", DEPLOYMENT_NAME_PATTERN: "Deployment", DATASET_NAME_PATTERN: "Dataset"}
# An addon's weights may be the adapter a fine-tuning job trains.
ALSO_TAKES = {("LoRAAddonSpec", "source"): "FineTuningJob"}
IMPLIED = {"kind"}  # a Model is a base model and a LoRAAddon an addon: the resource class says it
SCALARS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool"}
HEADER = '''"""Typed inputs of Ember's resources, as in pulumi-kubernetes' SDK. GENERATED from the kinds' specs
(ember.provider.domain.kinds) by ember.provider.tools.args_sdk: edit the specs, then run
`python -m ember.provider.tools.args_sdk`. Every field may be left out but the required ones; check applies the spec's
defaults and says what is wrong, naming the field and value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi

if TYPE_CHECKING:
    from ember.provider.resources import Dataset, Deployment, FineTuningJob, Model
'''


def _type(schema: dict[str, Any], defs: dict[str, Any], nested: dict[str, dict]) -> str:
    """The Python annotation of one property; a scalar may be an Output. Nested specs found are added to `nested`."""
    schema = _not_null(schema)
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if "properties" in defs[name]:
            nested[name] = defs[name]
            return f"{name}Args | pulumi.Input[dict]"
        schema = defs[name]
    if schema.get("type") == "array":  # each item may be an Output, as in pulumi-kubernetes' SDK
        return f"Sequence[{_type(schema['items'], defs, nested)}]"
    if schema.get("type") == "object":  # a mapping by key (an account ID): its values' schema is the one pattern's
        (values,) = schema["patternProperties"].values()
        return f"Mapping[str, {_type(values, defs, nested)}]"
    return f"pulumi.Input[{SCALARS[schema['type']]}]"


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional property's schema without its null."""
    return next(s for s in schema.get("anyOf", [schema]) if s.get("type") != "null")


def _field(spec: str, name: str, schema: dict, required: bool, defs: dict, nested: dict[str, dict]) -> list[str]:
    annotation = _type(schema, defs, nested)
    value = _not_null(schema)
    takes = [NAMES_OF.get(value.get("pattern")), NAMES_OF.get(value.get("items", {}).get("pattern")),
             ALSO_TAKES.get((spec, name))]
    for resource in filter(None, takes):
        annotation = annotation.replace("pulumi.Input[str]", f"pulumi.Input[str] | {resource}")
    line = f"    {name}: {annotation}" + ("" if required else " | None = None")
    notes = [schema.get("description")] + [f"one of {', '.join(map(str, d['enum']))}" for d in _enums(schema, defs)]
    comment = "; ".join(n for n in notes if n)
    return [f"    # {text}" for text in textwrap.wrap(comment, 112)] + [line]


def _enums(schema: dict, defs: dict) -> list[dict]:
    found = [s for s in schema.get("anyOf", [schema]) if "enum" in s]
    return found + [defs[s["$ref"].rsplit("/", 1)[1]] for s in schema.get("anyOf", [schema]) if "$ref" in s
                    and "enum" in defs[s["$ref"].rsplit("/", 1)[1]]]


def _class(title: str, spec: str, schema: dict, defs: dict, nested: dict[str, dict]) -> list[str]:
    required = set(schema.get("required", ()))
    properties = {k: v for k, v in schema["properties"].items() if k not in IMPLIED}
    ordered = [k for k in properties if k in required] + [k for k in properties if k not in required]
    lines = ["", "", "@dataclass", f"class {title}Args:"]
    doc = schema.get("description")
    if doc:
        lines.append(f'    """{doc}"""')
        lines.append("")
    for name in ordered:
        lines += _field(spec, name, properties[name], name in required, defs, nested)
    return lines


def arg_classes() -> list[str]:
    """The names of the generated Args classes: one per kind, then the nested ones (autoscaling, request logging)."""
    nested: dict[str, dict] = {}
    for kind in KINDS:
        schema = kind.spec.model_json_schema(mode="validation")
        for name, value in schema["properties"].items():
            _type(value, schema.get("$defs", {}), nested)
    return [f"{kind.name}Args" for kind in KINDS] + [f"{name}Args" for name in sorted(nested)]


def generate() -> str:
    names = ", ".join(f'"{name}"' for name in arg_classes())
    lines, nested = [HEADER.rstrip("\n"), "", "\n".join(textwrap.wrap(f"__all__ = [{names}]", 116,
                                                                      subsequent_indent="           "))], {}
    for kind in KINDS:
        schema = kind.spec.model_json_schema(mode="validation")
        defs = schema.get("$defs", {})
        lines += _class(kind.name, kind.spec.__name__, schema, defs, nested)
    for name in sorted(nested):  # the nested specs' own properties are plain values
        lines += _class(name, name, nested[name], {}, {})
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ARGS_FILE.write_text(generate())
    print(f"wrote {ARGS_FILE}")
