"""The optimiser every backbone-training loop shares (``heads finetune``, ``heads pretrain``): its settings and
its parameter groups.

``FinetuneConfig`` and ``PretrainConfig`` each nest one :class:`OptimConfig` (as ``optim``) with their own
defaults; YAML keys, CLI flags and run.json keep these keys flat (``lr``, ``batch_size``, ``epochs``...).
:func:`param_groups` builds the AdamW groups (no decay on biases and LayerNorm weights; a new classifier at its
own rate); the optimizer is :func:`heads.protocol.optim.adamw`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from torch import nn

from embstore.config import reject_unknown_keys
from embstore.data.spec import DataSpec
from embstore.errors import ConfigError
from heads.protocol.schedule import SCHEDULES

__all__ = [
    "OPTIM_KEYS",
    "SCHEDULES",
    "OptimConfig",
    "TrainerConfig",
    "check_choice",
    "check_positive",
    "flat_keys",
    "nested_values",
    "param_groups",
]


def check_positive(config: object, names: tuple[str, ...]) -> None:
    """ConfigError naming the first of ``names`` whose value is below 1 (None, an option not given, passes)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"The '{name}' option must be a positive integer; got {value}.")


def check_choice(config: object, name: str, allowed: tuple[Any, ...]) -> None:
    """ConfigError naming the option, its choices (None shown as none) and the value given."""
    value = getattr(config, name)
    if value not in allowed:
        shown = ", ".join("none" if a is None else str(a) for a in allowed)
        raise ConfigError(f"The '{name}' option must be one of {shown}; got {value!r}.")


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
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this before every optimizer step (0: no clipping), as the Trainer does."""

    def __post_init__(self) -> None:
        self.check(SCHEDULES)
        check_choice(self, "mixed_precision", ("no", "fp16", "bf16"))
        check_positive(self, ("batch_size", "epochs", "grad_accum"))
        if self.lr <= 0:
            raise ConfigError(f"The 'lr' option must be positive; got {self.lr}.")
        if self.weight_decay < 0:
            raise ConfigError(f"The 'weight_decay' option must be 0 or more; got {self.weight_decay}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"The 'warmup_ratio' option must be in [0, 1); got {self.warmup_ratio}.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"The 'max_grad_norm' option must be 0 (no clipping) or more; got {self.max_grad_norm}.")

    def check(self, schedules: tuple[str, ...]) -> None:
        """Refuse a schedule the owning loop does not implement."""
        check_choice(self, "schedule", schedules)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON-ready keys."""
        return dataclasses.asdict(self)


OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimConfig))
"""Every flat key an :class:`OptimConfig` owns."""
_NESTED = ("source", "optim")


class TrainerConfig(Protocol):
    """A backbone trainer's config: a frozen dataclass nesting a DataSpec (``source``) and an OptimConfig
    (``optim``), whose YAML keys, CLI flags and run.json entries are flat."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def source(self) -> DataSpec: ...

    @property
    def optim(self) -> OptimConfig: ...


def flat_keys(config: TrainerConfig, data_keys: tuple[str, ...], first: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config`` as flat keys: its own fields named in ``first``, the data keys, the optimiser keys, then the rest
    of its own fields (values as they are; the caller makes tuples JSON-ready)."""
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NESTED}
    return {**{k: own.pop(k) for k in first}, **config.source.to_dict(data_keys), **config.optim.to_dict(), **own}


def nested_values(
    cls: type[TrainerConfig],
    d: Mapping[str, Any],
    data_keys: tuple[str, ...],
    optim: OptimConfig,
    command: str,
    data_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from flat keys ``d``: its own fields, ``source`` from the data keys (over
    ``data_defaults``) and ``optim`` from the optimiser keys (over the trainer's defaults ``optim``). Unknown keys
    are a ConfigError naming them and ``command``."""
    own = {f.name for f in dataclasses.fields(cls)} - set(_NESTED)
    reject_unknown_keys(dict(d), own | set(data_keys) | set(OPTIM_KEYS), command)
    values: dict[str, Any] = {k: v for k, v in d.items() if k in own}
    values["source"] = DataSpec.from_dict({**(data_defaults or {}), **{k: v for k, v in d.items() if k in data_keys}})
    values["optim"] = dataclasses.replace(optim, **{k: v for k, v in d.items() if k in OPTIM_KEYS})
    return values


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, *, head_prefix: str | None = None, head_lr: float | None = None
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: no weight decay on biases and LayerNorm weights (tensors of one
    dimension, as BERT and the Trainer do); with ``head_prefix`` the parameters under it (a freshly initialised
    classifier) form groups of their own at ``head_lr``. Backbone groups come first, decayed before undecayed;
    each group says whether it is the head's (``"head"``), a key :func:`heads.protocol.optim.adamw` drops."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = head_prefix is not None and name.startswith(head_prefix)
            groups[(head, p.ndim >= 2)].append(p)
    return [
        {
            "params": params,
            "lr": (head_lr if head_lr is not None else lr) if head else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "head": head,
        }
        for (head, decay), params in groups.items()
        if params
    ]
