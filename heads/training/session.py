"""One backbone-training session: the accelerate setup and the one training step both trainers take.

:func:`start_session` resolves the device (:func:`embstore.device.resolve_device`: an explicit CUDA device
without CUDA is an error, never a silent CPU run), builds the ``Accelerator``, AdamW over the given parameter
groups and the learning-rate schedule, and ``prepare``s them with the loaders, as accelerate's
``examples/nlp_example.py`` does. :meth:`Session.step` is the training step of ``heads finetune`` and
``heads pretrain`` alike: forward and backward under ``accumulate``, the gradient norm clipped to
``max_grad_norm`` when gradients are synchronised, then the optimizer and schedule steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from embstore.device import resolve_device
from heads.protocol.optim import adamw
from heads.protocol.schedule import make_scheduler, steps_per_epoch
from heads.training.optim import OptimConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["Session", "start_session"]

T = TypeVar("T")


@dataclass
class Session:
    """The prepared model, optimizer, schedule and loaders of one model shape, and the optimizer steps taken."""

    acc: Accelerator
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train: DataLoader[Any]
    """The prepared training loader."""
    loaders: list[DataLoader[Any]]
    """The other loaders (validation, evaluation), prepared, in the order given."""
    max_grad_norm: float
    steps: int
    """Optimizer steps so far (a resumed run starts from the checkpoint's)."""

    def step(self, loss_of: Callable[[nn.Module], tuple[torch.Tensor, T]]) -> T:
        """One training step: ``loss_of(model)`` returns the loss to minimise and what the caller wants back.

        Under gradient accumulation the optimizer steps once per ``grad_accum`` calls (accelerate decides);
        the gradient norm is clipped to ``max_grad_norm`` (0: not clipped) right before every optimizer step."""
        with self.acc.accumulate(self.model):
            loss, out = loss_of(self.model)
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.max_grad_norm:
                self.acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
            if self.acc.sync_gradients:
                self.steps += 1
        return out

    def unwrapped(self) -> nn.Module:
        """The model without accelerate's wrappers (DDP), for saving and surgery."""
        return self.acc.unwrap_model(self.model)


def start_session(
    model: nn.Module,
    groups: list[dict[str, Any]],
    optim: OptimConfig,
    *,
    device: str | None,
    train: DataLoader[Any],
    loaders: Sequence[DataLoader[Any]] = (),
    total_steps: int | None = None,
    gamma: float = 0.9,
    done_steps: int = 0,
) -> Session:
    """Accelerator, AdamW over ``groups`` (see :func:`heads.training.optim.param_groups`) and the schedule of
    ``optim``, prepared with the ``train`` and other ``loaders``.

    The schedule spans ``total_steps`` optimizer steps (default: ``optim.epochs`` epochs of ``train``) with
    ``optim.warmup_ratio`` of them warming up; ``done_steps`` fast-forwards it (a rebuilt session)."""
    from accelerate import Accelerator

    acc = Accelerator(
        mixed_precision=optim.mixed_precision,
        gradient_accumulation_steps=optim.grad_accum,
        cpu=resolve_device(device) == "cpu",
    )
    per_epoch = steps_per_epoch(len(train), optim.grad_accum)
    total = total_steps or per_epoch * optim.epochs
    opt = adamw(groups, optim.lr)
    sched = make_scheduler(
        opt,
        optim.schedule,
        warmup=int(optim.warmup_ratio * total),
        total=total,
        per_epoch=per_epoch,
        gamma=gamma,
        done_steps=done_steps,
    )
    prepared_model, opt, prepared_train, sched, *prepared = acc.prepare(model, opt, train, sched, *loaders)
    return Session(
        acc=acc,
        model=prepared_model,
        opt=opt,
        sched=sched,
        train=prepared_train,
        loaders=list(prepared),
        max_grad_norm=optim.max_grad_norm,
        steps=done_steps,
    )
