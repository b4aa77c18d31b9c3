"""Faults, overload and bad input: what keeps working when things go wrong.

The slow tests print the figures the README's Reliability section quotes (run with -s to see them).
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.provider.provider_helpers import alive, config, make_models, replica_pids, served_addons, store_entries
from tests.runtime.server_helpers import BASE, start, usage_records

from ember.provider.domain.kinds import BY_NAME
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.lora_addon import LoRAAddonSpec
from ember.provider.domain.kinds.model import ModelSpec
from ember.provider.domain.model_files import ModelFilesError, inspect_adapter, inspect_base_model
from ember.provider.domain.spec import SpecError, parse
from ember.provider.tools.runner import OfflineRunner
from ember.runtime.devtools import tinymodels

CANARY = "canary-reliability-7f3a"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def processes_mentioning(text: str) -> set[int]:
    """Live processes whose command line mentions `text` (here: a stack's state directory)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                        and alive(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


# ---------------------------------------------------------------------------------------------------------
# overload


@pytest.mark.slow
def test_sustained_overload_sheds_load_and_loses_nothing(tmp_path):
    server = start(tmp_path, max_queue=4)
    clients, seconds = 24, 12.0
    try:
        rss = [rss_mb(server.process.pid)]
        stop = time.monotonic() + seconds

        async def client(http, i, results):
            n = 0
            while time.monotonic() < stop:
                body = {"model": BASE, "prompt": f"{CANARY} {i}-{n}", "max_tokens": 16, "ignore_eos": True}
                try:
                    r = await http.post(f"{server.url}/v1/completions", json=body,
                                        headers={"Authorization": f"Bearer {server.keys['acme']}"})
                    results.append((r.status_code, r.json()))
                except httpx.HTTPError as exc:  # a lost request: no answer at all
                    results.append((None, repr(exc)))
                n += 1
                if r.status_code == 429:
                    await asyncio.sleep(0.05)

        async def sample():
            while time.monotonic() < stop:
                await asyncio.sleep(0.5)
                rss.append(rss_mb(server.process.pid))

        async def run():
            results = []
            async with httpx.AsyncClient(timeout=60) as http:
                await asyncio.gather(sample(), *[client(http, i, results) for i in range(clients)])
            return results

        results = asyncio.run(run())
        statuses = [s for s, _ in results]
        accepted = [body for s, body in results if s == 200]
        shed = statuses.count(429)
        assert set(statuses) <= {200, 429}, [b for s, b in results if s not in (200, 429)][:3]
        assert shed > 0 and len(accepted) > 0
        assert len({b["id"] for b in accepted}) == len(accepted)  # nothing answered twice
        assert all(b["usage"]["completion_tokens"] == 16 for b in accepted)
        records = usage_records(server)
        assert len(records) == len(accepted)  # every accepted request metered exactly once, shed ones never
        assert sum(r["completion_tokens"] for r in records) == 16 * len(accepted)
        growth = max(rss[len(rss) // 4:]) - rss[len(rss) // 4]
        assert growth < 100, rss  # steady state: the queue bounds memory
        stored = "".join(p.read_text() for p in (tmp_path / "usage").rglob("*") if p.is_file()) + server.log.read_text()
        assert CANARY not in stored and server.keys["acme"] not in stored  # no prompt, no key in logs or usage
        print(f"\n[reliability] overload: {clients} clients x {seconds:.0f} s, queue 4: {len(results)} requests, "
              f"{len(accepted)} served ({len(accepted) / seconds:.1f}/s), {shed} shed with 429, 0 lost, "
              f"{len(records)} usage records; server RSS {rss[0]:.0f} -> peak {max(rss):.0f} MB, "
              f"steady-state growth {growth:.1f} MB")
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------
# faults on the local cluster

PROGRAM = '''
import json
import pulumi
from ember.provider.resources import Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

s = json.load(open("settings.json"))
base = Model("base", ModelArgs(account_id="acme", source="models/base"))
local = Deployment("local", DeploymentArgs(account_id="acme", base_model=base, max_loras=4))
for name in s["addons"]:
    LoRAAddon(name, LoRAAddonArgs(account_id="acme", base_model=base, source=f"models/{name}", deployments=[local]))
pulumi.export("endpoint", local.endpoints.apply(lambda e: e[0] if e else None))
'''


def program(tmp_path, addons=("pirate", "poet")) -> Path:
    root = tmp_path / "program"
    models = make_models(root / "models")
    for name in addons:
        if name not in models:
            tinymodels.make_lora(models["base"], root / "models" / name, rank=4, seed=len(name) * 7 + ord(name[-1]))
    (root / "Pulumi.yaml").write_text("name: reliability\nruntime: python\n")
    (root / "__main__.py").write_text(PROGRAM)
    (root / "settings.json").write_text(json.dumps({"addons": list(addons)}))
    return root


@pytest.mark.slow
def test_twenty_addons_created_in_parallel_all_load(tmp_path):
    names = [f"addon-{i:02d}" for i in range(20)]
    root = program(tmp_path, names)
    cfg = config(tmp_path)
    runner = OfflineRunner(root, config=cfg, log=lambda _: None)
    try:
        started = time.monotonic()
        endpoint = runner.up()["endpoint"]
        took = time.monotonic() - started
        expected = {f"accounts/acme/models/{n}" for n in names}
        assert served_addons(endpoint, cfg, "acme") == expected
        desired = json.loads((cfg.state_dir / "store" / "deployments" / "acme" / "local" / "addons.json").read_text())
        assert set(desired) == expected  # none lost in the parallel read-modify-writes of the desired set
        key = (cfg.state_dir / "keys" / "acme.key").read_text()
        for name in sorted(expected):  # 20 addons through 4 device slots: the host cache swaps them in
            r = httpx.post(f"{endpoint}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                           json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
        print(f"\n[reliability] 20 addons created in parallel on one deployment in {took:.1f} s: 20 loaded, "
              f"20 in the desired set, 20 answered")
    finally:
        runner.destroy()


@pytest.mark.slow
def test_a_replica_killed_during_traffic_gives_clean_errors_and_up_restores_it(tmp_path):
    root = program(tmp_path)
    cfg = config(tmp_path)
    runner = OfflineRunner(root, config=cfg, log=lambda _: None)
    try:
        endpoint = runner.up()["endpoint"]
        key = (cfg.state_dir / "keys" / "acme.key").read_text()
        [pid] = replica_pids(cfg, "acme", "local")
        outcomes, stop = [], threading.Event()

        def traffic():
            while not stop.is_set():
                try:
                    r = httpx.post(f"{endpoint}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                   json={"model": "accounts/acme/models/base", "prompt": "hi",
                                         "max_tokens": 8}, timeout=30)
                    outcomes.append(r.status_code)
                except httpx.TransportError as exc:  # refused or cut: a clean error, never a hang
                    outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=40)
            assert not t.is_alive()  # no client hung on the dead replica
        errors = {o for o in outcomes if o != 200}
        assert 200 in outcomes and errors and errors <= {"ConnectError", "RemoteProtocolError", "ReadError"}
        refreshed = runner.refresh()
        assert any(s.name == "local" and "drift" in s.detail for s in refreshed)
        endpoint = runner.up()["endpoint"]
        [again] = replica_pids(cfg, "acme", "local")
        assert again != pid and served_addons(endpoint, cfg, "acme") == {"accounts/acme/models/pirate",
                                                                     "accounts/acme/models/poet"}
        print(f"\n[reliability] replica killed under 4 clients: {outcomes.count(200)} answered, "
              f"{len(outcomes) - outcomes.count(200)} clean connection errors ({', '.join(sorted(errors))}), "
              f"none hung; refresh reported the drift and up restored the replica with both addons")
    finally:
        runner.destroy()


@pytest.mark.slow
def test_an_up_killed_midway_converges_when_run_again(tmp_path):
    root = program(tmp_path)
    state = root / ".ember"
    up = subprocess.Popen([sys.executable, "-c", "from ember.provider.tools.cli import main; main(['up', '.', '--no-demo', '--offline'])"],
                          cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    replicas = state / "replicas" / "acme" / "local.json"
    deadline = time.monotonic() + 120
    while not replicas.exists() and time.monotonic() < deadline and up.poll() is None:
        time.sleep(0.05)
    up.kill()  # mid-way: the replica is starting, the Deployment is not in the stack's state yet
    up.wait()
    assert replicas.exists(), "the up finished or failed before it could be interrupted"
    runner = OfflineRunner(root, log=lambda _: None)
    try:
        assert "pulumi-python:dynamic/ember:Deployment::local" not in runner.state.resources
        endpoint = runner.up()["endpoint"]
        assert len(runner.state.resources) == 4
        cfg = runner.config
        pids = replica_pids(cfg, "acme", "local")
        assert len(pids) == 1 and processes_mentioning(str(state)) == set(pids)  # no orphan replica
        assert served_addons(endpoint, cfg, "acme") == {"accounts/acme/models/pirate", "accounts/acme/models/poet"}
        runner.up()
        assert {s.op for s in runner.steps} == {"same"}  # converged: a further run changes nothing
    finally:
        runner.destroy()
    assert processes_mentioning(str(state)) == set()
    assert store_entries(runner.config) == []  # no staging folder or object left behind
    print("\n[reliability] `up` killed while its replica started: the next `up` resumed the deployment, "
          "adopted the replica (1 process, no orphan), and destroy left no process or store file")


# ---------------------------------------------------------------------------------------------------------
# bad input: every rejection is a clear error, never a crash

FIELDS = sorted(set(ModelSpec.model_fields) | set(DeploymentSpec.model_fields) | set(LoRAAddonSpec.model_fields))
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=80)
    | st.sampled_from(["accounts/acme/models/m", "accounts/acme/deployments/d", "NVIDIA_H100_80GB", "serverless",
                       "llama-v3p1-8b-instruct", "s3://bucket/x", "../..", "CPU"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([ModelSpec, DeploymentSpec, LoRAAddonSpec]),
       data=st.dictionaries(st.sampled_from(FIELDS + ["extra", "__provider"]), VALUES, max_size=10))
def test_the_spec_rejects_anything_with_a_clear_error(kind, data):
    try:
        parse(kind, data)
    except SpecError as exc:
        assert exc.errors and all(isinstance(f, str) and m for f, m in exc.errors)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["Model", "Deployment", "LoRAAddon"]),
       data=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8))
