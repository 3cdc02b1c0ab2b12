"""Storage formats a store is read from: the zarr and HDF5 backends, and the checks made before opening one.

:class:`Backend` is the whole interface the reader (:class:`embstore.store.reader.Store`) needs from a format; the
writer always writes zarr (:mod:`embstore.store.writer`). :func:`check_metadata` and :func:`complete_meta` look at a
path's root metadata only, so a finished store is recognised without opening (or importing) its format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embstore.errors import StoreDamagedError, StoreNotFoundError
from embstore.store import layout as L

__all__ = [
    "Backend",
    "ZarrBackend",
    "H5Backend",
    "STORE_SUFFIXES",
    "is_h5_path",
    "check_metadata",
    "complete_meta",
    "open_backend",
]

STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")


def is_h5_path(path: str | os.PathLike[str]) -> bool:
    return str(path).rstrip("/").endswith((".h5", ".hdf5"))


class Backend(Protocol):
    """What a store reader needs from a storage format."""

    format: str
    """'zarr' or 'h5'."""

    def attrs(self) -> dict[str, Any] | None: ...
    def read(self, name: str, selection: Any = ...) -> np.ndarray: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def nbytes(self) -> int: ...
    def close(self) -> None: ...


class ZarrBackend:
    """A zarr v3 group, local or at an fsspec URL."""

    format = "zarr"

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
    """One HDF5 file with the zarr store's tree (exported at the end of an extraction)."""

    format = "h5"

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
                raise StoreNotFoundError(
                    f"{path} is a directory of stores, not a store: it holds {shown}; pass one of them (e.g. "
                    f"{root / inside[0]}), or run 'embstore ls --dir {path}'."
                )
            raise StoreNotFoundError(
                f"{path} is not an embstore store (no zarr.json); pass a path printed by 'embstore extract' or listed "
                f"by 'embstore ls'."
            )
        try:
            json.loads(meta.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreDamagedError(
                f"{meta} cannot be parsed ({type(exc).__name__}: {str(exc).splitlines()[0]}); the store is damaged: "
                f"run 'embstore verify {path}', or delete it and re-extract."
            ) from None
    elif root.is_file() and is_h5_path(path):
        import h5py

        if not h5py.is_hdf5(str(root)):
            raise StoreDamagedError(
                f"{path} is not a readable HDF5 file (damaged or not a store); delete it and re-extract, or pass "
                f"another path."
            )


def complete_meta(path: str, fingerprint: str) -> L.StoreMeta | None:
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
        found = L.StoreMeta.from_dict(meta, source=path) if isinstance(meta, dict) else None
    except (OSError, ValueError):  # unreadable, another schema version (StoreMismatchError) or damaged
        return None
    return found if found is not None and found.fingerprint == fingerprint and found.complete else None


def open_backend(path: str, storage_options: dict[str, Any] | None = None) -> Backend:
    """The backend of the store at ``path`` (HDF5 by suffix, else zarr); StoreNotFoundError when it cannot be opened."""
    try:
        return H5Backend(path) if is_h5_path(path) else ZarrBackend(path, storage_options)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreNotFoundError(
            f"{path} cannot be opened as a store ({type(exc).__name__}: {exc}); check the path."
        ) from exc
