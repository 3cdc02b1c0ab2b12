"""The catalog of stores in a cache directory: where stores go by default, what a store is named, which entries
are stores and which complete store is the latest (what ``heads sweep`` without ``--store`` reads)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from embstore.errors import StoreNotFoundError

__all__ = ["cache_dir", "slug", "store_entries", "latest_store", "STORE_SUFFIXES"]

STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")
"""Names that mark a directory entry as a store."""


def cache_dir() -> Path:
    """Default store location: $EMBSTORE_CACHE, else ./cache."""
    return Path(os.environ.get("EMBSTORE_CACHE", "cache"))


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, runs of other characters as '-', at most 40 characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "store"


def store_entries(cache: Path) -> list[Path]:
    """The entries of ``cache`` named like stores, sorted (none if it is not a directory)."""
    if not cache.is_dir():
        return []
    return sorted(p for p in cache.iterdir() if p.name.endswith(STORE_SUFFIXES))


def latest_store(cache: Path) -> str:
    """The most recently finished complete store in ``cache``."""
    from embstore.store.reader import open_store

    found: list[tuple[str, str]] = []
    for p in store_entries(cache):
        try:
            with open_store(p, allow_incomplete=True) as s:
                if s.complete:
                    found.append((s.meta.finished or "", str(p)))
        except Exception:  # an unreadable entry is not a candidate
            continue
    if not found:
        raise StoreNotFoundError(f"No complete store in {cache}; run 'embstore extract' first or pass --store PATH.")
    return max(found)[1]
