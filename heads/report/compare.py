"""The paired comparison across runs that ``heads report`` adds: every (run, configuration) against the report's
best, on the evaluation rows all of them scored.

Each run's ``predictions.npz`` (sweeps and fine-tunes write one) holds its predictions of its evaluation rows by
source-row id. When every compared run scored the same rows (the same evaluation set: :mod:`heads.evalset`) with
the same label names, :func:`compare` hands them to :func:`heads.report.assess.assess`, the sweep's own sureness
code, with each configuration named by its run: a 95% paired-bootstrap interval of every configuration's macro-F1
and accuracy over those rows (one set of resamples for all, so intervals are comparable), and the exact McNemar
test against the best (chosen as the report chooses it), Holm-corrected over every other configuration.

:func:`seconds_per_row` is the training cost beside each score: training seconds per training row (a probe's
exclude its store's one extraction pass; a fine-tune's cover every epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heads.report.assess import RunPredictions, assess
from heads.report.rundir import PREDICTIONS_FILE
from heads.report.table import CONFIG_INTERVAL_KEY, ConfigStats, ResultRow

__all__ = ["Compared", "RunInput", "compare", "seconds_per_row"]


@dataclass(frozen=True)
class RunInput:
    """One run of a report: its name, directory, meta (run.json) and result rows (results.jsonl order)."""

    name: str
    path: Path
    meta: dict[str, Any]
    rows: list[ResultRow]


@dataclass(frozen=True)
class Compared:
    """One (run, configuration)'s place in the paired comparison."""

    f1_lo: float
    f1_hi: float
    accuracy_lo: float
    accuracy_hi: float
    is_best: bool
    p_vs_best_holm: float | None
    vs_best: str | None
    """'best', 'tied', 'worse' or 'better' (significantly better on the evaluation rows than the configuration
    chosen on validation)."""


def _predictions(run: RunInput) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """{results.jsonl line: (row ids, y_true, y_pred)} of a run, sorted by row id; None without predictions.npz."""
    path = run.path / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        line, ids, y, pred = z["run"], z["row_id"], z["y_true"], z["y_pred"]
    out = {}
    for i in np.unique(line):
        sel = line == i
        order = np.argsort(ids[sel], kind="stable")
        out[int(i)] = (ids[sel][order], y[sel][order], pred[sel][order])
    return out


def compare(runs: list[RunInput], entries: list[tuple[str, ConfigStats]]) -> dict[int, Compared]:
    """{index into ``entries``: its comparison}; ``entries`` are (run name, configuration), best first. Empty when
    the best has no predictions, the runs hold other label names, or the configurations were not all scored on the
    same rows (then nothing can be paired); configurations without predictions are left out."""
    by_name = {r.name: r for r in runs}
    names = {tuple(r.meta.get("label_names") or ()) for r in runs}
    if len(names) != 1 or not next(iter(names)):
        return {}
    n_classes = len(next(iter(names)))
    preds = {r.name: _predictions(r) for r in runs}
    items: list[RunPredictions] = []
    owner: list[int] = []
    for j, (run, stats) in enumerate(entries):
        p = preds.get(run)
        if p is None:
            continue
        key = (f"{run}|{stats.key[0]}", *stats.key[1:])
        for line, row in enumerate(by_name[run].rows):
            if row.config_key == stats.key and line in p:
                ids, y, pred = p[line]
                items.append(RunPredictions(key, row.seed, row.fold, ids, y, pred))  # type: ignore[arg-type]
                owner.append(j)
    if not items or owner[0] != 0:
        return {}
    best = items[0].key
    found = assess(items, best, n_classes)  # no interval at all when the configurations scored different rows
    out: dict[int, Compared] = {}
    for j, f in zip(owner, found.fields):
        if j in out or CONFIG_INTERVAL_KEY not in f.get("extra", {}):
            continue
        interval = f["extra"][CONFIG_INTERVAL_KEY]
        out[j] = Compared(
            f1_lo=interval["f1_macro_lo"],
            f1_hi=interval["f1_macro_hi"],
            accuracy_lo=interval["accuracy_lo"],
            accuracy_hi=interval["accuracy_hi"],
            is_best=bool(f.get("is_best")),
            p_vs_best_holm=f.get("p_vs_best_holm"),
            vs_best=f.get("vs_best"),
        )
    return out


def seconds_per_row(stats: ConfigStats, meta: dict[str, Any]) -> float | None:
    """Mean training seconds of the configuration per training row of its run (None when the run records none)."""
    n = meta.get("train_rows")
    return stats.train_seconds / int(n) if n else None
