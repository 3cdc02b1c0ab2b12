"""Features for heads, read from a store once per sweep and held in the stored dtype.

A :class:`FeatureBank` serves every configuration of a sweep from one read of the layers it
needs. When those would not fit in ``max_memory`` it reads each configuration's layers from
the store when that configuration trains and drops them after, so the peak stays at one
configuration's features (each layer is its own chunks in the store, so this reads nothing
twice per configuration).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from embstore.errors import ConfigError
from embstore.store import Store, TokenStates
from heads.config import POOLED_HEADS
from heads.modules import Ragged
from heads.specs import Combo

__all__ = ["FeatureBank", "parse_memory"]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "t": 1 << 40, "tb": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'8GB', '512MB', '1.5g' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"The 'max_memory' option must be a size like 8GB, 512MB or a byte count; got {text!r}.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _towers_for(combo: Combo, towers: Sequence[str]) -> list[str]:
    return list(towers) if combo.head == "pair" else [towers[0]]


class FeatureBank:
    """Features of the store splits a sweep uses.

    ``rows[split]`` optionally restricts/reorders a store split (for carved holdouts); None is all rows.
    """

    def __init__(self, store: Store, combos: Sequence[Combo], splits: Sequence[str], max_memory: int) -> None:
        self.store = store
        self.splits = list(dict.fromkeys(splits))
        self.layers = sorted({x for c in combos if c.pooling != "tokens" for x in c.layers})
        self.poolings = sorted({c.pooling for c in combos if c.pooling != "tokens"})
        self.towers = sorted({t for c in combos if c.pooling != "tokens" for t in _towers_for(c, store.towers)})
        item = np.dtype(store.layout.dtype).itemsize
        self.needed = sum(store.n_rows(s) for s in self.splits) * len(self.layers) * len(self.poolings) * len(self.towers) * store.hidden * item
        self.max_memory = max_memory
        self.preloaded = self.needed <= max_memory
        self._cache: dict[tuple[str, str, str], np.ndarray] = {}
        if self.preloaded and self.layers:
            for split in self.splits:
                for pooling in self.poolings:
                    for tower in self.towers:
                        # (n, k, hidden) in the stored dtype, read once for the whole sweep
                        self._cache[(split, pooling, tower)] = store.pooled(split, pooling, self.layers, tower=tower)
        elif self.layers:
            log.info("features need %.2f GB > max_memory %.2f GB: reading each configuration's layers when it trains",
                     self.needed / 1e9, max_memory / 1e9)

    def _block(self, split: str, pooling: str, tower: str, layers: Sequence[int]) -> np.ndarray:
        """(n, len(layers), hidden) for the given layers, from memory or the store."""
        if self.preloaded:
            full = self._cache[(split, pooling, tower)]
            pos = [self.layers.index(x) for x in layers]
            if pos == list(range(pos[0], pos[-1] + 1)):
                return full[:, pos[0]:pos[-1] + 1]  # a view, no copy
            return full[:, pos]
        block = self.store.pooled(split, pooling, list(layers), tower=tower)
        if block.nbytes > self.max_memory:
            raise ConfigError(f"One configuration ({len(layers)} layers of {split}) needs {block.nbytes / 1e9:.2f} GB, over --max-memory {self.max_memory / 1e9:.2f} GB; raise --max-memory or sweep fewer layers at once.")
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
            return tuple(self._shape(combo, self._block(split, combo.pooling, t, combo.layers), rows) for t in self.store.towers)
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
        if combo.combine == "sum":
            return block.astype(np.float32).sum(1).astype(block.dtype)
        if combo.combine == "mean":
            return block.astype(np.float32).mean(1).astype(block.dtype)
        raise ConfigError(f"Unknown combine {combo.combine!r} for head {combo.head!r}.")