def test_provider_check_never_raises(tmp_path_factory, kind, data):
    provider = BY_NAME[kind].provider_class()
    provider._config = config(tmp_path_factory.mktemp("check"))
    result = provider.check({}, data)
    assert all(f.property and f.reason for f in result.failures)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    base = tinymodels.make_model(root / "base", "tiny", seed=0)
    return base, tinymodels.make_lora(base, root / "lora", rank=4, seed=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["model.safetensors", "adapter_model.safetensors"]),
       cut=st.integers(0, 4096), header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       header=st.one_of(st.none(), st.binary(max_size=200), st.dictionaries(
           st.text(max_size=30), st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                                                 VALUES, max_size=3), max_size=3).map(lambda d: json.dumps(d).encode())))
def test_truncated_and_lying_safetensors_are_refused_by_name(weights, tmp_path_factory, which, cut, header_len, header):
    base, lora = weights
    target = tmp_path_factory.mktemp("damaged")
    source = base if which == "model.safetensors" else lora
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    raw = (target / which).read_bytes()
    if header is not None:  # a made-up header, with the real length or a lying one
        length = len(header) if header_len is None else header_len
        raw = length.to_bytes(8, "little") + header + raw[8 + int.from_bytes(raw[:8], "little"):]
    elif header_len is not None:  # the real header behind a lying length
        raw = header_len.to_bytes(8, "little") + raw[8:]
    raw = raw[:len(raw) - cut] if cut else raw
    (target / which).write_bytes(raw)
    try:
        if which == "model.safetensors":
            inspect_base_model(target)
        else:
            inspect_adapter(target, json.loads((base / "config.json").read_text()))
    except ModelFilesError as exc:
        assert which in str(exc), str(exc)  # the message names the file at fault


