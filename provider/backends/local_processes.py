"""The local cluster's detached processes (replicas and the gateway): `python -m ember.runtime …` on a loopback port,
in a session of its own with its log in the state directory, waited for until its /health says ready, and stopped
with SIGTERM (it drains: finishes what it runs) before SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ember.provider.backends.processes import alive

# How long a process told to stop may drain before it is killed.
STOP_GRACE_S = 10.0


class ProcessError(RuntimeError):
    """A process did not start or get ready; the message ends with its log's last lines."""


@dataclass(frozen=True)
class LocalProcess:
    pid: int
    port: int
    log: str
    generation: str = ""  # a replica's: the digest of the spec it serves (a replacement starts a new generation)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        try:
            return " | ".join(Path(self.log).read_text().strip().splitlines()[-3:])
        except OSError:
            return "(no log)"


def free_port(preferred: int = 0, patience_s: float = 1.0) -> int:
    """`preferred` if it can be bound within `patience_s` (a process killed a moment ago may still hold it), else any
    free loopback port."""
    deadline = time.monotonic() + patience_s
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the process's server binds it
        while preferred:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, method: str = "GET", key: str | None = None, timeout: float = 5.0) -> dict:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def spawn(arguments: list[str], port: int, log: Path) -> LocalProcess:
    """`python -m ember.runtime <arguments> --port <port>`, detached from this process (its own session)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "ember.runtime", *arguments, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    return LocalProcess(process.pid, port, str(log))


def health(process: LocalProcess) -> tuple[int, dict] | None:
    """(status code, body) of its /health, or None while it does not answer."""
    if not alive(process.pid):
        return None
    try:
        return 200, http_json(f"{process.url}/health", timeout=2.0)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def ready(process: LocalProcess) -> bool:
    answer = health(process)
    return answer is not None and answer[0] == 200 and answer[1].get("status") == "ready"


def wait_ready(process: LocalProcess, what: str, timeout_s: float, progress: Callable[[str], None],
               why_not: Callable[[dict], str | None]) -> None:
    """Until its /health says ready. `why_not` reads a 503's body: a reason to stop waiting (it will not get ready),
    or None to go on waiting (still loading)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(process.pid):
            raise ProcessError(f"{what} on port {process.port} exited while starting: {process.tail()}")
        answer = health(process)
        if answer is not None and answer[0] == 200 and answer[1].get("status") == "ready":
            progress(f"{what} on port {process.port} is ready")
            return
        reason = why_not(answer[1]) if answer is not None else None
        if reason:
            raise ProcessError(f"{what} on port {process.port} {reason}: {process.tail()}")
        time.sleep(0.2)
    raise ProcessError(f"{what} on port {process.port} was not ready within {timeout_s:.0f} s: {process.tail()}")


def stop(process: LocalProcess, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL if it has not drained within `grace_s`."""
    if not alive(process.pid):
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
    try:  # reap it if it is our child
        os.waitpid(process.pid, os.WNOHANG)
    except ChildProcessError:
        pass


def save(path: Path, processes: list[LocalProcess]) -> None:
    """Written aside and renamed: an `up` killed meanwhile leaves the old list or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([p.__dict__ for p in processes]))
    tmp.replace(path)


def load(path: Path) -> list[LocalProcess]:
    return [LocalProcess(**p) for p in json.loads(path.read_text())] if path.exists() else []


class Busy(RuntimeError):
    """Another process holds the lock (an `up`, or the gateway scaling)."""


@contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[None]:
    """The lock of one process list: an `up` and the gateway's autoscaler change a deployment's replicas one at a time.
    `wait=False` raises Busy instead of waiting (the autoscaler tries again on its next tick)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(str(path)) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
