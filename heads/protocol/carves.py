"""The carve's use: validation rows for choosing (epoch, L2 strength, configuration), for a sweep and for one
estimator or fine-tuning round. The carve itself is :func:`embstore.data.carve.carve`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from embstore.data.carve import carve, source_order
from embstore.errors import ConfigError

__all__ = ["Split", "make_split", "validation_carve"]

log = logging.getLogger(__name__)


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