# ---------------------------------------------------------------------------------------------------------
# security


def test_keys_are_stored_hashed_and_every_hash_is_compared_in_constant_time(tmp_path, monkeypatch):
    import hmac

    from ember.provider.domain import accounts

    keys_file = tmp_path / "keys.json"
    keys = [accounts.Accounts.add_key(keys_file, f"account-{i}") for i in range(5)]
    stored = keys_file.read_text()
    assert not any(k in stored for k in keys)  # only SHA-256 hashes at rest
    registry = accounts.Accounts.load(keys_file)
    compared = []
    original = hmac.compare_digest
    monkeypatch.setattr(accounts.hmac, "compare_digest", lambda a, b: compared.append(1) or original(a, b))
    for key, expected in [(keys[0], "account-0"), (keys[4], "account-4"), ("wrong", None)]:
        compared.clear()
        caller = registry.authenticate(key)
        assert (caller.account if caller else None) == expected
        assert len(compared) == 5  # no early exit: timing does not tell where (or whether) a key matched


def test_sigterm_finishes_running_requests_and_takes_no_new_ones(tmp_path):
    """What a rollout or scale-down relies on: on SIGTERM the replica stops listening, lets every running
    request finish (streamed to its end, metered), and only then exits."""
    server = start(tmp_path / "drain")
    key = server.keys["acme"]
    body = {"model": BASE, "prompt": "canary-drain-prompt", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    chunks, finish = [], []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    chunks.append(choice)
                    first.set()
                    if choice["finish_reason"]:
                        finish.append(choice["finish_reason"])

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    server.process.send_signal(signal.SIGTERM)
    streamed_before = len(chunks)
    assert not finish  # still running when the signal came
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no longer listening
        httpx.post(f"{server.url}/v1/completions", json=body | {"stream": False}, timeout=5,
                   headers={"Authorization": f"Bearer {key}"})
    reader.join(60)
    # uvicorn re-raises the signal once it has shut down gracefully, so the exit status says SIGTERM.
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert finish == ["length"] and len(chunks) > streamed_before  # it went on streaming to its end
    assert [(r["status"], r["completion_tokens"]) for r in usage_records(server)] == [("ok", 400)]
