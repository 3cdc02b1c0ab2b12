"""The carve's use: validation rows for choosing (epoch, L2 strength, configuration), for a sweep, one estimator and
each fine-tuning round, and the carve of a store's rows that may hold augmented copies.

The carve itself is :func:`embstore.data.carve.carve`; everything here calls it, and only turns its refusal into a
message naming the option the user can change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embstore.data.carve import carve
from embstore.errors import CarveError, ConfigError

__all__ = ["Split", "make_split", "validation_carve", "carve_with_copies"]

SWEEP_FIX = "raise --validation-fraction, or pass --val-split NAME"
"""What a sweep's user changes when its validation carve cannot hold every class."""


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


def carve_with_copies(
    y: np.ndarray,
    fraction: float,
    seed: int,
    *,
    groups: np.ndarray | None,
    row_ids: np.ndarray,
    augmented: np.ndarray | None,
    every_class: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved) sorted positions: :func:`~embstore.data.carve.carve` of the original rows, the augmented
    copies (``augmented`` (n,) True; a copy has its source's row id) joining their source's kept side. Copies of a
    carved row are on neither side: they are not data to choose or score on, and fitting on them would leak the
    row. So a store with copies is carved exactly as its table (which has none) is."""
    if augmented is None or not augmented.any():
        return carve(y, fraction, seed, groups=groups, row_ids=row_ids, every_class=every_class)
    orig = np.flatnonzero(~augmented)
    kept, carved = carve(
        y[orig],
        fraction,
        seed,
        groups=None if groups is None else groups[orig],
        row_ids=row_ids[orig],
        every_class=every_class,
    )
    copies = np.flatnonzero(augmented & np.isin(row_ids, row_ids[orig[kept]]))
    return np.sort(np.concatenate([orig[kept], copies])), orig[carved]


def validation_carve(
    y: np.ndarray,
    fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    *,
    what: str = "the training rows",
    row_ids: np.ndarray | None = None,
    augmented: np.ndarray | None = None,
    fix: str = SWEEP_FIX,
    every_class: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) sorted positions: the carve (:func:`embstore.data.carve.carve`) of ``ceil(fraction * n)``
    rows, seeded, stratified, or group-disjoint when ``groups`` are given, drawn in the order of ``row_ids``.

    Every choice is made on the carved rows, so they must hold every class that ``y`` holds (and the fitting side
    too); otherwise a ConfigError names ``what`` was carved, the sizes and ``fix``. ``augmented`` (n,) marks
    augmented copies (their row id is their source's): the original rows are carved and the copies follow their
    source (:func:`carve_with_copies`; the validation side has none). ``every_class=False`` (word and edge tasks,
    whose rare labels may occur once) carves as close to every class as the counts allow instead of refusing.
    """
    try:
        if row_ids is None:
            return carve(y, fraction, seed, groups=groups, every_class=every_class)
        return carve_with_copies(
            y, fraction, seed, groups=groups, row_ids=row_ids, augmented=augmented, every_class=every_class
        )
    except CarveError as e:
        raise ConfigError(f"The validation carve of {what} {e.detail}; {fix}.") from None


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
    without early stopping (``patience`` 0), else :func:`validation_carve` of ``validation_fraction`` of the rows
    (the sweep's carve: the same rows for the same labels, seed, groups and row ids)."""
    n = len(y)
    if n == 0:
        raise ConfigError("fit got 0 training rows; pass at least one row per class.")
    if y_val is not None:
        return Split(np.arange(n), y, np.arange(len(y_val)), y_val, False)
    if patience == 0:
        return Split(np.arange(n), y, None, None, False)
    tr, va = validation_carve(
        y,
        validation_fraction,
        seed,
        groups,
        what="the training rows",
        row_ids=row_ids,
        fix="raise validation_fraction, pass X_val/y_val, or patience=0",
    )
    return Split(tr, y, va, y, True)
