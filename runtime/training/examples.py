"""Chat examples as token ids with a loss mask: the model learns the assistant's turns and nothing else.

Each conversation is rendered once with the base model's chat template. The assistant turns are found by
rendering the conversation up to each of them (the prompt, with the generation prompt) and through it: the
characters between belong to that answer, its end-of-turn token included, so the model learns to stop. Token
offsets map characters to tokens, so BPE merges at a boundary cannot shift the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.provider.domain.datasets import Dataset, DatasetError
from ember.runtime.model.tokenizer import TextTokenizer


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is part of an assistant turn

    @property
    def assistant_tokens(self) -> int:
        return sum(self.loss_mask)


def tokenize_example(tokenizer: TextTokenizer, messages: list[dict[str, str]]) -> TokenizedExample:
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(prompt) and full.startswith(through) and len(prompt) < len(through)):
            raise ValueError("the model's chat template does not render a conversation as its turns one after "
                             "another, so the assistant's tokens cannot be told apart")
        spans.append((len(prompt), len(through)))
    encoding = tokenizer.tokenizer.encode(full, add_special_tokens=False)
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding.offsets]
    return TokenizedExample(list(encoding.ids), mask)


def tokenize_dataset(tokenizer: TextTokenizer, dataset: Dataset, max_length: int, source: str) -> list[TokenizedExample]:
    """Every example tokenized; examples longer than `max_length` tokens are refused by line, as a bad line is."""
    examples, problems = [], []
    for number, messages in zip(dataset.lines, dataset.examples):
        example = tokenize_example(tokenizer, messages)
        if len(example.input_ids) > max_length:
            problems.append((number, f"{len(example.input_ids)} tokens after the chat template, above "
                                     f"max_context_length {max_length}"))
        elif not example.assistant_tokens:
            problems.append((number, "no assistant tokens after the chat template"))
        examples.append(example)
    if problems:
        raise DatasetError(source, problems)
    return examples
