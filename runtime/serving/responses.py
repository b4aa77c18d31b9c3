"""A Call's outputs in OpenAI's shapes: one JSON completion, or server-sent event chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from ember.runtime.model.sampling import TokenLogprob
from ember.runtime.model.tokenizer import TextTokenizer
from ember.runtime.serving.call import Call
from ember.runtime.serving.errors import APIError
from ember.runtime.serving.tools import ToolUse


class Responses:
    def __init__(self, chat: bool, model: str, tokenizer: TextTokenizer, logprobs: bool, include_usage: bool,
                 echoes: list[str] | None = None, tools: ToolUse | None = None):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.logprobs_wanted, self.include_usage = logprobs, include_usage
        self.echoes = echoes  # completions with echo: each choice's prompt text, which its text begins with
        self.tools = tools  # a chat whose output may hold tool calls: parsed when each choice ends
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # per choice: characters its completion logprobs have covered

    @staticmethod
    def usage(call: Call) -> dict:
        return {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                "total_tokens": call.prompt_tokens + call.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": call.cached_tokens}}

    def _logprobs(self, index: int, items: list[TokenLogprob]) -> dict:
        text, raw = self.tokenizer.token_text, self.tokenizer.token_bytes
        if self.chat:
            return {"content": [{
                "token": text(lp.token_id), "logprob": lp.logprob, "bytes": list(raw(lp.token_id)),
                "top_logprobs": [{"token": text(t), "logprob": v, "bytes": list(raw(t))} for t, v in lp.top],
            } for lp in items]}
        tokens = [text(lp.token_id) for lp in items]
        offsets, at = [], self._offsets.get(index, 0)
        for token in tokens:  # where each token starts in the choice's text (continuing across stream chunks)
            offsets.append(at)
            at += len(token)
        self._offsets[index] = at
        # the sampled token is always among the top ones (as vLLM does), so logprobs: 0 still says something
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [{text(t): v for t, v in lp.top} | {text(lp.token_id): lp.logprob} for lp in items],
                "text_offset": offsets}

    def _choice(self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob], delta: bool) -> dict:
        choice: dict = {"index": index, "finish_reason": finish}
        if self.chat:
            choice["delta" if delta else "message"] = {"content": text} if delta else {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(index, logprobs) if self.logprobs_wanted else None
        return choice

    async def complete(self, call: Call) -> dict:
        n = len(call.params)
        finishes: dict[int, str | None] = {}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(n)}
        async for index, out in call.merged():
            logprobs[index] += out.logprobs
            if out.finished:
                finishes[index] = out.finish_reason
        echoes = self.echoes or [""] * n
        choices = [self._choice(i, echoes[i] + call.texts[i], finishes.get(i), logprobs[i], delta=False)
                   for i in range(n)]
        for choice in choices if self.tools else ():
            content, calls = self._calls(choice["message"]["content"], choice["finish_reason"])
            if calls:
                choice["message"] |= {"content": content, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls"
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(call)}

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def _calls(self, text: str, finish: str | None) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished choice; an output cut short holds no call."""
        try:
            return self.tools.parse(text)
        except (ValueError, KeyError, TypeError):  # a required call that max_tokens cut: the text as it is
            return text, []

    async def _tool_stream(self, call: Call) -> AsyncIterator[str]:
        """With tools, a choice is sent when it ends: whether it is a call is only known then."""
        texts: dict[int, str] = {}
        async for index, out in call.merged():
            texts[index] = texts.get(index, "") + out.text
            if not out.finished:
                continue
            content, calls = self._calls(texts[index], out.finish_reason)
            delta: dict = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [c | {"index": k} for k, c in enumerate(calls)]
            yield self._event([{"index": index, "delta": delta, "logprobs": None,
                                "finish_reason": "tool_calls" if calls else out.finish_reason}])

    async def _text_stream(self, call: Call) -> AsyncIterator[str]:
        for i, echo in enumerate(self.echoes or ()):
            yield self._event([self._choice(i, echo, None, [], delta=True)])
        async for index, out in call.merged():
            if out.text or out.finished or (self.logprobs_wanted and out.logprobs):
                yield self._event([self._choice(index, out.text, out.finish_reason, out.logprobs, delta=True)])

    async def stream(self, call: Call) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                    "logprobs": None} for i in range(len(call.params))])
            async for event in (self._tool_stream(call) if self.tools else self._text_stream(call)):
                yield event
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        if self.include_usage:
            yield self._event([], self.usage(call))
        yield "data: [DONE]\n\n"
