"""Training rounds: one round on the evaluation split, or ``--folds K`` seeded, stratified (group-disjoint) folds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from embstore.data.carve import folds as carve_folds
from embstore.errors import ConfigError

__all__ = ["Round", "fold_rounds"]


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
    held out once; group-disjoint when ``groups``, aligned with the training rows, are given): the folds of
    :func:`embstore.data.carve.folds`, drawn in source-row order (``row_ids``, aligned with the training rows), so
    a store and its table fold alike. ``augmented`` (the training split's rows) marks augmented copies (their row id
    is their source's): the original rows are folded, and a copy joins the fitting side of its source's folds and
    is never held out, so a store with copies folds as its table does."""
    if not folds:
        yield Round(None, tr_rows, ev_split, ev_rows, y_eval)
        return
    base = np.arange(len(y_train)) if tr_rows is None else np.asarray(tr_rows)
    ids = np.arange(len(y_train)) if row_ids is None else np.asarray(row_ids)
    copy = augmented[base]
    orig = np.flatnonzero(~copy)
    counts = np.bincount(y_train[orig])
    if counts[counts > 0].min() < folds:
        raise ConfigError(
            f"--folds {folds} needs at least {folds} training rows of every class; the rarest class has "
            f"{counts[counts > 0].min()}. Use fewer folds or more data."
        )
    if groups is not None:
        n_groups = len(np.unique(groups[orig]))
        if n_groups < folds:
            raise ConfigError(
                f"--folds {folds} keeps groups apart but the training rows hold only {n_groups} groups; use --folds "
                f"{n_groups} or fewer."
            )
    splits = carve_folds(y_train[orig], folds, seed, groups=None if groups is None else groups[orig], row_ids=ids[orig])
    for k, (fit, held) in enumerate(splits):
        fit, held = orig[fit], orig[held]
        copies = np.flatnonzero(copy & np.isin(ids, ids[fit]))
        held = held[np.argsort(base[held], kind="stable")]  # rows in split order, labels aligned
        yield Round(k, np.sort(base[np.concatenate([fit, copies])]), tr_split, base[held], y_train[held])
