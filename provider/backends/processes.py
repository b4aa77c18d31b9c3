"""Whether a process on this host is alive: replicas of the local cluster, and the owners of staging folders
(uploads to the store, the provider's scratch folders), which are named for their owner so that whoever
comes next can remove those a killed process left behind without breaking one still at work."""

from __future__ import annotations

import os
import socket


def owner() -> str:
    """This process as the owner of a folder it works in: `<host>-<pid>`, which `abandoned` reads back."""
    return f"{socket.gethostname()}-{os.getpid()}"


def abandoned(name: str, prefix: str = "") -> bool:
    """Whether the folder `name` (`<prefix><owner()>-<anything without '-'>`) was left by a process of this host
    that is gone. Another host's folders, and names that are not so made, are never judged abandoned."""
    if not name.startswith(prefix):
        return False
    host, _, pid = name.removeprefix(prefix).rpartition("-")[0].rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (an exited child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
