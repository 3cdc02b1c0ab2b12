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

from embstore.errors import DiskFullError, OutputNotWritableError, StoreMismatchError
from embstore.store import layout as L
from embstore.store.digests import chunk_selections, digest_arrays, layer_digests
from embstore.store.lock import owner_tag, stale_owner

__all__ = ["StoreWriter", "export_h5", "io_errors"]


@contextmanager
def io_errors(path: str) -> Iterator[None]:
    """Turn a full disk or a permission problem into a one-line user error."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"No space left on the device while writing {path}; free some space or choose another --out, then "
                f"re-run to resume."
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputNotWritableError(
                f"Cannot write {path} ({exc.strerror}); choose a writable --out or EMBSTORE_CACHE."
            ) from exc
        raise


def _local(path: str) -> bool:
    return "://" not in path


CREATING = ".creating-"
"""A store is built in ``<path>.creating-<host>-<pid>`` and renamed into place."""


def clean_stale_staging(path: str) -> None:
    """Remove the ``.creating-*`` directories of runs that died while creating ``path``; a live owner's stay."""
    for stale in Path(path).parent.glob(Path(path).name + CREATING + "*"):
        if stale_owner(stale.name.rsplit(CREATING, 1)[1]):
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (a freshly built skeleton: metadata and small arrays)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def _chunk_files(root: Path, arr: Any, selection: Any) -> list[Path]:
    """Paths of the storage chunks of ``arr`` that ``selection`` touches (``...``, or a tuple of ints/slices)."""
    shape, chunks = arr.shape, arr.chunks
    if selection is Ellipsis:
        selection = ()
    ranges = []
    for dim, (size, step) in enumerate(zip(shape, chunks)):
        sel = selection[dim] if dim < len(selection) else slice(None)
        if isinstance(sel, (int, np.integer)):
            ranges.append(range(int(sel) // step, int(sel) // step + 1))
        else:
            start, stop, _ = sel.indices(size)
            ranges.append(range(start // step, max(start, stop - 1) // step + 1) if stop > start else range(0))
    import itertools

    return [root / arr.path / arr.metadata.encode_chunk_key(coords) for coords in itertools.product(*ranges)]


class StoreWriter:
    """Writes one zarr store. Make with :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, group: Any) -> None:
        self.path = path
        self.group = group
        self.meta = L.StoreMeta.from_dict(dict(group.attrs[L.ATTR_KEY]), source=path)
        self.layout = self.meta.layout

    @classmethod
    def create(
        cls,
        path: str,
        meta: L.StoreMeta,
        arrays: dict[str, np.ndarray],
        token_counts: dict[tuple[str, str], np.ndarray],
    ) -> "StoreWriter":
        """Create every array and the metadata, empty of hidden states.

        ``arrays`` are the per-row arrays known before the model runs (row ids, labels, token
        counts); ``token_counts[(split, tower)]`` gives tokens per row, which fixes the per-token
        offsets and chunk arrays. Locally the skeleton is built beside ``path`` and renamed into
        place, so a kill during creation never leaves a half-made store at ``path``.
        """
        import zarr

        lay = meta.layout
        target = f"{path}{CREATING}{owner_tag()}" if _local(path) else path
        with io_errors(path):
            if _local(path):
                clean_stale_staging(path)
            g = zarr.open_group(target, mode="w")
            for name, arr in arrays.items():
                g.create_array(name, data=arr, chunks=(max(1, min(len(arr), 1 << 20)),), compressors=None)
            for split, sl in lay.splits.items():
                g.create_array(
                    L.done_path(split), shape=(sl.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, compressors=None
                )
                g.create_array(
                    L.digest_path(split),
                    shape=(sl.n_chunks, 32),
                    chunks=(1, 32),
                    dtype="uint8",
                    fill_value=0,
                    compressors=None,
                )
                entries = len(lay.digest_entries())
                g.create_array(
                    L.layer_digest_path(split),
                    shape=(sl.n_chunks, entries, 32),
                    chunks=(1, entries, 32),
                    dtype="uint8",
                    fill_value=0,
                    compressors=None,
                )
                for tower in lay.towers:
                    for pooling in lay.poolings:
                        g.create_array(
                            L.pooled_path(split, tower, pooling),
                            shape=(len(lay.layers), sl.n_rows, lay.hidden),
                            chunks=lay.chunk_shape_pooled(split),
                            dtype=lay.dtype,
                            fill_value=0,
                            compressors=None,
                        )
                    if lay.word_poolings:
                        words = arrays[L.word_offsets_path(split)]
                        for c in range(sl.n_chunks):
                            start, stop = sl.rows(c)
                            n_words = int(words[stop] - words[start])
                            for pooling in lay.word_poolings:
                                g.create_array(
                                    L.word_chunk_path(split, tower, pooling, c),
                                    shape=(len(lay.layers), n_words, lay.hidden),
                                    chunks=(1, max(1, min(n_words, L.WORD_CHUNK_ROWS)), lay.hidden),
                                    dtype=lay.dtype,
                                    fill_value=0,
                                    compressors=None,
                                )
                    if not lay.token_layers:
                        continue
                    counts = token_counts[(split, tower)].astype(np.int64)
                    offsets = np.concatenate([[0], np.cumsum(counts)])
                    for layer in lay.token_layers:
                        g.create_array(
                            L.token_offsets_path(split, tower, layer),
                            data=offsets,
                            chunks=(len(offsets),),
                            compressors=None,
                        )
                        for c in range(sl.n_chunks):
                            start, stop = sl.rows(c)
                            n_tok = int(offsets[stop] - offsets[start])
                            g.create_array(
                                L.token_chunk_path(split, tower, layer, c),
                                shape=(n_tok, lay.hidden),
                                chunks=(max(1, min(n_tok, L.TOKEN_CHUNK_ROWS)), lay.hidden),
                                dtype=lay.dtype,
                                fill_value=0,
                                compressors=None,
                            )
            g.attrs[L.ATTR_KEY] = meta.to_dict()
            if _local(path):
                _fsync_tree(Path(target))
                try:
                    os.replace(target, path)
                except OSError as exc:
                    shutil.rmtree(target, ignore_errors=True)
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                        raise StoreMismatchError(
                            f"{path} appeared while this run was creating it (something else wrote there without the "
                            f"store lock); remove it or choose another --out."
                        ) from None
                    raise
                fsync_dir(Path(path).parent)
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
            # The data must be on disk before the flag that vouches for it: after a power loss a resume
            # trusts every chunk whose done flag it finds.
            self._sync([(name, sel) for name, sel in sels])
            digest = digest_arrays([(name, data[name]) for name, _ in sels])
            per_layer = layer_digests(self.layout, split, chunk, data)  # (entries, 32)
            self.group[L.layer_digest_path(split)][chunk] = per_layer
            self.group[L.digest_path(split)][chunk] = np.frombuffer(digest, dtype=np.uint8)
            self._sync([(L.layer_digest_path(split), (chunk,)), (L.digest_path(split), (chunk,))])
            self.group[L.done_path(split)][chunk] = 1
            self._sync([(L.done_path(split), (chunk,))])

    def _sync(self, regions: list[tuple[str, Any]]) -> None:
        """fsync the chunk files (and their directories) that ``regions`` (array path, selection) wrote."""
        if not _local(self.path):
            return
        dirs: set[Path] = set()
        for name, sel in regions:
            for f in _chunk_files(Path(self.path), self.group[name], sel):
                if f.is_file():
                    _fsync_file(f)
                    dirs.add(f.parent)
        for d in dirs:
            fsync_dir(d)

    def finalize(self, finished: str) -> None:
        """Mark the store complete at ``finished`` (ISO time; the last write of an extraction)."""
        meta = self.meta.completed(finished)
        with io_errors(self.path):
            self.group.attrs[L.ATTR_KEY] = meta.to_dict()
            if _local(self.path):
                _fsync_file(Path(self.path) / "zarr.json")
                fsync_dir(Path(self.path))
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
                                ds[i, s : s + rows_per_copy] = arr[i, s : s + rows_per_copy]
                    else:
                        for s in range(0, arr.shape[0], rows_per_copy):
                            ds[s : s + rows_per_copy] = arr[s : s + rows_per_copy]
                f.attrs[L.ATTR_KEY] = json.dumps(src.attrs[L.ATTR_KEY])
            os.replace(tmp, h5_path)
            fsync_dir(Path(h5_path).parent)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
