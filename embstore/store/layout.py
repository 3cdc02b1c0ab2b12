"""The on-disk layout of a store. Only this module names groups, arrays and attributes.

A store (zarr v3 directory, or one HDF5 file with the same tree) holds::

    attrs["embstore"] = {schema_version, complete, fingerprint, layout, provenance, ...}
    splits/<split>/row_ids                       (n,) int64   row index in the source file
    splits/<split>/labels                        (n,) int64   index into label_names (if labelled)
    splits/<split>/groups                        (n,) int64   index into group_names (with --group-col)
    splits/<split>/duration                      (n,) float32 seconds the model heard (audio)
    splits/<split>/augment/<field>               (n,) per row: copy (int16, 0 = original row),
                                                 speed, shift, snr_db (float32, NaN = not applied)
    splits/<split>/<tower>/n_tokens              (n,) int32   tokens (audio: output frames) after truncation
    splits/<split>/<tower>/truncated             (n,) bool    (audio: cropped by --max-seconds)
    splits/<split>/<tower>/pooled/<pooling>      (n_layers, n, hidden)  chunks (1, chunk_rows, hidden)
    splits/<split>/<tower>/tokens/<layer>/offsets      (n + 1,) int64 into the flat token rows
    splits/<split>/<tower>/tokens/<layer>/c<chunk>     (tokens of that row chunk, hidden)
    progress/<split>/done                        (n_chunks,) uint8, one storage chunk per element
    progress/<split>/digest                      (n_chunks, 32) uint8 sha256 of each row chunk
    progress/<split>/layer_digest                (n_chunks, entries, 32) uint8 sha256 of each
                                                 (tower, pooling or 'tokens', layer) of each row chunk,
                                                 in ``StoreLayout.digest_entries()`` order: what lets a
                                                 reader verify just the layers it reads

Text stores have one tower 'text' (or 'a' and 'b'), audio stores one tower 'audio'.
Augmented audio rows share their source row's ``row_ids`` (and group), so they can be traced
and kept on their source's side of every split.
Rows are stored in extraction order (longest first); ``row_ids`` maps them back. The pooled
array is chunked one layer at a time, so reading one layer touches only that layer's chunks.
Row chunk ``c`` covers rows [c * chunk_rows, (c + 1) * chunk_rows) (chunk_rows per split, see
``SplitLayout.plan``): the unit of resume and
of multi-process work, aligned with the storage chunks so ranks never share a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "EMBSTORE_VERSION",
    "SCHEMA_VERSION",
    "ATTR_KEY",
    "SINGLE_TOWER",
    "PAIR_TOWERS",
    "StoreLayout",
    "SplitLayout",
    "row_ids_path",
    "labels_path",
    "groups_path",
    "duration_path",
    "augment_path",
    "AUDIO_TOWER",
    "AUGMENT_FIELDS",
    "n_tokens_path",
    "truncated_path",
    "pooled_path",
    "token_offsets_path",
    "token_chunk_path",
    "done_path",
    "digest_path",
    "layer_digest_path",
]

SCHEMA_VERSION = 1

EMBSTORE_VERSION = "0.1.0"
"""The version of embstore that writes stores (``embstore.__version__``), recorded in each store's provenance."""
ATTR_KEY = "embstore"
SINGLE_TOWER = "text"
PAIR_TOWERS = ("a", "b")
AUDIO_TOWER = "audio"
AUGMENT_FIELDS = ("copy", "speed", "shift", "snr_db")
TOKEN_CHUNK_ROWS = 8192


