"""The gateway's view of its store: the latest snapshot (a Directory), read on a worker thread every refresh interval,
and read again when a request misses something (a key, a model, a ready replica) that the store may have gained since
the snapshot was taken: the request then waits for a read begun after it arrived, so a deployment that existed when the
request came is found. Reads for misses are at most one every MISS_REFRESH_S, however many requests miss."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable

from ember.runtime.gateway.config import GatewayConfig
from ember.runtime.gateway.directory import Directory, DirectoryError, read_directory
from ember.runtime.serving.errors import APIError

log = logging.getLogger("ember.gateway")
MISS_REFRESH_S = 0.25


class Snapshots:
    def __init__(self, config: GatewayConfig, on_read: Callable[[Directory], None] = lambda _: None):
        self.config, self.on_read = config, on_read
        self.directory: Directory | None = None  # its read_at: when the read that made it began
        self.failure: str | None = None  # why the last read failed, in words that name nothing in the store
        self._reading: asyncio.Future | None = None
        self._reading_since = 0.0
        self._misses = asyncio.Lock()
        self._last_miss = -math.inf

    def current(self) -> Directory:
        if self.directory is None:
            raise APIError(503, "the gateway has not read its store yet", type="service_unavailable",
                           code="store_unavailable", headers={"Retry-After": "1"})
        return self.directory

    async def refresh(self, since: float = -math.inf) -> None:
        """Until a read begun at or after `since` is done (one read at a time: callers during a read share it)."""
        while True:
            if self._reading is None or self._reading.done():
                self._reading_since = time.monotonic()
                self._reading = asyncio.ensure_future(self._read(self._reading_since))
            began = self._reading_since
            await asyncio.shield(self._reading)
            if began >= since:
                return

    async def since(self, arrived: float) -> Directory:
        """A snapshot read after `arrived` (a request's arrival), when the current one is older."""
        if self.directory is None or self.directory.read_at < arrived:
            async with self._misses:
                if self.directory is None or self.directory.read_at < arrived:
                    await asyncio.sleep(max(0.0, self._last_miss + MISS_REFRESH_S - time.monotonic()))
                    self._last_miss = time.monotonic()
                    await self.refresh(since=arrived)
        return self.current()

    async def _read(self, began: float) -> None:
        try:
            directory = await asyncio.to_thread(read_directory, self.config.store_url, self.config.gateway)
        except Exception as exc:  # a document the store holds that Ember cannot read, too: the last snapshot stands
            failure = exc if isinstance(exc, DirectoryError) else DirectoryError(f"reading the store failed: {exc!r}")
            if failure.reason != self.failure:
                log.warning("%s", failure)
            self.failure = failure.reason
            return
        self.directory, self.failure = dataclasses.replace(directory, read_at=began), None
        self.on_read(self.directory)
