"""The one carve of rows into kept and carved, and the folds, defined on source-row ids, for every product.

A row's source id is its 0-based position in its data file (``SplitData.row_ids``; a store keeps them as
``splits/<split>/row_ids``). The same rows can sit in different orders: a store sorts them by length, a loaded
table keeps the file's order, a ``--holdout`` split lists its rows in a seeded shuffle. A seeded carve of
positions would then pick different rows in each, so :func:`carve` and :func:`folds` first put the rows in
source-row order (and number classes and groups by their first row in that order, so neither the label encoding
nor the group names matter) and map the carved positions back.

Every carve of every product is :func:`carve`: ``--holdout`` (:mod:`embstore.data.tables`), the evaluation carve of
a one-split store (``heads sweep``) and of a one-split table (``heads finetune``), the validation carve of a sweep,
of ``HeadClassifier.fit`` and of fine-tuning's early stopping (:mod:`heads.protocol.carves`). ``--folds`` is
:func:`folds`. So a sweep and a fine-tune of one file, seed and fraction score the same test rows and choose on the
same validation rows.

The carve, of ``ceil(fraction * n)`` rows:

* **stratified** (no groups): each class gets its share of the carved rows by largest remainders, at least one row
  and never all of its rows, and its carved rows are its first in a seeded permutation of the rows;
* **grouped** (groups given): ``m`` of the ``k`` folds of a seeded
  :class:`~sklearn.model_selection.StratifiedGroupKFold`, ``m / k`` within 0.01 of ``fraction`` with the fewest
  folds (1 of 5 for 0.2, 2 of 5 for 0.4): no group on both sides, classes as balanced as the groups allow, about
  ``fraction * n`` rows; when those folds do not hold every class on both sides, the next folds and then other
  ``m / k`` are tried;
* without labels, the first rows of the seeded permutation (or, grouped, a fold).

With ``every_class`` (the default) a carve that cannot hold every class on both sides raises :class:`CarveError`
(one line with the sizes; the caller adds the option that fixes it). ``every_class=False`` is for the test-side
carves (``--holdout`` and the evaluation carve of a one-split data set, which must draw the same rows): a holdout is
the data's test split, fixed before any product runs, and a rare class missing from it makes a weaker test, not a
wrong one. Those carves are the same carve whenever every class fits; otherwise they stay stratified as far as the
counts allow (the kept side keeps a row of every class it can), and log which classes are missing from a side.

Plain numpy and scikit-learn; nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator

import numpy as np

from embstore.errors import CarveError, ConfigError

__all__ = ["carve", "folds", "source_order", "CARVE_VERSION"]

log = logging.getLogger(__name__)

CARVE_VERSION = "row-ids-2"
"""Names the carve in a holdout's provenance (and so in a store's fingerprint): a store written by an earlier
carve, which drew other rows, is not taken for one written by this one. ``row-ids-1`` was scikit-learn's
``train_test_split``/``GroupShuffleSplit`` on source-row order."""


def source_order(row_ids: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) positions that put rows in source-row order (stable: copies sharing a row id keep their order);
    ``arange(n)`` without row ids."""
    if row_ids is None:
        return np.arange(n)
    row_ids = np.asarray(row_ids)
    if len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {n} rows")
    return np.argsort(row_ids, kind="stable")


def _first_seen(values: np.ndarray) -> np.ndarray:
    """(n,) int64 codes 0..K-1 of ``values``, numbered in the order each value first appears."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _rows(y: np.ndarray | None, groups: np.ndarray | None, row_ids: np.ndarray | None) -> int:
    for a in (y, groups, row_ids):
        if a is not None:
            return len(a)
    raise ValueError("carve needs labels, groups or row ids to know how many rows there are")


def _prepared(
    y: np.ndarray | None, groups: np.ndarray | None, row_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(order, labels, groups): the positions in source-row order, and the labels and groups in that order as
    first-seen codes."""
    n = _rows(y, groups, row_ids)
    for name, a in (("y", y), ("groups", groups)):
        if a is not None and len(a) != n:
            raise ValueError(f"{name} has {len(a)} entries for {n} rows")
    order = source_order(row_ids, n)
    ys = None if y is None else _first_seen(np.asarray(y)[order])
    gs = None if groups is None else _first_seen(np.asarray(groups)[order])
    return order, ys, gs


