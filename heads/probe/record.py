"""What a sweep records of each trained head: its result row, and the columns that say how sure the table is.

:func:`result_row` is one trained head's row; :func:`sureness` computes, from every run's predictions of its
evaluation rows (and the control store's), the intervals, paired tests against the best, control scores and
codelengths that :func:`with_fields` adds to the rows; :func:`uncertainty_meta` is what ``run.json`` says about them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from embstore.store.reader import Store
from heads.probe.config import HeadConfig
from heads.probe.mdl import Codelength
from heads.probe.rounds import Labels, Outcome
from heads.probe.specs import Combo
from heads.report.assess import ALPHA, Assessment, RunPredictions, assess
from heads.report.table import ResultRow

__all__ = ["result_row", "with_fields", "uncertainty_meta", "sureness"]


def result_row(o: Outcome, store: Store, cfg: HeadConfig, eval_id: str) -> ResultRow:
    est, combo, rnd = o.est, o.combo, o.round
    history = list(getattr(est, "history_", []))
    seconds = float(getattr(est, "train_seconds_", 0.0))
    hp = {k: v for k, v in cfg.replace(head=combo.head).to_dict().items() if k not in ("seed", "device")}
    hp.update(o.hyper)
    lbfgs = "C" in o.hyper
    mix = getattr(est, "mix_weights_", None)
    return ResultRow(
        layers=combo.layers_label,
        combine=combo.combine,
        pooling=combo.pooling,
        head=combo.head,
        seed=rnd.seed,
        accuracy=o.metrics["accuracy"],
        f1_macro=o.metrics["f1_macro"],
        train_seconds=seconds,
        hyperparameters=hp,
        per_class=o.metrics["per_class"],
        confusion=o.metrics["confusion"],
        store_id=store.fingerprint,
        fold=rnd.fold,
        best_epoch=None if lbfgs else getattr(est, "best_epoch_", None),
        trainable_params=sum(int(p.numel()) for p in est.module_.parameters()),
        seconds_per_epoch=None if lbfgs else seconds / max(1, len(history)),
        history=history,
        mix_weights=None if mix is None else [float(w) for w in mix],
        val_accuracy=o.val.get("accuracy"),
        val_f1_macro=o.val.get("f1_macro"),
        extra={**o.extra, "eval_set": eval_id},
    )


def with_fields(row: ResultRow, found: dict[str, Any]) -> ResultRow:
    """``row`` with the sureness, control and MDL fields (``extra`` entries merged)."""
    found = dict(found)
    extra = {**row.extra, **found.pop("extra", {})}
    return dataclasses.replace(row, extra=extra, **found)


def uncertainty_meta(a: Assessment) -> dict[str, Any]:
    return {
        "resamples": a.resamples,
        "level": 0.95,
        "alpha": ALPHA,
        "paired_seed": a.paired_seed,
        "compared": a.compared,
        "tied": [list(k) for k in a.tied],
        "pooled_rows": a.pooled_rows,
        "interval": "percentile bootstrap over the evaluation rows (one seeded set of resamples shared by every "
        "configuration, so differences are paired)",
        "test": "exact McNemar on correctness against the best (two-sided binomial on the discordant rows), "
        "Holm-corrected over the configurations compared",
    }


def sureness(
    outcomes: Sequence[Outcome],
    controls: Sequence[Outcome],
    codes: dict[tuple[Combo, int], Codelength],
    best: tuple[str, str, str, str],
    labels: Labels,
    ci: bool,
    seed: int,
) -> Assessment:
    """The sureness fields of every outcome's row: intervals and paired tests (``ci``), control scores and gain,
    and codelengths."""
    by_run = {(o.combo.key, o.round.seed, o.round.fold): o for o in controls}
    runs = []
    for o in outcomes:
        c = by_run.get((o.combo.key, o.round.seed, o.round.fold))
        y = labels[o.round.eval_split][o.round.eval_rows]
        runs.append(
            RunPredictions(
                o.combo.key, o.round.seed, o.round.fold, o.round.eval_rows, y, o.pred, None if c is None else c.pred
            )
        )
    found = assess(runs, best, len(labels.names), seed=seed) if ci else Assessment(fields=[{} for _ in runs])
    for o, f, r in zip(outcomes, found.fields, runs):
        if r.control is not None and "control_f1_macro" not in f:  # --no-ci: the scores without intervals
            c = by_run[(o.combo.key, o.round.seed, o.round.fold)]
            f.update(
                control_accuracy=c.metrics["accuracy"],
                control_f1_macro=c.metrics["f1_macro"],
                gain_f1_macro=o.metrics["f1_macro"] - c.metrics["f1_macro"],
            )
        code = codes.get((o.combo, o.round.seed))
        if code is not None:
            f.update(mdl_bits=code.bits, compression=code.compression)
    return found
