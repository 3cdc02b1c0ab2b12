"""Split roles: which split of a store trains and which is scored (a one-split store is carved), and the groups
no carve may cut through."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from embstore.data.carve import carve
from embstore.errors import ConfigError

if TYPE_CHECKING:
    from embstore.store.reader import Store

__all__ = ["carve_groups", "split_roles"]

log = logging.getLogger(__name__)


def carve_groups(store: Store, split: str) -> np.ndarray | None:
    """Groups no carve may cut through: the stored groups (e.g. speakers), else the source row of
    augmented copies (a copy must stay on its source's side), else None."""
    groups = store.groups(split)
    if groups is not None:
        return groups
    return store.row_ids(split) if store.augmented(split).any() else None


def split_roles(
    store: Store, train: str, evaluate: str | None, holdout: float, seed: int, folds: int | None = None
) -> tuple[tuple[str, np.ndarray | None], tuple[str, np.ndarray | None]]:
    """((train split, rows or None), (eval split, rows or None)); a one-split store is carved (by
    :func:`embstore.data.carve.carve`, on source-row ids, as ``heads finetune`` carves a one-split table), unless
    ``folds`` cross-validates all its rows."""
    if train in store.splits:
        name = evaluate or next((s for s in ("test", "validation") if s in store.splits), None)
        if name is None and folds:
            name = train  # cross-validation scores held-out folds of the training rows; no evaluation split needed
        if name is None:
            raise ConfigError(
                f"{store.path} has splits {', '.join(store.splits)} and none is named test or validation; pass "
                f"--eval-split NAME."
            )
        if name not in store.splits:
            raise ConfigError(
                f"--eval-split {name!r} is not in {store.path}; its splits are {', '.join(store.splits)}."
            )
        return (train, None), (name, None)
    if len(store.splits) == 1 and evaluate is None:
        only = store.splits[0]
        if folds:
            return (only, None), (only, None)
        tr, te = carve(store.labels(only), holdout, seed, carve_groups(store, only), store.row_ids(only))
        te = te[~store.augmented(only)[te]]  # augmented copies train, never evaluate
        log.info("store has one split %r: carved %d rows for evaluation", only, len(te))
        return (only, tr), (only, te)
    raise ConfigError(f"--train-split {train!r} is not in {store.path}; its splits are {', '.join(store.splits)}.")
