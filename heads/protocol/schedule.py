"""The order and the pace of backbone training: a seeded per-epoch sampler and the learning-rate schedule.

:class:`EpochSampler` shuffles by (seed, epoch), so a resumed run sees the order an uninterrupted one would.
:func:`make_scheduler` is the one learning-rate schedule of the code base: a linear warmup, then linear, cosine or
per-epoch exponential decay, or constant; the backbone trainers step it per optimizer step, the probe heads
(:mod:`heads.probe.fitting`) per epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "SCHEDULES", "make_scheduler", "steps_per_epoch"]

SCHEDULES = ("linear", "cosine", "exponential", "exponential-epoch", "constant")
"""lr decay after the warmup; a product may allow fewer (see ``OptimConfig.check``)."""


class EpochSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch), so a resumed run sees the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def steps_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of ``batches`` batches, one step per ``grad_accum`` of them (the last one may
    close a shorter group, as accelerate does at the end of the loader)."""
    return math.ceil(batches / grad_accum)


def _factor(schedule: str, warmup: int, total: int, per_epoch: int, gamma: float) -> Callable[[int], float]:
    """The lr multiplier of optimizer step ``step`` (the Trainer's formulas for linear, cosine and constant)."""

    def warm(step: int) -> float:
        return step / max(1, warmup)

    def linear(step: int) -> float:
        return warm(step) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return warm(step)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def constant(step: int) -> float:
        return warm(step) if step < warmup else 1.0

    def exponential(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return float(gamma ** ((step - warmup) / max(1, per_epoch)))

    def exponential_epoch(step: int) -> float:  # torch's ExponentialLR stepped once per epoch: a staircase
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return float(gamma ** ((step - warmup) // max(1, per_epoch)))

    return {
        "linear": linear,
        "cosine": cosine,
        "constant": constant,
        "exponential": exponential,
        "exponential-epoch": exponential_epoch,
    }[schedule]


def make_scheduler(
    opt: torch.optim.Optimizer,
    schedule: str,
    *,
    warmup: int,
    total: int,
    per_epoch: int = 1,
    gamma: float = 0.9,
    done_steps: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup`` steps, then 'linear' or 'cosine' decay to 0 at step ``total``, 'exponential'
    (x ``gamma`` per ``per_epoch`` steps, smoothly), 'exponential-epoch' (x ``gamma`` once every ``per_epoch`` steps:
    torch's ExponentialLR stepped per epoch) or 'constant'; fast-forwarded by ``done_steps``.

    A step is whatever the caller steps it by: an optimizer step (backbone trainers) or an epoch (probe heads,
    ``per_epoch=1``, ``total`` = epochs)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _factor(schedule, warmup, max(total, 1), per_epoch, gamma))
    with warnings.catch_warnings():  # fast-forward on resume or rebuild: no optimizer step is due
        warnings.simplefilter("ignore")
        for _ in range(done_steps):
            sched.step()
    return sched
