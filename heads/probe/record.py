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
from heads.report.selectivity import SelectivityRun, selectivity_fields
from heads.report.table import CONFIG_INTERVAL_KEY, ResultRow

__all__ = ["result_row", "with_fields", "merge_fields", "uncertainty_meta", "sureness", "control_task_fields"]


def result_row(o: Outcome, store: Store, cfg: HeadConfig, eval_id: str) -> ResultRow:
    est, combo, rnd = o.est, o.combo, o.round
    history = list(getattr(est, "history_", []))
    seconds = float(getattr(est, "train_seconds_", 0.0))
    hp = {k: v for k, v in combo.config(cfg).to_dict().items() if k not in ("seed", "device")}
    hp.update(o.hyper)
    lbfgs = "C" in o.hyper
    mix = getattr(est, "mix_weights_", None)
    return ResultRow(
        layers=combo.layers_label,
        combine=combo.combine,
        pooling=combo.pooling,
        head=combo.head_label,
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


def merge_fields(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` and ``b`` together, their ``extra`` entries (and the configuration intervals in it) merged."""
    out = {**a, **{k: v for k, v in b.items() if k != "extra"}}
    extra = {**a.get("extra", {}), **b.get("extra", {})}
    shared = {**a.get("extra", {}).get(CONFIG_INTERVAL_KEY, {}), **b.get("extra", {}).get(CONFIG_INTERVAL_KEY, {})}
    if shared:
        extra[CONFIG_INTERVAL_KEY] = shared
    if extra:
        out["extra"] = extra
    return out


def control_task_fields(
    outcomes: Sequence[Outcome],
    task_controls: Sequence[Outcome],
    labels: Labels,
    control_labels: Labels,
    ci: bool,
    seed: int,
) -> list[dict[str, Any]]:
    """The control-task fields of every outcome's row (``--control-task``): control accuracy and selectivity, with
    paired-bootstrap intervals (``ci``); an outcome without a control-task run gets none."""
    by_run = {(o.combo.key, o.round.seed, o.round.fold): o for o in task_controls}
    runs, where = [], []
    for i, o in enumerate(outcomes):
        c = by_run.get((o.combo.key, o.round.seed, o.round.fold))
        if c is None:
            continue
        rows = o.round.eval_rows
        runs.append(
            SelectivityRun(
                o.combo.key,
                o.round.seed,
                o.round.fold,
                rows,
                o.pred == labels[o.round.eval_split][rows],
                c.pred == control_labels[o.round.eval_split][rows],
                o.val.get("accuracy"),
                c.val.get("accuracy"),
            )
        )
        where.append(i)
    found = selectivity_fields(runs, seed=seed, intervals=ci)
    fields: list[dict[str, Any]] = [{} for _ in outcomes]
    for i, f in zip(where, found):
        fields[i] = f
    return fields


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
