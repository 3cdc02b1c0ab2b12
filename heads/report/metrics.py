"""Classification metrics as JSON-ready Python values (floats, ints, lists), one function per need."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

__all__ = ["classification_metrics", "metrics_from_confusion", "majority_accuracy", "mean_std"]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true`` and ``y_pred`` are integer label indices, shape (n,), into ``label_names``.
    Every label counts, also one absent from both arrays: its scores are 0 (zero_division=0),
    so macro-F1 is averaged over all ``len(label_names)`` classes. ``confusion[i][j]`` counts
    rows of true label i predicted as j.
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    labels = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
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
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist(),
    }


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
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(label_names)}
    return {"accuracy": float(tp.sum() / total) if total else 0.0, "f1_macro": float(f1.mean()) if len(f1) else 0.0,
            "per_class": per_class, "confusion": cm.astype(int).tolist()}


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
