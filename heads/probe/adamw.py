"""Many linear probes trained in one pass over the data, as one batched matmul per feature width.

A layer sweep fits one logistic regression per layer (or layer combination) on the same rows. Instead of G passes,
:func:`fit_linear_probes` gathers each minibatch once per probe, stacks probes of equal width into
(batch, G_d, d) and computes all their logits with one einsum against (G_d, d, C) weights. The loss is the sum of
the per-probe mean cross-entropies, so each probe's gradient is exactly its own, and AdamW is elementwise: the
result equals fitting ``HeadClassifier(head='linear')`` on each feature alone (same init, split, batch order,
schedule and per-probe early stopping), up to float rounding of the batched matmul.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embstore.errors import ConfigError
from heads.probe.config import HeadConfig
from heads.probe.estimator import HeadClassifier
from heads.probe.fitting import (
    FittedHead,
    check_labels,
    class_weights,
    epoch_batches,
    epoch_schedule,
    head_device,
    resolve_n_classes,
)
from heads.probe.modules import Inputs, LinearHead, as_inputs, build_module
from heads.protocol import BestTracker, Split, make_split, scores
from heads.protocol.optim import adamw

__all__ = ["fit_linear_probes"]

log = logging.getLogger(__name__)


def _validate(
    features: list[Any], y: Any, val_features: list[Any] | None, y_val: Any
) -> tuple[list[Inputs], np.ndarray, list[Inputs] | None, np.ndarray | None]:
    if not features:
        raise ConfigError("fit_linear_probes needs at least one feature array; got an empty list.")
    train = [as_inputs(f, "linear") for f in features]
    n = len(train[0])
    if any(len(t) != n for t in train):
        raise ConfigError(f"All probe features must have the same rows; got row counts {[len(t) for t in train]}.")
    labels = check_labels(y, n)
    if val_features is None:
        if y_val is not None:
            raise ConfigError("y_val was given without val_features; pass both or neither.")
        return train, labels, None, None
    if len(val_features) != len(features):
        raise ConfigError(f"val_features must hold one array per probe ({len(features)}); got {len(val_features)}.")
    val = [as_inputs(f, "linear") for f in val_features]
    for g, (t, v) in enumerate(zip(train, val)):
        if t.shape != v.shape or len(v) != len(val[0]):
            raise ConfigError(
                f"val_features[{g}] must be {t.shape.describe()} with the same rows as the other "
                f"validation arrays; got {v.shape.describe()} with {len(v)} rows."
            )
    return train, labels, val, check_labels(y_val, len(val[0]), "y_val")


def _initial_probes(train: list[Inputs], cfg: HeadConfig, n_classes: int, fit_rows: np.ndarray) -> list[LinearHead]:
    """The very init a single HeadClassifier draws, once per probe: reseed, then build the same module (and fit its
    input statistics on the training rows)."""
    inits: list[LinearHead] = []
    for t in train:
        torch.manual_seed(cfg.seed)
        module = build_module(cfg, t.shape, n_classes)
        if not isinstance(module, LinearHead):  # build_module returns LinearHead for head='linear'
            raise TypeError(f"expected LinearHead, got {type(module).__name__}")
        if cfg.standardize:
            module.standardize.fit_stats(t, fit_rows)
        inits.append(module)
    return inits


@dataclass
class _Stack:
    """Every probe's weights, grouped by feature width ``d``: (G_d, d, C) weights and (G_d, C) biases, so the logits
    of all probes of a width are one einsum, and each probe's standardisation as (G_d, d)."""

    groups: dict[int, list[int]]
    """width -> probe indices, in input order."""
    W: dict[int, nn.Parameter]
    B: dict[int, nn.Parameter]
    shift: dict[int, torch.Tensor]
    scale: dict[int, torch.Tensor]
    device: torch.device
    sel: dict[int, torch.Tensor] = field(default_factory=dict)
    """Positions of the probes still training this epoch, per width (set by :meth:`live`)."""

    @classmethod
    def of(cls, inits: list[LinearHead], device: torch.device) -> "_Stack":
        groups: dict[int, list[int]] = {}
        for g, m in enumerate(inits):
            groups.setdefault(m.linear.in_features, []).append(g)
        # AdamW does not care about the (G_d, d, C) layout: updates are elementwise.
        return cls(
            groups=groups,
            W={
                d: nn.Parameter(torch.stack([inits[g].linear.weight.detach().T for g in gs]).to(device))
                for d, gs in groups.items()
            },
            B={
                d: nn.Parameter(torch.stack([inits[g].linear.bias.detach() for g in gs]).to(device))
                for d, gs in groups.items()
            },
            shift={d: torch.stack([inits[g].standardize.shift for g in gs]).to(device) for d, gs in groups.items()},
            scale={d: torch.stack([inits[g].standardize.scale for g in gs]).to(device) for d, gs in groups.items()},
            device=device,
        )

    def parameters(self) -> list[nn.Parameter]:
        return [p for d in self.groups for p in (self.W[d], self.B[d])]

    def live(self, trackers: list[BestTracker]) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """({width: probes still training}, {width: their positions in the width's stack}); sets :attr:`sel`.
        Probes that stopped early are frozen at their best and left out of the batches (their weights may still
        drift under AdamW's momentum, but only their best snapshot is kept)."""
        pos = {d: [j for j, g in enumerate(gs) if not trackers[g].stopped] for d, gs in self.groups.items()}
        pos = {d: js for d, js in pos.items() if js}
        self.sel = {d: torch.tensor(js, device=self.device) for d, js in pos.items()}
        return {d: [self.groups[d][j] for j in js] for d, js in pos.items()}, pos

    def logits(self, inputs: list[Inputs], d: int, gs: list[int], idx: np.ndarray) -> torch.Tensor:
        """(b, G_live, C) logits of the live probes ``gs`` of width ``d`` on rows ``idx``."""
        x = torch.stack([inputs[g].batch(idx, self.device)[0].flatten(1) for g in gs], dim=1)  # (b, G_d, d)
        x = (x - self.shift[d][self.sel[d]]) * self.scale[d][self.sel[d]]
        return torch.einsum("bgd,gdc->bgc", x, self.W[d][self.sel[d]]) + self.B[d][self.sel[d]]


