"""Hardening the provider side: sources that are not regular files are refused by name and never block preview;
an ID the spec refuses is a one-line field error, not the program's traceback; a fine-tuning job's output model
may not be declared again; the scratch folder of a conversion killed half-way is swept by the next run."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from google.protobuf import json_format, struct_pb2
from pulumi_policy import PolicyResource, StackValidationArgs
from pulumi_policy.deserialize import deserialize_properties
from pulumi_policy.proxy import unknown_checking_proxy
from tests.engine.engine_helpers import EngineStack, requires_pulumi
from tests.provider.gguf_helpers import write_gguf
from tests.provider.provider_helpers import config, provider

from ember.provider.domain import spec
from ember.provider.domain.gguf_model import convert_gguf
from ember.provider.domain.model_files import ModelFilesError, inspect_base_model
from ember.provider.domain.names import EMBER_TYPE_PREFIX
from ember.provider.domain.stack import StackSpec
from ember.provider.policy import policies
from ember.provider.policy.policies import MODEL, POLICIES
from ember.provider.tools import cli
from ember.provider.tools.runner import OfflineRunner, RunError
from ember.runtime.devtools import tinymodels

BASE = "accounts/acme/models/base"
BLOCKED_AFTER_S = 20
JOB = EMBER_TYPE_PREFIX + "FineTuningJob"


# -- 10. sources that are not regular files ----------------------------------------------------------------


def _release(fifos: list[Path]) -> None:
    """Open and close each FIFO's write end: a reader blocked on it gets end-of-file."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody is reading it now
            pass


def bounded(call, fifos: list[Path]):
    """call() in a thread: if it blocks on a FIFO, the FIFO is released and the test fails instead of hanging."""
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BLOCKED_AFTER_S)
    blocked = thread.is_alive()
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        _release(fifos)
        thread.join(0.2)
    assert not blocked, f"blocked for {BLOCKED_AFTER_S}s reading a FIFO"
    if "error" in box:
        raise box["error"]
    return box["value"]


def fifo_in_place_of(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    os.mkfifo(path)
    return path


def loop_in_place_of(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    os.symlink(path.name, path)  # points at itself
    return path


@pytest.fixture
def sources(tmp_path, tiny_model):
    root = tmp_path / "sources"
    base = Path(shutil.copytree(tiny_model, root / "base"))
    pirate = tinymodels.make_lora(base, root / "pirate", rank=4, seed=1)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(3)))
    return {"base": base, "pirate": Path(pirate), "chats": chats, "gguf": root / "base.gguf", "cfg": config(tmp_path)}


def check_source(sources, kind: str, source: Path, fifos: list[Path]) -> str:
    """The check failure on `source` (a FIFO left unreleased would block it)."""
    news = {"Model": {"account_id": "acme", "model_id": "base"},
            "LoRAAddon": {"account_id": "acme", "model_id": "pirate", "base_model": BASE},
            "Dataset": {"account_id": "acme", "dataset_id": "chats"}}[kind] | {"source": str(source), "__provider": "x"}
    result = bounded(lambda: provider(kind, sources["cfg"]).check({}, news), fifos)
    failures = {f.property: f.reason for f in result.failures}
    assert set(failures) == {"source"}, failures
    return failures["source"]


def named(kind: str, path: Path, inner: str | None) -> str:
    """How a check failure starts for `path`: a file in a source by its path, a source as given, a dataset's
    as a dataset error (`<source>: <problem>`)."""
    return str(path) if inner else f"{path}:" if kind == "Dataset" else repr(str(path))


# (resource kind, the source, the file in it made a FIFO: None for the source itself)
FIFO_CASES = [
    ("Model", "base", "config.json"),
    ("Model", "base", "tokenizer.json"),
    ("Model", "base", "tokenizer_config.json"),
    ("Model", "base", "model.safetensors"),
    ("Model", "base", None),
    ("Model", "gguf", None),
    ("LoRAAddon", "pirate", "adapter_config.json"),
    ("LoRAAddon", "pirate", "adapter_model.safetensors"),
    ("LoRAAddon", "pirate", None),
    ("Dataset", "chats", None),
]


@pytest.mark.parametrize("kind, source, inner", FIFO_CASES, ids=lambda c: str(c))
def test_a_fifo_source_is_refused_naming_it_and_never_blocks_check(sources, kind, source, inner):
    root = sources[source]
    fifo = fifo_in_place_of(root / inner if inner else root)
    message = check_source(sources, kind, root, [fifo])
    wanted = "a directory" if inner is None and source in ("base", "pirate") else "a regular file"
    assert f"{named(kind, fifo, inner)} is a FIFO, not {wanted}" in message, message