def carve(
    y: np.ndarray | None,
    fraction: float,
    seed: int,
    *,
    groups: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
    every_class: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) sorted positions: a seeded carve of ``ceil(fraction * n)`` rows (see the module docstring).

    ``y`` (n,): labels (any values; None: unlabelled). ``groups`` (n,): rows that must stay on one side (speakers,
    say); grouped when given, stratified otherwise. ``row_ids`` (n,): the rows' source ids; the carve is drawn on
    the rows in that order, so it does not depend on the order the rows are given in. ``every_class``: refuse
    (:class:`CarveError`) a carve that cannot hold every class on both sides, else carve as close as the counts
    allow. Raises ConfigError for a ``fraction`` outside (0, 1) or fewer than 2 rows.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"A carve takes a fraction in (0, 1) of the rows; got {fraction}.")
    order, ys, gs = _prepared(y, groups, row_ids)
    n = len(order)
    if n < 2:
        raise CarveError(f"of {fraction:g} of {n} row cannot put a row on each side; it needs at least 2 rows")
    if gs is not None:
        kept, carved = _grouped(ys, gs, fraction, seed, every_class)
    else:
        kept, carved = _stratified(ys, n, fraction, seed, every_class)
    return np.sort(order[kept]), np.sort(order[carved])


def folds(
    y: np.ndarray,
    k: int,
    seed: int,
    *,
    groups: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``k`` seeded, stratified folds, as (fit, held) sorted positions, each row held once: scikit-learn's
    ``StratifiedKFold`` (``StratifiedGroupKFold`` with ``groups``: no group in two folds) on the rows in source-row
    order, with classes and groups numbered as :func:`carve` numbers them. The caller checks ``k`` against the
    rarest class and the number of groups (its message names its option)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    order, ys, gs = _prepared(y, groups, row_ids)
    idx = np.arange(len(order))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has fewer than k members"
        if gs is not None:
            splits = list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(idx, ys, gs))
        else:
            splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(idx, ys))
    for fit, held in splits:
        yield np.sort(order[fit]), np.sort(order[held])


def _want(fraction: float, n: int) -> int:
    """Rows to carve: ``ceil(fraction * n)``, leaving at least one on each side."""
    return min(max(1, math.ceil(fraction * n - 1e-9)), n - 1)


def _stratified(
    ys: np.ndarray | None, n: int, fraction: float, seed: int, every_class: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) positions of the ``n`` rows in source order: each class's first ``take[c]`` rows in a seeded
    permutation are carved (the first ``want`` without labels)."""
    want = _want(fraction, n)
    walk = np.random.default_rng(seed).permutation(n)  # the draw: a seeded walk over the rows in source order
    if ys is None:
        return walk[want:], walk[:want]
    counts = np.bincount(ys)
    need = len(counts)
    rare = int(counts.min())
    fits = rare >= 2 and need <= want <= n - need
    if not fits:
        why = ""
        if rare < 2:
            why = f" (a class has only {rare} row, so it cannot be on both sides)"
        elif want > n - need:
            why = f" on both sides (the other side has {n - want} rows)"
        detail = f"({fraction:g} of {n} rows = {want}) cannot hold every one of the {need} classes{why}"
        if every_class:
            raise CarveError(detail)
        log.warning("the carve %s: it is stratified as far as the counts allow", detail)
        low = np.zeros(need, dtype=np.int64)
        high = np.where(counts >= 2, counts - 1, 0)  # the kept side keeps a row of every class it can
        if high.sum() < want:
            high = counts
    else:
        low, high = np.ones(need, dtype=np.int64), counts - 1
    take = _shares(counts, want, low, high)
    carved = np.zeros(n, dtype=bool)
    for c in range(need):
        rows = walk[ys[walk] == c]  # the class's rows in the order of the walk
        carved[rows[: take[c]]] = True
    return np.flatnonzero(~carved), np.flatnonzero(carved)


def _shares(counts: np.ndarray, want: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(classes,) rows carved of each class: ``want`` in all, each class's share proportional to its count, rounded
    by largest remainders within ``[low, high]`` (ties go to the class seen first)."""
    exact = want * counts / counts.sum()
    take = np.clip(np.floor(exact).astype(np.int64), low, high)
    while take.sum() < want:  # hand out what rounding (or a bound) left over
        room = np.where(take < high, exact - take, -np.inf)
        take[int(np.argmax(room))] += 1
    while take.sum() > want:  # a lower bound gave too many: take back from the most over its share
        over = np.where(take > low, take - exact, -np.inf)
        take[int(np.argmax(over))] -= 1
    return take


