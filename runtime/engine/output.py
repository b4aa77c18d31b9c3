"""Each sampled token turned into what a client sees: text deltas (incrementally detokenized), stop strings
cut, and whether the request ends (a stop string, a stop token or its length)."""

from __future__ import annotations

from dataclasses import dataclass

from ember.runtime.engine.sequence import Sequence
from ember.runtime.model.tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0  # characters already handed out


class OutputProcessor:
    def __init__(self, tokenizer: TextTokenizer, stop_token_ids: set[int], max_model_len: int):
        self.tokenizer, self.stop_token_ids, self.max_model_len = tokenizer, stop_token_ids, max_model_len
        self._text: dict[str, _TextState] = {}

    def add(self, seq: Sequence) -> None:
        self._text[seq.request_id] = _TextState(IncrementalDetokenizer(self.tokenizer, seq.prompt_ids))

    def remove(self, request_id: str) -> None:
        self._text.pop(request_id, None)

    def process(self, seq: Sequence, token: int) -> tuple[str, str | None]:
        """The new text the token makes visible, and why the request finishes (None while it goes on)."""
        state = self._text[seq.request_id]
        searched_to = len(state.text)
        state.text += state.detokenizer.add(token)
        params = seq.params
        reason, cut = None, False
        stops = params.stop if len(seq.output_ids) >= params.min_tokens else ()  # no stop before min_tokens
        if stops:
            # Only a stop string that ends in this token's text is new.
            tail_start = max(0, searched_to - max(map(len, stops)) + 1)
            hits = [i for s in stops if (i := state.text.find(s, tail_start)) >= 0]
            if hits:
                state.text = state.text[: min(hits)]
                reason, cut = "stop", True
        if reason is None and ((token in self.stop_token_ids and not params.ignore_eos) or token in params.stop_token_ids):
            reason = "stop"
        if reason is None and seq.matcher is not None and seq.matcher.is_stopped():
            reason = "stop"  # the grammar is complete and allows nothing more
        if reason is None and (len(seq.output_ids) >= params.max_tokens or len(seq.tokens) >= self.max_model_len):
            reason = "length"
        if reason == "stop" and seq.matcher is not None and (cut or not seq.matcher.is_accepting()):
            # "stop" on a constrained request promises a whole document of its grammar. One cut by a stop string,
            # or ended where the grammar is not complete (a stop token mid-document, the matcher failing a
            # per-token limit), is an unfinished one: "length", as when max_tokens cuts it.
            reason = "length"
        if reason and not cut:  # the text ends as decoding the ids ends, an unfinished character's bytes included
            state.text += state.detokenizer.flush()
        # Hold back text that could still turn out to be the start of a stop string.
        hold = 0 if reason else max(map(len, stops), default=1) - 1
        end = max(state.emitted, len(state.text) - hold)
        delta, state.emitted = state.text[state.emitted : end], end
        if reason:
            self.remove(seq.request_id)
        return delta, reason