def _train_epoch(
    stack: _Stack,
    live: dict[int, list[int]],
    train: list[Inputs],
    y: np.ndarray,
    split: Split,
    cfg: HeadConfig,
    opt: torch.optim.Optimizer,
    weight: torch.Tensor | None,
    gen: torch.Generator,
) -> dict[int, torch.Tensor]:
    """One epoch of minibatches over every live probe; {width: (G_live,) summed training loss x rows}."""
    device = stack.device
    totals = {d: torch.zeros(len(gs), device=device) for d, gs in live.items()}
    for idx in epoch_batches(split.train_idx, cfg.batch_size, gen):
        yb = torch.from_numpy(y[idx]).to(device)
        # Weighted mean as nn.CrossEntropyLoss takes it: sum(w_y * loss) / sum(w_y).
        denom = weight[yb].sum() if weight is not None else torch.tensor(float(len(idx)), device=device)
        loss = torch.zeros((), device=device)
        for d, gs in live.items():
            logits = stack.logits(train, d, gs, idx)  # (b, G_live, C)
            per_row = F.cross_entropy(
                logits.permute(0, 2, 1), yb[:, None].expand(-1, len(gs)), weight=weight, reduction="none"
            )  # (b, G_d)
            per_probe = per_row.sum(0) / denom  # (G_d,)
            loss = loss + per_probe.sum()  # a sum keeps every probe's gradient its own
            totals[d] += per_probe.detach() * len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return totals


def _record_epoch(
    stack: _Stack,
    live: dict[int, list[int]],
    pos: dict[int, list[int]],
    epoch: int,
    lr: float,
    totals: dict[int, torch.Tensor],
    preds: dict[int, np.ndarray] | None,
    split: Split,
    n_train: int,
    trackers: list[BestTracker],
    histories: list[list[dict[str, Any]]],
) -> None:
    """Every live probe's history entry and early-stopping update (a new best snapshots its weights)."""
    for d, gs in live.items():
        for jj, g in enumerate(gs):
            j = pos[d][jj]  # position of probe g in its width group's W/B
            if trackers[g].stopped:  # frozen at its best: later epochs must not touch its record
                continue
            acc = f1 = None
            if preds is not None and split.y_val is not None and split.val_idx is not None:
                acc, f1 = scores(split.y_val[split.val_idx], preds[d][:, jj])
            histories[g].append(
                {
                    "epoch": epoch,
                    "train_loss": float(totals[d][jj]) / n_train,
                    "val_accuracy": acc,
                    "val_f1_macro": f1,
                    "lr": lr,
                }
            )
            trackers[g].update(
                epoch, f1, lambda d=d, j=j: (stack.W[d][j].detach().clone(), stack.B[d][j].detach().clone())
            )


