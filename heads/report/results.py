"""The heads run directory: the only module that writes and reads its result files (their names:
:mod:`heads.report.rundir`).

Layout of one run (``heads sweep``, ``heads train``, ``heads finetune`` all write it)::

    run.json          meta: store path and fingerprint, model, label_names, command/config, created, version
    results.jsonl     one ResultRow per line, appended and flushed as each config x seed finishes
    results.csv       the same rows, flat (hyperparameters as hp_<name> columns)
    summary.md        the answer (best configuration and the ones tied with it), per-config table with intervals and
                      paired tests, the best config's per-class table and confusion matrix
    predictions.npz   per (run, evaluation row): run (line of results.jsonl), row_id, y_true, y_pred, proba
    *.png             metric_per_layer.png, learning_curves.png, confusion_best.png

``heads report`` reads several runs back with :func:`read_run` and merges them (:mod:`heads.report.merge`).
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embstore import __version__
from embstore.errors import DataError, DataFileNotFoundError, OutputNotWritableError
from heads.report.plots import plot_confusion, plot_curves, plot_per_layer, plot_selectivity
from heads.report.rundir import CSV_FILE, PREDICTIONS_FILE, ROWS_FILE, RUN_FILE, SUMMARY_FILE
from heads.report.summary import summary_md
from heads.report.table import ConfigKey, ConfigStats, ResultRow, aggregate, best_config

__all__ = [
    "ResultRow",
    "ConfigStats",
    "RunWriter",
    "aggregate",
    "best_config",
    "read_run",
    "save_predictions",
    "RUN_FILE",
    "PREDICTIONS_FILE",
]

PLOT_PER_LAYER, PLOT_CURVES, PLOT_CONFUSION = "metric_per_layer.png", "learning_curves.png", "confusion_best.png"
PLOT_SELECTIVITY = "selectivity_per_layer.png"
RUN_FORMAT_VERSION = 1
CSV_COLUMNS = [
    "layers",
    "combine",
    "pooling",
    "head",
    "seed",
    "fold",
    "accuracy",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "val_accuracy",
    "val_f1_macro",
    "train_seconds",
    "best_epoch",
    "trainable_params",
    "seconds_per_epoch",
    "store_id",
    "accuracy_lo",
    "accuracy_hi",
    "f1_macro_lo",
    "f1_macro_hi",
    "is_best",
    "p_vs_best",
    "p_vs_best_holm",
    "f1_macro_diff_lo",
    "f1_macro_diff_hi",
    "tied_with_best",
    "vs_best",
    "control_accuracy",
    "control_f1_macro",
    "gain_f1_macro",
    "gain_f1_macro_lo",
    "gain_f1_macro_hi",
    "mdl_bits",
    "compression",
    "control_task_accuracy",
    "control_task_accuracy_lo",
    "control_task_accuracy_hi",
    "selectivity",
    "selectivity_lo",
    "selectivity_hi",
    "val_selectivity",
]


class RunWriter:
    """Writes one run directory: ``run.json`` now, ``results.jsonl`` row by row, the rest in :meth:`finish`."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], *, resume: bool = False) -> None:
        """``meta``: store path/fingerprint, model, label_names, command/config. ``resume`` keeps rows already
        written."""
        self.run_dir = Path(run_dir)
        self.meta = {
            "name": self.run_dir.name,
            "format_version": RUN_FORMAT_VERSION,
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **meta,
        }
        self.rows: list[ResultRow] = []
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume and (self.run_dir / ROWS_FILE).exists():
                self.rows = read_run(self.run_dir)[1]
            (self.run_dir / RUN_FILE).write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
            self._jsonl = open(self.run_dir / ROWS_FILE, "a" if resume else "w", encoding="utf-8")
        except OSError as exc:
            raise OutputNotWritableError(
                f"Cannot write the run directory {self.run_dir} ({exc.strerror or exc}); choose a writable --out."
            ) from None

    def update_meta(self, **changes: Any) -> None:
        """Add or replace keys of run.json (e.g. what is known only after training: the evaluation set, notes)."""
        self.meta.update(changes)
        try:
            (self.run_dir / RUN_FILE).write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
        except OSError as exc:
            raise OutputNotWritableError(
                f"Cannot write {self.run_dir / RUN_FILE} ({exc.strerror or exc}); choose a writable --out."
            ) from None

    def add(self, row: ResultRow) -> None:
        """Append one row to results.jsonl and flush, so a crashed sweep keeps every finished row."""
        self._jsonl.write(json.dumps(row.to_dict(), default=str) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self.rows.append(row)

    def replace_rows(self, rows: list[ResultRow]) -> None:
        """Rewrite results.jsonl with ``rows`` (the same runs, in their final order, with columns known only at the
        end: intervals, paired tests, control scores, codelengths); atomic, so a crash leaves the old file whole."""
        if len(rows) != len(self.rows):
            raise ValueError(f"replace_rows needs the {len(self.rows)} rows written; got {len(rows)}")
        self._jsonl.close()
        path = self.run_dir / ROWS_FILE
        tmp = path.with_name(f".{ROWS_FILE}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row.to_dict(), default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            self._jsonl = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise OutputNotWritableError(
                f"Cannot write {path} ({exc.strerror or exc}); choose a writable --out."
            ) from None
        self.rows = list(rows)

    def write_predictions(
        self, runs: list[tuple[Any, Any, Any]], label_names: list[str], ids: list[dict[str, Any]] | None = None
    ) -> None:
        """predictions.npz: one entry per (run, evaluation row); ``runs[i]`` = (row ids, true labels, (rows, classes)
        probabilities) of the run on line i of results.jsonl; ``ids[i]`` more ids of its rows (word tasks: sentence
        and word). See :func:`save_predictions`."""
        save_predictions(self.run_dir / PREDICTIONS_FILE, runs, label_names, ids)

    def finish(self, label_names: list[str], best_key: ConfigKey | None = None) -> dict[str, Any]:
        """Write results.csv, summary.md and the plots; return the summary (configs, best, files, skipped plots).

        ``best_key`` overrides the best config (default: highest mean validation macro-F1, see :func:`best_config`).
        """
        self._jsonl.close()
        _write_csv(self.run_dir / CSV_FILE, self.rows)
        stats = aggregate(self.rows)
        best = None
        if stats:
            best = next((s for s in stats if s.key == tuple(best_key)), None) if best_key else best_config(stats)
            if best is None:
                raise DataError(
                    f"best_key {best_key} matches no config of this run; pass one of {[s.key for s in stats]}."
                )
        files, skipped = [], []
        for name, draw in (
            (PLOT_PER_LAYER, plot_per_layer),
            (PLOT_CURVES, plot_curves),
            (PLOT_CONFUSION, plot_confusion),
            (PLOT_SELECTIVITY, plot_selectivity),
        ):
            if draw(self.run_dir / name, stats, best, label_names):
                files.append(name)
            elif name != PLOT_SELECTIVITY:  # drawn only with --control-task: not a skip otherwise
                skipped.append(name)
        (self.run_dir / SUMMARY_FILE).write_text(
            summary_md(self.meta, stats, best, label_names, files, skipped, _SKIP_REASON)
        )
        return {
            "run_dir": str(self.run_dir),
            "n_rows": len(self.rows),
            "configs": [s.to_dict() for s in stats],
            "best": best.to_dict() if best else None,
            "plots": files,
            "skipped_plots": skipped,
        }


def save_predictions(
    path: Path, runs: list[tuple[Any, Any, Any]], label_names: list[str], ids: list[dict[str, Any]] | None = None
) -> Path:
    """Write per-row predictions in long format, readable with numpy alone (no pickle)::

        run      (N,) int64    the run's 0-based line in results.jsonl (0 for heads predict)
        row_id   (N,) int64    the row's id: its position in its source data file (heads predict: input line)
        y_true   (N,) int64    the true label index (-1 when unknown, as for heads predict)
        y_pred   (N,) int64    the predicted label index (the most probable class)
        proba    (N, K) float32 class probabilities, columns in label_names order
        label_names (K,) str
        sentence_id, word_id, head_id (N,) int64   word and edge tasks: the sentence's row id in its source file,
                 the word's (dependent's) 0-based position in it, and an edge's head position (row_id is then
                 sentence_id * 65536 + word_id)

    ``runs[i]`` = (row ids, true labels or None, probabilities) of run i, ``ids[i]`` its rows' further ids (the
    same names in every run). Written to a temporary file and renamed.
    """
    import numpy as np

    n_classes = len(label_names)
    row_id, ys, probas, run = [], [], [], []
    for i, (row_ids, y_true, proba) in enumerate(runs):
        p = np.asarray(proba, dtype=np.float32).reshape(-1, n_classes)
        row_id.append(np.asarray(row_ids, dtype=np.int64))
        ys.append(np.full(len(p), -1, dtype=np.int64) if y_true is None else np.asarray(y_true, dtype=np.int64))
        probas.append(p)
        run.append(np.full(len(p), i, dtype=np.int64))

    def cat(parts: list[Any], shape: tuple[int, ...], dtype: Any) -> Any:
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

    proba_all = cat(probas, (0, n_classes), np.float32)
    more = {}
    if ids:
        more = {k: cat([np.asarray(d[k], dtype=np.int64) for d in ids], (0,), np.int64) for k in ids[0]}
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    try:
        np.savez(
            tmp,
            run=cat(run, (0,), np.int64),
            row_id=cat(row_id, (0,), np.int64),
            y_true=cat(ys, (0,), np.int64),
            y_pred=proba_all.argmax(1).astype(np.int64) if len(proba_all) else np.zeros(0, np.int64),
            proba=proba_all,
            label_names=np.asarray([str(n) for n in label_names]),
            **more,
        )
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputNotWritableError(
            f"Cannot write {path} ({exc.strerror or exc}); choose a writable location."
        ) from None
    return path


def _opt(value: float | int | None) -> str:
    return "" if value is None else str(value)


def _write_csv(path: Path, rows: list[ResultRow]) -> None:
    hp_names = sorted({name for r in rows for name in r.hyperparameters})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS + [f"hp_{n}" for n in hp_names])
        for r in rows:
            base = [_opt(getattr(r, c)) for c in CSV_COLUMNS]
            hps = [_csv_value(r.hyperparameters.get(n)) for n in hp_names]
            writer.writerow(base + hps)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


