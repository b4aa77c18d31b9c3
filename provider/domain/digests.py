"""Content digests: the store names objects by them, the provider detects drift with them, and a replica
checks its downloads against them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The file a store object keeps its file list in (written when its upload completes): not part of its content,
# so a store object used as a source (a fine-tuning job's adapter deployed as an addon) keeps its digest.
OBJECT_MARKER = ".complete"


def file_digests(directory: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under a directory (a store object's marker left out)."""
    return {path.relative_to(directory).as_posix(): file_sha256(path)
            for path in sorted(p for p in directory.rglob("*") if p.is_file()) if path.name != OBJECT_MARKER
            or path.parent != directory}


def tree_digest(digests: dict[str, str]) -> str:
    """One digest for a directory, from its files' names and digests."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return "sha256:" + h.hexdigest()
