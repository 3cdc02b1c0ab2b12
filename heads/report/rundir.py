"""Where runs go and what their files are called: the one module that names them.

Every product writes a run directory (``heads sweep``/``train``, ``heads finetune``, ``heads pretrain``) and
``heads report`` a report directory; their default names and the shared file names are defined here and
imported wherever a run is written or read::

    runs/<YYYYmmdd-HHMMSS>-<kind>/    a run without --out (kind: finetune, pretrain, study, sweep-<store>)
        run.json                      meta: what was run, on which data, with which settings
        results.jsonl, results.csv    one result row per configuration x seed x fold (sweeps and fine-tunes)
        summary.md                    the table a person reads
        predictions.npz               per (run, evaluation row): the predicted label and class probabilities (sweeps)
        data.png                      class counts and length histograms of every split the run read
        model/                        a backbone usable as --model (fine-tunes without --folds, pretraining)
        folds/fold-K/model/           each fold's model (heads finetune --folds K --keep-fold-models)
        checkpoint/                   the training state --resume continues from (fine-tunes, pretraining)
    reports/<YYYYmmdd-HHMMSS>/        a merged report without --out
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

__all__ = [
    "RUN_FILE",
    "ROWS_FILE",
    "CSV_FILE",
    "SUMMARY_FILE",
    "PREDICTIONS_FILE",
    "BEST_HEAD_DIR",
    "MODEL_DIR",
    "CHECKPOINT_DIR",
    "FOLDS_DIR",
    "RUNS_ROOT",
    "REPORTS_ROOT",
    "timestamp",
    "run_dir",
]

RUN_FILE, ROWS_FILE, CSV_FILE, SUMMARY_FILE = "run.json", "results.jsonl", "results.csv", "summary.md"
PREDICTIONS_FILE, BEST_HEAD_DIR = "predictions.npz", "best_head"
MODEL_DIR, CHECKPOINT_DIR, FOLDS_DIR = "model", "checkpoint", "folds"
RUNS_ROOT, REPORTS_ROOT = Path("runs"), Path("reports")


def timestamp(now: _dt.datetime | None = None) -> str:
    """The time part of a default run or report directory name, e.g. 20250131-142502 (local time)."""
    return f"{now or _dt.datetime.now():%Y%m%d-%H%M%S}"


def run_dir(out: str | Path | None, kind: str, root: Path = RUNS_ROOT) -> Path:
    """``out`` when given, else ``root``/<timestamp>-<kind> (``kind`` empty: just the timestamp)."""
    if out:
        return Path(out)
    return root / (f"{timestamp()}-{kind}" if kind else timestamp())
