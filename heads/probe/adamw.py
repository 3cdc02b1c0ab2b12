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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embstore.errors import ConfigError
from heads.probe.config import HeadConfig
from heads.probe.estimator import (
    HeadClassifier, check_labels, class_weights, epoch_batches, make_scheduler, resolve_device, resolve_n_classes,
)
from heads.probe.modules import Inputs, LinearHead, as_inputs, build_module
from heads.protocol import BestTracker, make_split, scores

__all__ = ["fit_linear_probes"]

log = logging.getLogger(__name__)


def _validate(features: list[Any], y: Any, val_features: list[Any] | None, y_val: Any
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
            raise ConfigError(f"val_features[{g}] must be {t.shape.describe()} with the same rows as the other "
                              f"validation arrays; got {v.shape.describe()} with {len(v)} rows.")
    return train, labels, val, check_labels(y_val, len(val[0]), "y_val")


def fit_linear_probes(features: list[np.ndarray], y: Any, val_features: list[np.ndarray] | None, y_val: Any,
                      config: HeadConfig, n_classes: int | None = None) -> list[HeadClassifier]:
    """Fit one linear head per feature array in a single pass; returns one fitted HeadClassifier per probe.

    ``features[g]`` is (n, d_g) (or (n, layers, hidden), flattened), all on the same n rows; ``y`` (n,) int class
    indices; ``val_features``/``y_val`` likewise for validation, or None to carve it as HeadClassifier does.
    ``config`` gives the training settings (its head is taken as linear).
    """
    cfg, t0 = config.replace(head="linear"), time.perf_counter()
    train, y_arr, val_given, yv = _validate(features, y, val_features, y_val)
    n_classes = resolve_n_classes(y_arr, yv, n_classes)
    split = make_split(y_arr, yv, cfg)
    val = train if split.val_is_train else val_given
    device = resolve_device(cfg)
    G = len(train)

    # The very init a single HeadClassifier draws: reseed, then build the same module, once per probe.
    inits: list[LinearHead] = []
    for t in train:
        torch.manual_seed(cfg.seed)
        module = build_module(cfg, t.shape, n_classes)
        if not isinstance(module, LinearHead):  # build_module returns LinearHead for head='linear'
            raise TypeError(f"expected LinearHead, got {type(module).__name__}")
        if cfg.standardize:
            module.standardize.fit_stats(t, split.train_idx)
        inits.append(module)
    groups: dict[int, list[int]] = {}  # width d -> probe indices, in input order
    for g, m in enumerate(inits):
        groups.setdefault(m.linear.in_features, []).append(g)
    # Weights as (G_d, d, C) so the batched logits are one einsum; AdamW does not care about the layout.
    W = {d: nn.Parameter(torch.stack([inits[g].linear.weight.detach().T for g in gs]).to(device))
         for d, gs in groups.items()}
    B = {d: nn.Parameter(torch.stack([inits[g].linear.bias.detach() for g in gs]).to(device))
         for d, gs in groups.items()}
    # per-probe standardisation (identity when off), as (G_d, d) to broadcast over the batch
    shift = {d: torch.stack([inits[g].standardize.shift for g in gs]).to(device) for d, gs in groups.items()}
    scale = {d: torch.stack([inits[g].standardize.scale for g in gs]).to(device) for d, gs in groups.items()}
    params = [p for d in groups for p in (W[d], B[d])]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg)
    weight = class_weights(y_arr[split.train_idx], n_classes, cfg)
    weight = None if weight is None else weight.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    trackers = [BestTracker(cfg.patience) for _ in range(G)]
    histories: list[list[dict[str, Any]]] = [[] for _ in range(G)]

    def batch_x(inputs: list[Inputs], gs: list[int], idx: np.ndarray) -> torch.Tensor:
        x = torch.stack([inputs[g].batch(idx, device)[0].flatten(1) for g in gs], dim=1)  # (b, G_d, d)
        d = x.shape[2]
        return (x - shift[d][sel[d]]) * scale[d][sel[d]]  # sel: the live probes of this epoch

    for epoch in range(cfg.epochs):
        # Probes that stopped early are frozen at their best: leave them out of the batches (their weights
        # may still drift under AdamW's momentum, but only their best snapshot is kept).
        live_pos = {d: [j for j, g in enumerate(gs) if not trackers[g].stopped] for d, gs in groups.items()}
        live_pos = {d: js for d, js in live_pos.items() if js}
        live = {d: [groups[d][j] for j in js] for d, js in live_pos.items()}
        sel = {d: torch.tensor(js, device=device) for d, js in live_pos.items()}
        if not live:
            break
        lr = float(opt.param_groups[0]["lr"])
        totals = {d: torch.zeros(len(gs), device=device) for d, gs in live.items()}
        for idx in epoch_batches(split.train_idx, cfg.batch_size, gen):
            yb = torch.from_numpy(y_arr[idx]).to(device)
            # Weighted mean as nn.CrossEntropyLoss takes it: sum(w_y * loss) / sum(w_y).
            denom = weight[yb].sum() if weight is not None else torch.tensor(float(len(idx)), device=device)
            loss = torch.zeros((), device=device)
            for d, gs in live.items():
                logits = torch.einsum("bgd,gdc->bgc", batch_x(train, gs, idx), W[d][sel[d]]) + B[d][sel[d]]  # (b, G_live, C)
                per_row = F.cross_entropy(logits.permute(0, 2, 1), yb[:, None].expand(-1, len(gs)), weight=weight,
                                          reduction="none")  # (b, G_d)
                per_probe = per_row.sum(0) / denom  # (G_d,)
                loss = loss + per_probe.sum()  # a sum keeps every probe's gradient its own
                totals[d] += per_probe.detach() * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        preds = _val_predictions(val, split.val_idx, live, sel, W, B, batch_x, max(cfg.batch_size, 1024))
        for d, gs in live.items():
            for jj, g in enumerate(gs):
                j = live_pos[d][jj]  # position of probe g in its width group's W/B
                if trackers[g].stopped:  # frozen at its best: later epochs must not touch its record
                    continue
                acc = f1 = None
                if preds is not None and split.y_val is not None and split.val_idx is not None:
                    acc, f1 = scores(split.y_val[split.val_idx], preds[d][:, jj])
                histories[g].append({"epoch": epoch, "train_loss": float(totals[d][jj]) / len(split.train_idx),
                                     "val_accuracy": acc, "val_f1_macro": f1, "lr": lr})
                trackers[g].update(epoch, f1, lambda d=d, j=j: (W[d][j].detach().clone(), B[d][j].detach().clone()))
        log.debug("probes epoch %d: %d/%d still training", epoch, sum(not t.stopped for t in trackers), G)

    seconds = (time.perf_counter() - t0) / G
    fitted: list[HeadClassifier | None] = [None] * G
    for d, gs in groups.items():
        for j, g in enumerate(gs):
            w, b = trackers[g].state or (W[d][j].detach(), B[d][j].detach())
            module = inits[g]
            with torch.no_grad():
                module.linear.weight.copy_(w.T)
                module.linear.bias.copy_(b)
            est = HeadClassifier(cfg)
            est._set_fitted(module.to(device), n_classes, train[g].shape, histories[g], trackers[g].best_epoch,
                            seconds)
            fitted[g] = est
    return [est for est in fitted if est is not None]


def _val_predictions(val: list[Inputs] | None, val_idx: np.ndarray | None, live: dict[int, list[int]],
                     sel: dict[int, torch.Tensor], W: dict[int, nn.Parameter], B: dict[int, nn.Parameter],
                     batch_x: Any, batch_size: int
                     ) -> dict[int, np.ndarray] | None:
    """Predicted classes of the validation rows per width group, {d: (n_val, G_d)}; None without validation."""
    if val is None or val_idx is None:
        return None
    out: dict[int, list[torch.Tensor]] = {d: [] for d in live}
    with torch.inference_mode():
        for start in range(0, len(val_idx), batch_size):
            idx = val_idx[start:start + batch_size]
            for d, gs in live.items():
                logits = torch.einsum("bgd,gdc->bgc", batch_x(val, gs, idx), W[d][sel[d]]) + B[d][sel[d]]
                out[d].append(logits.argmax(2).cpu())
    return {d: torch.cat(parts).numpy() for d, parts in out.items()}
