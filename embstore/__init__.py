"""embstore: run a frozen transformer once, store every layer's hidden states, probe from the store.

Public API::

    from embstore import DataSpec, ExtractConfig, extract, open_store
    result = extract(ExtractConfig(model="minilm", source=DataSpec(data="train.csv", label_col="label")))
    # or from the flat keys of a YAML file / the CLI:
    result = extract(ExtractConfig.from_dict({"model": "minilm", "data": "train.csv", "label_col": "label"}))
    store = open_store(result.path)
    X = store.pooled("all", "cls", layers="-4--1")   # (n, 4, hidden)
"""

from embstore.config import ExtractConfig
from embstore.data.spec import DataSpec
from embstore.errors import (
    ColumnNotFoundError,
    ConfigError,
    DataError,
    DataFileNotFoundError,
    DiskFullError,
    EmbstoreError,
    LayerSpecError,
    ModelNotFoundError,
    OutputNotWritableError,
    RankFailedError,
    StoreBusyError,
    StoreCorruptedError,
    StoreDamagedError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
)
from embstore.layers import format_layers, parse_layers
from embstore.store.layout import EMBSTORE_VERSION as __version__
from embstore.store.layout import Provenance, StoreMeta
from embstore.store.reader import Store, TokenStates, open_store


def extract(config: ExtractConfig, *, show_progress: bool = True):  # type: ignore[no-untyped-def]
    """Run an extraction (see :func:`embstore.extraction.run.extract`); imports torch lazily."""
    from embstore.extraction.run import extract as _extract

    return _extract(config, show_progress=show_progress)


__all__ = [
    "__version__",
    "DataSpec",
    "ExtractConfig",
    "extract",
    "open_store",
    "Store",
    "StoreMeta",
    "Provenance",
    "TokenStates",
    "parse_layers",
    "format_layers",
    "EmbstoreError",
    "ConfigError",
    "DataError",
    "ColumnNotFoundError",
    "DataFileNotFoundError",
    "DiskFullError",
    "LayerSpecError",
    "ModelNotFoundError",
    "OutputNotWritableError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreBusyError",
    "StoreDamagedError",
    "StoreCorruptedError",
    "RankFailedError",
]
