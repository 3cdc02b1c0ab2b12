"""Checksums of row chunks: what the writer records and what a reader or ``embstore verify`` compares.

Every row chunk gets one sha256 over all its hidden-state regions (:func:`digest_arrays` over
:func:`chunk_selections`) and one per (tower, pooling or 'tokens', layer) entry (:func:`layer_digests`), so a
reader can check just the layers it reads. :class:`ChunkVerifier` does the reader's side over a backend.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from embstore.errors import StoreCorruptedError
from embstore.store import layout as L
from embstore.store.backends import Backend

__all__ = ["chunk_selections", "digest_arrays", "entry_digest", "layer_digests", "ChunkVerifier"]

log = logging.getLogger(__name__)


def chunk_selections(lay: L.StoreLayout, split: str, chunk: int) -> list[tuple[str, Any]]:
    """(array path, selection) of every hidden-state region row chunk ``chunk`` writes, canonical order."""
    sl = lay.splits[split]
    start, stop = sl.rows(chunk)
    out: list[tuple[str, Any]] = []
    for tower in lay.towers:
        for pooling in lay.poolings:
            out.append((L.pooled_path(split, tower, pooling), (slice(None), slice(start, stop))))
        for layer in lay.token_layers:
            out.append((L.token_chunk_path(split, tower, layer, chunk), ...))
        for pooling in lay.word_poolings:
            out.append((L.word_chunk_path(split, tower, pooling, chunk), ...))
    return out


def digest_arrays(arrays: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """sha256 over named arrays, in the given order; identical for written and re-read data."""
    h = hashlib.sha256()
    for name, arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(name.encode())
        h.update(str(a.dtype).encode() + repr(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


def entry_digest(name: str, layer: int, arr: np.ndarray) -> bytes:
    """sha256 of one layer of one array of one row chunk (its path, layer, dtype, shape and bytes)."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{name}|{layer}|{a.dtype}|{a.shape}".encode())
    h.update(a.tobytes())
    return h.digest()


def layer_digests(lay: L.StoreLayout, split: str, chunk: int, data: dict[str, np.ndarray]) -> np.ndarray:
    """(entries, 32) uint8: :func:`entry_digest` of every ``lay.digest_entries()`` entry of one row chunk,
    from the arrays :func:`chunk_selections` names (pooled (k, rows, hidden), tokens (n_tokens, hidden))."""
    out = np.zeros((len(lay.digest_entries()), 32), dtype=np.uint8)
    for e, (tower, what, layer) in enumerate(lay.digest_entries()):
        if what == "tokens":
            name = L.token_chunk_path(split, tower, layer, chunk)
            arr = data[name]
        elif what.startswith("words/"):
            name = L.word_chunk_path(split, tower, what.split("/", 1)[1], chunk)
            arr = data[name][lay.layer_position(layer)]
        else:
            name = L.pooled_path(split, tower, what)
            arr = data[name][lay.layer_position(layer)]
        out[e] = np.frombuffer(entry_digest(name, layer, arr), dtype=np.uint8)
    return out


