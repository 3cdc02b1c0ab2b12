"""What a sweep will train on which rows, decided (and checked) before anything is trained or written.

:func:`plan_rounds` turns the evaluation protocol (:mod:`heads.protocol`) into one :class:`Plan` per seed
(x fold): the rows to fit on, the validation rows every choice is made on (the seeded, stratified, group-aware
carve of the training rows, or ``--val-split``) and the evaluation rows scored once for the report.
:func:`drop_duplicates` removes configurations that are the same model as another.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embstore.errors import ConfigError
from embstore.store import Store
from heads.probe.config import POOLED_HEADS
from heads.probe.rounds import Plan
from heads.probe.specs import Combo
from heads.protocol import carve_groups, fold_rounds, validation_carve

__all__ = ["plan_rounds", "drop_duplicates", "check_val_split"]


def check_val_split(store: Store, val_split: str, train_split: str, eval_split: str) -> None:
    """``--val-split`` must name a store split that is neither the training nor the evaluation split."""
    if val_split not in store.splits:
        raise ConfigError(f"--val-split {val_split!r} is not in {store.path}; its splits are {', '.join(store.splits)}. "
                          "Pass one of them, or leave --val-split out to carve validation rows from the training split.")
    if val_split == eval_split:
        raise ConfigError(f"--val-split {val_split!r} is also the evaluation split: every choice would be made on the "
                          "rows the report scores. Pass another --val-split or --eval-split.")
    if val_split == train_split:
        raise ConfigError(f"--val-split {val_split!r} is the training split; pass another split, or leave --val-split "
                          "out to carve validation rows from it.")


def plan_rounds(store: Store, *, seeds: int, folds: int | None, validation_fraction: float, val_split: str | None,
                train: tuple[str, np.ndarray | None], evaluate: tuple[str, np.ndarray | None]) -> list[Plan]:
    """One Plan per seed (x fold), in (seed, fold) order; raises ConfigError for a carve that cannot work."""
    tr_split, tr_rows = train
    ev_split, ev_rows = evaluate
    y_all = store.labels(tr_split)
    augmented = store.augmented(tr_split)
    groups_all = carve_groups(store, tr_split)
    y_train = y_all if tr_rows is None else y_all[tr_rows]
    g_train = None if groups_all is None else groups_all if tr_rows is None else groups_all[tr_rows]
    y_eval_all = store.labels(ev_split)
    y_eval = y_eval_all if ev_rows is None else y_eval_all[ev_rows]
    val_rows_split = None
    if val_split is not None:
        val_rows_split = np.flatnonzero(~store.augmented(val_split))
    plans = []
    for seed in range(seeds):
        for rnd in fold_rounds(folds, y_train, tr_rows, tr_split, ev_split, ev_rows, y_eval, seed, g_train, augmented):
            base = np.arange(len(y_all)) if rnd.fit_rows is None else rnd.fit_rows
            if val_rows_split is not None and val_split is not None:
                fit, val, vsplit = base, val_rows_split, val_split
            else:
                where = f"the training split {tr_split!r}" + ("" if rnd.fold is None else f" (fold {rnd.fold})")
                g = None if groups_all is None else groups_all[base]
                fit_pos, val_pos = validation_carve(y_all[base], validation_fraction, seed, g, what=where)
                fit, val, vsplit = base[fit_pos], base[val_pos], tr_split
                val = val[~augmented[val]]  # choices are made on original rows only
            eval_rows = np.arange(len(y_eval_all)) if rnd.eval_rows is None else np.sort(rnd.eval_rows)
            plans.append(Plan(seed=seed, fold=rnd.fold, train_split=tr_split, fit_rows=np.sort(fit), val_split=vsplit,
                              val_rows=np.sort(val), eval_split=rnd.eval_split, eval_rows=eval_rows))
    return plans


def drop_duplicates(combos: Sequence[Combo], standardize: bool) -> tuple[list[Combo], list[str]]:
    """Configurations without the ones that are another's model, and a note for each kind dropped.

    For heads that standardise their inputs, the sum of k layers is k times their mean, and standardising removes
    the factor: ``sum`` and ``mean`` give the same model. The mean is trained; the sum is not.
    """
    seen = {c.key for c in combos}
    kept, dropped = [], []
    for c in dict.fromkeys(combos):  # also drops exact repeats (e.g. --head linear,mix both asking for mix)
        if standardize and c.head in POOLED_HEADS and c.combine == "sum" and (c.layers_label, "mean", c.pooling, c.head) in seen:
            dropped.append(c)
            continue
        kept.append(c)
    notes = []
    if dropped:
        which = ", ".join(sorted({f"{c.layers_label} {c.pooling} {c.head}" for c in dropped}))
        notes.append(f"combine sum was not trained where mean is ({which}): after standardisation the sum of the "
                     "layers and their mean are the same inputs, so the mean row stands for both")
    return kept, notes
