"""Non-linear heads of one architecture and input shape trained together as one stacked model.

Members (configuration x seed x fold) of a bundle share the architecture and the input shape; their weights are
stacked with ``torch.func.stack_module_state`` and one ``vmap`` of ``functional_call`` computes every member's
batch (PyTorch's model-ensembling recipe). Each member keeps what ``HeadClassifier.fit`` would give it: its seed's
initial weights, its own rows and seeded batch order, the training rows' input statistics, AdamW (elementwise, so
stacking changes nothing), the epoch schedule, and its own early stopping with the best epoch restored; a member
that stops leaves the stack. With dropout 0 a member equals its single fit up to float rounding; with dropout the
masks come from one generator for the whole stack, so a member's masks depend on its bundle (still deterministic
for the same sweep).

Every configuration's features are moved to the device once, as float32, and every minibatch is gathered there.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads.probe.config import HeadConfig
from heads.probe.estimator import HeadClassifier, class_weights, make_scheduler
from heads.probe.modules import InputShape, Inputs, build_module, fit_input_stats
from heads.protocol import BestTracker, scores

__all__ = ["Member", "fit_stacked", "schedule_lrs"]


@dataclass(frozen=True)
class Member:
    """One head to train: features ``feature`` (an index into the bundle's feature list), rows and seed."""

    feature: int
    """Index into ``train_inputs`` / ``val_inputs``."""
    seed: int
    fit_rows: np.ndarray
    """Rows of the training inputs to fit on (sorted)."""
    val_rows: np.ndarray
    """Rows of the validation inputs for early stopping (sorted)."""


def schedule_lrs(cfg: HeadConfig) -> list[float]:
    """The learning rate of every epoch, as ``make_scheduler`` steps it."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(float(opt.param_groups[0]["lr"]))
        if sched is not None:
            opt.step()
            sched.step()
    return lrs


def _device_arrays(inputs: Inputs, device: torch.device) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.float32) for a in inputs.arrays]


def fit_stacked(cfg: HeadConfig, train_inputs: Sequence[Inputs], val_inputs: Sequence[Inputs], members: Sequence[Member],
                y_train: np.ndarray, y_val: np.ndarray, n_classes: int, device: torch.device,
                on_done: Callable[[int], None] | None = None) -> list[HeadClassifier]:
    """Train every member (a dense or pair head ``cfg.head``; all inputs of one shape); one HeadClassifier each.

    ``train_inputs[f]`` / ``val_inputs[f]`` hold feature ``f`` for all rows of the training / validation split,
    ``y_train`` / ``y_val`` their labels. ``on_done(m)`` is called as member ``m`` finishes.
    """
    t0 = time.perf_counter()
    shape = train_inputs[0].shape
    M = len(members)
    # Inputs on the device once: per array (pair heads have two), stacked over features: (F, n, *row_shape)
    train_x = [torch.stack(ts) for ts in zip(*(_device_arrays(i, device) for i in train_inputs))]
    val_x = train_x if val_inputs is train_inputs else \
        [torch.stack(ts) for ts in zip(*(_device_arrays(i, device) for i in val_inputs))]
    y_tr = torch.from_numpy(y_train).to(device)
    y_va = y_val

    modules: list[nn.Module] = []
    for m in members:
        torch.manual_seed(m.seed)  # the init a single HeadClassifier draws
        module = build_module(cfg.replace(seed=m.seed), shape, n_classes)
        if cfg.standardize:
            fit_input_stats(module, train_inputs[m.feature], m.fit_rows)
        modules.append(module.to(device))
    base = copy.deepcopy(modules[0]).to("meta")
    params, buffers = torch.func.stack_module_state(modules)  # (M, ...) each; params are new leaves

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), x)

    n_in = len(train_x)
    batched = torch.vmap(call, in_dims=(0, 0, *([0] * n_in)), randomness="different")
    weights = []
    for m in members:
        w = class_weights(y_train[m.fit_rows], n_classes, cfg)
        weights.append(torch.ones(n_classes) if w is None else w)
    cw = torch.stack(weights).to(device)  # (M, C)
    gens = [torch.Generator().manual_seed(m.seed) for m in members]
    lrs = schedule_lrs(cfg)
    trackers = [BestTracker(cfg.patience) for _ in members]
    histories: list[list[dict[str, Any]]] = [[] for _ in members]
    alive = list(range(M))  # members still training, in stack order
    opt: torch.optim.Optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    feature_of = torch.tensor([m.feature for m in members], device=device)
    best_state: list[dict[str, torch.Tensor] | None] = [None] * M

    for epoch in range(cfg.epochs):
        if not alive:
            break
        for group in opt.param_groups:
            group["lr"] = lrs[epoch]
        base.train()
        # every member's permutation of its own rows, cut into batches; members with fewer rows are padded
        orders = [members[i].fit_rows[torch.randperm(len(members[i].fit_rows), generator=gens[i]).numpy()] for i in alive]
        order_idx, order_mask = _padded(orders)  # (A, longest): rows, 1 where real (members may differ in rows)
        n_batches = -(-order_idx.shape[1] // cfg.batch_size)
        totals = torch.zeros(len(alive), device=device)
        feats = feature_of[alive][:, None]
        for b in range(n_batches):
            cut = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            idx_t = torch.from_numpy(order_idx[:, cut]).to(device)
            mask_t = torch.from_numpy(order_mask[:, cut]).to(device)
            xs = [x[feats, idx_t] for x in train_x]  # (A, b, *row_shape) gathered on the device
            logits = batched(params, buffers, *xs)  # (A, b, C)
            yb = y_tr[idx_t]
            ce = F.cross_entropy(logits.permute(0, 2, 1), yb, reduction="none")  # (A, b)
            wrow = torch.gather(cw[alive], 1, yb) * mask_t
            per_member = (ce * wrow).sum(1) / wrow.sum(1).clamp_min(1e-12)  # nn.CrossEntropyLoss(weight)'s mean
            opt.zero_grad(set_to_none=True)
            per_member.sum().backward()  # a sum: every member's gradient is its own
            opt.step()
            totals += per_member.detach() * mask_t.sum(1)
        base.eval()
        stopped = []
        with torch.inference_mode():
            preds = _predict_all(batched, params, buffers, val_x, feats, [members[i].val_rows for i in alive], device)
            for a, i in enumerate(alive):
                m = members[i]
                acc = f1 = None
                if len(m.val_rows):
                    acc, f1 = scores(y_va[m.val_rows], preds[a])
                histories[i].append({"epoch": epoch, "train_loss": float(totals[a]) / max(1, len(m.fit_rows)),
                                     "val_accuracy": acc, "val_f1_macro": f1, "lr": lrs[epoch]})
                if trackers[i].update(epoch, f1, lambda a=a: {k: v[a].detach().clone() for k, v in params.items()}):
                    stopped.append(a)
        if stopped or epoch == cfg.epochs - 1:
            finished = stopped if epoch < cfg.epochs - 1 else list(range(len(alive)))
            for a in finished:
                i = alive[a]
                best_state[i] = trackers[i].state or {k: v[a].detach().clone() for k, v in params.items()}
                if on_done is not None:
                    on_done(i)
            keep = [a for a in range(len(alive)) if a not in set(finished)]
            if keep and len(keep) < len(alive):
                params, buffers, opt = _compact(params, buffers, opt, keep, cfg)
            alive = [alive[a] for a in keep]

    seconds = (time.perf_counter() - t0) / max(1, M)
    fitted = []
    for i, module in enumerate(modules):
        state = best_state[i]
        if state is not None:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(state[name])
        est = HeadClassifier(cfg.replace(seed=members[i].seed))
        est._set_fitted(module.eval(), n_classes, shape, histories[i], trackers[i].best_epoch, seconds)
        fitted.append(est)
    return fitted


def _padded(orders: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row lists of possibly different lengths as one (members, longest) index array (padded with row 0) and a
    float32 mask of the real entries."""
    longest = max(len(o) for o in orders)
    idx = np.zeros((len(orders), longest), dtype=np.int64)
    mask = np.zeros((len(orders), longest), dtype=np.float32)
    for a, o in enumerate(orders):
        idx[a, :len(o)], mask[a, :len(o)] = o, 1.0
    return idx, mask


def _predict_all(batched: Callable[..., torch.Tensor], params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 val_x: list[torch.Tensor], feats: torch.Tensor, rows: Sequence[np.ndarray], device: torch.device,
                 batch: int = 2048) -> list[np.ndarray]:
    """Every stack member's predicted classes of its own validation rows (eval mode), in one batched pass."""
    if not any(len(r) for r in rows):
        return [np.zeros(0, dtype=np.int64) for _ in rows]
    idx, _ = _padded([r if len(r) else np.zeros(1, dtype=np.int64) for r in rows])
    out = []
    for start in range(0, idx.shape[1], batch):
        idx_t = torch.from_numpy(idx[:, start:start + batch]).to(device)
        out.append(batched(params, buffers, *[x[feats, idx_t] for x in val_x]).argmax(-1).cpu())
    pred = torch.cat(out, dim=1).numpy()  # (A, longest)
    return [pred[a, :len(r)] for a, r in enumerate(rows)]


def _compact(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
             keep: list[int], cfg: HeadConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.optim.Optimizer]:
    """The stack without the members that stopped, AdamW's moments carried over."""
    idx = torch.tensor(keep, device=next(iter(params.values())).device)
    new_params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in params.items()}
    new_buffers = {k: v[idx].clone() for k, v in buffers.items()}
    new_opt = torch.optim.AdamW(list(new_params.values()), lr=opt.param_groups[0]["lr"], weight_decay=cfg.weight_decay)
    for old, new in zip(params.values(), new_params.values()):
        state = opt.state.get(old)
        if state:
            new_opt.state[new] = {k: (v[idx].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}
    return new_params, new_buffers, new_opt


def bundle_key(cfg: HeadConfig, shape: InputShape) -> tuple[str, tuple[tuple[int, ...], ...]]:
    """Members with the same key train in one stack."""
    return (cfg.head, shape.shapes)
