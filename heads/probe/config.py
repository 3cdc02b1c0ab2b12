"""Typed, frozen configuration of one head (its architecture and its training)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from embstore.config import reject_unknown_keys
from embstore.errors import Choice, Constraint, Interval, ListOf, Optional, validate_params

__all__ = ["HeadConfig", "PAIR_FEATURES", "HEADS", "POOLED_HEADS", "LAYERED_HEADS", "TOKEN_HEADS", "parse_grid"]

POOLED_HEADS = ("linear", "mlp", "rank")
"""Take one feature vector per row: (n, d); several layers arrive concatenated/summed/averaged. ``rank`` is the
rank-constrained linear probe (Hewitt & Liang 2019's complexity control): x -> B (A x), A of rank ``rank``."""
LAYERED_HEADS = ("conv", "sum", "mix")
"""Take the chosen layers separately: (n, k, hidden)."""
PAIR_HEADS = ("pair",)
"""Take two towers: ((n, k, hidden), (n, k, hidden))."""
TOKEN_HEADS = ("rnn", "gru", "lstm")
"""Take ragged per-token states of one layer."""
HEADS = POOLED_HEADS + LAYERED_HEADS + PAIR_HEADS + TOKEN_HEADS
Activation = Literal["relu", "gelu", "tanh"]
Aggregate = Literal["mean", "max", "last"]
Solver = Literal["lbfgs", "adamw"]
Schedule = Literal["constant", "exponential", "cosine"]
"""The schedules a probe head steps per epoch (of :data:`heads.protocol.schedule.SCHEDULES`)."""
ClassWeight = Literal["none", "balanced"]
ConvOrder = Literal["layers-first", "merge-first"]
"""conv head: 'layers-first' convolves each layer with its own k3/s3 kernel, then merges the layers with a pointwise
conv; 'merge-first' merges the layers with the pointwise (1x1) conv first, then applies one k3/s3 conv (the order of
the YouTube-titles study, docs/studies.md)."""
ReportEpoch = Literal["best", "last"]
TowerMerge = Literal["mix", "sum"]
PAIR_FEATURES = ("u", "v", "absdiff", "product")
"""pair head: the features of the two tower vectors the classifier reads: u, v, |u - v| and u * v."""
C_GRID = ListOf(
    Interval(float, 0, math.inf, closed="neither"),
    desc="a comma list of positive inverse L2 strengths C (finite, > 0)",
    hint="Pass values such as 1e-4,1e-2,1,100.",
)


def parse_grid(value: Any) -> tuple[float, ...]:
    """'1e-4,1e-2,1' or a list of numbers -> a tuple of floats (HeadConfig checks that they are positive)."""
    parts = str(value).split(",") if isinstance(value, (str, int, float)) else list(value)
    out = []
    for p in parts:
        if isinstance(p, str) and not p.strip():
            continue
        try:
            out.append(float(p))
        except (TypeError, ValueError):
            raise C_GRID.error("c_grid", value, "HeadConfig") from None
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """One head: architecture and training hyper-parameters. Saved with every fitted head."""

    head: str = "linear"
    """A head kind of :data:`HEADS`."""
    hidden: tuple[int, ...] = (2048,)
    """mlp: hidden layer sizes."""
    rank: int = 16
    """rank: the rank of the rank-constrained linear probe (``heads sweep --rank`` sweeps several)."""
    dropout: float = 0.1
    """mlp / conv / pair / recurrent heads: dropout before each linear layer after the first."""
    activation: Activation = "relu"
    """mlp: activation between hidden layers."""
    conv_hidden: int = 512
    """conv: width of the fully connected layer after the convolutions."""
    conv_order: ConvOrder = "layers-first"
    """conv: which comes first, the per-layer k3/s3 conv or the pointwise merge of the layers (:data:`ConvOrder`)."""
    sum_hidden: int = 256
    """sum: width of the tanh layer after summing the layers; pair: width of each tower's projection (when
    ``tower_hidden`` is not given)."""
    tower_hidden: tuple[int, ...] | None = None
    """pair: the widths of each tower's Linear layers (``activation`` between them, tanh after the last); None: one
    layer of ``sum_hidden``."""
    pair_features: tuple[str, ...] = PAIR_FEATURES
    """pair: which of u, v, |u - v| ('absdiff') and u * v ('product') the classifier reads, concatenated."""
    tower_merge: TowerMerge = "mix"
    """pair: how each tower merges its layers: a learnt scalar mix ('mix') or their fixed sum ('sum'; a sweep sets
    it for ``--combine sum``)."""
    rnn_hidden: int = 256
    """rnn/gru/lstm: hidden size."""
    rnn_layers: int = 1
    """rnn/gru/lstm: stacked layers (num_layers)."""
    bidirectional: bool = False
    """rnn/gru/lstm: run both directions."""
    aggregate: Aggregate = "mean"
    """rnn/gru/lstm: how the per-token outputs become one vector (masked)."""
    standardize: bool = True
    """Every head: standardise each input feature with the training rows' mean and std (token heads: over the
    training tokens), kept with the head and applied by ``heads predict``."""
    solver: Solver = "lbfgs"
    """linear: 'lbfgs' solves scikit-learn's logistic regression objective for every C of ``c_grid`` at once and
    picks C on validation; 'adamw' trains by minibatch AdamW (lr, weight_decay, epochs, early stopping)."""
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    """linear/lbfgs: inverse L2 strengths C tried (scikit-learn's C: penalty ||W||^2 / (2C), loss summed over rows)."""
    max_iter: int = 1000
    """linear/lbfgs: L-BFGS iterations at most per problem (scikit-learn's max_iter)."""
    tol: float = 1e-4
    """linear/lbfgs: stop when the largest gradient entry of the mean objective is at most tol (scikit-learn's tol)."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    batch_size: int = 64
    epochs: int = 30
    patience: int = 5
    """Early stopping: epochs without a better validation macro-F1 before stopping (0: never stop early).
    The best epoch's weights are restored (``report_epoch='best'``)."""
    report_epoch: ReportEpoch = "best"
    """Heads trained by epochs: the weights kept and scored, those of the best validation epoch ('best') or of the
    last epoch trained ('last', what a study that reports its last epoch did; with patience > 0 the epoch where
    early stopping stopped)."""
    schedule: Schedule = "constant"
    gamma: float = 0.9
    """exponential schedule: lr multiplier per epoch."""
    class_weight: ClassWeight = "none"
    """'balanced' weights the loss by n / (classes * count) per class."""
    validation_fraction: float = 0.1
    """Share of the training rows carved (seeded, stratified: :func:`embstore.data.carve.carve`) for early stopping
    when no validation set is given."""
    seed: int = 0
    """Seeds the validation carve, initialisation and shuffling (a sweep's first seed, and its holdout's)."""
    device: str | None = None
    """'cpu', 'cuda'...; None picks CUDA when present."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "head": Choice(HEADS),
        "schedule": Choice(Schedule),
        "activation": Choice(Activation),
        "aggregate": Choice(Aggregate),
        "class_weight": Choice(ClassWeight),
        "conv_order": Choice(ConvOrder),
        "tower_merge": Choice(TowerMerge),
        "tower_hidden": Optional(ListOf(Interval(int, 1, None), desc="positive layer sizes")),
        "pair_features": ListOf(Choice(PAIR_FEATURES)),
        "report_epoch": Choice(ReportEpoch),
        **{
            k: Interval(int, 1, None)
            for k in ("batch_size", "epochs", "conv_hidden", "sum_hidden", "rnn_hidden", "rank")
        },
        "rnn_layers": Interval(int, 1, None),
        "patience": Interval(int, 0, None, desc="0 (off) or more epochs"),
        "dropout": Interval(float, 0, 1, closed="left"),
        "validation_fraction": Interval(float, 0, 1, closed="neither"),
        "lr": Interval(float, 0, None, closed="neither"),
        "solver": Choice(Solver),
        "c_grid": C_GRID,
        "max_iter": Interval(int, 1, None),
        "tol": Interval(float, 0, None, closed="neither"),
        "hidden": ListOf(Interval(int, 1, None), min_len=0, desc="positive layer sizes"),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); the CLI's choices and help come from
    it too."""

    def __post_init__(self) -> None:
        validate_params(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["c_grid"] = list(self.c_grid)
        d["tower_hidden"] = None if self.tower_hidden is None else list(self.tower_hidden)
        d["pair_features"] = list(self.pair_features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadConfig":
        reject_unknown_keys(d, {f.name for f in dataclasses.fields(cls)}, "head")
        d = dict(d)
        if "hidden" in d:
            h = d["hidden"]
            d["hidden"] = tuple(int(x) for x in (str(h).split(",") if isinstance(h, (str, int)) else h))
        if "c_grid" in d:
            d["c_grid"] = parse_grid(d["c_grid"])
        if d.get("tower_hidden") is not None:
            h = d["tower_hidden"]
            d["tower_hidden"] = tuple(int(x) for x in (str(h).split(",") if isinstance(h, (str, int)) else h))
        if "pair_features" in d:
            f = d["pair_features"]
            d["pair_features"] = tuple(p.strip() for p in (f.split(",") if isinstance(f, str) else f) if p.strip())
        return cls(**d)

    def replace(self, **changes: Any) -> "HeadConfig":
        return dataclasses.replace(self, **changes)
