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
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads.probe.config import HeadConfig
from heads.probe.estimator import HeadClassifier
from heads.probe.fitting import FittedHead, class_weights, epoch_schedule
from heads.probe.modules import Inputs, InputShape, build_module, fit_input_stats
from heads.protocol import BestTracker, scores
from heads.protocol.optim import adamw

__all__ = ["Member", "fit_stacked", "schedule_lrs", "members_per_stack", "STACK_BYTES_CPU"]


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
    """The learning rate of every epoch, as ``epoch_schedule`` steps it for a single head."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = epoch_schedule(opt, cfg.schedule, cfg.epochs, cfg.gamma)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return lrs


def _device_arrays(inputs: Inputs, device: torch.device) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.float32) for a in inputs.arrays]


@dataclass
class _StackState:
    """The stacked members still training: their parameters and buffers (M_alive, ...), AdamW, and which members
    (indices into ``members``) they are, in stack order."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    alive: list[int]


def _initial_modules(
    cfg: HeadConfig,
    shape: InputShape,
    train_inputs: Sequence[Inputs],
    members: Sequence[Member],
    n_classes: int,
    device: torch.device,
) -> list[nn.Module]:
    """Every member's module with the init a single HeadClassifier of its seed draws (input statistics of its own
    fitting rows), on the device."""
    modules: list[nn.Module] = []
    for m in members:
        torch.manual_seed(m.seed)  # the init a single HeadClassifier draws
        module = build_module(cfg.replace(seed=m.seed), shape, n_classes)
        if cfg.standardize:
            fit_input_stats(module, train_inputs[m.feature], m.fit_rows)
        modules.append(module.to(device))
    return modules


def _member_weights(
    cfg: HeadConfig, members: Sequence[Member], y_train: np.ndarray, n_classes: int, device: torch.device
) -> torch.Tensor:
    """(M, C) class weights of each member's fitting rows (ones without ``class_weight``)."""
    weights = []
    for m in members:
        w = class_weights(y_train[m.fit_rows], n_classes, cfg.class_weight)
        weights.append(torch.ones(n_classes) if w is None else w)
    return torch.stack(weights).to(device)


