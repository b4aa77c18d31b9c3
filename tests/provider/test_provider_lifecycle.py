"""A Pulumi program through the SDK's mocks and the real providers: create, no-op, in-place, replace, destroy."""

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
from tests.provider.provider_helpers import alive, config, make_models, replica_pids, served_addons, store_entries

from ember.provider.domain.audit import AuditLog
from ember.provider.tools.runner import OfflineRunner, RunError

REPO = Path(__file__).resolve().parents[2]
PROGRAM = '''
import json
import pulumi
from ember.provider.resources import (Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs)

s = json.load(open("settings.json"))
base = Model("base", ModelArgs(account_id="acme", source=s["base_source"]))
local = Deployment("local", DeploymentArgs(account_id="acme", base_model=base, min_replicas=s["replicas"],
                                           max_replicas=s["replicas"], description=s["description"],
                                           max_loras=s.get("max_loras"), accelerator_type=s.get("accelerator")))
addons = [LoRAAddon(name, LoRAAddonArgs(account_id="acme", base_model=base, source=f"models/{name}",
                                        deployments=[local] if name in s["attached"] else []))
          for name in ("pirate", "poet")]
pulumi.export("endpoint", local.endpoints.apply(lambda e: e[0] if e else None))
'''


def port_open(endpoint: str) -> bool:
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_program_lifecycle(tmp_path):
    program = tmp_path / "program"
    make_models(program / "models")
    make_models(program / "models-b", seed=7)
    (program / "Pulumi.yaml").write_text("name: lifecycle\nruntime: python\n")
    (program / "__main__.py").write_text(PROGRAM)
    settings = {"base_source": "models/base", "replicas": 1, "description": "first", "attached": ["pirate", "poet"]}

    def up(**changes):
        settings.update(changes)
        (program / "settings.json").write_text(json.dumps(settings))
        runner = OfflineRunner(program, config=cfg, log=lambda _: None)
        outputs = runner.up()
        return runner, outputs, {(s.type, s.name): s.op for s in runner.steps}

    cfg = config(tmp_path)
    try:
        _lifecycle(up, cfg)
    finally:  # a failure must not leave replicas running
        OfflineRunner(program, config=cfg, log=lambda _: None).destroy()


def _lifecycle(up, cfg):
    runner, outputs, steps = up()
    assert set(steps.values()) == {"create"} and len(steps) == 4
    endpoint = outputs["endpoint"]
    assert served_addons(endpoint, cfg, "acme") == {"accounts/acme/models/pirate", "accounts/acme/models/poet"}
    audit = AuditLog(cfg.store_url)
    assert {(r.action, r.target) for r in audit.read(account="acme")} >= {
        ("addon.loaded", "accounts/acme/models/pirate"), ("addon.loaded", "accounts/acme/models/poet")}
    [first_pid] = replica_pids(cfg, "acme", "local")

    runner, outputs, steps = up()
    assert set(steps.values()) == {"same"}  # a second run with no change is a no-op
    assert replica_pids(cfg, "acme", "local") == [first_pid]
    assert [s.detail for s in runner.refresh()] == [""] * 4  # a refresh right after up: no drift

    # Issue 12 item 3: what the local cluster cannot run fails at preview, and up leaves the live replica alone
    with pytest.raises(RunError, match="accelerator_type: the local cluster runs CPU replicas only"):
        up(accelerator="NVIDIA_H100_80GB")
    assert alive(first_pid)
    # Issue 12 item 2: a replacement of the deployment serves its addons again in the same up; its new replica starts
    # on a new port beside the old one, which then drains and stops (issue 31)
    runner, outputs, steps = up(accelerator=None, max_loras=2)
    assert steps[("Deployment", "local")] == "replace"
    assert steps[("LoRAAddon", "pirate")] == steps[("LoRAAddon", "poet")] == steps[("Model", "base")] == "same"
    assert outputs["endpoint"] != endpoint and not alive(first_pid)
    endpoint = outputs["endpoint"]
    assert served_addons(endpoint, cfg, "acme") == {"accounts/acme/models/pirate", "accounts/acme/models/poet"}
    [first_pid] = replica_pids(cfg, "acme", "local")
    assert [s.detail for s in runner.refresh()] == [""] * 4
    # Issue 12 item 7: real drift shows, and the next up repairs it
    key = (cfg.state_dir / "keys" / "acme.key").read_text().strip()
    request = urllib.request.Request(f"{endpoint}/admin/adapters/accounts/acme/models/poet", method="DELETE",
                                     headers={"Authorization": f"Bearer {key}"})
    urllib.request.urlopen(request, timeout=30).close()
    drift = {s.name: s.detail for s in runner.refresh() if s.detail}
    assert drift == {"poet": "drift: deployed_on"}
    runner, outputs, steps = up()
    assert steps[("LoRAAddon", "poet")] == "update" and set(steps.values()) == {"same", "update"}
    assert served_addons(endpoint, cfg, "acme") == {"accounts/acme/models/pirate", "accounts/acme/models/poet"}

    before = len(audit.read())
    runner, outputs, steps = up(description="second", replicas=2, attached=["pirate"])
    assert steps[("Deployment", "local")] == "update" and steps[("LoRAAddon", "poet")] == "update"
    # the addon change in the audit log: poet unloaded from the running replica at the provider's call (its key), and
    # the new replica loading what the store wants by itself
    changes = {(r.action, r.target, r.actor) for r in audit.read()[before:]}
    assert ("addon.unloaded", "accounts/acme/models/poet", "accounts/acme/apiKeys/default") in changes
    assert ("addon.loaded", "accounts/acme/models/pirate", "replica:accounts/acme/deployments/local") in changes
    assert not {c for c in changes if c[0] == "addon.loaded" and c[1].endswith("/poet")}
    assert steps[("Model", "base")] == "same" and steps[("LoRAAddon", "pirate")] == "same"
    pids = replica_pids(cfg, "acme", "local")
    assert len(pids) == 2 and pids[0] == first_pid  # in place: the running replica was not restarted
    assert served_addons(endpoint, cfg, "acme") == {"accounts/acme/models/pirate"}
    state = runner.state.resources["pulumi-python:dynamic/ember:LoRAAddon::poet"]["outputs"]
    assert state["deployed_on"] == []

    runner, outputs, steps = up(base_source="models-b/base")  # new weights
    assert steps[("Model", "base")] == "replace" and steps[("Deployment", "local")] == "replace"
    assert steps[("LoRAAddon", "pirate")] == "replace"
    new_pids = replica_pids(cfg, "acme", "local")
    assert not set(new_pids) & set(pids) and not any(alive(p) for p in pids)

    assert [s.detail for s in runner.refresh()] == [""] * 4
    runner.destroy()
    assert not any(alive(p) for p in new_pids) and not port_open(outputs["endpoint"])
    assert store_entries(cfg) == []
    assert runner.state.resources == {}


