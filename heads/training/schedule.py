"""What the backbone-training loops share (``heads finetune``, ``heads pretrain``).

A seeded per-epoch sampler (a resumed run sees the order an uninterrupted one would), the
learning-rate schedule (linear warmup, then linear, cosine or per-epoch exponential decay), and
checkpoint identity: a fingerprint of the config (minus the options that may change on resume)
and the refusal, naming the differing options, to resume from a checkpoint made with another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from embstore.errors import ConfigError

__all__ = ["EpochSampler", "adamw", "fingerprint", "make_scheduler", "read_checkpoint"]

log = logging.getLogger(__name__)


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


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """torch's AdamW over parameter ``groups``, with the fused kernel (one kernel per step, not a loop over
    tensors) where this torch build has it: what the Trainer's default ``optim="adamw_torch_fused"`` uses.
    Same updates as the unfused one up to float rounding."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, *, warmup: int, total: int, per_epoch: int = 1,
                   gamma: float = 0.9, done_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup`` optimizer steps, then 'linear' or 'cosine' decay to 0 at ``total``,
    'exponential' (x ``gamma`` per ``per_epoch`` steps) or 'constant'; fast-forwarded by ``done_steps``."""
    from transformers import get_scheduler

    sched: torch.optim.lr_scheduler.LRScheduler
    if schedule == "exponential":
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return float(gamma ** ((step - warmup) / max(1, per_epoch)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    else:
        name = "constant_with_warmup" if schedule == "constant" else schedule
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=max(total, 1))
    with warnings.catch_warnings():  # fast-forward on resume or rebuild: no optimizer step is due
        warnings.simplefilter("ignore")
        for _ in range(done_steps):
            sched.step()
    return sched


def fingerprint(config: Mapping[str, Any], *extra: str) -> str:
    """sha256 of a config dict (already stripped of the options that may change on resume) and ``extra`` strings."""
    return hashlib.sha256(json.dumps([dict(config), *extra], sort_keys=True, default=str).encode()).hexdigest()


def read_checkpoint(ckpt: Path, state_file: str, expected: str, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON state in ``ckpt/state_file`` if its fingerprint is ``expected``; None when there is no checkpoint.

    ``config`` is this run's fingerprinted config dict; a mismatch raises ConfigError naming the differing options.
    """
    path = ckpt / state_file
    if not path.is_file():
        log.info("resume: no checkpoint in %s, starting from scratch", ckpt)
        return None
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"The checkpoint state {path} is not valid JSON ({exc.msg}); rerun without --resume "
                          "or with a new --out.") from None
    if state.get("fingerprint") != expected:
        old = state.get("config", {})
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k)) or ["model weights"]
        raise ConfigError(
            f"The checkpoint in {ckpt} was made with another configuration or model (checkpoint fingerprint "
            f"{str(state.get('fingerprint'))[:12]}, this run {expected[:12]}; differing: {', '.join(diff)}). "
            "Rerun with the checkpoint's options, without --resume, or with a new --out.")
    return state
