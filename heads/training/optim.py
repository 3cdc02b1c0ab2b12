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
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from embstore.config import reject_unknown_keys
from embstore.data.spec import DataSpec
from embstore.errors import Choice, Constraint, Interval, validate_params

if TYPE_CHECKING:  # the configs stay importable without torch (the CLI reads their tables at start)
    from torch import nn

__all__ = [
    "OPTIM_KEYS",
    "OptimConfig",
    "TrainerConfig",
    "flat_keys",
    "nested_values",
    "param_groups",
]

MixedPrecision = Literal["no", "fp16", "bf16"]


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
    schedule: str = "linear"
    """lr decay after the warmup (per optimizer step), one of :data:`heads.protocol.schedule.SCHEDULES`; each
    trainer allows those its loop implements (the ``optim.schedule`` entry of its config's constraint table)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    mixed_precision: MixedPrecision = "no"
    """accelerate mixed precision (fp16 needs a GPU)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this before every optimizer step (0: no clipping), as the Trainer does."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "mixed_precision": Choice(MixedPrecision),
        **{k: Interval(int, 1, None) for k in ("batch_size", "epochs", "grad_accum")},
        "lr": Interval(float, 0, None, closed="neither"),
        "weight_decay": Interval(float, 0, None, desc="0 or more"),
        "warmup_ratio": Interval(float, 0, 1, closed="left"),
        "max_grad_norm": Interval(float, 0, None, desc="0 (no clipping) or more"),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); the CLI's choices come from it too."""

    def __post_init__(self) -> None:
        validate_params(self)

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
