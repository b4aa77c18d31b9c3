"""Opt-in request logging: prompts and outputs, only for a deployment that asked, kept `retention_days`.

It is the one place request text may be written, a file of its own apart from every other log, and
entries older than the retention are deleted when the log opens and as it is written.
"""

from __future__ import annotations

import json
import threading
import time

import fsspec

DAY = 86400.0


class RequestLog:
    def __init__(self, url: str, retention_days: int):
        if not 1 <= retention_days <= 365:
            raise ValueError(f"retention_days: {retention_days!r} must be between 1 and 365")
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.retention_s = retention_days * DAY
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        self.sweep()

    def write(self, account_id: str, model: str, prompt: object, completion: str) -> None:
        entry = {"time": time.time(), "account_id": account_id, "model": model, "prompt": prompt, "completion": completion}
        with self._lock, self.fs.open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if time.time() - self._last_sweep > 3600:
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Delete entries older than the retention; returns how many were deleted."""
        now = time.time() if now is None else now
        with self._lock:
            self._last_sweep = now
            if not self.fs.exists(self.path):
                return 0
            lines = self.fs.cat_file(self.path).decode().splitlines()
            kept = [line for line in lines if line and json.loads(line)["time"] >= now - self.retention_s]
            if len(kept) != len(lines):
                self.fs.pipe_file(self.path, "".join(line + "\n" for line in kept).encode())
            return len(lines) - len(kept)
