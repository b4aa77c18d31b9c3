"""The checked-in JSON Schemas are what the spec generates, and the examples satisfy them."""

import json
from pathlib import Path

import jsonschema
import pytest

from ember.provider.domain import spec
from ember.provider.domain.kinds.model import ModelOutputs
from ember.provider.tools import schemas, stackfile

REPO = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO / "schema"
EXAMPLE_STACKS = sorted(REPO.glob("examples/*/stack.json"))


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_checked_in_schemas_are_fresh():
    assert schemas.stale(SCHEMA_DIR) == [], "run: ember schema --out schema"


def test_staleness_is_detected(tmp_path):
    schemas.write(tmp_path)
    assert schemas.stale(tmp_path) == []
    (tmp_path / "model.args.json").write_text("{}")
    (tmp_path / "retired.json").write_text("{}")
    (tmp_path / "deployment.args.json").unlink()
    assert schemas.stale(tmp_path) == ["deployment.args.json", "model.args.json", "retired.json"]


def test_there_are_examples():
    assert {p.parent.name for p in EXAMPLE_STACKS} >= {"quickstart", "serverless"}


@pytest.mark.parametrize("path", EXAMPLE_STACKS, ids=lambda p: p.parent.name)
def test_examples_validate_against_the_schemas_and_the_spec(path):
    data = json.loads(path.read_text())
    validator("stack.json").validate(data)
    for group, resource in (("models", "model"), ("addons", "lora_addon"), ("deployments", "deployment")):
        for item in data.get(group, []):
            validator(f"{resource}.args.json").validate(item)
    stackfile.load(path)  # the rules JSON Schema cannot express


@pytest.mark.parametrize(
    "resource, item, fragment",
    [
        ("model", {"account_id": "Acme", "source": "x"}, "does not match"),
        ("model", {"account_id": "acme", "source": "x", "kind": "HF_PEFT_ADDON"}, "HF_BASE_MODEL"),
        ("lora_addon", {"account_id": "acme", "base_model": "m", "source": "x"}, "does not match"),
        ("deployment", {"account_id": "acme", "base_model": "accounts/a/models/m", "accelerator_type": "TPU"}, "'TPU'"),
        ("deployment", {"account_id": "acme", "base_model": "accounts/a/models/m", "max_replicas": 0}, "minimum"),
        ("deployment", {"account_id": "acme", "base_model": "accounts/a/models/m", "max_lora_rank": 48}, "48"),
        ("deployment", {"account_id": "acme", "base_model": "accounts/a/models/m", "replicas": 2}, "replicas"),
    ],
)
def test_schemas_refuse_bad_resources(resource, item, fragment):
    errors = list(validator(f"{resource}.args.json").iter_errors(item))
    assert errors and any(fragment in e.message for e in errors), [e.message for e in errors]


def test_outputs_validate():
    outputs = ModelOutputs(name="accounts/acme/models/m", state=spec.ModelState.READY,
                                digest="sha256:" + "0" * 64, architecture="LlamaForCausalLM", parameter_count=10)
    validator("model.outputs.json").validate(outputs.model_dump(mode="json"))
    bad = outputs.model_dump(mode="json") | {"state": "DONE"}
    assert list(validator("model.outputs.json").iter_errors(bad))
