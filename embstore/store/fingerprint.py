"""File hashes, cached: the one leaf every module that fingerprints files imports (data, models, identity).

A file's sha256 is remembered under (resolved path, size, modification time, inode) in
``$EMBSTORE_CACHE/.hashes.json``, so a re-run does not re-read multi-GB weight or data files. This module
imports nothing from embstore, so data, models and identity can all depend on it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

__all__ = ["file_sha256", "files_sha256"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_memo: dict[str, str] | None = None


def _cache_file() -> Path:
    return Path(os.environ.get("EMBSTORE_CACHE", "cache")) / ".hashes.json"


def _load() -> dict[str, str]:
    global _memo
    if _memo is None:
        try:
            _memo = dict(json.loads(_cache_file().read_text()))
        except (OSError, ValueError):
            _memo = {}
    return _memo


def _save(memo: dict[str, str]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs re-hashing next time
        log.debug("cannot save the hash cache %s: %s", path, exc)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, remembered for as long as its path, size, mtime and inode stay the same."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    global _memo
    with _lock:
        memo = _load()
        if key in memo:
            return memo[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _lock:
        memo = _load()
        memo = {k: v for k, v in memo.items() if not k.startswith(f"{p}|")}  # drop the file's older versions
        memo[key] = digest
        _memo = memo
        _save(memo)
    return digest


def files_sha256(files: list[Path]) -> str:
    """One sha256 over several files (names and contents, in name order)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode())
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()
