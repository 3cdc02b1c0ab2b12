"""Writing stores: skeleton, row chunks, completion, and the HDF5 export.

Extraction always writes zarr (for ``--format h5`` into ``X.h5.partial.zarr``), because zarr
chunks are separate objects: a run killed mid-write leaves every finished chunk intact, and
ranks writing disjoint chunks never touch the same object. A chunk's ``done`` flag is written
only after its data and digest, and the store is marked complete only after every flag; an
HDF5 store is exported from the finished zarr into a temporary file renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embstore import layout as L
from embstore.errors import DiskFullError, OutputNotWritableError
from embstore.store import chunk_selections, digest_arrays

__all__ = ["StoreWriter", "export_h5", "io_errors"]


@contextmanager
def io_errors(path: str) -> Iterator[None]:
    """Turn a full disk or a permission problem into a one-line user error."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"No space left on the device while writing {path}; free some space or choose another --out, then re-run to resume.") from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputNotWritableError(f"Cannot write {path} ({exc.strerror}); choose a writable --out or EMBSTORE_CACHE.") from exc
        raise


def _local(path: str) -> bool:
    return "://" not in path


class StoreWriter:
    """Writes one zarr store. Make with :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, group: Any) -> None:
        self.path = path
        self.group = group
        self.meta: dict[str, Any] = dict(group.attrs[L.ATTR_KEY])
        self.layout = L.StoreLayout.from_dict(self.meta["layout"])

    @classmethod
    def create(cls, path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray],
               token_counts: dict[tuple[str, str], np.ndarray]) -> "StoreWriter":
        """Create every array and the metadata, empty of hidden states.

        ``arrays`` are the per-row arrays known before the model runs (row ids, labels, token
        counts); ``token_counts[(split, tower)]`` gives tokens per row, which fixes the per-token
        offsets and chunk arrays. Locally the skeleton is built beside ``path`` and renamed into
        place, so a kill during creation never leaves a half-made store at ``path``.
        """
        import zarr

        lay = L.StoreLayout.from_dict(meta["layout"])
        target = f"{path}.creating-{os.getpid()}" if _local(path) else path
        with io_errors(path):
            if _local(path):  # leftovers of runs killed while creating
                for stale in Path(path).parent.glob(Path(path).name + ".creating-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            g = zarr.open_group(target, mode="w")
            for name, arr in arrays.items():
                g.create_array(name, data=arr, chunks=(max(1, min(len(arr), 1 << 20)),), compressors=None)
            for split, sl in lay.splits.items():
                g.create_array(L.done_path(split), shape=(sl.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, compressors=None)
                g.create_array(L.digest_path(split), shape=(sl.n_chunks, 32), chunks=(1, 32), dtype="uint8", fill_value=0, compressors=None)
                for tower in lay.towers:
                    for pooling in lay.poolings:
                        g.create_array(L.pooled_path(split, tower, pooling), shape=(len(lay.layers), sl.n_rows, lay.hidden),
                                       chunks=lay.chunk_shape_pooled(split), dtype=lay.dtype, fill_value=0, compressors=None)
                    if not lay.token_layers:
                        continue
                    counts = token_counts[(split, tower)].astype(np.int64)
                    offsets = np.concatenate([[0], np.cumsum(counts)])
                    for layer in lay.token_layers:
                        g.create_array(L.token_offsets_path(split, tower, layer), data=offsets, chunks=(len(offsets),), compressors=None)
                        for c in range(sl.n_chunks):
                            start, stop = sl.rows(c)
                            n_tok = int(offsets[stop] - offsets[start])
                            g.create_array(L.token_chunk_path(split, tower, layer, c), shape=(n_tok, lay.hidden),
                                           chunks=(max(1, min(n_tok, L.TOKEN_CHUNK_ROWS)), lay.hidden),
                                           dtype=lay.dtype, fill_value=0, compressors=None)
            g.attrs[L.ATTR_KEY] = meta
            if _local(path):
                os.replace(target, path)
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> "StoreWriter":
        import zarr

        return cls(path, zarr.open_group(path, mode="r+"))

    def done(self, split: str) -> np.ndarray:
        """(n_chunks,) bool. A flag whose write was cut off reads as not done."""
        arr = self.group[L.done_path(split)]
        try:
            return np.asarray(arr[:]).astype(bool)
        except Exception:  # one garbled flag: read them one by one
            flags = np.zeros(arr.shape[0], dtype=bool)
            for i in range(arr.shape[0]):
                try:
                    flags[i] = bool(arr[i])
                except Exception:
                    flags[i] = False
            return flags

    def write_chunk(self, split: str, chunk: int, data: dict[str, np.ndarray]) -> None:
        """Write one row chunk: ``data`` maps each array of :func:`chunk_selections` to its values."""
        sels = chunk_selections(self.layout, split, chunk)
        with io_errors(self.path):
            for name, sel in sels:
                self.group[name][sel] = data[name]
            digest = digest_arrays([(name, data[name]) for name, _ in sels])
            self.group[L.digest_path(split)][chunk] = np.frombuffer(digest, dtype=np.uint8)
            self.group[L.done_path(split)][chunk] = 1

    def finalize(self, updates: dict[str, Any]) -> None:
        """Mark the store complete (the last write of an extraction)."""
        meta = {**self.meta, **updates, "complete": True}
        with io_errors(self.path):
            self.group.attrs[L.ATTR_KEY] = meta
        self.meta = meta

    def update_meta(self, updates: dict[str, Any]) -> None:
        meta = {**self.meta, **updates}
        with io_errors(self.path):
            self.group.attrs[L.ATTR_KEY] = meta
        self.meta = meta


def export_h5(zarr_path: str, h5_path: str, rows_per_copy: int = 65536) -> None:
    """Copy a finished zarr store into one HDF5 file with the same tree, chunks and attributes."""
    import h5py
    import zarr

    src = zarr.open_group(zarr_path, mode="r")
    tmp = f"{h5_path}.tmp-{os.getpid()}"
    with io_errors(h5_path):
        try:
            with h5py.File(tmp, "w") as f:
                for name, arr in src.members(max_depth=None):
                    if not isinstance(arr, zarr.Array):
                        continue
                    chunks = tuple(max(1, c) for c in arr.chunks) if arr.size else None
                    ds = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks)
                    if arr.ndim == 3:  # (layers, n, hidden): copy one layer slab at a time
                        for i in range(arr.shape[0]):
                            for s in range(0, arr.shape[1], rows_per_copy):
                                ds[i, s:s + rows_per_copy] = arr[i, s:s + rows_per_copy]
                    else:
                        for s in range(0, arr.shape[0], rows_per_copy):
                            ds[s:s + rows_per_copy] = arr[s:s + rows_per_copy]
                f.attrs[L.ATTR_KEY] = json.dumps(src.attrs[L.ATTR_KEY])
            os.replace(tmp, h5_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
