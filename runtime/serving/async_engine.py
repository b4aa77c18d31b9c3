"""The engine on its own thread, fed by asyncio request handlers.

The engine is single-threaded; this runner owns it. Handlers submit requests and read their outputs
from an asyncio queue; everything that touches the engine (add, abort, adapter changes) is a command run
on the engine thread between steps. The backlog is bounded: a submit beyond `max_queue` waiting requests
is refused at once (the server answers 429), so memory never grows with load.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from ember.runtime.engine.engine import Engine, RequestOutput
from ember.runtime.model.sampling import SamplingParams


class Overloaded(Exception):
    """The waiting queue is full."""


class Stream:
    """One request's outputs, in order; iterating ends at its last output. Closing it early aborts it."""

    def __init__(self, runner: "AsyncEngine", request_id: str, outputs: asyncio.Queue):
        self.runner, self.request_id, self.outputs = runner, request_id, outputs
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self.outputs.get()
                if isinstance(item, Exception):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if self.finished:
            self.runner._streams.pop(self.request_id, None)
        else:
            self.runner.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # submitted, not yet admitted to the engine (guards the queue bound)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        self._thread.start()

    # -- called from handlers ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self.engine.scheduler.waiting) + self._pending

    @property
    def running(self) -> int:
        return len(self.engine.scheduler.running)

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               cache_salt: str = "") -> "Stream":
        """Queue a request now (synchronously, so the backlog bound holds under bursts); raises Overloaded."""
        with self._lock:
            if self.queue_depth >= self.max_queue:
                raise Overloaded()
            self._pending += 1
        stream = Stream(self, f"r{next(self._ids)}", asyncio.Queue())
        self._streams[stream.request_id] = (asyncio.get_running_loop(), stream.outputs)

        def add() -> None:
            with self._lock:
                self._pending -= 1
            if stream.request_id not in self._streams:  # aborted before it was admitted
                return
            try:
                self.engine.add_request(prompt_ids, params, request_id=stream.request_id, adapter=adapter,
                                        cache_salt=cache_salt)
            except ValueError as exc:
                self._send(stream.request_id, exc)

        self._submit(add)
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request whose client went away; its cache is freed on the engine thread."""
        if self._streams.pop(request_id, None) is not None:
            self._submit(lambda: self.engine.abort(request_id))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps (adapter changes, inspection)."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(self.engine))
            except Exception as exc:  # handed back to the caller
                future.set_exception(exc)

        self._submit(run)
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread ----------------------------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _send(self, request_id: str, item: Any) -> None:
        if isinstance(item, RequestOutput) and item.finished or isinstance(item, Exception):
            stream = self._streams.pop(request_id, None)
        else:
            stream = self._streams.get(request_id)
        self._deliver(stream, item)

    @staticmethod
    def _deliver(stream, item: Any) -> None:
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopped:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                command()
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, never the server
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._send(request_id, RuntimeError(f"the engine failed a step: {type(exc).__name__}"))
                continue
            for out in outputs:
                self._send(out.request_id, out)