@pytest.mark.parametrize("kind, source, inner", [("Model", "base", None), ("Model", "gguf", None),
                                                 ("Model", "base", "config.json"), ("LoRAAddon", "pirate", None),
                                                 ("LoRAAddon", "pirate", "adapter_config.json"),
                                                 ("Dataset", "chats", None)], ids=lambda c: str(c))
def test_a_symlink_loop_is_named_as_one_not_as_missing(sources, kind, source, inner):
    root = sources[source]
    loop = loop_in_place_of(root / inner if inner else root)
    message = check_source(sources, kind, root, [])
    assert f"{named(kind, loop, inner)} is a symlink loop" in message, message
    assert "does not exist" not in message and "is missing" not in message


def test_the_readers_themselves_refuse_a_fifo_upload_and_runtime_alike(sources, tiny_model, tmp_path):
    from ember.provider.domain.datasets import DatasetError, read_dataset

    gguf = fifo_in_place_of(sources["gguf"])
    with pytest.raises(ModelFilesError, match=re.escape(f"{gguf} is a FIFO, not a regular file")):
        bounded(lambda: convert_gguf(gguf, tmp_path / "converted"), [gguf])
    chats = fifo_in_place_of(sources["chats"])
    with pytest.raises(DatasetError, match="is a FIFO, not a regular file"):
        bounded(lambda: read_dataset(f"file://{chats}"), [chats])  # an fsspec URL of a local file too
    index = sources["base"] / "model.safetensors.index.json"
    fifo_in_place_of(index)
    with pytest.raises(ModelFilesError, match=re.escape(f"{index} is a FIFO, not a regular file")):
        bounded(lambda: inspect_base_model(sources["base"]), [index])
    # the policy pack reads an addon's rank beside the program: a FIFO there is left to check to name
    adapter_config = fifo_in_place_of(sources["pirate"] / "adapter_config.json")
    assert bounded(lambda: policies._adapter_rank(str(sources["pirate"])), [adapter_config]) is None


