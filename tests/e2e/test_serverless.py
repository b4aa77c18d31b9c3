"""Serverless end to end: a platform stack serves a catalog base; two accounts' stacks add their addons to it.

Each addon answers only its own account; each account is billed per token for exactly its own traffic.
"""

import json
import shutil
from pathlib import Path

import httpx
import pytest
from tests.provider.provider_helpers import alive, replica_pids

from ember.provider.tools import billing, cli
from ember.provider.tools.runner import OfflineRunner
from ember.runtime.devtools import tinymodels

REPO = Path(__file__).resolve().parents[2]
BASE = "accounts/platform/models/llama-v3p1-8b-instruct"
ADDONS = {"acme": "accounts/acme/models/support-bot", "globex": "accounts/globex/models/legal-drafts"}


def complete(endpoint, key, model, n):
    response = httpx.post(f"{endpoint}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          json={"model": model, "prompt": "canary-serverless-prompt", "max_tokens": n})
    return response


@pytest.mark.slow
def test_two_accounts_share_a_serverless_base_and_pay_for_their_own_tokens(tmp_path, capsys):
    root = tmp_path / "serverless"
    shutil.copytree(REPO / "examples/serverless", root, ignore=shutil.ignore_patterns(".ember", "models"))
    platform, tenant = root / "platform", root / "tenant"
    # the operator's one-off step: the catalog model's weights in the store (tiny ones here)
    base = tinymodels.make_model(root / ".ember" / "store" / "catalog" / "llama-v3p1-8b-instruct", "tiny", seed=0)
    tinymodels.make_lora(base, tenant / "models" / "support-bot", rank=4, seed=1)
    tinymodels.make_lora(base, tenant / "models" / "legal-drafts", rank=8, seed=2)

    quiet = dict(log=lambda _: None)
    runners = [OfflineRunner(platform, **quiet), OfflineRunner(tenant, "acme", **quiet),
               OfflineRunner(tenant, "globex", **quiet)]
    try:
        platform_outputs = runners[0].up()
        endpoint, gateway = platform_outputs["endpoint"], platform_outputs["gateway"]
        shared = "accounts/platform/deployments/llama-8b-serverless"
        for runner, (account, addon) in zip(runners[1:], ADDONS.items()):
            outputs = runner.up()  # a tenant's stack exports the platform's gateway, which it reads (Gateway.get)
            assert outputs == {"model": addon, "gateway": gateway, "deployed_on": [shared]}
        cfg = runners[0].config
        assert all(r.config.state_dir == cfg.state_dir for r in runners)  # one store, from ember:stateDir
        keys = {a: (cfg.state_dir / "keys" / f"{a}.key").read_text().strip() for a in ADDONS}

        used = {account: 0 for account in ADDONS}
        for account, own in ADDONS.items():  # through the platform's gateway, the one endpoint tenants call
            for model, n in ((own, 5), (BASE, 3)):
                answer = complete(gateway, keys[account], model, n)
                assert answer.status_code == 200, answer.text
                used[account] += answer.json()["usage"]["total_tokens"]
            other = next(a for a in ADDONS.values() if a != own)
            for url in (gateway, endpoint):  # the gateway and the replica answer it alike: as an unknown model
                refused = complete(url, keys[account], other, 2)
                assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
            listed = httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {keys[account]}"}).json()
            assert {m["id"] for m in listed["data"]} == {BASE, own}

        for account in ADDONS:  # each account reads its own usage over HTTP, and only its own
            auth = {"Authorization": f"Bearer {keys[account]}"}
            mine = httpx.get(f"{endpoint}/v1/usage", headers=auth).json()
            assert {r["account_id"] for r in mine["data"]} == {account} and mine["totals"]["requests"] == 2
            assert mine["totals"]["prompt_tokens"] + mine["totals"]["completion_tokens"] == used[account]
            assert "canary-serverless-prompt" not in json.dumps(mine)
            other = next(a for a in ADDONS if a != account)
            denied = httpx.get(f"{endpoint}/v1/usage", params={"account": other}, headers=auth)
            assert denied.status_code == 403 and denied.json()["error"]["param"] == "account"
        assert httpx.get(f"{endpoint}/v1/usage").status_code == 401

        assert cli.main(["usage", str(tenant), "--stack", "acme", "--format", "json"]) == 0
        report = json.loads(capsys.readouterr().out)
        price = billing.DEFAULT_PRICES.per_million_tokens(8_030_261_248)  # the catalog size, not the tiny weights
        assert price == 0.20
        tokens = {a: sum(c["quantity"] for c in report["charges"] if c["account_id"] == a) for a in ADDONS}
        assert tokens == used
        amounts = {t["account_id"]: t["amount"] for t in report["totals"]}
        assert amounts == {a: pytest.approx(used[a] / 1e6 * price) for a in ADDONS}
        assert "platform" not in amounts  # the serverless replica's own time is not billed to anyone
        assert "canary-serverless-prompt" not in json.dumps(report)
        [pid] = replica_pids(cfg, "platform", "llama-8b-serverless")
    finally:
        for runner in reversed(runners):
            runner.destroy()
    assert not alive(pid)
