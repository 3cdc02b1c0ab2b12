"""Early stopping on validation macro-F1, and the scores every product chooses by."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["BestTracker", "scores"]


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(accuracy, macro-F1) over the classes present in either array (scikit-learn's ``f1_score(average='macro')``)."""
    from heads.report.metrics import confusion, macro_f1_present

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if not len(y_true):
        return 0.0, 0.0
    n = int(max(y_true.max(), y_pred.max())) + 1
    return float(np.mean(y_true == y_pred)), macro_f1_present(confusion(y_true, y_pred, n))


class BestTracker:
    """Early stopping on validation macro-F1: keeps the best (earliest on ties) epoch and its state.

    ``keep='last'`` still stops after ``patience`` epochs without a better score, but keeps no state: the weights of
    the last epoch trained are the ones reported (``best_epoch`` is then that epoch), as studies that report their
    last epoch did."""

    def __init__(self, patience: int, keep: str = "best") -> None:
        self.patience, self.best_f1, self.best_epoch, self.bad = patience, -math.inf, -1, 0
        self.keep = keep
        self.state: Any = None
        self.stopped = False

    def update(self, epoch: int, f1: float | None, snapshot: Callable[..., Any]) -> bool:
        """Record one epoch; ``snapshot()`` is called only for a new best. Returns True when training should stop."""
        if self.patience == 0 or f1 is None:  # no early stopping: the last epoch wins
            self.best_epoch = epoch
            return False
        if f1 > self.best_f1:
            self.best_f1, self.bad = f1, 0
            if self.keep == "best":
                self.best_epoch, self.state = epoch, snapshot()
        else:
            self.bad += 1
        if self.keep == "last":
            self.best_epoch = epoch
        self.stopped = self.bad >= self.patience
        return self.stopped
