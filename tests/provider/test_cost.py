"""Cost before `up`: estimates with hand-computed figures, the diff, the budget policy, and an estimate that
equals the bill for the same accelerator-seconds."""

import json
import re
from pathlib import Path

import pytest

from ember.provider.tools import billing, cost
from ember.provider.tools.cost import Resource

REPO = Path(__file__).resolve().parents[2]
H100, H200, A100 = "NVIDIA_H100_80GB", "NVIDIA_H200_141GB", "NVIDIA_A100_80GB"


def deployment(name, accelerator, count=1, low=1, high=3, **extra):
    return Resource("Deployment", name, {"accelerator_type": accelerator, "accelerator_count": count,
                                         "min_replicas": low, "max_replicas": high} | extra)


def test_each_resource_kind_is_priced_as_computed_by_hand():
    result = cost.estimate([
        deployment("big", H100, count=2, low=1, high=3),  # $4/h x 2 = $8/h: 730 h x 1 and x 3
        deployment("local", "CPU"),
        Resource("Deployment", "shared", {"deployment_type": "serverless",
                                          "base_model": "accounts/fireworks/models/llama-v3p1-8b-instruct"}),
        Resource("LoRAAddon", "tenant", {"serverless": True, "base_model": "accounts/fireworks/models/llama-v3p1-70b-instruct"}),
        Resource("LoRAAddon", "private", {"base_model": "accounts/acme/models/custom"}),  # rides a dedicated deployment
        Resource("FineTuningJob", "tune", {"dataset": "accounts/acme/datasets/d", "epochs": 3,
                                           "base_model": "accounts/fireworks/models/llama-v3p1-8b-instruct"}),
        Resource("Deployment", "later", {"accelerator_type": "04da6b54-80e4-46f7-96ec-b56ff0331ba9"}),  # unknown yet
    ], dataset_tokens={"accounts/acme/datasets/d": 10_000})
    assert result.as_dict() == {
        "currency": "USD",
        "deployments": [
            {"name": "big", "accelerator_type": H100, "accelerator_count": 2, "monthly_usd_min": 5840.0,
             "monthly_usd_max": 17520.0},
            {"name": "local", "accelerator_type": "CPU", "accelerator_count": 1, "monthly_usd_min": 0.0,
             "monthly_usd_max": 0.0}],
        "serverless": [{"name": "shared", "usd_per_million_tokens": 0.20},
                       {"name": "tenant", "usd_per_million_tokens": 0.90}],
        "fine_tuning": [{"name": "tune", "training_tokens": 30_000, "usd": 0.015}],  # 30k tokens x $0.50/M
        "notes": [],  # no catalog file: nothing is deprecated
        "total_monthly_usd_min": 5840.0, "total_monthly_usd_max": 17520.0}


def test_the_diff_of_an_accelerator_change_shows_both_sides():
    before = cost.estimate([deployment("gpu", H100), deployment("cpu", "CPU")])
    after = cost.estimate([deployment("gpu", H200), deployment("cpu", "CPU")])
    assert cost.diff(before, after) == [
        ("gpu", f"+$2,190/month at max replicas (1 x {H100} → 1 x {H200})"),  # ($5 - $4) x 730 h x 3
        ("total", "+$2,190/month at max replicas ($10,950.00/month, $3,650.00 at min replicas)")]
    assert cost.diff(after, before)[0][1].startswith("-$2,190/month")


def test_a_month_of_replicas_costs_what_the_bill_charges():
    start = 1_700_000_000.0  # whole hours: one replica record of 730 h
    replica = {"replica": "r1", "deployment": "accounts/acme/deployments/gpu", "started": start,
               "last_seen": start + 730 * 3600, "accelerator_type": A100, "accelerator_count": 2,
               "base_model": "accounts/acme/models/m", "deployment_type": "dedicated"}
    billed = sum(c.amount for c in billing.bill([], [replica], period="hour"))
    [estimated] = cost.estimate([deployment("gpu", A100, count=2, low=1, high=1)]).deployments
    assert estimated["monthly_usd_min"] == estimated["monthly_usd_max"] == pytest.approx(billed) == 4234.0


