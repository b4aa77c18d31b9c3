"""What a local path is, asked before anything opens it.

Sources are read at preview (config.json, safetensors headers, tokenizer and adapter files, a GGUF header, a
dataset) and again at upload. Opening a FIFO blocks until a writer comes, which is forever, and a device never
ends, so everything but a regular file (or a directory, where one is wanted) is refused first, by name. A
symlink loop is named as one, not reported as a missing file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MISSING = "does not exist"
_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def problem(path: str | Path, want: str = "file") -> str | None:
    """None when `path` is a regular file (want="file") or a directory (want="directory"), following symlinks;
    else what it is, to follow the path in a message: "is a FIFO, not a regular file", "is a symlink loop",
    MISSING …"""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "is a symlink to nothing" if os.path.islink(path) else MISSING
        return f"cannot be read: {exc.strerror}"
    wanted = stat.S_ISDIR if want == "directory" else stat.S_ISREG
    if wanted(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"is {kind}, not {'a directory' if want == 'directory' else 'a regular file'}"


def present(path: str | Path) -> bool:
    """Whether anything is at `path`, a broken or looping symlink included (Path.exists says no to those)."""
    return os.path.lexists(path)