@pytest.mark.slow
def test_quickstart_program_answers_and_detects_a_dead_replica(tmp_path, capsys):
    from ember.provider.tools import cli

    program = tmp_path / "quickstart"
    shutil.copytree(REPO / "examples/quickstart", program, ignore=shutil.ignore_patterns(".ember", "models"))
    assert cli.main(["quickstart", "--stack", str(program / "stack.json")]) == 0
    try:
        assert cli.main(["up", str(program), "--offline"]) == 0
        printed = capsys.readouterr().out
        assert printed.count("answer from accounts/quickstart/models/") == 3
        gateway = json.loads(printed.split("  gateway: ", 1)[1].splitlines()[0])
        assert f"asking each model, through {gateway}:" in printed  # the demo asks through the gateway
        cfg = OfflineRunner(program, log=lambda _: None).config
        key = (cfg.state_dir / "keys" / "quickstart.key").read_text()
        state_text = "".join(p.read_text() for p in (cfg.state_dir / "stacks").glob("*.json"))
        assert key not in state_text and key not in (cfg.state_dir / "store" / "keys.json").read_text()
        _quickstart_audit(program, cfg, capsys)
        [pid] = replica_pids(cfg, "quickstart", "smollm2-local")
        __import__("os").kill(pid, 9)
        assert cli.main(["refresh", str(program), "--offline"]) == 0
        assert "drift: " in capsys.readouterr().out
        assert cli.main(["up", str(program), "--offline", "--no-demo"]) == 0  # the next up restores it
        [again] = replica_pids(cfg, "quickstart", "smollm2-local")
        assert again != pid and alive(again)
        # a replacement of the deployment: both addons answer again after this one up, with no second run
        main = program / "__main__.py"
        main.write_text(main.read_text().replace("max_loras=4", "max_loras=2"))
        capsys.readouterr()
        assert cli.main(["up", str(program), "--offline"]) == 0
        printed = capsys.readouterr().out
        assert "replace  Deployment  smollm2-local  (max_loras: 4 → 2)" in printed
        assert printed.count("answer from accounts/quickstart/models/") == 3
        assert cli.main(["refresh", str(program), "--offline"]) == 0
        assert "drift" not in capsys.readouterr().out
        assert cli.main(["up", str(program), "--offline", "--no-demo"]) == 0
        printed = capsys.readouterr().out
        assert {line.split()[0] for line in printed.splitlines() if line.startswith("  ")} - \
            {"same", "endpoint:", "models:", "account:", "gateway:", "app_key:"} == set()
        assert 'app_key: "[secret]"' in printed  # the applications' key: a secret output, never printed
    finally:
        assert cli.main(["destroy", str(program), "--offline"]) == 0
    assert store_entries(OfflineRunner(program, log=lambda _: None).config) == []


def _quickstart_audit(program: Path, cfg, capsys) -> None:
    """The audit log of the quickstart's first up: its addons loaded on its deployment, the account's key made; and
    `ember audit` finds the program's store by itself."""
    from ember.provider.tools import cli

    records = AuditLog(cfg.store_url).read(account="quickstart")
    loaded = {r.target for r in records if r.action == "addon.loaded" and r.result == "ok"}
    assert loaded == {"accounts/quickstart/models/smollm2-pirate", "accounts/quickstart/models/smollm2-poet"}
    on = "on accounts/quickstart/deployments/smollm2-local"
    assert {r.detail for r in records if r.action == "addon.loaded"} == {on}
    assert "key.created" in {r.action for r in records}
    capsys.readouterr()
    assert cli.main(["audit", str(program), "--account", "quickstart"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["time", "account", "actor", "action", "target", "result", "detail"]
    assert len(table) == len(records) + 1 and sum(" addon.loaded " in line for line in table) == len(loaded)