@dataclass(frozen=True, kw_only=True)
class SplitLayout:
    """Shape facts of one split."""

    n_rows: int
    """Stored rows."""
    chunk_rows: int
    """Rows per row chunk: the requested maximum evened out so the last chunk is not mostly empty."""
    n_tokens: dict[str, int]
    """Total tokens per tower (the flat length of per-token arrays)."""

    @classmethod
    def plan(cls, n_rows: int, max_chunk_rows: int, n_tokens: dict[str, int]) -> "SplitLayout":
        chunks = max(1, -(-n_rows // max_chunk_rows))
        return cls(n_rows=n_rows, chunk_rows=max(1, -(-n_rows // chunks)), n_tokens=n_tokens)

    @property
    def n_chunks(self) -> int:
        """Row chunks (work units)."""
        return max(1, -(-self.n_rows // self.chunk_rows))

    def rows(self, chunk: int) -> tuple[int, int]:
        """Row range [start, stop) of row chunk ``chunk``."""
        start = chunk * self.chunk_rows
        return start, min(self.n_rows, start + self.chunk_rows)


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """What arrays a store holds and how they are shaped."""

    layers: tuple[int, ...]
    """Stored layer indices (0 = embeddings)."""
    poolings: tuple[str, ...]
    hidden: int
    dtype: str
    """Storage dtype of hidden states, 'float16' or 'float32'."""
    towers: tuple[str, ...]
    """('text',) or ('a', 'b') in towers mode."""
    token_layers: tuple[int, ...]
    """Layers with per-token states."""
    chunk_rows: int
    """The requested maximum rows per chunk (each split evens it out)."""
    splits: dict[str, SplitLayout]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "poolings": list(self.poolings),
            "hidden": self.hidden,
            "dtype": self.dtype,
            "towers": list(self.towers),
            "token_layers": list(self.token_layers),
            "chunk_rows": self.chunk_rows,
            "splits": {
                k: {
                    "n_rows": v.n_rows,
                    "chunk_rows": v.chunk_rows,
                    "n_chunks": v.n_chunks,
                    "n_tokens": dict(v.n_tokens),
                }
                for k, v in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreLayout":
        return cls(
            layers=tuple(d["layers"]),
            poolings=tuple(d["poolings"]),
            hidden=int(d["hidden"]),
            dtype=d["dtype"],
            towers=tuple(d["towers"]),
            token_layers=tuple(d["token_layers"]),
            chunk_rows=int(d["chunk_rows"]),
            splits={
                k: SplitLayout(n_rows=v["n_rows"], chunk_rows=v["chunk_rows"], n_tokens=dict(v["n_tokens"]))
                for k, v in d["splits"].items()
            },
        )

    def layer_position(self, layer: int) -> int:
        """Index of ``layer`` along the pooled arrays' first axis."""
        return self.layers.index(layer)

    def chunk_shape_pooled(self, split: str) -> tuple[int, int, int]:
        return (1, self.splits[split].chunk_rows, self.hidden)

    def digest_entries(self) -> list[tuple[str, str, int]]:
        """(tower, pooling or 'tokens', layer) of every per-layer checksum of a row chunk, in stored order."""
        out = [(t, p, layer) for t in self.towers for p in self.poolings for layer in self.layers]
        return out + [(t, "tokens", layer) for t in self.towers for layer in self.token_layers]

    def data_paths(self, split: str) -> list[str]:
        """Every array written per row chunk, in the canonical order used for digests."""
        paths = []
        for tower in self.towers:
            paths += [pooled_path(split, tower, p) for p in self.poolings]
        return paths


def _split(split: str) -> str:
    return f"splits/{split}"


def row_ids_path(split: str) -> str:
    return f"{_split(split)}/row_ids"


def labels_path(split: str) -> str:
    return f"{_split(split)}/labels"


def groups_path(split: str) -> str:
    return f"{_split(split)}/groups"


def duration_path(split: str) -> str:
    return f"{_split(split)}/duration"


def augment_path(split: str, field: str) -> str:
    if field not in AUGMENT_FIELDS:
        raise KeyError(f"unknown augmentation field {field!r}; one of {AUGMENT_FIELDS}")
    return f"{_split(split)}/augment/{field}"


def n_tokens_path(split: str, tower: str) -> str:
    return f"{_split(split)}/{tower}/n_tokens"


def truncated_path(split: str, tower: str) -> str:
    return f"{_split(split)}/{tower}/truncated"


def pooled_path(split: str, tower: str, pooling: str) -> str:
    return f"{_split(split)}/{tower}/pooled/{pooling}"


def token_offsets_path(split: str, tower: str, layer: int) -> str:
    return f"{_split(split)}/{tower}/tokens/{layer}/offsets"


def token_chunk_path(split: str, tower: str, layer: int, chunk: int) -> str:
    return f"{_split(split)}/{tower}/tokens/{layer}/c{chunk:06d}"


def done_path(split: str) -> str:
    return f"progress/{split}/done"


def digest_path(split: str) -> str:
    return f"progress/{split}/digest"


def layer_digest_path(split: str) -> str:
    return f"progress/{split}/layer_digest"
