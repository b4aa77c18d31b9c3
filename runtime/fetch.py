"""Local copies of model-store objects, so a replica can load weights from s3://, gs:// or any fsspec URL.

A local path (or file:// URL) is used in place. Anything else is downloaded once into a cache directory
(EMBER_CACHE_DIR, default /tmp/ember-cache), checked against the object's file digests (the `.complete`
list the store writes last), and only then renamed into place, so a half-done download is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec

from ember.provider.domain.digests import OBJECT_MARKER, file_sha256
from ember.provider.domain.model_files import ModelFilesError


def cache_folder() -> Path:
    """The replica's cache folder: fetched objects, compiled kernels (EMBER_CACHE_DIR, a pod's volume)."""
    return Path(os.environ.get("EMBER_CACHE_DIR", "/tmp/ember-cache"))


def local_copy(url: str, cache_dir: str | Path | None = None) -> Path:
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    cache = Path(cache_dir) if cache_dir else cache_folder()
    target = cache / hashlib.sha256(url.encode()).hexdigest()[:32]
    if (target / OBJECT_MARKER).exists():
        return target
    staging = cache / f".download-{uuid.uuid4().hex}"
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.get(path.rstrip("/") + "/", str(staging) + "/", recursive=True)
        listing = staging / OBJECT_MARKER
        if listing.exists():
            for name, digest in json.loads(listing.read_text()).items():
                if not (staging / name).exists() or file_sha256(staging / name) != digest:
                    raise ModelFilesError(f"{url}: {name} does not match its digest (corrupt store or download)")
        else:
            listing.write_text("{}")
        staging.rename(target)
    except ModelFilesError:
        raise
    except Exception as exc:  # fsspec backends raise their own errors
        raise ModelFilesError(f"{url} could not be downloaded: {type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
