"""Split roles: which split of a store trains and which is scored (a one-split store is carved)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from embstore.errors import ConfigError
from heads.protocol.carves import carve_with_copies

if TYPE_CHECKING:
    from embstore.store.reader import Store

__all__ = ["split_roles"]

log = logging.getLogger(__name__)


def split_roles(
    store: Store, train: str, evaluate: str | None, holdout: float, seed: int, folds: int | None = None
) -> tuple[tuple[str, np.ndarray | None], tuple[str, np.ndarray | None]]:
    """((train split, rows or None), (eval split, rows or None)); a one-split store is carved (by
    :func:`embstore.data.carve.carve`, on source-row ids and group-disjoint with stored groups, as ``heads finetune``
    carves a one-split table and ``--holdout`` a file), unless ``folds`` cross-validates all its rows.

    The evaluation carve, like ``--holdout``, does not refuse a share too small to hold every class
    (``every_class=False``): it must draw the rows ``--holdout`` draws, and a class missing from the scored rows
    makes a weaker test, not a wrong one. Augmented copies train with their source row, and never evaluate."""
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
        tr, te = carve_with_copies(
            store.labels(only),
            holdout,
            seed,
            groups=store.groups(only),
            row_ids=store.row_ids(only),
            augmented=store.augmented(only),
            every_class=False,
        )
        log.info("store has one split %r: carved %d rows for evaluation", only, len(te))
        return (only, tr), (only, te)
    raise ConfigError(f"--train-split {train!r} is not in {store.path}; its splits are {', '.join(store.splits)}.")
