"""Every error a user can cause, in one place.

Each class subclasses the closest built-in so callers can catch either. The CLI turns any
:class:`EmbstoreError` into one line on stderr and exit code 2; a traceback is a bug.
Messages name the bad value and say how to fix it.
"""

from __future__ import annotations

__all__ = [
    "EmbstoreError",
    "DataError",
    "ColumnNotFoundError",
    "DataFileNotFoundError",
    "ModelNotFoundError",
    "LayerSpecError",
    "StoreNotFoundError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "OutputNotWritableError",
    "DiskFullError",
    "ConfigError",
    "CarveError",
    "StoreBusyError",
    "StoreDamagedError",
    "RankFailedError",
    "StoreCorruptedError",
]


class EmbstoreError(Exception):
    """Base class of every error caused by user input or the environment."""


class ConfigError(EmbstoreError, ValueError):
    """An option has a value outside what it accepts."""


class CarveError(ConfigError):
    """A carve cannot hold every class (or keep groups apart) on both sides.

    ``detail`` says why with the sizes, for a caller to put after what it carved and before the option that fixes
    it: ``f"The validation carve of {what} {e.detail}; raise --validation-fraction."``.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"The carve {detail}.")


class DataError(EmbstoreError, ValueError):
    """The data file parses but its content cannot be used (empty, NaN rows, missing labels)."""


class ColumnNotFoundError(DataError):
    """A named column is not in the data file."""


class DataFileNotFoundError(EmbstoreError, FileNotFoundError):
    """A data file does not exist."""


class ModelNotFoundError(EmbstoreError, FileNotFoundError):
    """A --model value is neither built in, a local directory, nor in the local HF cache."""


class LayerSpecError(EmbstoreError, ValueError):
    """A layer specification is malformed or names layers the model/store does not have."""


class StoreNotFoundError(EmbstoreError, FileNotFoundError):
    """No store at the given path."""


class StoreIncompleteError(EmbstoreError, RuntimeError):
    """The store exists but its extraction has not finished."""


class StoreMismatchError(EmbstoreError, ValueError):
    """A store exists at the output path but was made from other inputs or another schema."""


class OutputNotWritableError(EmbstoreError, PermissionError):
    """The output location cannot be created or written."""


class DiskFullError(EmbstoreError, OSError):
    """Not enough free space for the store."""


class StoreBusyError(EmbstoreError, BlockingIOError):
    """Another process holds the store's write lock."""


class StoreDamagedError(EmbstoreError, ValueError):
    """A store's metadata exists but cannot be parsed (a torn or edited zarr.json / HDF5 attribute)."""


class RankFailedError(EmbstoreError, RuntimeError):
    """One rank of a multi-process run failed; every rank stops with this error."""


class StoreCorruptedError(EmbstoreError, ValueError):
    """Data read from a store does not match the checksum recorded when it was written."""