def _fold_counts(fraction: float, n_groups: int) -> list[tuple[int, int]]:
    """(m, k) pairs, best first: carve ``m`` of ``k`` group folds, ``m / k`` close to ``fraction``. The fewest folds
    within 0.01 of it come first (1 of 5 for 0.2, 2 of 5 for 0.4, 1 of 3 for 0.34), then the rest by distance;
    ``k`` is at most 20 and the number of groups."""
    pairs = []
    for k in range(2, min(20, n_groups) + 1):
        m = min(max(1, round(fraction * k)), k - 1)
        err = abs(m / k - fraction)
        pairs.append(((0, k) if err <= 0.01 + 1e-9 else (1, err), m, k))
    return [(m, k) for _, m, k in sorted(pairs)]


def _grouped(
    ys: np.ndarray | None, gs: np.ndarray, fraction: float, seed: int, every_class: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) positions of the rows in source order: ``m`` consecutive folds of a seeded
    :class:`~sklearn.model_selection.StratifiedGroupKFold` of ``k`` (:func:`_fold_counts`), the first that holds
    every class on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    n, n_groups = len(gs), int(gs.max()) + 1
    if n_groups < 2:
        raise CarveError(f"({fraction:g} of {n} rows) keeps groups apart, and the rows hold only 1 group")
    y = np.zeros(n, dtype=np.int64) if ys is None else ys
    need = int(y.max()) + 1
    idx = np.arange(n)
    # a class seen in one group only can never sit on both sides: then no (m, k) is searched beyond the first
    hopeless = int(np.bincount(np.unique(y * n_groups + gs) // n_groups, minlength=need).min()) < 2
    first: tuple[np.ndarray, np.ndarray] | None = None
    for rank, (m, k) in enumerate(_fold_counts(fraction, n_groups)):
        if hopeless and first is not None:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "the least populated class has fewer than k members"
                held = [v for _, v in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(idx, y, gs)]
        except ValueError:  # every class has fewer than k rows
            continue
        for start in range(k):
            carved = np.sort(np.concatenate([held[(start + j) % k] for j in range(m)]))
            kept = np.setdiff1d(idx, carved)
            first = first or (kept, carved)
            if len(np.unique(y[carved])) == need and len(np.unique(y[kept])) == need:
                if rank:
                    log.info(
                        "the carve: %d of %d rows (%d of %d group folds) to hold every class", len(carved), n, m, k
                    )
                return kept, carved
    detail = (
        f"({fraction:g} of {n} rows) keeps its {n_groups} groups apart, and no carve of them holds every one of "
        f"the {need} classes on both sides"
    )
    if every_class or first is None:
        raise CarveError(detail)
    log.warning("the carve %s: it keeps the groups apart anyway", detail)
    return first
