"""``heads sweep --control STORE``: the store a sweep's configurations are also trained on, as a baseline.

The usual control is a random-weights encoder of the same architecture and tokenizer (``embstore extract
--random-weights SEED``): what a configuration scores there is what the architecture and the probe reach without
pretraining, so ``gain_f1_macro`` is what pretraining adds. The control is trained with the very rows, carves and
selection rule of the sweep, so it must hold the same rows in the same order, with the same labels, from the same
data file, and every layer and pooling the sweep trains; :func:`check_control` refuses anything else in one line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embstore.errors import ConfigError
from embstore.layers import format_layers
from embstore.store.reader import Store
from heads.evalset import source_sha256
from heads.probe.specs import Combo

__all__ = ["check_control"]

_FIX = "extract the control from the same data with the same options and --random-weights SEED"


def _refuse(control: Store, what: str) -> None:
    raise ConfigError(f"--control {control.path}: {what}; {_FIX} (embstore extract ... --random-weights 0).")


def check_control(store: Store, control: Store, splits: Sequence[str], combos: Sequence[Combo]) -> None:
    """Raise ConfigError naming the first difference that makes ``control`` unusable as ``store``'s control."""
    if control.fingerprint == store.fingerprint:
        _refuse(control, f"it is the store itself (fingerprint {store.fingerprint[:12]})")
    if control.hidden != store.hidden:
        _refuse(
            control,
            f"its model has {control.hidden}-wide layers, the store's {store.hidden}-wide (another model shape)",
        )
    layers = sorted({x for c in combos for x in c.layers})
    missing = [x for x in layers if x not in control.layers and x not in control.token_layers]
    if missing:
        _refuse(
            control,
            f"it lacks layer(s) {format_layers(missing)} of the sweep (it stores {format_layers(control.layers)})",
        )
    poolings = sorted({c.pooling for c in combos if c.pooling != "tokens"})
    absent = [p for p in poolings if p not in control.poolings]
    if absent:
        _refuse(control, f"it lacks pooling(s) {', '.join(absent)} (it stores {', '.join(control.poolings)})")
    if list(control.towers) != list(store.towers):
        _refuse(control, f"its towers are {', '.join(control.towers)}, the store's {', '.join(store.towers)}")
    if control.label_names != store.label_names:
        _refuse(control, f"its label names {control.label_names} differ from the store's {store.label_names}")
    for split in dict.fromkeys(splits):
        if split not in control.splits:
            _refuse(control, f"it has no split {split!r} (its splits: {', '.join(control.splits)})")
        if control.n_rows(split) != store.n_rows(split):
            _refuse(control, f"its split {split!r} has {control.n_rows(split)} rows, the store's {store.n_rows(split)}")
        if not np.array_equal(control.row_ids(split), store.row_ids(split)):
            _refuse(
                control, f"its split {split!r} holds other rows, or the same rows in another order (row ids differ)"
            )
        if not np.array_equal(control.labels(split), store.labels(split)):
            _refuse(control, f"its split {split!r} has other labels")
        mine, theirs = store.groups(split), control.groups(split)
        if (mine is None) != (theirs is None) or (
            mine is not None and theirs is not None and not np.array_equal(mine, theirs)
        ):
            _refuse(control, f"its split {split!r} has other groups")
        a = source_sha256(store.provenance.sources, split)
        b = source_sha256(control.provenance.sources, split)
        if a != b:
            _refuse(
                control,
                f"its split {split!r} comes from another data file (sha256 {str(b)[:12]} vs {str(a)[:12]}), "
                "so its evaluation set differs",
            )
