"""The optimiser settings every backbone-training loop shares (``heads finetune``, ``heads pretrain``).

``FinetuneConfig`` and ``PretrainConfig`` each nest one :class:`OptimConfig` (as ``optim``) with their own
defaults; YAML keys, CLI flags and run.json keep these keys flat (``lr``, ``batch_size``, ``epochs``...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from embstore.errors import ConfigError

__all__ = ["OPTIM_KEYS", "SCHEDULES", "OptimConfig"]

SCHEDULES = ("linear", "cosine", "exponential", "constant")
"""lr decay after the warmup; a product may allow fewer (see ``schedules`` of :meth:`OptimConfig.check`)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with a warmup and a per-step schedule, batching, gradient accumulation and mixed precision."""

    lr: float = 5e-5
    """AdamW peak learning rate (reached at the end of the warmup)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (never on biases and LayerNorm weights)."""
    batch_size: int = 8
    """Rows per forward batch (per process)."""
    epochs: int = 3
    """Passes over the training rows."""
    warmup_ratio: float = 0.0
    """Share of the optimizer steps with a linear warmup from 0."""
    schedule: Literal["linear", "cosine", "exponential", "constant"] = "linear"
    """lr decay after the warmup (per optimizer step)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate mixed precision (fp16 needs a GPU)."""

    def __post_init__(self) -> None:
        self.check(SCHEDULES)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"The 'mixed_precision' option must be one of no, fp16, bf16; got {self.mixed_precision!r}.")
        for name in ("batch_size", "epochs", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"The '{name}' option must be a positive integer; got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"The 'lr' option must be positive; got {self.lr}.")
        if self.weight_decay < 0:
            raise ConfigError(f"The 'weight_decay' option must be 0 or more; got {self.weight_decay}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"The 'warmup_ratio' option must be in [0, 1); got {self.warmup_ratio}.")

    def check(self, schedules: tuple[str, ...]) -> None:
        """Refuse a schedule the owning loop does not implement."""
        if self.schedule not in schedules:
            raise ConfigError(f"The 'schedule' option must be one of {', '.join(schedules)}; got {self.schedule!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON-ready keys."""
        return dataclasses.asdict(self)


OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimConfig))
"""Every flat key an :class:`OptimConfig` owns."""
