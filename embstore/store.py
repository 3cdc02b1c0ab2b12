"""Reading stores: one :class:`Store` interface over the zarr and HDF5 backends."""

from __future__ import annotations

import hashlib
import json
import os
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embstore import layout as L
from embstore.errors import (
    ConfigError, StoreCorruptedError, StoreDamagedError, StoreIncompleteError, StoreMismatchError, StoreNotFoundError,
)
from embstore.layers import parse_layers

log = logging.getLogger(__name__)

__all__ = ["Store", "TokenStates", "open_store", "complete_meta", "is_h5_path", "chunk_selections", "digest_arrays",
           "layer_digests", "entry_digest"]


def is_h5_path(path: str | os.PathLike[str]) -> bool:
    return str(path).rstrip("/").endswith((".h5", ".hdf5"))


class Backend(Protocol):
    """What a store reader needs from a storage format."""

    def attrs(self) -> dict[str, Any] | None: ...
    def read(self, name: str, selection: Any = ...) -> np.ndarray: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def nbytes(self) -> int: ...
    def close(self) -> None: ...


class ZarrBackend:
    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        import zarr

        self.path = path
        self.group = zarr.open_group(path, mode="r", storage_options=storage_options)

    def attrs(self) -> dict[str, Any] | None:
        return self.group.attrs.get(L.ATTR_KEY)  # type: ignore[return-value]

    def read(self, name: str, selection: Any = ...) -> np.ndarray:
        return np.asarray(self.group[name][selection])  # type: ignore[index]

    def has(self, name: str) -> bool:
        return name in self.group

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.group[name].shape)  # type: ignore[union-attr]

    def nbytes(self) -> int:
        if "://" not in self.path:
            return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())
        return sum(int(a.nbytes_stored()) for _, a in self.group.arrays())  # pragma: no cover

    def close(self) -> None:
        pass


class H5Backend:
    def __init__(self, path: str) -> None:
        import h5py

        self.path = path
        self.file = h5py.File(path, "r")

    def attrs(self) -> dict[str, Any] | None:
        raw = self.file.attrs.get(L.ATTR_KEY)
        return None if raw is None else json.loads(raw)

    def read(self, name: str, selection: Any = ...) -> np.ndarray:
        return np.asarray(self.file[name][selection])

    def has(self, name: str) -> bool:
        return name in self.file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.file[name].shape)

    def nbytes(self) -> int:
        return os.path.getsize(self.path)

    def close(self) -> None:
        self.file.close()


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
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


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
        else:
            name = L.pooled_path(split, tower, what)
            arr = data[name][lay.layer_position(layer)]
        out[e] = np.frombuffer(entry_digest(name, layer, arr), dtype=np.uint8)
    return out