def test_ember_preview_of_a_fifo_config_json_fails_at_once_naming_it(sources, tmp_path):
    program = tmp_path / "program"
    program.mkdir()
    (program / "Pulumi.yaml").write_text("name: fifo\nruntime: python\n")
    (program / "__main__.py").write_text(
        f"from ember.provider import Model, ModelArgs\nModel('base', ModelArgs(account_id='acme', "
        f"source={str(sources['base'])!r}))\n")
    fifo = fifo_in_place_of(sources["base"] / "config.json")
    try:
        out = subprocess.run([sys.executable, "-m", "ember.provider.tools.cli", "preview", "--offline", str(program)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("ember preview blocked on the FIFO")
    finally:
        _release([fifo])
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"ember preview failed: Model base: source: {fifo} is a FIFO, not a regular file" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# -- 11. a bad ID is a field error, not a traceback ---------------------------------------------------------

LONG = "x" * 64
PROGRAMS = {
    "model_id": f"Model('m', ModelArgs(account_id='acme', model_id='{LONG}', source='s3://b/w'))",
    "deployment_id": f"Deployment('d', DeploymentArgs(account_id='acme', deployment_id='{LONG}', "
                     f"base_model=Model('m', ModelArgs(account_id='acme', source='s3://b/w'))))",
    "dataset_id": f"Dataset('chats', DatasetArgs(account_id='acme', dataset_id='{LONG}', source='s3://b/c.jsonl'))",
    "account_id": f"Deployment('d', DeploymentArgs(account_id='{LONG}', "
                  f"base_model=Model('m', ModelArgs(account_id='{LONG}', source='s3://b/w'))))",
}
# a field that only check judges: the form each error above must have
BAD_FIELD = "Model('m', ModelArgs(account_id='acme', source='s3://b/w', display_name=''))"


def write_program(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Pulumi.yaml").write_text(f"name: {directory.name}\nruntime: python\n")
    (directory / "__main__.py").write_text("from ember.provider import *\n" + textwrap.dedent(body) + "\n")
    return directory


def offline_preview(program: Path, capsys) -> tuple[int, str]:
    code = cli.main(["preview", "--offline", str(program)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("field", list(PROGRAMS))
def test_an_id_the_spec_refuses_is_a_one_line_field_error_in_offline_preview(tmp_path, capsys, monkeypatch, field):
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    code, err = offline_preview(write_program(tmp_path / "bad-field", BAD_FIELD), capsys)
    assert code == 1 and re.fullmatch(r"ember preview failed: Model m: display_name: .+", err.strip()), err
    code, err = offline_preview(write_program(tmp_path / "program", PROGRAMS[field]), capsys)
    assert code == 1 and "Traceback" not in err, err
    kind = "Dataset" if field == "dataset_id" else "Deployment" if field == "deployment_id" else "Model"
    name = {"Model": "m", "Deployment": "d", "Dataset": "chats"}[kind]
    [line] = err.strip().splitlines()  # one line, in the form of the bad field's
    assert re.fullmatch(rf"ember preview failed: {kind} {name}: {field}: '{LONG}' is not a valid ID: use 1-63 "
                        rf"characters .+", line), line


def test_errors_only_the_program_can_see_are_one_line_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    twice = write_program(tmp_path / "twice", """
        Model('first', ModelArgs(account_id='acme', model_id='shared', source='s3://b/w'))
        Model('second', ModelArgs(account_id='acme', model_id='shared', source='s3://b/v'))""")
    code, err = offline_preview(twice, capsys)
    assert code == 1 and err.strip() == (
        "ember preview failed: Model second: model_id: accounts/acme/models/shared is already declared by Model first; "
        "model IDs are globally unique, base models and addons alike"), err
    got = write_program(tmp_path / "get", "Model.get('old', 'accounts/acme/model/x')")
    code, err = offline_preview(got, capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith("ember preview failed: Model old: id: 'accounts/acme/model/x' is not a model name"), err
    # the mechanism: the Pulumi CLI's language host prints a pulumi.RunError as its message alone
    import pulumi

    from ember.provider.resources import ProgramError

    assert issubclass(ProgramError, pulumi.RunError) and issubclass(ProgramError, ValueError)


@pytest.mark.engine
@pytest.mark.slow
@requires_pulumi
def test_under_the_pulumi_cli_a_bad_id_is_the_engines_field_error_and_a_clash_one_line(tmp_path):
    shown = {}
    for field, body in (("model_id", PROGRAMS["model_id"]), ("display_name", BAD_FIELD)):
        stack = EngineStack(write_program(tmp_path / field.replace("_", "-"), body), tmp_path / f"home-{field}")
        out = stack.pulumi("preview", check=False)
        shown[field] = out.stdout + out.stderr
        assert out.returncode != 0 and "Traceback" not in shown[field], shown[field]
        # the engine's words for a check failure, the same for both fields
        assert re.search(rf"ember:Model resource 'm': property {field} value .* has a problem: ", shown[field]), shown[field]
    assert f"'{LONG}' is not a valid ID" in shown["model_id"]
    stack = EngineStack(write_program(tmp_path / "clash", CLASH), tmp_path / "home-clash")
    out = stack.pulumi("preview", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text
    assert "FineTuningJob tune: output_model: accounts/acme/models/v1 is also declared by Model v1" in text, text


# -- 12. a fine-tuning job's output model declared again ----------------------------------------------------

JOB_LINE = ("FineTuningJob('tune', FineTuningJobArgs(account_id='acme', base_model='accounts/acme/models/base', "
            "dataset='accounts/acme/datasets/chats', output_model='v1'))")
MODEL_LINE = "Model('v1', ModelArgs(account_id='acme', source='s3://b/w'))"
CLASH = f"Model('base', ModelArgs(account_id='acme', source='s3://b/base'))\n{MODEL_LINE}\n{JOB_LINE}"


@pytest.mark.parametrize("body, expected", [
    (CLASH, "FineTuningJob tune: output_model: accounts/acme/models/v1 is also declared by Model v1: a fine-tuning "
            "job writes its output model itself"),
    (f"Model('base', ModelArgs(account_id='acme', source='s3://b/base'))\n{JOB_LINE}\n{MODEL_LINE}",
     "Model v1: model_id: accounts/acme/models/v1 is the output_model of FineTuningJob tune"),
    (f"Model('base', ModelArgs(account_id='acme', source='s3://b/base'))\n{JOB_LINE}\n"
     "LoRAAddon('v1', LoRAAddonArgs(account_id='acme', base_model='accounts/acme/models/base', source='s3://b/a'))",
     "LoRAAddon v1: model_id: accounts/acme/models/v1 is the output_model of FineTuningJob tune"),
], ids=["job-after-model", "model-after-job", "addon-after-job"])
def test_a_job_whose_output_model_is_declared_again_is_refused_at_preview(tmp_path, body, expected):
    runner = OfflineRunner(write_program(tmp_path / "program", body), config=config(tmp_path), log=lambda _: None)
    with pytest.raises(RunError, match=re.escape(expected)):
        runner.up(preview=True)


def test_the_stack_spec_and_the_policy_pack_refuse_it_too():
    stack = {"models": [{"account_id": "acme", "model_id": "v1", "source": "w"}],
             "fine_tuning_jobs": [{"account_id": "acme", "base_model": BASE, "dataset": "accounts/acme/datasets/chats",
                                   "output_model": "v1"}]}
    with pytest.raises(spec.SpecError) as refused:
        spec.parse(StackSpec, stack)
    assert ("fine_tuning_jobs[0].output_model", "accounts/acme/models/v1 is also declared by models[0]: a fine-tuning job "
            "writes its output model itself (deploy it with LoRAAddonArgs(source=job) under another ID); give one of "
            "them another ID") in refused.value.errors
    pack = [policy_resource(MODEL, "v1", account_id="acme", model_id="v1", source="s3://b/w"),
            policy_resource(JOB, "tune", account_id="acme", base_model=BASE, dataset="accounts/acme/datasets/chats",
                            output_model="v1")]
    found = []
    unique = next(p for p in POLICIES if p.name == "ember-unique-model-ids")
    unique.validate(StackValidationArgs(pack, None), lambda message, urn=None: found.append((message, urn)))
    [(message, urn)] = found
    assert message.startswith("FineTuningJob tune: output_model: accounts/acme/models/v1 is also declared by "
                              "Model v1: a fine-tuning job writes its output model itself"), message
    assert urn.endswith("::tune")


def policy_resource(resource_type: str, name: str, **props) -> PolicyResource:
    """A resource as the analyzer hands it to a stack policy (through a protobuf Struct, behind the proxy)."""
    struct = struct_pb2.Struct()
    struct.update({"__provider": "serialized-provider", **props})
    proxied = unknown_checking_proxy(deserialize_properties(json_format.MessageToDict(struct)))
    return PolicyResource(resource_type, proxied, f"urn:pulumi:dev::p::{resource_type}::{name}", name, None, None,
                          None, [], {})


# -- 13. a conversion killed half-way -------------------------------------------------------------------------

KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from ember.provider.providers import model
from ember.provider.providers.base import ProviderConfig

state = Path(sys.argv[1])
# killed as the last tensor is converted: the scratch folder holds a half-written .converted.partial-<pid>
model.progress = lambda line: os.kill(os.getpid(), signal.SIGKILL) if "converting" in line else None
provider = model.ModelProvider()
provider._config = ProviderConfig(state, f"file://{state / 'store'}", 60)
provider.create({"account_id": "acme", "model_id": "killed", "source": sys.argv[2]})
"""


def kill_a_conversion(cfg, gguf: Path) -> list[Path]:
    out = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(cfg.state_dir), str(gguf)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr
    partials = partials_of(cfg)
    assert partials, "the killed conversion left no partial folder to sweep"
    return partials


def partials_of(cfg) -> list[Path]:
    return sorted((cfg.state_dir / "scratch").glob("*/.converted.partial-*"))


def test_the_partial_of_a_killed_conversion_is_swept_by_the_next_up_and_destroy(tmp_path, tiny_model):
    cfg = config(tmp_path)
    gguf = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    kill_a_conversion(cfg, gguf)
    model = provider("Model", cfg)
    model.create({"account_id": "acme", "model_id": "next", "source": str(tiny_model)})  # a later `up`
    assert partials_of(cfg) == []
    kill_a_conversion(cfg, gguf)
    model.delete("accounts/acme/models/next", {"account_id": "acme", "model_id": "next", "source": str(tiny_model)})
    assert partials_of(cfg) == []  # a later `destroy`
    assert list((cfg.state_dir / "scratch").iterdir()) == []


def test_a_live_conversions_scratch_is_kept(tmp_path, tiny_model):
    cfg = config(tmp_path)
    model = provider("Model", cfg)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # another process converting right now, and this one
        theirs = cfg.state_dir / "scratch" / f"{socket.gethostname()}-{other.pid}-abcd1234"
        (theirs / ".converted.partial-1").mkdir(parents=True)
        with model.scratch() as mine:
            (mine / ".converted.partial-2").mkdir()
            model.create({"account_id": "acme", "model_id": "next", "source": str(tiny_model)})
            assert (mine / ".converted.partial-2").is_dir() and (theirs / ".converted.partial-1").is_dir()
    finally:
        other.kill()
        other.wait()
    model.delete("accounts/acme/models/next", {"account_id": "acme", "model_id": "next", "source": str(tiny_model)})
    assert not theirs.exists()  # its owner is gone now
