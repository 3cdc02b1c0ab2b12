"""What every probe trainer needs besides its own loop: labels checked, the device, class weights, the per-epoch
schedule, seeded minibatches, and :class:`FittedHead`, what a trainer hands back.

``HeadClassifier.fit`` (:mod:`heads.probe.estimator`), the batched AdamW probes (:mod:`heads.probe.adamw`), the
stacked heads (:mod:`heads.probe.ensemble`) and the L-BFGS route (:mod:`heads.probe.rounds`) all train heads; they
share these steps, each given only the settings it uses. Each trainer returns a :class:`FittedHead` and the
estimator takes it as its own learned state (``HeadClassifier.from_fit``), as scikit-learn's estimators set their
own ``*_`` attributes from what their fitting functions return. Nothing here knows the estimator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from embstore.device import resolve_device
from embstore.errors import ConfigError
from heads.probe.config import HeadConfig
from heads.probe.modules import InputShape
from heads.protocol.schedule import make_scheduler

__all__ = [
    "check_labels",
    "resolve_n_classes",
    "head_device",
    "class_weights",
    "epoch_schedule",
    "epoch_batches",
    "FittedHead",
]


def check_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    """``y`` (anything array-like) as (n,) int64 class indices; ConfigError if the length or dtype is wrong."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ConfigError(f"{name} must be 1-D with one label per feature row ({n}); got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"{name} must hold integer class indices 0..C-1; got dtype {y.dtype}. Encode labels as "
            "indices first (e.g. sklearn LabelEncoder)."
        )
    if n and y.min() < 0:
        raise ConfigError(f"{name} must hold class indices 0..C-1; got {y.min()}.")
    return y.astype(np.int64, copy=False)


def resolve_n_classes(y: np.ndarray, y_val: np.ndarray | None, n_classes: int | None) -> int:
    """n_classes, or 1 + the largest label seen; ConfigError if a label is out of range."""
    seen = max([int(a.max()) for a in (y, y_val) if a is not None and len(a)] or [0]) + 1
    if n_classes is None:
        return seen
    if n_classes < seen:
        raise ConfigError(f"n_classes is {n_classes} but the labels go up to {seen - 1}; pass n_classes >= {seen}.")
    return int(n_classes)


def head_device(cfg: HeadConfig) -> torch.device:
    """The torch device of ``cfg.device`` by the one device rule (:func:`embstore.device.resolve_device`)."""
    return torch.device(resolve_device(cfg.device))


def class_weights(y_train: np.ndarray, n_classes: int, class_weight: str) -> torch.Tensor | None:
    """'balanced': n / (C * count_c), 0 for absent classes; None otherwise. (C,) float32."""
    if class_weight != "balanced":
        return None
    counts = np.bincount(y_train, minlength=n_classes).astype(np.float64)
    w = np.divide(len(y_train), n_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


def epoch_schedule(
    opt: torch.optim.Optimizer, schedule: str, epochs: int, gamma: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch lr schedule of a head (step it once per epoch): constant, x ``gamma`` per epoch
    ('exponential') or a cosine to 0 over ``epochs`` ('cosine'), without warmup."""
    return make_scheduler(opt, schedule, warmup=0, total=epochs, per_epoch=1, gamma=gamma)


def epoch_batches(train_idx: np.ndarray, batch_size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    """One seeded permutation of the training rows, cut into minibatches of row indices."""
    order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@dataclass(frozen=True)
class FittedHead:
    """What training a head produced; ``HeadClassifier.from_fit`` makes it a fitted estimator."""

    module: nn.Module
    """The trained head module, on its device, with its best epoch's weights."""
    n_classes: int
    input_shape: InputShape
    """The shapes of the inputs it was trained on (predict checks its inputs against them)."""
    history: list[dict[str, Any]]
    """One entry per epoch (per C for L-BFGS probes)."""
    best_epoch: int
    """The epoch whose weights the module holds (-1 for L-BFGS probes, which have no epochs)."""
    train_seconds: float