class Store:
    """A read-only view of one store. Build with :func:`open_store`.

    With ``verify`` (the default) every read of whole row chunks (pooled layers, per-token states)
    is checked against the per-layer sha256 recorded when the chunk was written, and a mismatch is
    :class:`StoreCorruptedError` naming the split, chunk, array and layer.
    """

    def __init__(self, backend: Backend, path: str, verify: bool = True) -> None:
        self._b = backend
        self.path = path
        self.verify_reads = verify
        self._digests: dict[str, np.ndarray | None] = {}
        meta = backend.attrs()
        if not meta:
            raise StoreNotFoundError(f"{path} is not an embstore store (no '{L.ATTR_KEY}' attributes); pass a path printed by 'embstore extract' or listed by 'embstore ls'.")
        if meta.get("schema_version") != L.SCHEMA_VERSION:
            raise StoreMismatchError(
                f"{path} has store schema version {meta.get('schema_version')}, this embstore reads version "
                f"{L.SCHEMA_VERSION}; re-extract it with this version."
            )
        self.meta: dict[str, Any] = meta
        self.layout = L.StoreLayout.from_dict(meta["layout"])

    # -- description ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

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
        names = self.meta.get("label_names")
        return None if names is None else list(names)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("provenance", {}))

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", "text"))

    def n_rows(self, split: str) -> int:
        return self._split(split).n_rows

    def done_chunks(self, split: str) -> np.ndarray:
        """(n_chunks,) bool: which row chunks have been written."""
        return self._b.read(L.done_path(split)).astype(bool)

    def nbytes(self) -> int:
        return self._b.nbytes()

    def describe(self) -> dict[str, Any]:
        """Everything ``embstore info --json`` prints."""
        splits = {}
        for name, sl in self.layout.splits.items():
            done = int(self.done_chunks(name).sum())
            splits[name] = {"rows": sl.n_rows, "chunks": sl.n_chunks, "chunks_done": done,
                            "tokens": sl.n_tokens, "truncated": self.meta.get("truncated", {}).get(name),
                            "augmented": self.meta.get("augmented", {}).get(name, 0)}
        return {
            "path": self.path, "format": "h5" if isinstance(self._b, H5Backend) else "zarr",
            "complete": self.complete, "fingerprint": self.fingerprint, "schema_version": L.SCHEMA_VERSION,
            "modality": self.modality, "splits": splits, "layers": self.layers, "hidden": self.hidden,
            "poolings": self.poolings, "towers": self.towers, "token_layers": self.token_layers,
            "dtype": self.layout.dtype, "label_names": self.label_names, "group_names": self.group_names,
            "sampling_rate": self.meta.get("sampling_rate"), "bytes": self.nbytes(),
            "created": self.meta.get("created"), "finished": self.meta.get("finished"),
            "provenance": self.provenance,
        }

    # -- data ----------------------------------------------------------------------------------
    def _split(self, split: str) -> L.SplitLayout:
        if split not in self.layout.splits:
            raise ConfigError(f"Split {split!r} is not in {self.path}; its splits are {', '.join(self.splits)}.")
        return self.layout.splits[split]

    def _tower(self, tower: str | None) -> str:
        if tower is None:
            if len(self.layout.towers) > 1:
                raise ConfigError(f"{self.path} holds two towers ({', '.join(self.towers)}); pass tower='a' or tower='b'.")
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
        names = self.meta.get("group_names")
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
        """Per-row augmentation record (copy, speed, shift, snr_db), or None when the split has none."""
        self._split(split)
        if not self._b.has(L.augment_path(split, "copy")):
            return None
        return {f: self._b.read(L.augment_path(split, f)) for f in L.AUGMENT_FIELDS}

    def augmented(self, split: str) -> np.ndarray:
        """(n,) bool: rows that are augmented copies (never evaluate on them)."""
        aug = self.augmentation(split)
        return np.zeros(self.n_rows(split), dtype=bool) if aug is None else aug["copy"] > 0

    def n_tokens(self, split: str, tower: str | None = None) -> np.ndarray:
        """(n,) int32 tokens per row after truncation."""
        self._split(split)
        return self._b.read(L.n_tokens_path(split, self._tower(tower)))

    def pooled(self, split: str, pooling: str, layers: str | Sequence[int] | None = None,
               tower: str | None = None) -> np.ndarray:
        """Pooled states as ``(n, len(layers), hidden)`` in the stored dtype.

        ``layers`` takes the same specs as extraction ('all', '9-12', '-1', [3, 6]); None is all.
        """
        return self.pooled_rows(split, pooling, 0, self._split(split).n_rows, layers, tower)

    def _layer_digests(self, split: str) -> np.ndarray | None:
        """(n_chunks, entries, 32) recorded per-layer checksums, or None (a store from before they existed)."""
        if split not in self._digests:
            name = L.layer_digest_path(split)
            self._digests[split] = self._b.read(name) if self._b.has(name) else None
            if self._digests[split] is None and self.verify_reads:
                log.warning("%s has no per-layer checksums (written by an older embstore): its reads are not verified; "
                            "'embstore verify' still checks it", self.path)
        return self._digests[split]

    def _check(self, split: str, entry: tuple[str, str, int], name_of: Callable[[int], str],
               chunk_data: Callable[[int], np.ndarray], start: int = 0, stop: int | None = None) -> None:
        """Compare every written row chunk of one (tower, pooling/'tokens', layer) that lies whole within rows
        [start, stop) with its recorded sha256; ``chunk_data(c)`` is row chunk ``c``'s array as read,
        ``name_of(c)`` the array it came from. (A read of part of a chunk cannot be checked.)"""
        if not self.verify_reads:
            return
        recorded = self._layer_digests(split)
        if recorded is None:
            return
        e = self.layout.digest_entries().index(entry)
        done = self.done_chunks(split)
        sl = self.layout.splits[split]
        stop = sl.n_rows if stop is None else stop
        for c in range(sl.n_chunks):
            lo, hi = sl.rows(c)
            if lo < start or hi > stop:
                continue
            if done[c] and entry_digest(name_of(c), entry[2], chunk_data(c)) != bytes(recorded[c, e]):
                raise StoreCorruptedError(
                    f"{self.path}: split {split}, row chunk {c}, {name_of(c)} layer {entry[2]} does not match the checksum "
                    f"recorded when it was written (the store is corrupted); run 'embstore verify {self.path}' and "
                    "re-extract, or pass --no-verify to read it anyway.")

    def pooled_rows(self, split: str, pooling: str, start: int, stop: int, layers: str | Sequence[int] | None = None,
                    tower: str | None = None) -> np.ndarray:
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
                return block[j, lo - start:hi - start]  # (chunk rows, hidden), as written

            self._check(split, (t, pooling, layer), lambda c: path, chunk, start, stop)
        return np.ascontiguousarray(block.transpose(1, 0, 2))  # (rows, k, hidden)

    def tokens(self, split: str, layer: int, tower: str | None = None) -> TokenStates:
        """Per-token states of one layer, ragged (see :class:`TokenStates`)."""
        sl = self._split(split)
        t = self._tower(tower)
        resolved = parse_layers([layer], sorted({*self.layers, *self.token_layers}))[0]  # token layers need not be pooled
        if resolved not in self.layout.token_layers:
            stored = ",".join(map(str, self.token_layers)) or "none"
            raise ConfigError(f"Layer {layer} has no per-token states in {self.path} (stored: {stored}); re-extract with --tokens {resolved}.")
        offsets = self._b.read(L.token_offsets_path(split, t, resolved))
        parts = [self._b.read(L.token_chunk_path(split, t, resolved, c)) for c in range(sl.n_chunks)]
        self._check(split, (t, "tokens", resolved), lambda c: L.token_chunk_path(split, t, resolved, c), parts.__getitem__)
        return TokenStates(values=np.concatenate(parts) if parts else np.zeros((0, self.hidden)), offsets=offsets)

    # -- integrity -----------------------------------------------------------------------------
    def iter_chunk_arrays(self, split: str, chunk: int) -> Iterator[tuple[str, np.ndarray]]:
        for name, sel in chunk_selections(self.layout, split, chunk):
            yield name, self._b.read(name, sel)

    def verify(self) -> list[str]:
        """Re-read every row chunk and compare its sha256 with the one recorded at write time.

        Returns a list of problems (empty when the store is complete and intact).
        """
        problems = []
        if not self.complete:
            problems.append("store is not marked complete")
        for split, sl in self.layout.splits.items():
            done = self.done_chunks(split)
            recorded = self._b.read(L.digest_path(split))
            for c in range(sl.n_chunks):
                if not done[c]:
                    problems.append(f"split {split}: row chunk {c} was never written")
                    continue
                try:
                    got = digest_arrays(list(self.iter_chunk_arrays(split, c)))
                except Exception as exc:  # a truncated or garbled chunk file fails to decode
                    problems.append(f"split {split}: row chunk {c} cannot be read ({type(exc).__name__}: {exc})")
                    continue
                if got != bytes(recorded[c]):
                    problems.append(f"split {split}: row chunk {c} does not match its checksum (corrupted)")
                    continue
                per_layer = self._layer_digests(split)
                if per_layer is not None:
                    arrays = dict(self.iter_chunk_arrays(split, c))
                    if not np.array_equal(layer_digests(self.layout, split, c, arrays), per_layer[c]):
                        problems.append(f"split {split}: row chunk {c} does not match its per-layer checksums (corrupted)")
        return problems

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


STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")


def check_metadata(path: str) -> None:
    """Fail clearly before opening a local path that is not a readable store.

    A directory of stores (what ``--out DIR`` makes) names the stores inside; a store whose root
    metadata cannot be parsed is :class:`StoreDamagedError`, never mistaken for "not a store".
    Remote (fsspec) paths are left to the backend.
    """
    if "://" in path:
        return
    root = Path(path)
    if root.is_dir() and not is_h5_path(path):
        meta = root / "zarr.json"
        if not meta.is_file():
            inside = sorted(c.name for c in root.iterdir() if c.name.endswith(STORE_SUFFIXES))
            if inside:
                shown = ", ".join(inside[:5]) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
                raise StoreNotFoundError(f"{path} is a directory of stores, not a store: it holds {shown}; pass one of them (e.g. {root / inside[0]}), or run 'embstore ls --dir {path}'.")
            raise StoreNotFoundError(f"{path} is not an embstore store (no zarr.json); pass a path printed by 'embstore extract' or listed by 'embstore ls'.")
        try:
            json.loads(meta.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreDamagedError(f"{meta} cannot be parsed ({type(exc).__name__}: {str(exc).splitlines()[0]}); the store is damaged: run 'embstore verify {path}', or delete it and re-extract.") from None
    elif root.is_file() and is_h5_path(path):
        import h5py

        if not h5py.is_hdf5(str(root)):
            raise StoreDamagedError(f"{path} is not a readable HDF5 file (damaged or not a store); delete it and re-extract, or pass another path.")


def complete_meta(path: str, fingerprint: str) -> dict[str, Any] | None:
    """The metadata of the complete store at ``path`` if its fingerprint is ``fingerprint``, else None.

    Reads only the root metadata (``zarr.json`` as JSON; an HDF5 file's attribute), so a re-run that
    finds its store finished answers without importing zarr.
    """
    if "://" in path or not os.path.exists(path):
        return None
    try:
        if is_h5_path(path):
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get(L.ATTR_KEY)
            meta = None if raw is None else json.loads(raw)
        else:
            meta = json.loads((Path(path) / "zarr.json").read_bytes()).get("attributes", {}).get(L.ATTR_KEY)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("schema_version") != L.SCHEMA_VERSION:
        return None
    return meta if meta.get("fingerprint") == fingerprint and meta.get("complete") else None


def open_store(path: str | os.PathLike[str], *, allow_incomplete: bool = False,
               storage_options: dict[str, Any] | None = None, verify: bool = True) -> Store:
    """Open a store for reading; with ``verify`` (default) reads are checked against their checksums.

    Refuses an incomplete store (an extraction still running or killed) unless
    ``allow_incomplete``; the message says how to finish it.
    """
    p = str(path)
    if not _exists(p):
        if is_h5_path(p) and os.path.exists(p + ".partial.zarr"):
            raise StoreIncompleteError(f"{p} is incomplete (its extraction is staged in {p}.partial.zarr); re-run the same 'embstore extract' command to resume it.")
        raise StoreNotFoundError(f"No store at {p}; run 'embstore ls' to list the stores in the cache.")
    check_metadata(p)
    try:
        backend: Backend = H5Backend(p) if is_h5_path(p) else ZarrBackend(p, storage_options)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreNotFoundError(f"{p} cannot be opened as a store ({type(exc).__name__}: {exc}); check the path.") from exc
    store = Store(backend, p, verify=verify)
    if not store.complete and not allow_incomplete:
        done = sum(int(store.done_chunks(s).sum()) for s in store.splits)
        total = sum(sl.n_chunks for sl in store.layout.splits.values())
        store.close()
        raise StoreIncompleteError(
            f"{p} is incomplete ({done} of {total} row chunks written): its extraction was interrupted or is "
            f"still running; re-run the same 'embstore extract' command to resume it."
        )
    return store
