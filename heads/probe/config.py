"""Typed, frozen configuration of one head (its architecture and its training)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from embstore.config import reject_unknown_keys
from embstore.errors import ConfigError

__all__ = ["HeadConfig", "HEADS", "POOLED_HEADS", "LAYERED_HEADS", "TOKEN_HEADS", "parse_grid"]

POOLED_HEADS = ("linear", "mlp")
"""Take one feature vector per row: (n, d); several layers arrive concatenated/summed/averaged."""
LAYERED_HEADS = ("conv", "sum", "mix")
"""Take the chosen layers separately: (n, k, hidden)."""
PAIR_HEADS = ("pair",)
"""Take two towers: ((n, k, hidden), (n, k, hidden))."""
TOKEN_HEADS = ("rnn", "gru", "lstm")
"""Take ragged per-token states of one layer."""
HEADS = POOLED_HEADS + LAYERED_HEADS + PAIR_HEADS + TOKEN_HEADS


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
            raise ConfigError(
                f"The 'c_grid' option must be a comma list of positive numbers such as 1e-4,1e-2,1; got {p!r}."
            ) from None
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """One head: architecture and training hyper-parameters. Saved with every fitted head."""

    head: str = "linear"
    """One of linear, mlp, conv, sum, mix, pair, rnn, gru, lstm."""
    hidden: tuple[int, ...] = (2048,)
    """mlp: hidden layer sizes."""
    dropout: float = 0.1
    """mlp / conv / pair / recurrent heads: dropout before each linear layer after the first."""
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    """mlp: activation between hidden layers."""
    conv_hidden: int = 512
    """conv: width of the fully connected layer after the convolutions."""
    sum_hidden: int = 256
    """sum: width of the tanh layer after summing the layers; pair: width of each tower's projection."""
    rnn_hidden: int = 256
    """rnn/gru/lstm: hidden size."""
    rnn_layers: int = 1
    """rnn/gru/lstm: stacked layers (num_layers)."""
    bidirectional: bool = False
    """rnn/gru/lstm: run both directions."""
    aggregate: Literal["mean", "max", "last"] = "mean"
    """rnn/gru/lstm: how the per-token outputs become one vector (masked)."""
    standardize: bool = True
    """Every head: standardise each input feature with the training rows' mean and std (token heads: over the
    training tokens), kept with the head and applied by ``heads predict``."""
    solver: Literal["lbfgs", "adamw"] = "lbfgs"
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
    The best epoch's weights are restored."""
    schedule: Literal["constant", "exponential", "cosine"] = "constant"
    gamma: float = 0.9
    """exponential schedule: lr multiplier per epoch."""
    class_weight: Literal["none", "balanced"] = "none"
    """'balanced' weights the loss by n / (classes * count) per class."""
    validation_fraction: float = 0.1
    """Share of the training rows carved (seeded, stratified: :func:`embstore.data.carve.carve`) for early stopping
    when no validation set is given."""
    seed: int = 0
    """Seeds the validation carve, initialisation and shuffling (a sweep's first seed, and its holdout's)."""
    device: str | None = None
    """'cpu', 'cuda'...; None picks CUDA when present."""

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"The 'head' option must be one of {', '.join(HEADS)}; got {self.head!r}.")
        if self.schedule not in ("constant", "exponential", "cosine"):
            raise ConfigError(f"The 'schedule' option must be constant, exponential or cosine; got {self.schedule!r}.")
        if self.activation not in ("relu", "gelu", "tanh"):
            raise ConfigError(f"The 'activation' option must be relu, gelu or tanh; got {self.activation!r}.")
        if self.aggregate not in ("mean", "max", "last"):
            raise ConfigError(f"The 'aggregate' option must be mean, max or last; got {self.aggregate!r}.")
        if self.class_weight not in ("none", "balanced"):
            raise ConfigError(f"The 'class_weight' option must be none or balanced; got {self.class_weight!r}.")
        for name in ("batch_size", "epochs", "conv_hidden", "sum_hidden", "rnn_hidden", "rnn_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"The '{name}' option must be a positive integer; got {getattr(self, name)}.")
        if self.patience < 0:
            raise ConfigError(f"The 'patience' option must be 0 (off) or more epochs; got {self.patience}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"The 'dropout' option must be in [0, 1); got {self.dropout}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"The 'validation_fraction' option must be in (0, 1); got {self.validation_fraction}.")
        if self.lr <= 0:
            raise ConfigError(f"The 'lr' option must be positive; got {self.lr}.")
        if self.solver not in ("lbfgs", "adamw"):
            raise ConfigError(f"The 'solver' option must be lbfgs or adamw; got {self.solver!r}.")
        if not self.c_grid:
            raise ConfigError("The 'c_grid' option must hold at least one inverse L2 strength C, e.g. 1e-4,1e-2,1,100.")
        bad = [c for c in self.c_grid if not (isinstance(c, (int, float)) and c > 0 and c != float("inf"))]
        if bad:
            raise ConfigError(
                f"The 'c_grid' option must hold positive inverse L2 strengths C (finite, > 0); got {bad[0]!r}. "
                "Pass values such as 1e-4,1e-2,1,100."
            )
        if self.max_iter < 1:
            raise ConfigError(f"The 'max_iter' option must be a positive integer; got {self.max_iter}.")
        if not self.tol > 0:
            raise ConfigError(f"The 'tol' option must be positive; got {self.tol}.")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"The 'hidden' option must be positive layer sizes; got {self.hidden}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["c_grid"] = list(self.c_grid)
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
        return cls(**d)

    def replace(self, **changes: Any) -> "HeadConfig":
        return dataclasses.replace(self, **changes)
