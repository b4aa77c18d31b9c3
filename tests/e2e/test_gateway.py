"""The gateway in front of real replicas, as a stack declares it: one endpoint for the base model and its addons
(the official openai client), per-account access, streaming and aborts metered once, a replica killed under traffic,
and no prompt, key or completion in its log or metrics."""

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from tests.provider.provider_helpers import config, make_models, replica_pids

from ember.provider.domain.accounts import Accounts
from ember.provider.tools.runner import OfflineRunner

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

BASE, PIRATE, POET = (f"accounts/acme/models/{m}" for m in ("base", "pirate", "poet"))
PROD = "accounts/acme/deployments/prod"
CANARY = "CANARY-gateway-e2e-51c9"
PROGRAM = '''
import pulumi
from ember.provider import Deployment, DeploymentArgs, Gateway, GatewayArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

base = Model("base", ModelArgs(account_id="acme", source="models/base"))
prod = Deployment("prod", DeploymentArgs(account_id="acme", base_model=base, min_replicas=2, max_replicas=2,
                                         max_loras=2))
addons = [LoRAAddon(name, LoRAAddonArgs(account_id="acme", base_model=base, source=f"models/{name}", deployments=[prod]))
          for name in ("pirate", "poet")]
gateway = Gateway("front", GatewayArgs(account_id="platform", rate_limits={"requests_per_minute": 6000}))
pulumi.export("gateway", gateway.url)
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    program = root / "program"
    make_models(program / "models")
    (program / "Pulumi.yaml").write_text("name: gateway\nruntime: python\n")
    (program / "__main__.py").write_text(PROGRAM)
    cfg = config(root)
    runner = OfflineRunner(program, config=cfg, log=lambda _: None)
    try:
        url = runner.up()["gateway"]
        keys = {account: (cfg.state_dir / "keys" / f"{account}.key").read_text().strip()
                for account in ("acme", "platform")}
        keys["globex"] = Accounts.add_key(cfg.state_dir / "store" / "keys.json", "globex")
        yield runner, cfg, url, keys
    finally:
        runner.destroy()


def client(url: str, key: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_openai_client_calls_the_base_and_both_addons_and_pins_a_deployment(stack):
    _, _, url, keys = stack
    acme = client(url, keys["acme"])
    assert {m.id for m in acme.models.list()} == {BASE, PIRATE, POET}
    for model in (BASE, PIRATE, POET, f"{BASE}#{PROD}", f"{PIRATE}#{PROD}"):
        answer = acme.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=4, temperature=0)
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
        assert answer.model == model.split("#")[0]
    with pytest.raises(openai.NotFoundError):
        acme.completions.create(model=f"{BASE}#accounts/acme/deployments/nowhere", prompt="hi", max_tokens=2)
    stream = acme.completions.create(model=POET, prompt="once upon", max_tokens=6, stream=True,
                                     stream_options={"include_usage": True})
    chunks = list(stream)  # passed through as the replica sent them: text chunks, then the usage
    assert chunks[-1].usage.completion_tokens == 6 and sum(bool(c.choices) for c in chunks) >= 2


def test_a_second_account_neither_lists_nor_uses_the_first_accounts_addons(stack):
    _, _, url, keys = stack
    globex = client(url, keys["globex"])
    assert [m.id for m in globex.models.list()] == []
    for model in (BASE, PIRATE, f"{PIRATE}#{PROD}"):
        with pytest.raises(openai.NotFoundError) as refused:
            globex.completions.create(model=model, prompt="hi", max_tokens=2)
        assert refused.value.body["code"] == "model_not_found"


def usage_lines(cfg) -> list[dict]:
    lines = []
    for path in glob.glob(str(cfg.state_dir / "store" / "usage" / "*" / "requests-*.jsonl")):
        lines += [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return lines


def test_a_stream_whose_client_leaves_is_aborted_on_the_replica_and_metered_once(stack):
    _, cfg, url, keys = stack
    body = {"model": PIRATE, "prompt": CANARY, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {keys['acme']}"}) as response:
        assert response.status_code == 200, response.read()
        first = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        records = [r for r in usage_lines(cfg) if r["response_id"] == first["id"]]
        if records:
            break
        time.sleep(0.2)
    time.sleep(1)  # a second record, were there one, would be written by now
    records = [r for r in usage_lines(cfg) if r["response_id"] == first["id"]]
    assert len(records) == 1 and records[0]["status"] == "aborted" and records[0]["completion_tokens"] < 400


def test_the_gateway_keeps_no_prompt_completion_or_key_in_its_log_or_metrics(stack):
    _, cfg, url, keys = stack
    answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys['acme']}"}, timeout=60,
                        json={"model": BASE, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 8})
    completion = answer.json()["choices"][0]["message"]["content"]
    httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {keys['acme']}"}, timeout=60,
               json={"model": CANARY, "prompt": CANARY})  # a bad name: refused, and not echoed into any label
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {keys['platform']}"}, timeout=10).text
    assert "ember_gateway_requests_total" in metrics
    [log] = glob.glob(str(cfg.state_dir / "logs" / "platform" / "gateway-front-*.log"))
    seen = Path(log).read_text() + metrics
    assert "POST /v1/chat/completions" in seen  # the access log is there: it holds no text
    for secret in (CANARY, keys["acme"], keys["platform"], keys["globex"]):
        assert secret not in seen
    assert len(completion) > 3 and completion not in seen


def test_a_replica_killed_under_traffic_costs_no_request_that_had_not_started_streaming(stack):
    runner, cfg, url, keys = stack
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    pids = replica_pids(cfg, "acme", "prod")
    assert len(pids) == 2
    whole, streamed, stop = [], [], threading.Event()

    def ask_whole():
        while not stop.is_set():
            r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                           json={"model": PIRATE, "prompt": "hi there", "max_tokens": 24, "ignore_eos": True})
            whole.append(r.status_code)

    def ask_streaming():
        while not stop.is_set():
            began = False
            try:
                with httpx.stream("POST", f"{url}/v1/completions", headers=headers, timeout=60,
                                  json={"model": BASE, "prompt": "hi", "max_tokens": 24, "ignore_eos": True,
                                        "stream": True}) as response:
                    began = response.status_code == 200
                    text = response.read().decode()
                streamed.append("complete" if began and text.rstrip().endswith("data: [DONE]")
                                else f"status {response.status_code}")
            except httpx.TransportError as exc:
                streamed.append("cut while streaming" if began else f"failed before streaming: {type(exc).__name__}")

    threads = [threading.Thread(target=ask_whole) for _ in range(4)] + \
              [threading.Thread(target=ask_streaming) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
        assert not thread.is_alive()
    assert whole and set(whole) == {200}, whole  # every whole request was answered, on the replica left if need be
    assert streamed and set(streamed) <= {"complete", "cut while streaming"}, streamed
    print(f"\n[gateway] a replica of 2 killed under 6 clients: {len(whole)} whole requests all answered, "
          f"{streamed.count('complete')} streams complete, {streamed.count('cut while streaming')} cut after they "
          f"began (the killed replica's), none failed before streaming")
    runner.refresh()  # reports the drift, and the next up starts the replica again
    runner.up()
    assert len(replica_pids(cfg, "acme", "prod")) == 2 and pids[0] not in replica_pids(cfg, "acme", "prod")
