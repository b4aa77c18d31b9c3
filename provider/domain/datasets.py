"""Fine-tuning datasets: JSONL files of chat conversations, checked line by line.

One example per line, `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`, the
last message an assistant's (what the model learns to say). The provider checks a file at preview and the
training process reads it with the same function, so both refuse the same lines with the same words. Pure:
no tokenizer here (how long an example is depends on the base model; the training process checks that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ember.provider.domain import file_kinds

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content"}
MIN_EXAMPLES = 3
REPORTED = 5  # the first bad lines named in an error


class DatasetError(ValueError):
    """A dataset that cannot be trained on: `.problems` lists (line number, what is wrong), first ones first."""

    def __init__(self, source: str, problems: list[tuple[int | None, str]], bad_lines: int | None = None):
        self.problems = problems
        shown = "; ".join(f"line {line}: {message}" if line else message for line, message in problems[:REPORTED])
        more = (bad_lines or len(problems)) - min(len(problems), REPORTED)
        super().__init__(f"{source}: {shown}" + (f" (and {more} more bad lines)" if more > 0 else ""))


@dataclass(frozen=True)
class Dataset:
    examples: list[list[dict[str, str]]]  # each a conversation: [{"role", "content"}, ...]
    lines: list[int]  # the file's line number of each example

    @property
    def message_count(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def character_count(self) -> int:
        return sum(len(m["content"]) for e in self.examples for m in e)


def _check_line(raw: str) -> list[dict[str, str]]:
    """One example, or ValueError saying what is wrong with it."""
    try:
        example = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
        raise ValueError('needs an object with a "messages" list')
    messages = example["messages"]
    if not messages:
        raise ValueError('"messages" is empty')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] is {type(message).__name__}, not an object with role and content")
        if set(message) - MESSAGE_KEYS:
            raise ValueError(f"messages[{i}] has unknown keys {sorted(set(message) - MESSAGE_KEYS)}; "
                             f"a message has role and content")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role {message.get('role')!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}].content is empty (every message needs text)")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message is the {messages[-1]['role']}'s: an example ends with the assistant's "
                         f"answer, which is what is learned")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_dataset(text: str, source: str = "dataset") -> Dataset:
    """Every example of a JSONL chat dataset, or DatasetError naming the first bad lines (blank lines are skipped)."""
    examples, lines, problems, bad = [], [], [], 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            examples.append(_check_line(raw))
            lines.append(number)
        except ValueError as exc:
            bad += 1
            if len(problems) < REPORTED:
                problems.append((number, str(exc)))
    if problems:
        raise DatasetError(source, problems, bad)
    if len(examples) < MIN_EXAMPLES:
        raise DatasetError(source, [(None, f"{len(examples)} examples; a dataset needs at least {MIN_EXAMPLES}")])
    return Dataset(examples, lines)


def read_dataset(path: str, source: str | None = None) -> Dataset:
    """A dataset file (a local path or an fsspec URL), parsed and checked."""
    return parse_dataset_bytes(read_dataset_bytes(path, source), source or path)


def read_dataset_bytes(path: str, source: str | None = None) -> bytes:
    """A dataset file's bytes (what an upload stores, once checked)."""
    import fsspec

    if "://" not in path or path.startswith("file://"):  # a FIFO would block this read forever: refused first
        problem = file_kinds.problem(path.removeprefix("file://"))
        if problem is not None:
            raise DatasetError(source or path, [(None, problem)])
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(source or path, [(None, "does not exist")]) from None


def parse_dataset_bytes(raw: bytes, source: str) -> Dataset:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(source, [(None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    return parse_dataset(text, source)
