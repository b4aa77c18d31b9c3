"""No prompt or output text anywhere a server writes — logs, usage, metrics, errors — unless opted in."""

import pytest
from tests.runtime.server_helpers import BASE, PIRATE, metrics_text, start

openai = pytest.importorskip("openai")
CANARY = "zqxcanary"


def written_text(server) -> str:
    """Everything the server wrote: its log, every file under its directory but the models, its metrics."""
    parts = [metrics_text(server)]
    for path in server.root.rglob("*"):
        if path.is_file() and "models" not in path.relative_to(server.root).parts:
            parts.append(path.read_bytes().decode(errors="replace"))
    return "\n".join(parts)


def send_canaries(server) -> list[str]:
    """Prompts, messages and stop strings carrying canaries, through every path (ok, stream, errors)."""
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0)
    outputs = []
    for i, model in enumerate([BASE, PIRATE]):
        out = c.completions.create(model=model, prompt=f"{CANARY}-prompt-{i} secret", max_tokens=24,
                                   stop=[f"{CANARY}-stop"], temperature=0, extra_body={"ignore_eos": True})
        outputs.append(out.choices[0].text)
        chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"{CANARY}-chat-{i}"}],
                                         max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        outputs.append(chat.choices[0].message.content)
        for chunk in c.chat.completions.create(model=model, stream=True, max_tokens=8,
                                               messages=[{"role": "user", "content": f"{CANARY}-stream-{i}"}]):
            pass
    for bad in (lambda: c.completions.create(model=BASE, prompt=f"{CANARY}-long " * 400, max_tokens=4),
                lambda: c.completions.create(model=BASE, prompt=f"{CANARY}-bad", temperature=9),
                lambda: c.completions.create(model=f"{CANARY}-model", prompt=f"{CANARY}-unknown-model")):
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as info:
            bad()
        assert f"{CANARY}-long" not in str(info.value.body) and f"{CANARY}-bad" not in str(info.value.body)
    return [o for o in outputs if len(o.strip()) >= 12]


def test_no_request_text_is_written_anywhere(tmp_path):
    server = start(tmp_path)
    try:
        outputs = send_canaries(server)
        text = written_text(server)
        assert "POST /v1/completions" in text  # the log was captured
    finally:
        server.stop()
    text += server.log.read_text()
    for prompt_part in ("prompt-0", "prompt-1", "chat-0", "stream-1", "long", "-stop"):
        assert f"{CANARY}-{prompt_part}" not in text
    assert outputs and not [o for o in outputs if o.strip() in text]


def test_opt_in_request_log_is_the_only_place_with_text(tmp_path):
    request_log = tmp_path / "requests.log"
    server = start(tmp_path / "srv", extra=["--request-log", str(request_log), "--retention-days", "7"])
    try:
        send_canaries(server)
        text = written_text(server)
    finally:
        server.stop()
    logged = request_log.read_text()
    assert f"{CANARY}-prompt-0" in logged and f"{CANARY}-chat-1" in logged
    assert CANARY not in text.replace(logged, "") + server.log.read_text()


def test_request_log_retention_is_enforced(tmp_path):
    import json
    import time

    from ember.runtime.serving.request_log import DAY, RequestLog

    path = tmp_path / "log.jsonl"
    old, recent = time.time() - 10 * DAY, time.time() - DAY
    path.write_text(json.dumps({"time": old, "prompt": "old"}) + "\n" + json.dumps({"time": recent, "prompt": "new"}) + "\n")
    log = RequestLog(str(path), retention_days=7)
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["new"]
    assert log.sweep(now=time.time() + 7 * DAY) == 1 and path.read_text() == ""
    with pytest.raises(ValueError, match="retention_days: 0"):
        RequestLog(str(path), 0)
