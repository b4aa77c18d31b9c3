"""One HTTP request's n choices running in the engine, merged into one stream of outputs as they come.

The choices are queued when the Call is made (raising Overloaded at once if the backlog is full) and run
to completion whatever the client does; a client that leaves aborts them. `on_finish` runs exactly once,
when the last choice ends, with the request's status: ok, aborted or error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from ember.runtime.engine.engine import RequestOutput
from ember.runtime.model.sampling import SamplingParams
from ember.runtime.serving.async_engine import AsyncEngine, Overloaded
from ember.runtime.serving.errors import APIError


class Call:
    def __init__(self, runner: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None,
                 on_finish: Callable[["Call", str], None], account: str = ""):
        """`prompts`: the distinct prompts (a batch of completions has several); choice i answers prompt
        i // (len(params) // len(prompts)). `account`: whose prefix cache the choices use."""
        self.prompts, self.params, self.on_finish = prompts, params, on_finish
        self.prompt_tokens = sum(len(p) for p in prompts)  # each prompt counted once, whatever n is
        per_prompt = len(params) // len(prompts)
        self.firsts = range(0, len(params), per_prompt)  # each prompt's first choice, which counts its cache hits
        self.cached_tokens = 0  # prompt tokens served from the prefix cache
        self.completion_tokens = 0
        self.first_token: float | None = None  # time.perf_counter() of the first output
        self.texts = [""] * len(params)
        self.finish_reasons: list[str] = []  # one per choice that finished (stop, length, abort)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outcomes: list[str] = []
        self.streams = []
        try:
            for i, p in enumerate(params):
                self.streams.append(runner.submit(prompts[i // per_prompt], p, adapter, cache_salt=account))
        except Overloaded:
            for stream in self.streams:
                stream.close()
            raise
        self.tasks = [asyncio.create_task(self._pump(i, stream)) for i, stream in enumerate(self.streams)]

    async def _pump(self, index: int, stream) -> None:
        outcome = "ok"
        try:
            async for out in stream:
                if self.first_token is None:
                    self.first_token = time.perf_counter()
                if index in self.firsts and out.completion_tokens == len(out.token_ids):
                    self.cached_tokens += out.cached_tokens
                self.completion_tokens += len(out.token_ids)
                self.texts[index] += out.text
                if out.finished:
                    self.finish_reasons.append(out.finish_reason)
                self.queue.put_nowait((index, out))
        except asyncio.CancelledError:
            outcome = "aborted"
            self.finish_reasons.append("abort")
            stream.close()
        except Exception as exc:  # handed to the consumer
            outcome = "error"
            self.queue.put_nowait((index, exc))
        finally:
            self.outcomes.append(outcome)
            self.queue.put_nowait((index, None))
            if len(self.outcomes) == len(self.streams):
                self.on_finish(self, next((o for o in ("error", "aborted") if o in self.outcomes), "ok"))

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The outputs of all n choices, as they come; leaving early aborts the choices still running."""
        open_choices = len(self.tasks)
        try:
            while open_choices:
                index, item = await self.queue.get()
                if item is None:
                    open_choices -= 1
                elif isinstance(item, Exception):
                    raise APIError(400 if isinstance(item, ValueError) else 500, str(item),
                                   type="invalid_request_error" if isinstance(item, ValueError) else "server_error")
                else:
                    yield index, item
        finally:
            for task in self.tasks:
                task.cancel()
