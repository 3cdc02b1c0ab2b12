"""Features for heads, read from a store once per sweep and held in the stored dtype, or streamed by row chunk.

A :class:`FeatureBank` serves every configuration of a sweep from one read of the layers it needs. When those
would not fit in ``max_memory`` it does not preload: the linear solver then streams row chunks from the store
(:meth:`FeatureBank.chunk_blocks`, one full pass per iteration), and the other heads read each configuration's
layers when that configuration trains (each layer is its own chunks in the store, so this reads nothing twice
per configuration).

Rows are always absolute positions in a store split, sorted; :meth:`FeatureBank.chunks` cuts a row set along
the store's row chunks, the unit the stream path reads and that torchrun ranks divide (``c % world == rank``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embstore.errors import ConfigError, NonFiniteValuesError
from embstore.store.reader import Store, TokenStates
from heads.probe.config import POOLED_HEADS
from heads.probe.modules import Ragged
from heads.probe.specs import Combo

__all__ = ["FeatureBank", "parse_memory", "feature_width", "BLOCK_ROWS"]

BLOCK_ROWS = 1024
"""Rows per block of the linear solver's passes (a row chunk is cut into blocks, the same in memory and streamed)."""

log = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
}


def parse_memory(text: str | int) -> int:
    """'8GB', '512MB', '1.5g' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"The 'max_memory' option must be a size like 8GB, 512MB or a byte count; got {text!r}.")
    try:
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except ValueError:
        raise ConfigError(
            f"The 'max_memory' option must be a size like 8GB, 512MB or a byte count; got {text!r}."
        ) from None
    if value <= 0:
        raise ConfigError(f"The 'max_memory' option must be a positive size like 8GB; got {text!r}.")
    return value


def _towers_for(combo: Combo, towers: Sequence[str]) -> list[str]:
    return list(towers) if combo.head == "pair" else [towers[0]]


def feature_width(combo: Combo, hidden: int) -> int:
    """Width of a pooled head's input vector: hidden (single, sum, mean) or layers x hidden (concat)."""
    return hidden * len(combo.layers) if combo.combine == "concat" else hidden


def _needs(store: Store, combos: Sequence[Combo]) -> tuple[list[int], list[str], list[str]]:
    """The stored layers, poolings and towers the pooled ``combos`` read."""
    pooled = [c for c in combos if c.pooling != "tokens"]
    return (
        sorted({x for c in pooled for x in c.layers}),
        sorted({c.pooling for c in pooled}),
        sorted({t for c in pooled for t in _towers_for(c, store.towers)}),
    )