class ChunkVerifier:
    """Compares row chunks read from ``backend`` with the checksums recorded when they were written."""

    def __init__(self, backend: Backend, layout: L.StoreLayout, path: str, enabled: bool = True) -> None:
        self._b, self.layout, self.path, self.enabled = backend, layout, path, enabled
        self._recorded: dict[str, np.ndarray | None] = {}
        self._verified: set[tuple[str, tuple[str, str, int], int]] = set()
        """(split, entry, row chunk) already checked by this reader: a chunk verified once is not hashed again (a
        sweep that reads a layer for several configuration groups, or streams it every pass, pays for it once)."""

    def done(self, split: str) -> np.ndarray:
        """(n_chunks,) bool: which row chunks have been written."""
        return self._b.read(L.done_path(split)).astype(bool)

    def recorded(self, split: str) -> np.ndarray | None:
        """(n_chunks, entries, 32) recorded per-layer checksums, or None (a store from before they existed)."""
        if split not in self._recorded:
            name = L.layer_digest_path(split)
            self._recorded[split] = self._b.read(name) if self._b.has(name) else None
            if self._recorded[split] is None and self.enabled:
                log.warning(
                    "%s has no per-layer checksums (written by an older embstore): its reads are not verified; "
                    "'embstore verify' still checks it",
                    self.path,
                )
        return self._recorded[split]

    def check(
        self,
        split: str,
        entry: tuple[str, str, int],
        name_of: Callable[[int], str],
        chunk_data: Callable[[int], np.ndarray],
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        """Compare every written row chunk of one (tower, pooling/'tokens', layer) that lies whole within rows
        [start, stop) with its recorded sha256; ``chunk_data(c)`` is row chunk ``c``'s array as read,
        ``name_of(c)`` the array it came from. (A read of part of a chunk cannot be checked.)"""
        if not self.enabled:
            return
        recorded = self.recorded(split)
        if recorded is None:
            return
        e = self.layout.digest_entries().index(entry)
        done = self.done(split)
        sl = self.layout.splits[split]
        stop = sl.n_rows if stop is None else stop
        for c in range(sl.n_chunks):
            lo, hi = sl.rows(c)
            if lo < start or hi > stop or (split, entry, c) in self._verified:
                continue
            if done[c]:
                self._verify(split, entry, c, name_of(c), chunk_data(c), bytes(recorded[c, e]))

    def check_chunk(self, split: str, entry: tuple[str, str, int], c: int, name: str, data: np.ndarray) -> None:
        """Compare one written row chunk of one (tower, what, layer) entry with its recorded sha256."""
        if not self.enabled or (split, entry, c) in self._verified:
            return
        recorded = self.recorded(split)
        if recorded is None or not self.done(split)[c]:
            return
        self._verify(split, entry, c, name, data, bytes(recorded[c, self.layout.digest_entries().index(entry)]))

    def _verify(
        self, split: str, entry: tuple[str, str, int], c: int, name: str, data: np.ndarray, recorded: bytes
    ) -> None:
        if entry_digest(name, entry[2], data) != recorded:
            raise StoreCorruptedError(
                f"{self.path}: split {split}, row chunk {c}, {name} layer {entry[2]} does not match the checksum "
                f"recorded when it was written (the store is corrupted); run 'embstore verify {self.path}' and "
                "re-extract, or pass --no-verify to read it anyway."
            )
        self._verified.add((split, entry, c))

    def chunk_arrays(self, split: str, chunk: int) -> Iterator[tuple[str, np.ndarray]]:
        """(array path, values) of every hidden-state region of one row chunk, as read."""
        for name, sel in chunk_selections(self.layout, split, chunk):
            yield name, self._b.read(name, sel)

    def problems(self) -> list[str]:
        """Re-read every row chunk and compare it with both of its recorded checksums; one line per problem."""
        problems = []
        for split, sl in self.layout.splits.items():
            done = self.done(split)
            whole: Any = self._b.read(L.digest_path(split))
            for c in range(sl.n_chunks):
                if not done[c]:
                    problems.append(f"split {split}: row chunk {c} was never written")
                    continue
                try:
                    arrays = list(self.chunk_arrays(split, c))
                except Exception as exc:  # a truncated or garbled chunk file fails to decode
                    problems.append(f"split {split}: row chunk {c} cannot be read ({type(exc).__name__}: {exc})")
                    continue
                if digest_arrays(arrays) != bytes(whole[c]):
                    problems.append(f"split {split}: row chunk {c} does not match its checksum (corrupted)")
                    continue
                per_layer = self.recorded(split)
                if per_layer is not None and not np.array_equal(
                    layer_digests(self.layout, split, c, dict(arrays)), per_layer[c]
                ):
                    problems.append(f"split {split}: row chunk {c} does not match its per-layer checksums (corrupted)")
                    continue
                problems += self._non_finite(split, c, arrays)
        return problems

    def _non_finite(self, split: str, chunk: int, arrays: list[tuple[str, np.ndarray]]) -> list[str]:
        """One line per layer of one row chunk that holds inf or NaN (an embstore from before extraction checked
        for them stored such values silently)."""
        lay = self.layout
        token_layer = {
            L.token_chunk_path(split, t, layer, chunk): layer for t in lay.towers for layer in lay.token_layers
        }
        out = []
        for name, arr in arrays:
            values = np.asarray(arr)
            if not values.dtype.kind == "f":
                continue
            if name in token_layer:
                per_layer = [(token_layer[name], int((~np.isfinite(values)).sum()))]
            else:  # pooled (layers, rows, hidden)
                bad = (~np.isfinite(values)).reshape(len(values), -1).sum(axis=1)
                per_layer = list(zip(lay.layers, (int(b) for b in bad)))
            for layer, n in per_layer:
                if n:
                    out.append(
                        f"split {split}: row chunk {chunk}, {name} layer {layer}: {n} non-finite values (inf or NaN), "
                        "stored silently by an older embstore; re-extract with --dtype float32"
                    )
        return out