def _train_epoch(
    st: _StackState,
    batched: Callable[..., torch.Tensor],
    base: nn.Module,
    train_x: list[torch.Tensor],
    y_tr: torch.Tensor,
    cw: torch.Tensor,
    members: Sequence[Member],
    feats: torch.Tensor,
    gens: list[torch.Generator],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """One epoch of every live member over its own rows in its own seeded order; (A,) summed loss x rows."""
    base.train()
    # every member's permutation of its own rows, cut into batches; members with fewer rows are padded
    orders = [
        members[i].fit_rows[torch.randperm(len(members[i].fit_rows), generator=gens[i]).numpy()] for i in st.alive
    ]
    order_idx, order_mask = _padded(orders)  # (A, longest): rows, 1 where real (members may differ in rows)
    totals = torch.zeros(len(st.alive), device=device)
    for b in range(-(-order_idx.shape[1] // batch_size)):
        cut = slice(b * batch_size, (b + 1) * batch_size)
        idx_t = torch.from_numpy(order_idx[:, cut]).to(device)
        mask_t = torch.from_numpy(order_mask[:, cut]).to(device)
        xs = [x[feats, idx_t] for x in train_x]  # (A, b, *row_shape) gathered on the device
        logits = batched(st.params, st.buffers, *xs)  # (A, b, C)
        yb = y_tr[idx_t]
        ce = F.cross_entropy(logits.permute(0, 2, 1), yb, reduction="none")  # (A, b)
        wrow = torch.gather(cw[st.alive], 1, yb) * mask_t
        per_member = (ce * wrow).sum(1) / wrow.sum(1).clamp_min(1e-12)  # nn.CrossEntropyLoss(weight)'s mean
        st.opt.zero_grad(set_to_none=True)
        per_member.sum().backward()  # a sum: every member's gradient is its own
        st.opt.step()
        totals += per_member.detach() * mask_t.sum(1)
    return totals


def _validate_epoch(
    st: _StackState,
    batched: Callable[..., torch.Tensor],
    base: nn.Module,
    val_x: list[torch.Tensor],
    y_val: np.ndarray,
    members: Sequence[Member],
    feats: torch.Tensor,
    device: torch.device,
    epoch: int,
    lr: float,
    totals: torch.Tensor,
    trackers: list[BestTracker],
    histories: list[list[dict[str, Any]]],
) -> list[int]:
    """Score every live member on its own validation rows, record its epoch and early stopping; the stack positions
    of the members that stopped."""
    base.eval()
    stopped = []
    with torch.inference_mode():
        preds = _predict_all(
            batched, st.params, st.buffers, val_x, feats, [members[i].val_rows for i in st.alive], device
        )
        for a, i in enumerate(st.alive):
            m = members[i]
            acc = f1 = None
            if len(m.val_rows):
                acc, f1 = scores(y_val[m.val_rows], preds[a])
            histories[i].append(
                {
                    "epoch": epoch,
                    "train_loss": float(totals[a]) / max(1, len(m.fit_rows)),
                    "val_accuracy": acc,
                    "val_f1_macro": f1,
                    "lr": lr,
                }
            )
            if trackers[i].update(epoch, f1, lambda a=a: _member_state(st.params, a)):
                stopped.append(a)
    return stopped


def _retire(
    st: _StackState,
    finished: list[int],
    trackers: list[BestTracker],
    best_state: list[dict[str, torch.Tensor] | None],
    cfg: HeadConfig,
    on_done: Callable[[int], None] | None,
) -> None:
    """Keep the best weights of the members at stack positions ``finished`` and take them out of the stack."""
    for a in finished:
        i = st.alive[a]
        best_state[i] = trackers[i].state or _member_state(st.params, a)
        if on_done is not None:
            on_done(i)
    keep = [a for a in range(len(st.alive)) if a not in set(finished)]
    if keep and len(keep) < len(st.alive):
        st.params, st.buffers, st.opt = _compact(st.params, st.buffers, st.opt, keep, cfg)
    st.alive = [st.alive[a] for a in keep]


STACK_BYTES_CPU = 32 << 20
"""On CPU, a stack's parameters, gradients and AdamW moments (16 bytes a parameter) are kept under this many bytes:
a larger stack streams its weights from memory on every step and loses to smaller stacks, whose weights stay in
cache. Measured by ``benchmarks/stack.py --sizes`` (BENCHMARKS.md): 21 MLPs of hidden 256 (32 MiB) or conv heads
(22 MiB) are fastest in one stack; MLPs of hidden 2048 (12 MiB each) are fastest one or two at a time (3 at 36 MiB
already slower, 21 at 255 MiB 2.8x slower). On CUDA every member is stacked."""


def members_per_stack(cfg: HeadConfig, shape: InputShape, n_classes: int, device: torch.device) -> int | None:
    """How many members one stack holds: None (all) on CUDA, else as many as STACK_BYTES_CPU allows (at least 1)."""
    if device.type == "cuda":
        return None
    with torch.random.fork_rng(devices=[]):
        n_params = sum(p.numel() for p in build_module(cfg, shape, n_classes).parameters())
    return max(1, STACK_BYTES_CPU // max(1, 16 * n_params))


def fit_stacked(
    cfg: HeadConfig,
    train_inputs: Sequence[Inputs],
    val_inputs: Sequence[Inputs],
    members: Sequence[Member],
    y_train: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    device: torch.device,
    on_done: Callable[[int], None] | None = None,
    stack_size: int | None = None,
) -> list[HeadClassifier]:
    """Train every member (a dense or pair head ``cfg.head``; all inputs of one shape); one HeadClassifier each.

    ``train_inputs[f]`` / ``val_inputs[f]`` hold feature ``f`` for all rows of the training / validation split,
    ``y_train`` / ``y_val`` their labels. ``on_done(m)`` is called as member ``m`` finishes. ``stack_size`` members
    train together at most (None: all; see :func:`members_per_stack`); the features move to the device once.
    """
    t0 = time.perf_counter()
    # Inputs on the device once: per array (pair heads have two), stacked over features: (F, n, *row_shape)
    train_x = [torch.stack(ts) for ts in zip(*(_device_arrays(i, device) for i in train_inputs))]
    val_x = (
        train_x
        if val_inputs is train_inputs
        else [torch.stack(ts) for ts in zip(*(_device_arrays(i, device) for i in val_inputs))]
    )
    size = len(members) if stack_size is None else max(1, stack_size)
    fitted: list[FittedHead] = []
    for start in range(0, len(members), size):
        part = list(range(start, min(len(members), start + size)))

        def done(i: int, part: list[int] = part) -> None:
            if on_done is not None:
                on_done(part[i])

        fitted += _fit_stack(
            cfg, train_inputs, train_x, val_x, [members[i] for i in part], y_train, y_val, n_classes, device, done
        )
    seconds = (time.perf_counter() - t0) / max(1, len(members))
    return [
        HeadClassifier.from_fit(cfg.replace(seed=m.seed), dataclasses.replace(fit, train_seconds=seconds))
        for m, fit in zip(members, fitted)
    ]


def _fit_stack(
    cfg: HeadConfig,
    train_inputs: Sequence[Inputs],
    train_x: list[torch.Tensor],
    val_x: list[torch.Tensor],
    members: Sequence[Member],
    y_train: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    device: torch.device,
    on_done: Callable[[int], None] | None,
) -> list[FittedHead]:
    """One stack of members, trained together to the end; their training seconds are left to the caller (0)."""
    shape = train_inputs[0].shape
    modules = _initial_modules(cfg, shape, train_inputs, members, n_classes, device)
    base = copy.deepcopy(modules[0]).to("meta")
    stacked, buffers = torch.func.stack_module_state(modules)  # (M, ...) each
    # Linear weights held as (M, in, out): the layout their vmapped gradients come in, so autograd and the fused
    # AdamW use them as they are instead of copying every weight gradient on every step (27% of a hidden-2048 stack)
    held = _transposed(stacked)
    params = {
        k: (v.detach().transpose(1, 2).contiguous() if k in held else v.detach().clone()).requires_grad_(True)
        for k, v in stacked.items()
    }

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *x: torch.Tensor) -> torch.Tensor:
        # one member's parameters (inside vmap) as its module holds them: linear weights back to (out, in) views
        return torch.func.functional_call(base, ({k: v.T if k in held else v for k, v in p.items()}, b), x)

    batched = torch.vmap(call, in_dims=(0, 0, *([0] * len(train_x))), randomness="different")
    cw = _member_weights(cfg, members, y_train, n_classes, device)
    y_tr = torch.from_numpy(y_train).to(device)
    gens = [torch.Generator().manual_seed(m.seed) for m in members]
    lrs = schedule_lrs(cfg)
    trackers = [BestTracker(cfg.patience, cfg.report_epoch) for _ in members]
    histories: list[list[dict[str, Any]]] = [[] for _ in members]
    st = _StackState(
        params,
        buffers,
        adamw([{"params": list(params.values()), "weight_decay": cfg.weight_decay}], cfg.lr),
        list(range(len(members))),
    )
    feature_of = torch.tensor([m.feature for m in members], device=device)
    best_state: list[dict[str, torch.Tensor] | None] = [None] * len(members)
    for epoch in range(cfg.epochs):
        if not st.alive:
            break
        for group in st.opt.param_groups:
            group["lr"] = lrs[epoch]
        feats = feature_of[st.alive][:, None]
        totals = _train_epoch(st, batched, base, train_x, y_tr, cw, members, feats, gens, cfg.batch_size, device)
        stopped = _validate_epoch(
            st, batched, base, val_x, y_val, members, feats, device, epoch, lrs[epoch], totals, trackers, histories
        )
        if stopped or epoch == cfg.epochs - 1:
            _retire(
                st,
                stopped if epoch < cfg.epochs - 1 else list(range(len(st.alive))),
                trackers,
                best_state,
                cfg,
                on_done,
            )
    fitted = []
    for i, module in enumerate(modules):
        state = best_state[i]
        if state is not None:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(state[name])
        fitted.append(FittedHead(module, n_classes, shape, histories[i], trackers[i].best_epoch, 0.0))
    return fitted


def _transposed(params: dict[str, torch.Tensor]) -> set[str]:
    """The stacked linear weights (M, out, in): held transposed, as (M, in, out)."""
    return {k for k, v in params.items() if v.dim() == 3 and k.endswith("weight")}


def _member_state(params: dict[str, torch.Tensor], a: int) -> dict[str, torch.Tensor]:
    """Stack member ``a``'s parameters, copied, in its module's layout."""
    held = _transposed(params) if params else set()
    return {k: (v[a].detach().T if k in held else v[a].detach()).clone() for k, v in params.items()}


def _padded(orders: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row lists of possibly different lengths as one (members, longest) index array (padded with row 0) and a
    float32 mask of the real entries."""
    longest = max(len(o) for o in orders)
    idx = np.zeros((len(orders), longest), dtype=np.int64)
    mask = np.zeros((len(orders), longest), dtype=np.float32)
    for a, o in enumerate(orders):
        idx[a, : len(o)], mask[a, : len(o)] = o, 1.0
    return idx, mask


def _predict_all(
    batched: Callable[..., torch.Tensor],
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    val_x: list[torch.Tensor],
    feats: torch.Tensor,
    rows: Sequence[np.ndarray],
    device: torch.device,
    batch: int = 2048,
) -> list[np.ndarray]:
    """Every stack member's predicted classes of its own validation rows (eval mode), in one batched pass."""
    if not any(len(r) for r in rows):
        return [np.zeros(0, dtype=np.int64) for _ in rows]
    idx, _ = _padded([r if len(r) else np.zeros(1, dtype=np.int64) for r in rows])
    out = []
    for start in range(0, idx.shape[1], batch):
        idx_t = torch.from_numpy(idx[:, start : start + batch]).to(device)
        out.append(batched(params, buffers, *[x[feats, idx_t] for x in val_x]).argmax(-1).cpu())
    pred = torch.cat(out, dim=1).numpy()  # (A, longest)
    return [pred[a, : len(r)] for a, r in enumerate(rows)]


def _compact(
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    keep: list[int],
    cfg: HeadConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.optim.Optimizer]:
    """The stack without the members that stopped, AdamW's moments carried over."""
    idx = torch.tensor(keep, device=next(iter(params.values())).device)
    new_params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in params.items()}
    new_buffers = {k: v[idx].clone() for k, v in buffers.items()}
    new_opt = adamw(
        [{"params": list(new_params.values()), "weight_decay": cfg.weight_decay}], opt.param_groups[0]["lr"]
    )
    for old, new in zip(params.values(), new_params.values()):
        state = opt.state.get(old)
        if state:
            new_opt.state[new] = {
                k: (v[idx].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()
            }
    return new_params, new_buffers, new_opt


def bundle_key(cfg: HeadConfig, shape: InputShape) -> tuple[str, str, tuple[tuple[int, ...], ...]]:
    """Members with the same key train in one stack (one architecture: head, how a pair head merges layers, and
    input shape)."""
    return (cfg.head, cfg.tower_merge, shape.shapes)
