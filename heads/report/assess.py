"""How sure a sweep's answer is, from its per-row predictions: the columns :mod:`heads.report.uncertainty` fills.

:func:`assess` takes every run's predictions of its evaluation rows (and, with a control store, the control's
predictions of the same rows) and returns, per run, the fields of :class:`heads.report.table.ResultRow` that say how
sure the table is:

* per run: the 95% bootstrap interval of its accuracy and macro-F1 over its own evaluation rows (runs scored on
  the same rows share their resamples, so every difference is paired), and with a control its control scores and
  the paired interval of the gain in macro-F1;
* per configuration (recorded with every run of it, under ``extra["config_interval"]``): the same intervals over
  all its evaluation rows (the held-out rows of every fold pooled), of the metric averaged over seeds;
* against the best configuration (chosen on validation): the exact McNemar p on correctness, Holm-corrected over
  every other configuration, the paired-bootstrap interval of the macro-F1 difference, whether the configuration
  is tied with the best (Holm p >= 0.05), and else whether it is worse or better on the evaluation rows (better:
  the choice made on validation did not carry over). These use the lowest seed's runs (folds pooled).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heads.report.metrics import confusion, metrics_from_confusion
from heads.report.table import CONFIG_INTERVAL_KEY, ConfigKey
from heads.report.uncertainty import LEVEL, N_RESAMPLES, bootstrap_scores, holm, mcnemar_p, percentile_interval

__all__ = ["RunPredictions", "Assessment", "assess", "ALPHA"]

ALPHA = round(1.0 - LEVEL, 10)
"""Significance level of the paired tests (Holm-corrected p below it: significantly worse than the best)."""


@dataclass(frozen=True)
class RunPredictions:
    """One run's predictions of its evaluation rows."""

    key: ConfigKey
    seed: int
    fold: int | None
    rows: np.ndarray
    """(n,) evaluation row positions in their split, sorted."""
    y: np.ndarray
    """(n,) true labels."""
    pred: np.ndarray
    """(n,) predicted labels."""
    control: np.ndarray | None = None
    """(n,) the control store's run of the same configuration, seed and fold, on the same rows."""


@dataclass
class Assessment:
    """The sureness fields of every run (in input order), and what the summary says about the best."""

    fields: list[dict[str, Any]]
    """Per run: ResultRow field values (and ``extra`` entries under ``"extra"``)."""
    tied: list[ConfigKey] = field(default_factory=list)
    """Configurations not significantly worse than the best (Holm p >= ALPHA), best first by macro-F1 diff."""
    compared: int = 0
    """How many configurations were compared with the best (the Holm family)."""
    paired_seed: int | None = None
    """The seed whose runs the paired tests used."""
    resamples: int = N_RESAMPLES
    pooled_rows: int = 0
    """Evaluation rows of a configuration (all folds' held-out rows together)."""


def _rows_seed(base: int, rows: np.ndarray) -> list[int]:
    """Resample seed of a set of rows: the same rows get the same resamples in every run of a sweep."""
    return [int(base), zlib.crc32(np.ascontiguousarray(rows, dtype=np.int64).tobytes())]


def _metrics(y: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, float]:
    m = metrics_from_confusion(confusion(y, pred, n_classes), [str(i) for i in range(n_classes)])
    return float(m["accuracy"]), float(m["f1_macro"])


def _interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = percentile_interval(values)
    return float(lo), float(hi)


