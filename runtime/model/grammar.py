"""Grammar-constrained decoding (structured outputs) with llguidance: a JSON schema in, a token mask per step out.

llguidance (the grammar engine vLLM and llama.cpp use) is a Rust library with no Python dependencies, so the
runtime image stays small; it reads the model's tokenizer.json itself. A constrained request owns a matcher:
before each of its tokens is sampled, the matcher's mask leaves only the tokens that keep the output inside the
grammar (the end-of-sequence token once the JSON is complete); the sampled token is then fed back to it. Free
requests in the same batch are untouched.
"""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from ember.runtime.model.tokenizer import TextTokenizer

JSON_OBJECT = {"type": "object"}  # response_format json_object: any JSON object


# JSON written as json.dumps writes it: no room for a model to wander off into whitespace (a schema's own
# "x-guidance" options override these).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_grammar(schema: dict | None) -> str:
    """The llguidance grammar of JSON documents that satisfy `schema` (any object when None)."""
    return LLMatcher.grammar_from_json_schema(json.dumps(schema if schema is not None else JSON_OBJECT),
                                              defaults=JSON_STYLE)


class Grammars:
    """One model's grammar support: its llguidance tokenizer (built once, on the first constrained request)."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)

    @cached_property
    def _llg_tokenizer(self) -> LLTokenizer:
        return LLTokenizer(self.tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.stop_token_ids)

    def matcher(self, grammar: str) -> LLMatcher:
        """A fresh matcher for one request; ValueError naming the fault when the grammar cannot be served."""
        matcher = LLMatcher(self._llg_tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"response_format: the schema cannot be enforced: {matcher.get_error()}")
        return matcher

    def allowed(self, matcher: LLMatcher) -> torch.Tensor:
        """The tokens the matcher allows next, as a boolean vector over the vocabulary."""
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].astype(bool))


def constrain(logits: torch.Tensor, rows: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """`logits` with each listed row limited to its allowed tokens (a copy when any row is)."""
    if not rows:
        return logits
    logits = logits.clone()
    for row, allowed in rows:
        logits[row].masked_fill_(~allowed.to(logits.device), float("-inf"))
    return logits
