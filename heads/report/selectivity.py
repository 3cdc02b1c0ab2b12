"""Selectivity (Hewitt & Liang 2019): a probe's accuracy on its task minus the same probe's accuracy on a control
task, with paired-bootstrap intervals.

Both accuracies are of the same configuration, seed and fold, on the same evaluation rows (each scored against its
own labels: the task's, or the control task's), so one set of resamples of those rows gives both accuracies and
their difference on every resample: the interval of the selectivity is paired. Per configuration the held-out rows
of every fold are pooled and the seeds averaged on every resample, as :mod:`heads.report.assess` does for macro-F1.

Plain numpy (:func:`heads.report.uncertainty.resample_counts`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from heads.report.table import CONFIG_INTERVAL_KEY, ConfigKey
from heads.report.uncertainty import N_RESAMPLES, percentile_interval, resample_counts

__all__ = ["SelectivityRun", "selectivity_fields"]


@dataclass(frozen=True)
class SelectivityRun:
    """One run on its task and on the control task, on the same evaluation rows."""

    key: ConfigKey
    seed: int
    fold: int | None
    rows: np.ndarray
    """(n,) evaluation rows, sorted."""
    correct: np.ndarray
    """(n,) bool: the task probe is right."""
    control_correct: np.ndarray
    """(n,) bool: the control-task probe is right (against the control labels)."""
    val_accuracy: float | None = None
    val_control_accuracy: float | None = None


def _seed(base: int, rows: np.ndarray) -> list[int]:
    return [int(base), zlib.crc32(np.ascontiguousarray(rows, dtype=np.int64).tobytes()), 29]


def _accuracies(rows: np.ndarray, correct: np.ndarray, seed: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, models) accuracy of every column of ``correct`` (n, models) on the same resamples of ``rows``."""
    n = len(rows)
    if n == 0:
        return np.full((n_resamples, correct.shape[1]), np.nan)
    parts = [counts @ correct.astype(np.float32) / n for counts in resample_counts(n, n_resamples, _seed(seed, rows))]
    return np.concatenate(parts).astype(np.float64)


def _interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = percentile_interval(values)
    return float(lo), float(hi)


def selectivity_fields(
    runs: Sequence[SelectivityRun], *, seed: int = 0, n_resamples: int = N_RESAMPLES, intervals: bool = True
) -> list[dict[str, Any]]:
    """Per run (in input order): ``control_task_accuracy``, ``selectivity`` (and ``val_selectivity``), with 95%
    paired-bootstrap intervals of both (``intervals``), and under ``extra[CONFIG_INTERVAL_KEY]`` the
    configuration-level intervals."""
    fields: list[dict[str, Any]] = []
    for r in runs:
        acc, ctrl = (
            float(np.mean(r.correct)) if len(r.rows) else float("nan"),
            (float(np.mean(r.control_correct)) if len(r.rows) else float("nan")),
        )
        f: dict[str, Any] = {"control_task_accuracy": ctrl, "selectivity": acc - ctrl}
        if r.val_accuracy is not None and r.val_control_accuracy is not None:
            f["val_selectivity"] = r.val_accuracy - r.val_control_accuracy
        if intervals:
            boot = _accuracies(r.rows, np.stack([r.correct, r.control_correct], axis=1), seed, n_resamples)
            f["control_task_accuracy_lo"], f["control_task_accuracy_hi"] = _interval(boot[:, 1])
            f["selectivity_lo"], f["selectivity_hi"] = _interval(boot[:, 0] - boot[:, 1])
        fields.append(f)
    if not intervals:
        return fields
    # configuration level: folds pooled per seed, seeds averaged on every resample
    by_config: dict[ConfigKey, dict[int, list[int]]] = {}
    for i, r in enumerate(runs):
        by_config.setdefault(r.key, {}).setdefault(r.seed, []).append(i)
    for key, seeds in by_config.items():
        pooled = []
        for members in seeds.values():
            rows = np.concatenate([runs[i].rows for i in members])
            order = np.argsort(rows, kind="stable")
            pooled.append(
                (
                    rows[order],
                    np.concatenate([runs[i].correct for i in members])[order],
                    np.concatenate([runs[i].control_correct for i in members])[order],
                )
            )
        rows = pooled[0][0]
        if any(not np.array_equal(p[0], rows) for p in pooled):
            continue  # seeds scored on different rows: the run-level intervals stand
        cols = np.stack([c for p in pooled for c in (p[1], p[2])], axis=1)  # (n, 2 * seeds)
        boot = _accuracies(rows, cols, seed, n_resamples)
        task, ctrl = boot[:, 0::2].mean(1), boot[:, 1::2].mean(1)
        entry = dict(zip(("control_task_accuracy_lo", "control_task_accuracy_hi"), _interval(ctrl)))
        entry.update(zip(("selectivity_lo", "selectivity_hi"), _interval(task - ctrl)))
        for members in seeds.values():
            for i in members:
                fields[i].setdefault("extra", {})[CONFIG_INTERVAL_KEY] = entry
    return fields
