"""A client loop through the gateway, held across a change of a live stack: requests, streamed and not, for the base
model and addons, each judged complete (a whole JSON answer with its usage; a stream with every chunk, its usage and
[DONE]) and kept with its response id, so a test can match every answer to exactly one usage record."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

MAX_TOKENS = 4


@dataclass(frozen=True)
class Answer:
    model: str
    streamed: bool
    status: int
    complete: bool
    response_id: str | None
    detail: str  # what was wrong, for the assertion message (never the completion's text)


def ask(client: httpx.Client, url: str, key: str, model: str, streamed: bool) -> Answer:
    body = {"model": model, "prompt": "the sea", "max_tokens": MAX_TOKENS, "temperature": 0}
    if streamed:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        response = client.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        return Answer(model, streamed, 0, False, None, type(exc).__name__)
    if response.status_code != 200:
        return Answer(model, streamed, response.status_code, False, None, response.text[:200])
    if not streamed:
        answer = response.json()
        complete = answer.get("usage", {}).get("completion_tokens") == MAX_TOKENS and bool(answer.get("choices"))
        return Answer(model, streamed, 200, complete, answer.get("id"), "" if complete else "no usage")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return Answer(model, streamed, 200, False, None, "a stream without [DONE]")
    chunks = [json.loads(e) for e in events[:-1]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    complete = len(usage) == 1 and usage[0]["completion_tokens"] == MAX_TOKENS
    return Answer(model, streamed, 200, complete, chunks[0].get("id") if chunks else None,
                  "" if complete else "a stream without its usage")


class TrafficLoop:
    """`threads` clients sending requests in turn for each of `models`, streamed and not, while a change runs."""

    def __init__(self, url: str, key: str, models: list[str], threads: int = 2):
        self.url, self.key, self.models, self.threads = url, key, models, threads
        self.answers: list[Answer] = []

    def across(self, change: Callable[[], object], minimum: int = 200, limit_s: float = 600.0) -> list[Answer]:
        """Run `change` while the loop runs; the loop goes on until the change is done and at least `minimum` requests
        were answered (at most `limit_s`). The answers given meanwhile."""
        answers: list[Answer] = []
        done = threading.Event()
        turns = itertools.count()
        lock = threading.Lock()
        deadline = time.monotonic() + limit_s

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                while time.monotonic() < deadline:
                    with lock:
                        if done.is_set() and len(answers) >= minimum:
                            return
                        turn = next(turns)
                    model = self.models[turn % len(self.models)]
                    answer = ask(http, self.url, self.key, model, streamed=turn // len(self.models) % 2 == 1)
                    with lock:
                        answers.append(answer)

        workers = [threading.Thread(target=client, daemon=True) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            change()
        finally:
            done.set()
            for worker in workers:
                worker.join(timeout=limit_s)
        self.answers += answers
        return answers


def failures(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.status != 200 or not a.complete]


def metered_ids(usage_root: Path) -> list[str]:
    """The response ids of every usage record under the store's usage folder."""
    ids = []
    for path in sorted(usage_root.rglob("requests-*.jsonl")):
        ids += [json.loads(line).get("response_id") for line in path.read_text().splitlines() if line]
    return ids