def assess(
    runs: Sequence[RunPredictions], best: ConfigKey, n_classes: int, *, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> Assessment:
    """The sureness fields of every run; ``best`` is the configuration chosen on validation."""
    fields: list[dict[str, Any]] = [{} for _ in runs]
    _per_run(runs, fields, n_classes, seed, n_resamples)
    out = Assessment(fields=fields, resamples=n_resamples)
    _per_config(runs, fields, best, n_classes, seed, n_resamples, out)
    return out


def _per_run(
    runs: Sequence[RunPredictions], fields: list[dict[str, Any]], n_classes: int, seed: int, n_resamples: int
) -> None:
    """Intervals over each run's own rows; runs on the same rows share one set of resamples."""
    groups: dict[bytes, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(np.ascontiguousarray(r.rows, dtype=np.int64).tobytes(), []).append(i)
    for members in groups.values():
        first = runs[members[0]]
        preds = [runs[i].pred for i in members]
        controls = [i for i in members if runs[i].control is not None]
        preds += [runs[i].control for i in controls]  # type: ignore[misc]
        acc, f1 = bootstrap_scores(
            first.y, np.stack(preds), n_classes, n_resamples=n_resamples, seed=_rows_seed(seed, first.rows)
        )
        for j, i in enumerate(members):
            fields[i]["accuracy_lo"], fields[i]["accuracy_hi"] = _interval(acc[j])
            fields[i]["f1_macro_lo"], fields[i]["f1_macro_hi"] = _interval(f1[j])
        for j, i in enumerate(controls):
            r = runs[i]
            assert r.control is not None  # selected above
            c_acc, c_f1 = _metrics(r.y, r.control, n_classes)
            f1_run = _metrics(r.y, r.pred, n_classes)[1]
            lo, hi = _interval(f1[members.index(i)] - f1[len(members) + j])
            fields[i].update(
                control_accuracy=c_acc,
                control_f1_macro=c_f1,
                gain_f1_macro=f1_run - c_f1,
                gain_f1_macro_lo=lo,
                gain_f1_macro_hi=hi,
            )


def _pooled(
    runs: Sequence[RunPredictions],
) -> (
    tuple[dict[tuple[ConfigKey, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]], np.ndarray, np.ndarray] | None
):
    """Per (configuration, seed): predictions of all its evaluation rows (folds pooled), on one common row order;
    None when the configurations were not all scored on the same rows."""
    parts: dict[tuple[ConfigKey, int], list[RunPredictions]] = {}
    for r in runs:
        parts.setdefault((r.key, r.seed), []).append(r)
    pooled = {}
    common: np.ndarray | None = None
    y_common: np.ndarray | None = None
    for k, rs in parts.items():
        rows = np.concatenate([r.rows for r in rs])
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if common is None:
            common, y_common = rows, np.concatenate([r.y for r in rs])[order]
        elif not np.array_equal(rows, common):
            return None
        control = None if any(r.control is None for r in rs) else np.concatenate([r.control for r in rs])[order]  # type: ignore[misc]
        pooled[k] = (np.concatenate([r.pred for r in rs])[order], rows, control)
    if common is None or y_common is None:
        return None
    return pooled, common, y_common


def _per_config(
    runs: Sequence[RunPredictions],
    fields: list[dict[str, Any]],
    best: ConfigKey,
    n_classes: int,
    seed: int,
    n_resamples: int,
    out: Assessment,
) -> None:
    """Configuration-level intervals (folds pooled, seeds averaged) and the paired tests against the best."""
    got = _pooled(runs)
    if got is None:
        return
    pooled, rows, y = got
    out.pooled_rows = len(rows)
    items = list(pooled)
    controls = [k for k in items if pooled[k][2] is not None]
    preds = np.stack([pooled[k][0] for k in items] + [pooled[k][2] for k in controls])  # type: ignore[misc]
    acc, f1 = bootstrap_scores(y, preds, n_classes, n_resamples=n_resamples, seed=_rows_seed(seed, rows))
    at = {k: i for i, k in enumerate(items)}
    control_at = {k: len(items) + i for i, k in enumerate(controls)}
    configs = list(dict.fromkeys(k for k, _ in items))
    seeds = {c: sorted(s for k, s in items if k == c) for c in configs}
    shared: dict[ConfigKey, dict[str, Any]] = {}
    for c in configs:
        rows_of = [at[(c, s)] for s in seeds[c]]
        entry = dict(zip(("accuracy_lo", "accuracy_hi"), _interval(acc[rows_of].mean(0))))
        entry.update(zip(("f1_macro_lo", "f1_macro_hi"), _interval(f1[rows_of].mean(0))))
        if all((c, s) in control_at for s in seeds[c]):
            gain = f1[rows_of] - f1[[control_at[(c, s)] for s in seeds[c]]]
            entry.update(zip(("gain_f1_macro_lo", "gain_f1_macro_hi"), _interval(gain.mean(0))))
        shared[c] = entry
    if best not in seeds:
        for i, r in enumerate(runs):
            fields[i].setdefault("extra", {})[CONFIG_INTERVAL_KEY] = shared[r.key]
        return
    s0 = min(seeds[best])
    out.paired_seed = s0
    best_correct = pooled[(best, s0)][0] == y
    others = [c for c in configs if c != best and (c, min(seeds[c])) in at]
    tests: dict[ConfigKey, dict[str, Any]] = {best: {"vs_best": "best"}}
    direction: dict[ConfigKey, str] = {}
    raw = []
    for c in others:
        sc = min(seeds[c])
        p, only_best, only_other = mcnemar_p(best_correct, pooled[(c, sc)][0] == y)
        lo, hi = _interval(f1[at[(c, sc)]] - f1[at[(best, s0)]])
        tests[c] = {"p_vs_best": p, "f1_macro_diff_lo": lo, "f1_macro_diff_hi": hi}
        raw.append(p)
        direction[c] = "better" if only_other > only_best else "worse"
    for c, adjusted in zip(others, holm(raw)):
        tests[c]["p_vs_best_holm"] = float(adjusted)
        tests[c]["tied_with_best"] = bool(adjusted >= ALPHA)
        # significantly different on the evaluation rows: worse, or better (the choice made on validation did not
        # carry over to the evaluation rows, which the report must say)
        tests[c]["vs_best"] = "tied" if adjusted >= ALPHA else direction[c]
    out.compared = len(others)
    diff_mid = {c: (tests[c]["f1_macro_diff_lo"] + tests[c]["f1_macro_diff_hi"]) / 2 for c in others}
    out.tied = sorted((c for c in others if tests[c]["tied_with_best"]), key=lambda c: -diff_mid[c])
    for i, r in enumerate(runs):
        f = fields[i]
        f.setdefault("extra", {})[CONFIG_INTERVAL_KEY] = shared[r.key]
        f["is_best"] = r.key == best
        f.update(tests.get(r.key, {}))
