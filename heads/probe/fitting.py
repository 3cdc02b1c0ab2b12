"""What every probe trainer needs besides its own loop: labels checked, the device, class weights, the per-epoch
schedule, seeded minibatches, and marking a head fitted.

``HeadClassifier.fit`` (:mod:`heads.probe.estimator`), the batched AdamW probes (:mod:`heads.probe.adamw`), the
stacked heads (:mod:`heads.probe.ensemble`) and the L-BFGS route (:mod:`heads.probe.rounds`) all train heads; they
share these steps, each given only the settings it uses. Nothing here imports the estimator, so each of those
modules (the estimator too) imports this one without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from embstore.device import resolve_device
from embstore.errors import ConfigError
from heads.probe.config import HeadConfig
from heads.probe.modules import InputShape
from heads.protocol.schedule import make_scheduler

if TYPE_CHECKING:
    from heads.probe.estimator import HeadClassifier

__all__ = [
    "check_labels",
    "resolve_n_classes",
    "head_device",
    "class_weights",
    "epoch_schedule",
    "epoch_batches",
    "mark_fitted",
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


def mark_fitted(
    est: HeadClassifier,
    module: nn.Module,
    n_classes: int,
    shape: InputShape,
    history: list[dict[str, Any]],
    best_epoch: int,
    train_seconds: float,
) -> HeadClassifier:
    """Make ``est`` a fitted head: its module (in eval mode), classes, input shape, history, best epoch and training
    seconds, and for a 'mix' head the learnt layer weights; returns ``est``. Every trainer ends with this."""
    est.module_ = module.eval()
    est.n_classes_, est.input_shape_, est.history_ = n_classes, shape, history
    est.best_epoch_, est.train_seconds_ = best_epoch, train_seconds
    mix = getattr(module, "mix", None)
    if est.config.head == "mix" and mix is not None:
        est.mix_weights_ = mix.mix_weights()
        est.mix_scale_ = float(mix.gamma.detach().cpu())
    return est
