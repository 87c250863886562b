"""Digests of weight files (md5 for a bundle's ``large_files.yml``, sha256 for provenance), remembered per file.

Hashing the Zoo brain LDM's 2.2 GB of weights took 4.5-5.6 s on a 2-core CPU at every load. A file's digests are
therefore kept in a small JSON cache (``$MEDDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/napari-meddiff``, else
``~/.cache/napari-meddiff``; ``MEDDIFF_CACHE_DIR=none`` turns it off) under its real path, with its size,
modification time, change time and inode: any change to the file makes a new entry. As git does with racy
index entries, a file modified less than `SETTLE_SECONDS` before it was hashed is not remembered (file times
are only as fine as the kernel's clock tick, so a write in the same tick could otherwise go unseen). The cache
only saves time: one that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

CACHE_ENV = "MEDDIFF_CACHE_DIR"
CACHE_FILE = "weight-digests.json"
SETTLE_SECONDS = 2.0
MAX_ENTRIES = 256


def cache_dir() -> Path | None:
    """Where the digest cache lives, or None when it is turned off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "none", "off", "0") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-meddiff"


def hash_file(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, read once into one reused buffer."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    buffer = bytearray(1 << 24)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            md5.update(view[:n])
            sha.update(view[:n])
    return md5.hexdigest(), sha.hexdigest()


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _read(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(cache: Path, entries: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".digests-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, cache)
    except OSError:
        pass


def weight_digests(path: str | os.PathLike) -> tuple[str, str]:
    """(md5, sha256) of a weight file: remembered from an earlier load while the file is unchanged."""
    path = Path(path).resolve()
    folder = cache_dir()
    before = path.stat()
    key, ident = str(path), _identity(before)
    cache = folder / CACHE_FILE if folder is not None else None
    entries = _read(cache) if cache is not None else {}
    hit = entries.get(key)
    if (
        isinstance(hit, dict)
        and hit.get("identity") == ident
        and isinstance(hit.get("md5"), str)
        and isinstance(hit.get("sha256"), str)
    ):
        return hit["md5"], hit["sha256"]
    md5, sha = hash_file(path)
    settled = time.time() - before.st_mtime_ns / 1e9 >= SETTLE_SECONDS
    if cache is not None and settled and _identity(path.stat()) == ident:
        entries = _read(cache)  # another process may have added entries meanwhile
        entries.pop(key, None)
        entries[key] = {"identity": ident, "md5": md5, "sha256": sha}
        _write(cache, dict(list(entries.items())[-MAX_ENTRIES:]))
    return md5, sha
