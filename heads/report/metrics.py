"""Classification metrics as JSON-ready Python values (floats, ints, lists), one function per need."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "classification_metrics",
    "confusion",
    "metrics_from_confusion",
    "macro_f1_present",
    "averages",
    "majority_accuracy",
    "mean_std",
]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: rows true label, columns predicted (labels outside range ignored)."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    ok = (y_true >= 0) & (y_true < n_classes) & (y_pred >= 0) & (y_pred < n_classes)
    return np.bincount(y_true[ok] * n_classes + y_pred[ok], minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true`` and ``y_pred`` are integer label indices, shape (n,), into ``label_names``.
    Every label counts, also one absent from both arrays: its scores are 0 (zero_division=0),
    so macro-F1 is averaged over all ``len(label_names)`` classes (scikit-learn's
    ``f1_score(labels=all, average='macro', zero_division=0)``, computed here in numpy so a sweep
    does not import scikit-learn). ``confusion[i][j]`` counts rows of true label i predicted as j.
    """
    return metrics_from_confusion(confusion(y_true, y_pred, len(label_names)), label_names)


def macro_f1_present(cm: np.ndarray) -> float:
    """Macro-F1 over the classes present in the true or predicted labels of a confusion matrix (rows: true),
    as scikit-learn's ``f1_score(average='macro', zero_division=0)`` computes it without ``labels``."""
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    denom = (cm.sum(1) + cm.sum(0)).astype(np.float64)
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def metrics_from_confusion(confusion: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """What :func:`classification_metrics` returns, from a (classes, classes) confusion matrix (rows: true).

    For predictions counted where they were made (every torchrun rank scores its own row chunks and the counts
    are summed), with the same conventions: every label counts, zero_division=0.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = int(cm.sum())
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "f1_macro": float(f1.mean()) if len(f1) else 0.0,
        "per_class": per_class,
        "confusion": cm.astype(int).tolist(),
        "macro": averages(per_class, "macro"),
        "weighted": averages(per_class, "weighted"),
    }


def averages(per_class: dict[str, dict[str, Any]], how: str) -> dict[str, float]:
    """Precision, recall and F1 averaged over the classes of a per-class table ({label: {precision, recall, f1,
    support}}): 'macro' (every class counts once) or 'weighted' (by support, as scikit-learn's
    ``classification_report`` weighted avg; 0 without rows)."""
    rows = list(per_class.values())
    if not rows:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    weights = np.array([float(r["support"]) if how == "weighted" else 1.0 for r in rows])
    total = weights.sum()
    return {
        k: float(np.dot(weights, [float(r[k]) for r in rows]) / total) if total else 0.0
        for k in ("precision", "recall", "f1")
    }


def majority_accuracy(y_train: np.ndarray, y_eval: np.ndarray) -> float:
    """Accuracy on ``y_eval`` of always predicting the most frequent class of ``y_train`` (ties: lowest index)."""
    values, counts = np.unique(np.asarray(y_train).reshape(-1), return_counts=True)
    if len(values) == 0 or len(y_eval) == 0:
        return 0.0
    majority = values[int(np.argmax(counts))]
    return float(np.mean(np.asarray(y_eval).reshape(-1) == majority))


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0, so one value has std 0); (nan, nan) when empty."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=0))
