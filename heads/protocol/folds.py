"""Training rounds: one round on the evaluation split, or ``--folds K`` seeded, stratified (group-disjoint) folds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from embstore.data.carve import source_order
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