_SKIP_REASON = {
    PLOT_PER_LAYER: "no single-layer configs",
    PLOT_CURVES: "the best config has no per-epoch history",
    PLOT_CONFUSION: "no best config or no confusion matrix",
}


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[ResultRow]]:
    """(meta, rows) of a run directory written by :class:`RunWriter`.

    A truncated last line (the process died mid-write) is skipped; any other bad line raises.
    """
    run_dir = Path(run_dir)
    hint = "pass a directory written by heads sweep/train/finetune"
    if not run_dir.is_dir():
        raise DataFileNotFoundError(f"Run directory {run_dir} does not exist; {hint}.")
    for name in (ROWS_FILE, RUN_FILE):
        if not (run_dir / name).is_file():
            raise DataFileNotFoundError(f"{run_dir} is not a heads run directory (no {name}); {hint}.")
    try:
        meta = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{run_dir / RUN_FILE} is not valid JSON ({exc.msg}); rerun the command that wrote {run_dir}."
        ) from None
    lines = (run_dir / ROWS_FILE).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(ResultRow.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if i == len(lines) - 1:
                continue  # the last row was being written when the process stopped
            raise DataError(
                f"{run_dir / ROWS_FILE} line {i + 1} is not a result row ({exc}); "
                f"delete that line or rerun the command that wrote {run_dir}."
            ) from None
    return meta, rows
