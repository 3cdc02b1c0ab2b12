"""What the regression and arc sweeps share: the splits they train and score, the validation carve by sentence, the
configurations (layers x pooling x combination), and features built block by block from the store.

A word-level example reads word states; a pair example reads ``[h_i, h_j, h_i * h_j]`` of two words; a sentence
example reads the store's pooled states. Features of a configuration are built from one read of its split's states
(held in the stored dtype), a block of rows at a time, so a task of a quarter of a million word pairs never holds
their float32 features at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from embstore.data.carve import carve
from embstore.errors import ConfigError
from embstore.layers import format_layers, parse_layers
from embstore.store.reader import Store
from heads.probe.specs import Combo

__all__ = ["BLOCK", "Roles", "split_roles_of", "combos_for", "StateCache", "validation_rows"]

BLOCK = 8192
"""Rows per block of features."""


@dataclass(frozen=True)
class Roles:
    """The training and evaluation splits (and rows: a one-split store is carved)."""

    train_split: str
    train_rows: np.ndarray
    eval_split: str
    eval_rows: np.ndarray


def split_roles_of(
    splits: Sequence[str],
    n_rows: dict[str, int],
    train: str,
    evaluate: str | None,
    holdout: float,
    seed: int,
    groups: dict[str, np.ndarray | None],
    ids: dict[str, np.ndarray],
    path: str,
) -> Roles:
    """As :func:`heads.protocol.split_roles`, for examples without class labels: a one-split store's groups
    (sentences) are carved whole."""
    if train in splits:
        name = evaluate or next((s for s in ("test", "validation") if s in splits), None)
        if name is None or name not in splits:
            raise ConfigError(
                f"{path} has splits {', '.join(splits)}; pass --eval-split NAME (one of them) to score on."
            )
        return Roles(train, np.arange(n_rows[train]), name, np.arange(n_rows[name]))
    if len(splits) == 1 and evaluate is None:
        only = splits[0]
        tr, te = carve(None, holdout, seed, groups=groups[only], row_ids=ids[only])
        return Roles(only, tr, only, te)
    raise ConfigError(f"--train-split {train!r} is not in {path}; its splits are {', '.join(splits)}.")


def validation_rows(
    rows: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) absolute rows: a seeded carve of ``fraction`` of ``rows``, groups (sentences) whole."""
    g = None if groups is None else groups[rows]
    fit, val = carve(None, fraction, seed, groups=g, row_ids=ids[rows])
    return np.sort(rows[fit]), np.sort(rows[val])


def combos_for(
    layers: str, combine: Sequence[str], poolings: Sequence[str], store_layers: Sequence[int], head: str
) -> list[Combo]:
    """Every single layer, then (with several layers) each of concat, sum, mean asked for over all of them."""
    chosen = parse_layers(layers, list(store_layers), "layers")
    out = []
    for p in poolings:
        if "single" in combine:
            out += [Combo((x,), "single", p, head) for x in chosen]
        if len(chosen) > 1:
            out += [Combo(tuple(chosen), c, p, head) for c in combine if c in ("concat", "sum", "mean")]
    if not out:
        raise ConfigError(
            f"Nothing to train: --layers {format_layers(chosen)} with --combine {','.join(combine)} gives no "
            "configuration; add 'single' or choose several layers."
        )
    return out


def _shape(combo: Combo, block: np.ndarray) -> np.ndarray:
    """(n, k, H) -> the configuration's (n, width) float32 input."""
    if combo.combine == "concat":
        return block.reshape(len(block), -1).astype(np.float32)
    if combo.combine in ("sum", "mean"):
        x = block.astype(np.float32)
        return x.sum(1) if combo.combine == "sum" else x.mean(1)
    return block[:, 0].astype(np.float32)


class StateCache:
    """The states of each (split, pooling), read once: word states of every stored layer for word and pair examples,
    pooled states for sentence examples."""

    def __init__(self, store: Store, level: str) -> None:
        self.store, self.level = store, level
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def states(self, split: str, pooling: str) -> np.ndarray:
        key = (split, pooling)
        if key not in self._cache:
            self._cache[key] = (
                self.store.pooled(split, pooling)
                if self.level == "sentence"
                else self.store.word_states(split, pooling=pooling)
            )
        return self._cache[key]

    def width(self, combo: Combo) -> int:
        h = self.store.hidden * (len(combo.layers) if combo.combine == "concat" else 1)
        return 3 * h if self.level == "pair" else h

    def blocks(
        self, combo: Combo, split: str, first: np.ndarray, second: np.ndarray | None = None
    ) -> Iterator[np.ndarray]:
        """(b, width) float32 features of the examples reading states ``first`` (and, for pairs, ``second``)."""
        states = self.states(split, combo.pooling)
        pos = [self.store.layout.layer_position(x) for x in combo.layers]
        for start in range(0, len(first), BLOCK):
            a = _shape(combo, states[first[start : start + BLOCK]][:, pos])
            if second is None:
                yield a
                continue
            b = _shape(combo, states[second[start : start + BLOCK]][:, pos])
            yield np.concatenate([a, b, a * b], axis=1)