def _fitted(
    stack: _Stack,
    inits: list[LinearHead],
    train: list[Inputs],
    cfg: HeadConfig,
    n_classes: int,
    trackers: list[BestTracker],
    histories: list[list[dict[str, Any]]],
    seconds: float,
) -> list[HeadClassifier]:
    """One fitted HeadClassifier per probe, in input order, with its best epoch's weights."""
    fitted: list[HeadClassifier | None] = [None] * len(inits)
    for d, gs in stack.groups.items():
        for j, g in enumerate(gs):
            w, b = trackers[g].state or (stack.W[d][j].detach(), stack.B[d][j].detach())
            module = inits[g]
            with torch.no_grad():
                module.linear.weight.copy_(w.T)
                module.linear.bias.copy_(b)
            fitted[g] = HeadClassifier.from_fit(
                cfg,
                FittedHead(
                    module.to(stack.device), n_classes, train[g].shape, histories[g], trackers[g].best_epoch, seconds
                ),
            )
    return [est for est in fitted if est is not None]


def fit_linear_probes(
    features: list[np.ndarray],
    y: Any,
    val_features: list[np.ndarray] | None,
    y_val: Any,
    config: HeadConfig,
    n_classes: int | None = None,
) -> list[HeadClassifier]:
    """Fit one linear head per feature array in a single pass; returns one fitted HeadClassifier per probe.

    ``features[g]`` is (n, d_g) (or (n, layers, hidden), flattened), all on the same n rows; ``y`` (n,) int class
    indices (any array-like); ``val_features``/``y_val`` likewise for validation, or None to carve it as
    HeadClassifier does. ``config`` gives the training settings (its head is taken as linear).
    """
    cfg, t0 = config.replace(head="linear"), time.perf_counter()
    train, y_arr, val_given, yv = _validate(features, y, val_features, y_val)
    n_classes = resolve_n_classes(y_arr, yv, n_classes)
    split = make_split(y_arr, yv, validation_fraction=cfg.validation_fraction, seed=cfg.seed, patience=cfg.patience)
    val = train if split.val_is_train else val_given
    device = head_device(cfg)
    inits = _initial_probes(train, cfg, n_classes, split.train_idx)
    stack = _Stack.of(inits, device)
    opt = adamw([{"params": list(stack.parameters()), "weight_decay": cfg.weight_decay}], cfg.lr)
    sched = epoch_schedule(opt, cfg.schedule, cfg.epochs, cfg.gamma)
    weight = class_weights(y_arr[split.train_idx], n_classes, cfg.class_weight)
    weight = None if weight is None else weight.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    trackers = [BestTracker(cfg.patience, cfg.report_epoch) for _ in train]
    histories: list[list[dict[str, Any]]] = [[] for _ in train]
    for epoch in range(cfg.epochs):
        live, pos = stack.live(trackers)
        if not live:
            break
        lr = float(opt.param_groups[0]["lr"])
        totals = _train_epoch(stack, live, train, y_arr, split, cfg, opt, weight, gen)
        sched.step()
        preds = _val_predictions(val, split.val_idx, live, stack.logits, max(cfg.batch_size, 1024))
        _record_epoch(stack, live, pos, epoch, lr, totals, preds, split, len(split.train_idx), trackers, histories)
        log.debug("probes epoch %d: %d/%d still training", epoch, sum(not t.stopped for t in trackers), len(train))
    return _fitted(stack, inits, train, cfg, n_classes, trackers, histories, (time.perf_counter() - t0) / len(train))


def _val_predictions(
    val: list[Inputs] | None,
    val_idx: np.ndarray | None,
    live: dict[int, list[int]],
    logits_of: Callable[[list[Inputs], int, list[int], np.ndarray], torch.Tensor],
    batch_size: int,
) -> dict[int, np.ndarray] | None:
    """Predicted classes of the validation rows per width group, {d: (n_val, G_d)}; None without validation."""
    if val is None or val_idx is None:
        return None
    out: dict[int, list[torch.Tensor]] = {d: [] for d in live}
    with torch.inference_mode():
        for start in range(0, len(val_idx), batch_size):
            idx = val_idx[start : start + batch_size]
            for d, gs in live.items():
                out[d].append(logits_of(val, d, gs, idx).argmax(2).cpu())
    return {d: torch.cat(parts).numpy() for d, parts in out.items()}
