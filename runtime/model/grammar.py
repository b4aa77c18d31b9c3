"""Grammar-constrained decoding (structured outputs) with llguidance: a JSON schema in, a token mask per step out.

llguidance (the grammar engine vLLM and llama.cpp use) is a Rust library with no Python dependencies, so the
runtime image stays small; it reads the model's tokenizer.json itself. A constrained request owns a matcher:
before each of its tokens is sampled, the matcher's mask leaves only the tokens that keep the output inside the
grammar (the end-of-sequence token once the JSON is complete); the sampled token is then fed back to it. Free
requests in the same batch are untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from ember.runtime.model.finite_schema import has_finite_instance
from ember.runtime.model.tokenizer import TextTokenizer

JSON_OBJECT = {"type": "object"}  # response_format json_object: any JSON object


# JSON written as json.dumps writes it: no room for a model to wander off into whitespace (a schema's own
# "x-guidance" options override these).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# What one grammar may cost, in llguidance's own units; a grammar beyond them is refused when it is compiled (or,
# for the per-token bounds, its request ends "length" where it hits them). A grammar of 50,000 symbols (an anyOf of
# about 2,000 small objects) compiles in about 0.2 s on one core; at llguidance's default, 500,000, it takes over 1 s.
# verbose_errors off: llguidance's verbose messages quote the parser's state, which is output text.
LIMITS = {"max_grammar_size": 50_000, "verbose_errors": False}


def json_grammar(schema: dict | None) -> str:
    """The llguidance grammar of JSON documents that satisfy `schema` (any object when None); ValueError when no
    finite document does (a grammar of it would let the model write forever, or nothing)."""
    if schema is not None and not has_finite_instance(schema):
        raise ValueError("the schema admits no finite JSON document: its $ref recursion never ends")
    return LLMatcher.grammar_from_json_schema(json.dumps(schema if schema is not None else JSON_OBJECT),
                                              defaults=JSON_STYLE)


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A grammar compiled once for a request: each of its choices matches with a copy of this matcher, which
    itself never consumes a token."""

    template: LLMatcher

    def matcher(self) -> LLMatcher:
        return self.template.deep_copy()  # milliseconds, where compiling again could take a second


class Grammars:
    """One model's grammar support: its llguidance tokenizer (built once, on the first constrained request)."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)

    @cached_property
    def _llg_tokenizer(self) -> LLTokenizer:
        return LLTokenizer(self.tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.stop_token_ids)

    def compile(self, grammar: str) -> CompiledGrammar:
        """`grammar` compiled within LIMITS; ValueError naming the fault when it cannot be served. A few hundred
        milliseconds for a big grammar: run it off the event loop and the engine thread (llguidance lets go of the
        GIL while it compiles, so a worker thread holds up neither)."""
        matcher = LLMatcher(self._llg_tokenizer, grammar, log_level=0, limits=LLParserLimits(**LIMITS))
        # What every output must begin with (the bytes the grammar forces), and the choice after it, tried on a
        # copy: a grammar that fails there (nothing can follow, a row too wide to parse) fails every request.
        probe = matcher.deep_copy()
        if not probe.is_error():
            probe.consume_tokens(probe.compute_ff_tokens())
            probe.compute_bitmask()
        if matcher.is_error() or probe.is_error():
            error = (matcher.get_error() or probe.get_error()).replace("<non-verbose/>", "").strip()
            raise ValueError(f"the schema cannot be enforced: {error}")
        return CompiledGrammar(matcher)

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
