"""The evaluation protocol every product shares: split roles, carves, folds, early stopping.

Which rows train, which rows choose (validation) and which rows are scored for the report (evaluation) is
decided here once, for ``heads sweep``/``heads train`` (probe) and ``heads finetune`` (whose data is not a store: it
calls
:func:`carve`, :func:`make_split` and :func:`fold_rounds` on the loaded rows):

* :func:`split_roles` names the training and evaluation splits of a store (a one-split store is carved);
* :func:`carve` is the seeded, stratified (or group-disjoint) carve of a share of rows;
* :func:`validation_carve` is the same carve for choosing (epoch, L2 strength, configuration); it refuses a
  carve that cannot hold every class;
* :func:`fold_rounds` gives the ``--folds K`` rounds (stratified, group-disjoint with groups);
* :class:`BestTracker` is early stopping on validation macro-F1; :func:`make_split` carves validation rows
  for a single estimator that was given none.

Nothing here imports torch: the protocol is plain numpy and scikit-learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embstore.data.carve import carve, source_order
from embstore.errors import ConfigError

if TYPE_CHECKING:
    from embstore.store.reader import Store

__all__ = [
    "Split",
    "make_split",
    "BestTracker",
    "scores",
    "carve",
    "validation_carve",
    "carve_groups",
    "split_roles",
    "Round",
    "fold_rounds",
]

log = logging.getLogger(__name__)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(accuracy, macro-F1) over the classes present in either array (scikit-learn's ``f1_score(average='macro')``)."""
    from heads.report.metrics import confusion, macro_f1_present

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if not len(y_true):
        return 0.0, 0.0
    n = int(max(y_true.max(), y_pred.max())) + 1
    return float(np.mean(y_true == y_pred)), macro_f1_present(confusion(y_true, y_pred, n))


class BestTracker:
    """Early stopping on validation macro-F1: keeps the best (earliest on ties) epoch and its state."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best_f1, self.best_epoch, self.bad = patience, -math.inf, -1, 0
        self.state: Any = None
        self.stopped = False

    def update(self, epoch: int, f1: float | None, snapshot: Callable[..., Any]) -> bool:
        """Record one epoch; ``snapshot()`` is called only for a new best. Returns True when training should stop."""
        if self.patience == 0 or f1 is None:  # no early stopping: the last epoch wins
            self.best_epoch = epoch
            return False
        if f1 > self.best_f1:
            self.best_f1, self.best_epoch, self.bad, self.state = f1, epoch, 0, snapshot()
        else:
            self.bad += 1
        self.stopped = self.bad >= self.patience
        return self.stopped


@dataclass
class Split:
    """Training rows and (optional) validation rows, as indices into their inputs."""

    train_idx: np.ndarray
    y: np.ndarray
    """labels of the training inputs, all rows (index with train_idx)."""
    val_idx: np.ndarray | None
    y_val: np.ndarray | None
    """labels of the validation inputs, all rows."""
    val_is_train: bool
    """True when validation rows were carved from the training inputs."""


def make_split(
    y: np.ndarray,
    y_val: np.ndarray | None,
    *,
    validation_fraction: float,
    seed: int,
    patience: int,
    groups: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
) -> Split:
    """Training and validation rows of one estimator: ``y_val``'s rows when validation data was given, none
    without early stopping (``patience`` 0), else a :func:`carve` of ``validation_fraction`` of the rows (seeded;
    group-disjoint with ``groups``, else stratified when every class has 2 rows; drawn in the order of the rows'
    source ids ``row_ids`` when given).

    For one estimator (or one fine-tuning round) fitted without validation data; sweeps carve with
    :func:`validation_carve`, which also refuses a carve that cannot hold every class.
    """
    n = len(y)
    if n == 0:
        raise ConfigError("fit got 0 training rows; pass at least one row per class.")
    if y_val is not None:
        return Split(np.arange(n), y, np.arange(len(y_val)), y_val, False)
    if patience == 0:
        return Split(np.arange(n), y, None, None, False)
    try:
        tr, va = carve(y, validation_fraction, seed, groups, row_ids)
    except ValueError as e:
        raise ConfigError(f"Cannot carve a validation set from {n} rows ({e}); pass X_val/y_val or patience=0.") from e
    return Split(tr, y, va, y, True)


def validation_carve(
    y: np.ndarray,
    fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    what: str = "the training rows",
    row_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) sorted positions: a seeded, stratified carve of ``ceil(fraction * n)`` rows (each class in
    proportion, at least one row of each), group-aware (no group on both sides, classes balanced as far as the
    groups allow) when ``groups`` are given.

    Every choice of a sweep is made on the carved rows, so they must hold every class that ``y`` holds (and
    the fitting side too); otherwise a ConfigError names the sizes and the fix. ``row_ids`` (n,): the rows'
    source ids; the carve is drawn on the rows in that order (:mod:`embstore.data.carve`).
    """
    if row_ids is not None:
        order = source_order(row_ids, len(y))
        fit, val = validation_carve(y[order], fraction, seed, None if groups is None else groups[order], what)
        return np.sort(order[fit]), np.sort(order[val])
    present = np.flatnonzero(np.bincount(y))
    n, need = len(y), len(present)
    want = int(np.ceil(fraction * n))
    fix = "raise --validation-fraction, or pass --val-split NAME"
    counts = np.bincount(y)[present]
    if want < need or counts.min() < 2:
        rare = "" if counts.min() >= 2 else f" (a class has only {counts.min()} row, so it cannot be on both sides)"
        raise ConfigError(
            f"The validation carve of {what} ({fraction:g} of {n} rows = {want}) cannot hold every one "
            f"of the {need} classes{rare}; {fix}."
        )
    idx = np.arange(n)
    n_groups = 0 if groups is None else len(np.unique(groups))

    def covers(fit: np.ndarray, val: np.ndarray) -> bool:
        return len(np.unique(y[val])) == need and len(np.unique(y[fit])) == need

    if groups is not None and n_groups >= 2:
        from sklearn.model_selection import StratifiedGroupKFold

        # One fold of a stratified group k-fold (k = 1/fraction): groups whole, classes as balanced as the groups
        # allow. When no fold holds every class (few groups, each of few classes), fewer and larger folds are tried.
        k_max = min(max(2, int(round(1.0 / fraction))), n_groups)
        for k in range(k_max, 1, -1):
            for fit, val in StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y, groups):
                if covers(fit, val):
                    if k < round(1.0 / fraction):
                        log.info(
                            "validation carve of %s: %d of %d rows (1 of %d group folds) to hold every class",
                            what,
                            len(val),
                            n,
                            k,
                        )
                    return np.sort(fit), np.sort(val)
        raise ConfigError(
            f"The validation carve of {what} keeps its {n_groups} groups apart, and no carve of them holds "
            f"every one of the {need} classes on both sides; {fix}."
        )
    if groups is not None:
        log.warning("only one group: carving validation rows without keeping groups apart")
    val = _stratified_pick(y, present, want, seed)
    fit = np.setdiff1d(idx, val)
    return fit, val