class FeatureBank:
    """Features of the store splits a sweep uses, preloaded when they fit ``max_memory``."""

    def __init__(self, store: Store, combos: Sequence[Combo], splits: Sequence[str], max_memory: int) -> None:
        self.store = store
        self.splits = list(dict.fromkeys(splits))
        self.layers, self.poolings, self.towers = _needs(store, combos)
        self.itemsize = np.dtype(store.layout.dtype).itemsize
        self.row_bytes = len(self.layers) * len(self.poolings) * len(self.towers) * store.hidden * self.itemsize
        """Bytes of one row of every needed layer, pooling and tower, in the stored dtype."""
        self.needed = sum(store.n_rows(s) for s in self.splits) * self.row_bytes
        self.max_memory = max_memory
        self.preloaded = self.needed <= max_memory
        self._cache: dict[tuple[str, str, str], np.ndarray] = {}
        self._finite: set[tuple[str, str, int, int]] = set()
        """(split, pooling, first row, layer) blocks already seen finite (a streamed chunk is checked once)."""
        if self.preloaded and self.layers:
            for split in self.splits:
                for pooling in self.poolings:
                    for tower in self.towers:
                        # (n, k, hidden) in the stored dtype, read once for the whole sweep
                        block = store.pooled(split, pooling, self.layers, tower=tower)
                        self._check_finite(split, pooling, self.layers, block)
                        self._cache[(split, pooling, tower)] = block
        elif self.layers:
            log.info(
                "features need %.2f GB > max_memory %.2f GB: streaming row chunks from the store",
                self.needed / 1e9,
                max_memory / 1e9,
            )

    @staticmethod
    def bytes_needed(store: Store, combos: Sequence[Combo], splits: Sequence[str]) -> int:
        """What a bank of ``combos`` would hold in memory (:attr:`needed`), without reading anything."""
        layers, poolings, towers = _needs(store, combos)
        return (
            sum(store.n_rows(s) for s in dict.fromkeys(splits))
            * len(layers)
            * len(poolings)
            * len(towers)
            * store.hidden
            * np.dtype(store.layout.dtype).itemsize
        )

    def _check_finite(self, split: str, pooling: str, layers: Sequence[int], block: np.ndarray, start: int = 0) -> None:
        """Refuse features holding inf or NaN (``block`` (rows, k, hidden), rows from ``start``): an embstore from
        before extraction checked for them stored such values silently, and a head would train on them."""
        todo = [j for j, layer in enumerate(layers) if (split, pooling, start, layer) not in self._finite]
        if not todo:
            return
        bad = ~np.isfinite(block[:, todo]).all(axis=(0, 2))
        if bad.any():
            layer = layers[todo[int(np.flatnonzero(bad)[0])]]
            raise NonFiniteValuesError(
                f"{self.store.path} holds inf or NaN in split {split!r}, layer {layer}, pooling {pooling} (stored by "
                "an embstore from before extraction checked for them; 'embstore verify' lists them all): re-extract "
                "it with --dtype float32, or sweep other --layers or --pooling."
            )
        self._finite.update((split, pooling, start, layers[j]) for j in todo)

    # -- whole configurations ------------------------------------------------------------------------------
    def _block(self, split: str, pooling: str, tower: str, layers: Sequence[int]) -> np.ndarray:
        """(n, len(layers), hidden) for the given layers, from memory or the store."""
        if self.preloaded:
            full = self._cache[(split, pooling, tower)]
            pos = [self.layers.index(x) for x in layers]
            if pos == list(range(pos[0], pos[-1] + 1)):
                return full[:, pos[0] : pos[-1] + 1]  # a view, no copy
            return full[:, pos]
        need = self.store.n_rows(split) * len(layers) * self.store.hidden * self.itemsize
        if need > self.max_memory:
            raise ConfigError(
                f"One configuration ({len(layers)} layers of {split}) needs {need / 1e9:.2f} GB, over --max-memory "
                f"{self.max_memory / 1e9:.2f} GB; raise --max-memory or sweep fewer layers at once."
            )
        block = self.store.pooled(split, pooling, list(layers), tower=tower)
        self._check_finite(split, pooling, list(layers), block)
        return block

    def features(self, combo: Combo, split: str, rows: np.ndarray | None = None) -> Any:
        """The input of ``combo``'s head for ``split`` (optionally only ``rows``, in that order).

        single -> (n, hidden); concat -> (n, k*hidden); sum/mean -> (n, hidden);
        mix/conv/sum-head -> (n, k, hidden); pair -> ((n, k, hidden), (n, k, hidden)); tokens -> Ragged.
        """
        if combo.pooling == "tokens":
            tok: TokenStates = self.store.tokens(split, combo.layers[0])
            ragged = Ragged(tok.values, tok.offsets)
            return ragged if rows is None else ragged.take(rows)
        if combo.head == "pair":
            return tuple(
                self._shape(combo, self._block(split, combo.pooling, t, combo.layers), rows) for t in self.store.towers
            )
        return self._shape(combo, self._block(split, combo.pooling, self.store.towers[0], combo.layers), rows)

    @staticmethod
    def _shape(combo: Combo, block: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        if rows is not None:
            block = block[rows]
        if combo.head not in POOLED_HEADS:
            return block  # layered heads (conv, sum, mix, pair) take the layers separately
        if combo.combine == "single":
            return block[:, 0]
        if combo.combine == "concat":
            return block.reshape(len(block), -1)
        if combo.combine == "sum":  # in float32: a float16 sum of many layers loses digits (or overflows)
            return block.astype(np.float32).sum(1)
        if combo.combine == "mean":
            return block.astype(np.float32).mean(1)
        raise ConfigError(f"Unknown combine {combo.combine!r} for head {combo.head!r}.")

    # -- row chunks (the stream path) ----------------------------------------------------------------------
    def chunks(self, split: str, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(store row chunk, the sorted absolute ``rows`` inside it) for every chunk that holds some of them."""
        sl = self.store.layout.splits[split]
        rows = np.asarray(rows, dtype=np.int64)
        ids = rows // sl.chunk_rows
        return [(int(c), rows[ids == c]) for c in np.unique(ids)]

    def chunk_bytes(self, split: str, n_features: int, per_row_work: int = 0) -> int:
        """Working set of one row chunk: the read (every needed layer and pooling, stored dtype), plus for one block
        of at most ``BLOCK_ROWS`` of its rows ``n_features`` float32 features and ``per_row_work`` bytes of work."""
        rows = self.store.layout.splits[split].chunk_rows
        return rows * self.row_bytes + min(rows, BLOCK_ROWS) * (4 * n_features + per_row_work)

    def chunk_blocks(
        self, combos: Sequence[Combo], split: str, chunk: int, rows: np.ndarray
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(rows, one float32 (len(rows), width) array per pooled combo) for blocks of at most ``BLOCK_ROWS`` of
        ``rows`` (absolute, all inside row chunk ``chunk``): the chunk is read once (from memory, or from the
        store), the float32 features built one block at a time, so a streamed chunk costs its stored bytes plus
        one block's features."""
        tower = self.store.towers[0]
        if self.preloaded:
            raw = {p: self._cache[(split, p, tower)] for p in self.poolings}
            offset = 0
        else:
            start, stop = self.store.layout.splits[split].rows(chunk)
            raw = {p: self.store.pooled_rows(split, p, start, stop, self.layers, tower=tower) for p in self.poolings}
            for p, block in raw.items():
                self._check_finite(split, p, self.layers, block, start)
            offset = start
        pos = {c: [self.layers.index(x) for x in c.layers] for c in combos}
        for b in range(0, len(rows), BLOCK_ROWS):
            sub = rows[b : b + BLOCK_ROWS]
            blocks = {p: raw[p][sub - offset] for p in self.poolings}
            yield (
                sub,
                [
                    np.ascontiguousarray(self._shape(c, blocks[c.pooling][:, pos[c]], None), dtype=np.float32)
                    for c in combos
                ],
            )
