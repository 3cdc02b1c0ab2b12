"""The one carve of rows into kept and held-out, defined on source-row ids, for every product.

A row's source id is its 0-based position in its data file (``SplitData.row_ids``; a store keeps them as
``splits/<split>/row_ids``). The same rows can sit in different orders: a store sorts them by length, a loaded
table keeps the file's order, a ``--holdout`` split lists its rows as the holdout drew them. A seeded carve of
positions would then pick different rows in each, so every carve here first puts the rows in source-row order
and maps the carved positions back. ``embstore extract --holdout``, the evaluation carve of a one-split store
(``heads sweep``, and so the probe of a pretrained model, which is a sweep of its store) and of a one-split
table (``heads finetune``) all call :func:`carve`, so the same data, seed and fraction give the same rows, and
the same evaluation-set id (:mod:`heads.evalset`). The validation carve and the folds of
:mod:`heads.protocol` are drawn in the same source-row order.

Plain numpy and scikit-learn; nothing here imports torch.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["carve", "stratifiable", "source_order", "CARVE_VERSION"]

log = logging.getLogger(__name__)

CARVE_VERSION = "row-ids-1"
"""Names the carve in a holdout's provenance (and so in a store's fingerprint): a store written by an earlier
carve, which drew other rows, is not taken for one written by this one."""


def source_order(row_ids: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) positions that put rows in source-row order (stable: copies sharing a row id keep their order);
    ``arange(n)`` without row ids."""
    if row_ids is None:
        return np.arange(n)
    row_ids = np.asarray(row_ids)
    if len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {n} rows")
    return np.argsort(row_ids, kind="stable")


def stratifiable(y: np.ndarray | None, fraction: float) -> bool:
    """Whether :func:`carve` stratifies ``y`` (n,) int labels: every class has 2 rows and both sides of the carve
    have at least one row per class."""
    if y is None or not len(y):
        return False
    counts = np.bincount(np.asarray(y))
    present = int((counts > 0).sum())
    want = int(np.ceil(fraction * len(y)))
    return bool(counts[counts > 0].min() >= 2 and want >= present and len(y) - want >= present)


def carve(
    y: np.ndarray | None,
    fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
    *,
    drawn_order: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) sorted positions: a seeded carve of ``ceil(fraction * n)`` rows.

    Group-disjoint when ``groups`` (n,) are given (and hold 2 or more groups), else stratified by ``y`` (n,) int
    labels (unstratified without labels, when a class has a single row, or when either side is smaller than the
    number of classes). ``row_ids`` (n,): the rows' source ids; the carve is drawn on the rows in that order, so
    it does not depend on the order the rows are given in. ``drawn_order``: each side in the order the carve drew
    it (a seeded shuffle, for ``--holdout``: ``--limit N`` then keeps a random N) instead of sorted; the same rows.
    """
    arrange = (lambda rows: rows) if drawn_order else np.sort
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    n = len(y) if y is not None else len(groups) if groups is not None else len(row_ids) if row_ids is not None else 0
    order = source_order(row_ids, n)
    idx = np.arange(n)
    if groups is not None:
        g = np.asarray(groups)[order]
        if len(np.unique(g)) >= 2:
            tr, va = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(idx, groups=g))
            return arrange(order[tr]), arrange(order[va])
        log.warning("only one group: carving rows without keeping groups apart")
    strat = None
    if y is not None:
        ys = np.asarray(y)[order]
        if stratifiable(ys, fraction):
            strat = ys
        else:
            log.warning(
                "the carve is not stratified: a class has fewer than 2 rows or a side is smaller than the "
                "number of classes"
            )
    try:
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    except ValueError:  # too few rows on a side for one per class: carve without stratifying
        if strat is None:
            raise
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed)
    return arrange(order[tr]), arrange(order[va])