BUDGET_PROGRAM = '''
from ember.provider import Deployment, DeploymentArgs
for name, replicas in (("small", 1), ("large", 4)):
    Deployment(name, DeploymentArgs(account_id="acme", base_model="accounts/fireworks/models/llama-v3p1-8b-instruct",
                                    accelerator_type="NVIDIA_H100_80GB", min_replicas=1, max_replicas=replicas,
                                    cluster="kubernetes"))  # the local cluster runs CPU replicas only
'''


def test_ember_cost_and_the_budget_policy_on_a_program(tmp_path, capsys):
    from ember.provider.tools import cli

    program = tmp_path / "gpus"
    program.mkdir()
    (program / "Pulumi.yaml").write_text("name: gpus\nruntime: python\n")
    (program / "__main__.py").write_text(BUDGET_PROGRAM)
    assert cli.main(["cost", str(program), "--offline", "--format", "json", "--diff"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_monthly_usd_max"] == 4 * 730 * 5 == 14600  # 2,920 + 11,680
    assert report["diff"]["total"].startswith("+$14,600/month")  # nothing exists yet
    config = tmp_path / "budget.json"
    config.write_text(json.dumps({"ember-monthly-budget": {"maximum": 10000}}))
    assert cli.main(["preview", str(program), "--offline", "--policy-pack", "ember",
                     "--policy-pack-config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "+$14,600/month" in out  # the preview's cost change under its steps
    assert ("[mandatory] ember-monthly-budget: the stack's deployments are estimated at $14,600.00/month at "
            "max_replicas, above this policy's budget of $10,000.00/month; the most expensive is large "
            "($11,680.00/month, 1 x NVIDIA_H100_80GB)") in out
    config.write_text(json.dumps({"ember-monthly-budget": {"maximum": 10000, "judgeAt": "min_replicas"}}))
    assert cli.main(["preview", str(program), "--offline", "--policy-pack", "ember",
                     "--policy-pack-config", str(config)]) == 0


@pytest.mark.slow
def test_ember_cost_prices_the_kubernetes_example(tmp_path, capsys):
    """Its pulumi-kubernetes objects are recorded as declared (a plain offline preview refuses them, by type)."""
    import shutil

    from ember.provider.tools import cli, pirate, quickstart

    try:
        quickstart.prepare(tmp_path / "quickstart" / "models", log=lambda _: None)
    except quickstart.QuickstartError as exc:
        pytest.skip(str(exc))
    pirate.write(tmp_path / "fine-tuning" / "data")
    program = tmp_path / "kubernetes"
    shutil.copytree(REPO / "examples/kubernetes", program, ignore=shutil.ignore_patterns(".ember"))
    (program / "Pulumi.gpu.yaml").write_text("config:\n" + "".join(f"  ember-kubernetes:{k}: {v}\n" for k, v in {
        "image": "registry.example.com/ember-runtime:0.1.0", "storeUrl": "s3://ember-models/store",
        "acceleratorType": H100, "minReplicas": '"1"', "maxReplicas": '"3"'}.items()))
    assert cli.main(["cost", str(program), "--stack", "gpu", "--offline", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deployments"] == [{"name": "smollm2-gpu", "accelerator_type": H100, "accelerator_count": 1,
                                      "monthly_usd_min": 2920.0, "monthly_usd_max": 8760.0}]
    [job] = report["fine_tuning"]
    assert job["name"] == "smollm2-pirate-sft" and job["training_tokens"] > 0
    assert cli.main(["preview", str(program), "--stack", "gpu", "--offline"]) == 1
    assert re.search(r"ember:kubernetes:(Deployment|Gateway): the offline runner knows only Ember's resources",
                     capsys.readouterr().err)


def test_a_deployment_that_scales_to_zero_costs_from_nothing_up_to_its_max():
    result = cost.estimate([deployment("idle", H100, count=2, low=0, high=2,
                                       autoscaling={"scale_to_zero_window_s": 300})])  # $8/h: 0 to 2 replicas
    [priced] = result.as_dict()["deployments"]
    assert priced["monthly_usd_min"] == 0.0 and priced["monthly_usd_max"] == 11680.0
