"""Which rows a run was scored on: one evaluation-set id shared by sweeps, fine-tunes and pretrain probes.

Two runs are comparable only when they were scored on the same rows of the same file. The id is the
sha256 of the source file's sha256 and the sorted row indices (positions in that file) that were
scored, so a sweep over a store made with ``--holdout 0.2 --seed 0`` and a fine-tune of the same file
with the same holdout get the same id, whatever order or split name each used. Every run records::

    run.json["eval_set"] = {"id": "3f2a...", "source_sha256": "...", "rows": 1520}
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["eval_set", "source_sha256", "EVAL_SET_KEY"]

EVAL_SET_KEY = "eval_set"


def source_sha256(sources: Iterable[Mapping[str, Any]], split: str) -> str | None:
    """The sha256 of the file a split's rows come from, given provenance ``sources`` (as ``embstore`` stores
    them: one entry per file, ``split`` 'all' for a file that ``--holdout`` split); None when unknown."""
    sources = list(sources)
    for wanted in (split, "all"):
        for s in sources:
            if s.get("split") == wanted and s.get("sha256"):
                # audio rows are files: their bytes are part of what was scored
                return str(s["sha256"]) + (f"+{s['audio_sha256']}" if s.get("audio_sha256") else "")
    return None


def eval_set(source: str | None, row_ids: Iterable[int] | np.ndarray) -> dict[str, Any]:
    """The record of one evaluation set: ``id`` (16 hex digits), ``source_sha256`` and ``rows``.

    ``row_ids`` are the scored rows' positions in the source file, in any order (duplicates count once).
    """
    rows = np.unique(np.asarray(list(row_ids) if not isinstance(row_ids, np.ndarray) else row_ids, dtype=np.int64))
    h = hashlib.sha256()
    h.update((source or "unknown-source").encode())
    h.update(rows.astype("<i8").tobytes())
    return {"id": h.hexdigest()[:16], "source_sha256": source, "rows": int(len(rows))}
