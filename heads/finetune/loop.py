"""One fine-tuning round's training machinery: optimiser groups, the accelerate epoch loop, early stopping.

- :func:`param_groups`: the backbone at ``lr`` and the new classifier at ``head_lr`` (a random head needs a far
  larger step than pretrained weights), no weight decay on biases and LayerNorm weights.
- :class:`RoundTrainer`: ``Accelerator.prepare`` of model, optimizer, schedule and loaders; one epoch with
  gradient clipping and a tqdm bar (running loss, examples/s); gathered predictions.
- :class:`EarlyStopping`: the best validation epoch and its weights, with two guards for small data sets.
- :func:`importance_pruning`: remove the least important heads (Michel et al. 2019).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from embstore.errors import ConfigError
from embstore.surgery import head_importance, heads_to_prune, prune_heads
from heads.finetune.config import FinetuneConfig
from heads.training.schedule import adamw, make_scheduler

__all__ = ["EarlyStopping", "RoundTrainer", "importance_pruning", "param_groups", "state_copy"]

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: the backbone at ``lr``, the classifier at ``head_lr``; no decay on biases and LayerNorm
    weights (as BERT and the Trainer do). Backbone groups come first."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(name.startswith("head."), p.ndim >= 2)].append(p)
    return [{"params": params, "lr": head_lr if head else lr, "weight_decay": weight_decay if decay else 0.0,
             "head": head} for (head, decay), params in groups.items() if params]


class RoundTrainer:
    """The accelerate objects for one model shape; rebuilt after pruning changes parameter shapes."""

    def __init__(self, config: FinetuneConfig, model: nn.Module, loaders: dict[str, DataLoader[Any]],
                 done_steps: int = 0, show_progress: bool = False) -> None:
        from accelerate import Accelerator

        optim = config.optim
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=optim.mixed_precision, gradient_accumulation_steps=optim.grad_accum,
                               cpu=cpu)
        per_epoch = math.ceil(len(loaders["train"]) / optim.grad_accum)
        total = per_epoch * optim.epochs
        warmup = int(optim.warmup_ratio * total)
        groups = param_groups(model, optim.lr, config.head_lr, optim.weight_decay)
        if not groups:
            raise ConfigError("Every parameter is frozen (freeze covers all layers and there is nothing to train); "
                              "freeze fewer layers, e.g. 'all-but-last'.")
        self.head_group = next(i for i, g in enumerate(groups) if g["head"])
        opt = adamw([{k: v for k, v in g.items() if k != "head"} for g in groups], optim.lr)
        sched = make_scheduler(opt, optim.schedule, warmup=warmup, total=total, per_epoch=per_epoch,
                               gamma=config.gamma, done_steps=done_steps)
        self.steps, self.max_grad_norm, self.show_progress = done_steps, config.max_grad_norm, show_progress
        self.model, self.opt, self.train, self.sched, self.val, self.eval = self.acc.prepare(
            model, opt, loaders["train"], sched, loaders["val"], loaders["eval"])

    def epoch(self, epoch: int) -> float:
        """One pass over the training rows (a tqdm bar with the running loss and examples/s); the mean loss."""
        from tqdm.auto import tqdm

        self.model.train()
        losses: list[float] = []
        rows, loss_sum, t0 = 0, 0.0, time.perf_counter()
        bar = tqdm(self.train, desc=f"finetune epoch {epoch}", leave=False,
                   disable=not (self.show_progress and self.acc.is_local_main_process))
        for batch in bar:
            with self.acc.accumulate(self.model):
                labels = batch.pop("labels")
                loss = nn.functional.cross_entropy(self.model(**batch), labels)
                self.acc.backward(loss)
                if self.acc.sync_gradients and self.max_grad_norm:
                    self.acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
                if self.acc.sync_gradients:
                    self.steps += 1
            losses.append(float(loss.detach()))
            loss_sum += losses[-1]  # a running sum: the bar's mean costs O(1) per step, not O(steps)
            rows += int(labels.shape[0]) * self.acc.num_processes
            bar.set_postfix(loss=f"{loss_sum / len(losses):.4f}", ex_s=f"{rows / max(time.perf_counter() - t0, 1e-9):.1f}")
        bar.close()
        return float(np.mean(losses)) if losses else float("nan")

    def predict(self, loader: Any) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_pred) over a prepared loader, gathered across processes."""
        self.model.eval()
        ys, ps = [], []
        with torch.no_grad():
            for batch in loader:
                labels = batch.pop("labels")
                pred = self.model(**batch).argmax(-1)
                pred, labels = self.acc.gather_for_metrics((pred, labels))
                ys.append(labels.cpu().numpy())
                ps.append(pred.cpu().numpy())
        return np.concatenate(ys), np.concatenate(ps)

    def lr(self) -> tuple[float | None, float]:
        """(backbone lr, classifier lr) after the last step; the backbone's is None when all of it is frozen."""
        last = self.sched.get_last_lr()
        return (float(last[0]) if self.head_group > 0 else None), float(last[self.head_group])