def _stratified_pick(y: np.ndarray, present: np.ndarray, want: int, seed: int) -> np.ndarray:
    """``want`` sorted rows, each class's share proportional to its count (largest remainders; at least one per
    class, never all of a class), drawn by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(y)[present]
    exact = want * counts / counts.sum()
    take = np.clip(np.floor(exact).astype(np.int64), 1, counts - 1)
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):  # hand out what rounding left over
        if take.sum() >= want:
            break
        if take[c] < counts[c] - 1:
            take[c] += 1
    picked = [rng.permutation(np.flatnonzero(y == cls))[:k] for cls, k in zip(present, take)]
    return np.sort(np.concatenate(picked))


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


@dataclass(frozen=True)
class Round:
    """One training round: fit on ``fit_rows`` of the training split, score ``eval_rows`` of ``eval_split``."""

    fold: int | None
    fit_rows: np.ndarray | None
    """Rows of the training split (None: all of them)."""
    eval_split: str
    eval_rows: np.ndarray | None
    """Rows of the evaluation split (None: all of them)."""
    y_eval: np.ndarray


def fold_rounds(
    folds: int | None,
    y_train: np.ndarray,
    tr_rows: np.ndarray | None,
    tr_split: str,
    ev_split: str,
    ev_rows: np.ndarray | None,
    y_eval: np.ndarray,
    seed: int,
    groups: np.ndarray | None,
    augmented: np.ndarray,
    row_ids: np.ndarray | None = None,
) -> Iterator[Round]:
    """One round on the evaluation split, or ``folds`` seeded, stratified folds of the training rows (each row
    held out once; group-disjoint when ``groups``, aligned with the training rows, are given). Augmented rows
    only ever join the fitting side. ``row_ids``, aligned with the training rows: their source ids; the folds
    are drawn on the rows in that order (:mod:`embstore.data.carve`), so a store and its table fold alike."""
    if not folds:
        yield Round(None, tr_rows, ev_split, ev_rows, y_eval)
        return
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    base = np.arange(len(y_train)) if tr_rows is None else tr_rows
    order = source_order(row_ids, len(y_train))
    base, y_train = base[order], y_train[order]
    groups = None if groups is None else groups[order]
    counts = np.bincount(y_train)
    if counts[counts > 0].min() < folds:
        raise ConfigError(
            f"--folds {folds} needs at least {folds} training rows of every class; the rarest class has "
            f"{counts[counts > 0].min()}. Use fewer folds or more data."
        )
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < folds:
            raise ConfigError(
                f"--folds {folds} keeps groups apart but the training rows hold only {n_groups} groups; use --folds "
                f"{n_groups} or fewer."
            )
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(base, y_train, groups)
    else:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(base, y_train)
    for k, (fit, held) in enumerate(splits):
        held = held[~augmented[base[held]]]
        held = held[np.argsort(base[held], kind="stable")]  # rows in split order, labels aligned
        yield Round(k, np.sort(base[fit]), tr_split, base[held], y_train[held])
