"""Reading stores: one :class:`Store` interface over the zarr and HDF5 backends (:mod:`embstore.store.backends`).

Reads of whole row chunks are checked against their recorded checksums (:mod:`embstore.store.digests`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.errors import ConfigError, StoreIncompleteError, StoreNotFoundError
from embstore.layers import parse_layers
from embstore.store import layout as L
from embstore.store.backends import Backend, check_metadata, is_h5_path, open_backend
from embstore.store.digests import ChunkVerifier

__all__ = ["Store", "TokenStates", "open_store"]


@dataclass(frozen=True)
class TokenStates:
    """Ragged per-token states of one split and layer: row ``i`` is ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray
    """(total_tokens, hidden)"""
    offsets: np.ndarray
    """(n + 1,) int64"""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class Store:
    """A read-only view of one store. Build with :func:`open_store`.

    With ``verify`` (the default) every read of whole row chunks (pooled layers, per-token states)
    is checked against the per-layer sha256 recorded when the chunk was written, and a mismatch is
    :class:`StoreCorruptedError` naming the split, chunk, array and layer.
    """

    meta: L.StoreMeta
    """The store's root attribute, typed: completeness, fingerprint, layout, labels, :attr:`provenance`."""

    def __init__(self, backend: Backend, path: str, verify: bool = True) -> None:
        self._b = backend
        self.path = path
        raw = backend.attrs()
        if not raw:
            raise StoreNotFoundError(
                f"{path} is not an embstore store (no '{L.ATTR_KEY}' attributes); pass a path printed by 'embstore "
                f"extract' or listed by 'embstore ls'."
            )
        self.meta = L.StoreMeta.from_dict(raw, source=path)
        self.layout = self.meta.layout
        self._verifier = ChunkVerifier(backend, self.layout, path, enabled=verify)

    @property
    def verify_reads(self) -> bool:
        """Whether reads of whole row chunks are checked against their recorded checksums."""
        return self._verifier.enabled

    # -- description ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.meta.complete

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def splits(self) -> list[str]:
        return list(self.layout.splits)

    @property
    def layers(self) -> list[int]:
        return list(self.layout.layers)

    @property
    def poolings(self) -> list[str]:
        return list(self.layout.poolings)

    @property
    def towers(self) -> list[str]:
        return list(self.layout.towers)

    @property
    def token_layers(self) -> list[int]:
        return list(self.layout.token_layers)

    @property
    def hidden(self) -> int:
        return self.layout.hidden

    @property
    def label_names(self) -> list[str] | None:
        names = self.meta.label_names
        return None if names is None else list(names)

    @property
    def provenance(self) -> L.Provenance:
        """How the store was made: model, data, options, tools."""
        return self.meta.provenance

    @property
    def modality(self) -> str:
        return self.meta.modality

    def n_rows(self, split: str) -> int:
        return self._split(split).n_rows

    def done_chunks(self, split: str) -> np.ndarray:
        """(n_chunks,) bool: which row chunks have been written."""
        return self._verifier.done(split)

    def nbytes(self) -> int:
        return self._b.nbytes()

    def describe(self) -> dict[str, Any]:
        """Everything ``embstore info --json`` prints."""
        splits = {}
        for name, sl in self.layout.splits.items():
            done = int(self.done_chunks(name).sum())
            splits[name] = {
                "rows": sl.n_rows,
                "chunks": sl.n_chunks,
                "chunks_done": done,
                "tokens": sl.n_tokens,
                "truncated": self.meta.truncated.get(name),
                "augmented": (self.meta.augmented or {}).get(name, 0),
            }
            if self.meta.words is not None:
                splits[name]["words"] = sl.n_words
                splits[name]["words_cut"] = self.meta.words.cut.get(name, 0)
        return {
            "path": self.path,
            "format": self._b.format,
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "schema_version": self.meta.schema_version,
            "modality": self.modality,
            "splits": splits,
            "layers": self.layers,
            "hidden": self.hidden,
            "poolings": self.poolings,
            "towers": self.towers,
            "token_layers": self.token_layers,
            "dtype": self.layout.dtype,
            "label_names": self.label_names,
            "group_names": self.group_names,
            "sampling_rate": self.meta.sampling_rate,
            "bytes": self.nbytes(),
            "created": self.meta.created,
            "finished": self.meta.finished,
            "provenance": self.provenance.to_dict(),
            **(
                {
                    "word_poolings": self.word_poolings,
                    "word_labels": {k: len(v) for k, v in self.word_label_names.items()},
                    "word_heads": self.has_word_heads,
                }
                if self.word_poolings
                else {}
            ),
        }

    # -- data ----------------------------------------------------------------------------------
    def _split(self, split: str) -> L.SplitLayout:
        if split not in self.layout.splits:
            raise ConfigError(f"Split {split!r} is not in {self.path}; its splits are {', '.join(self.splits)}.")
        return self.layout.splits[split]

    def _tower(self, tower: str | None) -> str:
        if tower is None:
            if len(self.layout.towers) > 1:
                raise ConfigError(
                    f"{self.path} holds two towers ({', '.join(self.towers)}); pass tower='a' or tower='b'."
                )
            return self.layout.towers[0]
        if tower not in self.layout.towers:
            raise ConfigError(f"Tower {tower!r} is not in {self.path}; its towers are {', '.join(self.towers)}.")
        return tower

    def row_ids(self, split: str) -> np.ndarray:
        """(n,) int64: each stored row's index in its source file."""
        self._split(split)
        return self._b.read(L.row_ids_path(split))

    def labels(self, split: str) -> np.ndarray:
        """(n,) int64 indices into :attr:`label_names`."""
        self._split(split)
        if self.label_names is None:
            raise ConfigError(f"{self.path} was extracted without labels; re-extract with --label-col COLUMN.")
        return self._b.read(L.labels_path(split))

    @property
    def group_names(self) -> list[str] | None:
        """Names of the groups (e.g. speakers) when extracted with --group-col."""
        names = self.meta.group_names
        return None if names is None else list(names)

    def groups(self, split: str) -> np.ndarray | None:
        """(n,) int64 indices into :attr:`group_names`, or None without --group-col."""
        self._split(split)
        return self._b.read(L.groups_path(split)) if self._b.has(L.groups_path(split)) else None

    def durations(self, split: str) -> np.ndarray | None:
        """(n,) float32 seconds of audio per row (audio stores), else None."""
        self._split(split)
        return self._b.read(L.duration_path(split)) if self._b.has(L.duration_path(split)) else None

    def augmentation(self, split: str) -> dict[str, np.ndarray] | None:
        """Per-row augmentation record (copy, speed, shift, snr_db, and pitch, shift_seconds, noise_std where the
        store used them), or None when the split has none."""
        self._split(split)
        if not self._b.has(L.augment_path(split, "copy")):
            return None
        return {
            f: self._b.read(L.augment_path(split, f)) for f in L.AUGMENT_FIELDS if self._b.has(L.augment_path(split, f))
        }

    def augmented(self, split: str) -> np.ndarray:
        """(n,) bool: rows that are augmented copies (never evaluate on them)."""
        aug = self.augmentation(split)
        return np.zeros(self.n_rows(split), dtype=bool) if aug is None else aug["copy"] > 0

    def n_tokens(self, split: str, tower: str | None = None) -> np.ndarray:
        """(n,) int32 tokens per row after truncation."""
        self._split(split)
        return self._b.read(L.n_tokens_path(split, self._tower(tower)))

    def pooled(
        self, split: str, pooling: str, layers: str | Sequence[int] | None = None, tower: str | None = None
    ) -> np.ndarray:
        """Pooled states as ``(n, len(layers), hidden)`` in the stored dtype.

        ``layers`` takes the same specs as extraction ('all', '9-12', '-1', [3, 6]); None is all.
        """
        return self.pooled_rows(split, pooling, 0, self._split(split).n_rows, layers, tower)

    def pooled_rows(
        self,
        split: str,
        pooling: str,
        start: int,
        stop: int,
        layers: str | Sequence[int] | None = None,
        tower: str | None = None,
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of :meth:`pooled`, ``(stop - start, len(layers), hidden)`` in the stored dtype.

        For streaming a split chunk by chunk (``layout.splits[split].rows(c)`` gives chunk ``c``'s range), so
        only those rows are read.
        """
        n = self._split(split).n_rows
        if not 0 <= start <= stop <= n:
            raise ConfigError(f"Rows [{start}, {stop}) are outside split {split!r} of {self.path} ({n} rows).")
        t = self._tower(tower)
        if pooling not in self.layout.poolings:
            raise ConfigError(f"Pooling {pooling!r} is not in {self.path}; it stores {', '.join(self.poolings)}.")
        chosen = self.layers if layers is None else parse_layers(layers, self.layers)
        path = L.pooled_path(split, t, pooling)
        pos = [self.layout.layer_position(x) for x in chosen]
        rows = slice(start, stop)
        if pos == list(range(pos[0], pos[-1] + 1)):
            block = self._b.read(path, (slice(pos[0], pos[-1] + 1), rows))  # (k, rows, hidden)
        else:
            block = np.stack([self._b.read(path, (p, rows)) for p in pos])
        chunk_rows = self.layout.splits[split].rows
        for j, layer in enumerate(chosen):

            def chunk(c: int, j: int = j) -> np.ndarray:
                lo, hi = chunk_rows(c)
                return block[j, lo - start : hi - start]  # (chunk rows, hidden), as written

            self._verifier.check(split, (t, pooling, layer), lambda c: path, chunk, start, stop)
        return np.ascontiguousarray(block.transpose(1, 0, 2))  # (rows, k, hidden)

    def tokens(self, split: str, layer: int, tower: str | None = None) -> TokenStates:
        """Per-token states of one layer, ragged (see :class:`TokenStates`)."""
        sl = self._split(split)
        t = self._tower(tower)
        resolved = parse_layers([layer], sorted({*self.layers, *self.token_layers}))[
            0
        ]  # token layers need not be pooled
        if resolved not in self.layout.token_layers:
            stored = ",".join(map(str, self.token_layers)) or "none"
            raise ConfigError(
                f"Layer {layer} has no per-token states in {self.path} (stored: {stored}); re-extract with --tokens "
                f"{resolved}."
            )
        offsets = self._b.read(L.token_offsets_path(split, t, resolved))
        parts = [self._b.read(L.token_chunk_path(split, t, resolved, c)) for c in range(sl.n_chunks)]
        self._verifier.check(
            split, (t, "tokens", resolved), lambda c: L.token_chunk_path(split, t, resolved, c), parts.__getitem__
        )
        return TokenStates(values=np.concatenate(parts) if parts else np.zeros((0, self.hidden)), offsets=offsets)

    # -- words (word-level data, --word-pooling) ---------------------------------------------------
    @property
    def word_poolings(self) -> list[str]:
        """The stored word poolings (first, last, mean); empty for a store without word states."""
        return list(self.layout.word_poolings)

    @property
    def word_label_names(self) -> dict[str, list[str]]:
        """Per-word label column -> its values (what :meth:`word_labels` indexes); empty without words."""
        words = self.meta.words
        return {} if words is None else {k: list(v) for k, v in words.labels.items()}

    @property
    def has_word_heads(self) -> bool:
        """Whether every word's dependency head is stored (:meth:`word_heads`)."""
        return self.meta.words is not None and self.meta.words.heads

    def _words(self, split: str) -> L.SplitLayout:
        sl = self._split(split)
        if not self.layout.word_poolings:
            raise ConfigError(
                f"{self.path} has no word states; extract word-level data (a CoNLL-U file, or a table with a "
                f"'tokens' list column) with --word-pooling first."
            )
        return sl

    def word_offsets(self, split: str) -> np.ndarray:
        """(n + 1,) int64: row ``i``'s words are ``offsets[i]:offsets[i + 1]`` of every per-word array."""
        self._words(split)
        return self._b.read(L.word_offsets_path(split))

    def word_sentence(self, split: str) -> np.ndarray:
        """(n_words,) int64: the stored row (sentence) of every word."""
        offsets = self.word_offsets(split)
        return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))

    def word_position(self, split: str) -> np.ndarray:
        """(n_words,) int64: every word's 0-based position in its sentence."""
        offsets = self.word_offsets(split)
        return np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], np.diff(offsets))

    def word_cut(self, split: str) -> np.ndarray:
        """(n_words,) bool: words no token reached (--max-length cut them off, or the tokenizer made nothing of
        them); their states are zeros."""
        self._words(split)
        return self._b.read(L.word_cut_path(split)).astype(bool)

    def word_labels(self, split: str, name: str) -> np.ndarray:
        """(n_words,) int64 indices into ``word_label_names[name]``."""
        self._words(split)
        names = self.word_label_names
        if name not in names:
            raise ConfigError(
                f"{self.path} has no word label {name!r}; its word labels are {', '.join(names) or 'none'}."
            )
        return self._b.read(L.word_label_path(split, name)).astype(np.int64)

    def word_heads(self, split: str) -> np.ndarray:
        """(n_words,) int64 every word's dependency head: its 1-based position in the sentence, 0 for the root."""
        self._words(split)
        if not self.has_word_heads:
            raise ConfigError(
                f"{self.path} stores no dependency heads; extract a CoNLL-U file, or a table with a 'head' column."
            )
        return self._b.read(L.word_head_path(split)).astype(np.int64)

    def word_forms(self, split: str) -> list[str]:
        """Every word as written in the data, in stored order."""
        self._words(split)
        raw = self._b.read(L.word_form_bytes_path(split)).tobytes()
        offsets = self._b.read(L.word_form_offsets_path(split))
        return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]

    def word_states(
        self,
        split: str,
        layers: str | Sequence[int] | None = None,
        pooling: str | None = None,
        tower: str | None = None,
    ) -> np.ndarray:
        """Word states as ``(n_words, len(layers), hidden)`` in the stored dtype; ``pooling`` defaults to the first
        stored word pooling."""
        sl = self._words(split)
        t = self._tower(tower)
        p = pooling or self.layout.word_poolings[0]
        if p not in self.layout.word_poolings:
            raise ConfigError(
                f"Word pooling {p!r} is not in {self.path}; it stores {', '.join(self.layout.word_poolings)}."
            )
        chosen = self.layers if layers is None else parse_layers(layers, self.layers)
        pos = [self.layout.layer_position(x) for x in chosen]
        parts = []
        for c in range(sl.n_chunks):
            path = L.word_chunk_path(split, t, p, c)
            block = self._b.read(path)  # (n_layers, words of the chunk, hidden)
            for layer in chosen:
                self._verifier.check_chunk(
                    split, (t, L.word_entry(p), layer), c, path, block[self.layout.layer_position(layer)]
                )
            parts.append(block[pos])
        if not parts:
            return np.zeros((0, len(chosen), self.hidden), dtype=self.layout.dtype)
        return np.ascontiguousarray(np.concatenate(parts, axis=1).transpose(1, 0, 2))

    # -- integrity -----------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Re-read every row chunk and compare its sha256 with the one recorded at write time.

        Returns a list of problems (empty when the store is complete and intact).
        """
        return ([] if self.complete else ["store is not marked complete"]) + self._verifier.problems()

    def close(self) -> None:
        self._b.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return f"Store({self.path!r}, {state}, splits={self.splits}, layers={self.layers}, hidden={self.hidden})"


def _exists(path: str) -> bool:
    return "://" in path or os.path.exists(path)


def open_store(
    path: str | os.PathLike[str],
    *,
    allow_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
) -> Store:
    """Open a store for reading; with ``verify`` (default) reads are checked against their checksums.

    Refuses an incomplete store (an extraction still running or killed) unless
    ``allow_incomplete``; the message says how to finish it.
    """
    p = str(path)
    if not _exists(p):
        if is_h5_path(p) and os.path.exists(p + ".partial.zarr"):
            raise StoreIncompleteError(
                f"{p} is incomplete (its extraction is staged in {p}.partial.zarr); re-run the same 'embstore extract' "
                f"command to resume it."
            )
        raise StoreNotFoundError(f"No store at {p}; run 'embstore ls' to list the stores in the cache.")
    check_metadata(p)
    store = Store(open_backend(p, storage_options), p, verify=verify)
    if not store.complete and not allow_incomplete:
        done = sum(int(store.done_chunks(s).sum()) for s in store.splits)
        total = sum(sl.n_chunks for sl in store.layout.splits.values())
        store.close()
        raise StoreIncompleteError(
            f"{p} is incomplete ({done} of {total} row chunks written): its extraction was interrupted or is "
            f"still running; re-run the same 'embstore extract' command to resume it."
        )
    return store