def importance_pruning(model: Any, loader: DataLoader[Any], config: FinetuneConfig) -> dict[int, list[int]]:
    """Prune the least important heads (importance on ``prune_batches`` training batches); returns what was removed."""
    def loss_fn(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        device = next(m.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()}
        labels = inputs.pop("labels")
        return nn.functional.cross_entropy(m(**inputs), labels)

    batches = [b for _, b in zip(range(config.prune_batches), loader)]
    importance = head_importance(model, batches, loss_fn)  # (L, H)
    plan = heads_to_prune(importance, config.prune_fraction or 0.0, config.min_heads_per_layer)
    prune_heads(model.encoder, plan)
    log.info("pruned heads after epoch 1 by importance: %s", plan)
    return plan


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (the best epoch's, kept for restoring)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class EarlyStopping:
    """Early stopping on validation macro-F1 (the best epoch and its weights are kept), with two guards so a
    small data set does not stop before the classifier has learnt anything:

    - it never stops before ``min_epochs``;
    - epochs whose validation predictions are all one class, before any epoch's were not, neither count
      against the patience nor become the best epoch (the classifier has not moved yet); the last epoch
      always counts, so a run that never moves still ends with weights.
    """

    def __init__(self, patience: int, min_epochs: int, last_epoch: int) -> None:
        from heads.protocol import BestTracker

        self.tracker = BestTracker(patience)
        self.min_epochs, self.last_epoch, self.moved = min_epochs, last_epoch, False

    @staticmethod
    def one_class(y_val: np.ndarray, p_val: np.ndarray) -> bool:
        """Whether every validation row got the same prediction although the rows hold several classes."""
        return len(y_val) > 0 and len(np.unique(p_val)) == 1 and len(np.unique(y_val)) > 1

    def update(self, epoch: int, f1: float | None, one_class: bool, snapshot: Callable[[], Any]) -> None:
        """Record one epoch; ``snapshot()`` is called only for a new best."""
        if one_class and not self.moved and epoch < self.last_epoch:
            log.info("epoch %d: every validation row is predicted as one class; not counted for early stopping", epoch)
            return
        self.moved = self.moved or not one_class
        self.tracker.update(epoch, f1, snapshot)
        if epoch < self.min_epochs:
            self.tracker.stopped = False

    @property
    def stopped(self) -> bool:
        return bool(self.tracker.stopped)

    @property
    def best_epoch(self) -> int:
        return int(self.tracker.best_epoch)

    @property
    def state(self) -> Any:
        """The best epoch's weights (None without validation rows or patience)."""
        return self.tracker.state

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the same decisions."""
        t = self.tracker
        return {"best_f1": t.best_f1, "best_epoch": t.best_epoch, "bad": t.bad, "stopped": t.stopped, "moved": self.moved}

    def load(self, d: Mapping[str, Any], state: Any) -> None:
        """Restore from a checkpoint's :meth:`to_dict` and the best weights (or None)."""
        t = self.tracker
        t.best_f1, t.best_epoch, t.bad, t.stopped = d["best_f1"], d["best_epoch"], d["bad"], bool(d["stopped"])
        t.state, self.moved = state, bool(d.get("moved", True))
