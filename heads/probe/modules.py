"""What each head kind takes (:func:`as_inputs`, :class:`InputShape`) and the torch modules that compute it.

:func:`as_inputs` validates user features for a head and wraps them as :class:`Inputs`, which turns row indices
into float32 batches; :func:`build_module` picks the untrained module from a config.

Every module maps a batch of float32 tensors to logits ``(batch, classes)``:

* pooled heads (linear, mlp) take ``x`` of shape (batch, dim) or (batch, layers, hidden), flattened;
* layered heads (conv, sum, mix) take ``x`` of shape (batch, layers, hidden);
* the pair head takes ``(a, b)``, each (batch, layers, hidden);
* recurrent heads (rnn, gru, lstm) take padded ``x`` (batch, max_len, hidden) and ``lengths`` (batch,) int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from embstore.errors import ConfigError
from heads.probe.config import LAYERED_HEADS, PAIR_HEADS, POOLED_HEADS, TOKEN_HEADS, HeadConfig

__all__ = [
    "InputShape",
    "ScalarMix",
    "LinearHead",
    "MLPHead",
    "ConvHead",
    "SumHead",
    "MixHead",
    "PairHead",
    "RecurrentHead",
    "build_module",
    "Ragged",
    "Inputs",
    "as_inputs",
    "Standardize",
    "fit_input_stats",
    "inverse_scale",
]


@dataclass(frozen=True)
class InputShape:
    """Per-row shape of what a head was fitted on, used to validate later inputs and to rebuild it.

    ``kind`` is ``dense`` (one array), ``pair`` (two arrays) or ``tokens`` (ragged token states);
    ``shapes`` holds one per-row shape per input array: ``(dim,)`` or ``(layers, hidden)`` for dense,
    two ``(layers, hidden)`` for pair, ``(hidden,)`` (width of one token) for tokens.
    """

    kind: str
    shapes: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        """Human form, e.g. ``(n, 3, 24)`` or ``((n, 3, 24), (n, 3, 24))`` or ``tokens (T, 24)``."""
        if self.kind == "tokens":
            return f"ragged tokens (T, {self.shapes[0][0]})"
        parts = ["(" + ", ".join(["n", *map(str, s)]) + ")" for s in self.shapes]
        return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputShape":
        return cls(kind=str(d["kind"]), shapes=tuple(tuple(int(v) for v in s) for s in d["shapes"]))


@dataclass(frozen=True)
class Ragged:
    """Ragged per-token states: row ``i`` is ``values[offsets[i]:offsets[i+1]]`` (same contract as TokenStates)."""

    values: np.ndarray
    """(total_tokens, hidden)"""
    offsets: np.ndarray
    """(n + 1,) int64"""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, idx: np.ndarray) -> "Ragged":
        """Rows ``idx`` as a new compact Ragged (copies only those rows' tokens)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        parts = [self.values[s:e] for s, e in zip(starts, ends)]
        values = np.concatenate(parts) if parts else self.values[:0]
        return Ragged(values=values, offsets=offsets)


def _f32(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class Inputs:
    """One validated head input: ``dense`` (X,), ``pair`` (Xa, Xb) or ``tokens`` (values, offsets)."""

    shape: InputShape
    arrays: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.arrays[1]) - 1 if self.shape.kind == "tokens" else len(self.arrays[0])

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Rows ``idx`` as float32 tensors on ``device``: dense/pair as stored, tokens as (padded, lengths)."""
        if self.shape.kind != "tokens":
            return tuple(_f32(a[idx], device) for a in self.arrays)
        values, offsets = self.arrays
        starts, ends = offsets[idx], offsets[idx + 1]
        lengths = ends - starts
        padded = np.zeros((len(idx), max(int(lengths.max()), 1), values.shape[1]), dtype=values.dtype)
        for i, (s, e) in enumerate(zip(starts, ends)):
            padded[i, : e - s] = values[s:e]
        # An empty row becomes one zero token: pack_padded_sequence rejects length 0.
        return _f32(padded, device), torch.from_numpy(np.maximum(lengths, 1).astype(np.int64))


def _got(X: Any) -> str:
    if isinstance(X, np.ndarray):
        return f"shape {X.shape}"
    if isinstance(X, (tuple, list)):
        return f"a {type(X).__name__} of {len(X)} items"
    return f"a {type(X).__name__}"


def as_inputs(X: Any, head: str) -> Inputs:
    """Validate ``X`` for ``head`` and wrap it; raises ConfigError naming the expected and given shapes."""
    if head in TOKEN_HEADS:
        if isinstance(X, np.ndarray) or not (hasattr(X, "values") and hasattr(X, "offsets")):
            raise ConfigError(
                f"The '{head}' head takes ragged token states (.values (T, hidden), .offsets (n+1,)), such as "
                f"store.tokens(split, layer) or heads.Ragged; got {_got(X)}. Use a pooled head such as "
                "linear for (n, dim) features."
            )
        values, offsets = np.asarray(X.values), np.asarray(X.offsets)
        if (
            values.ndim != 2
            or offsets.ndim != 1
            or len(offsets) < 1
            or np.any(np.diff(offsets) < 0)
            or offsets[-1] > len(values)
        ):
            raise ConfigError(
                f"The '{head}' head needs values (T, hidden) and non-decreasing offsets (n+1,) within "
                f"T; got values {values.shape}, offsets {offsets.shape}."
            )
        return Inputs(InputShape("tokens", ((values.shape[1],),)), (values, offsets.astype(np.int64, copy=False)))
    if head in PAIR_HEADS:
        if not isinstance(X, (tuple, list)) or len(X) != 2:
            raise ConfigError(
                f"The 'pair' head takes two towers (Xa, Xb), each (n, layers, hidden); got {_got(X)}. "
                "Pass a tuple of both towers' features."
            )
        a, b = np.asarray(X[0]), np.asarray(X[1])
        if a.ndim != 3 or b.ndim != 3 or len(a) != len(b):
            raise ConfigError(
                f"The 'pair' head takes two (n, layers, hidden) arrays with the same n; got shapes "
                f"{a.shape} and {b.shape}."
            )
        return Inputs(InputShape("pair", (a.shape[1:], b.shape[1:])), (a, b))
    if isinstance(X, (tuple, list)) or not hasattr(X, "shape"):
        raise ConfigError(f"The '{head}' head takes one feature array; got {_got(X)}. Use head=pair for two towers.")
    X = np.asarray(X)
    if head in LAYERED_HEADS:
        if X.ndim != 3:
            raise ConfigError(
                f"The '{head}' head takes (n, layers, hidden) features; got shape {X.shape}. Use "
                f"combine=mix or a pooled head such as linear."
            )
        if head == "conv" and X.shape[2] < 3:
            raise ConfigError(f"The 'conv' head needs hidden >= 3 (kernel 3, stride 3); got shape {X.shape}.")
    elif X.ndim not in (2, 3):
        raise ConfigError(f"The '{head}' head takes (n, dim) or (n, layers, hidden) features; got shape {X.shape}.")
    return Inputs(InputShape("dense", (X.shape[1:],)), (X,))


class ScalarMix(nn.Module):
    """ELMo scalar mix: ``gamma * sum_k softmax(w)_k x[:, k]``; (batch, layers, hidden) -> (batch, hidden)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        # Zeros: start from the plain average of the layers, as ELMo does.
        self.weights = nn.Parameter(torch.zeros(layers))
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.einsum("k,bkh->bh", torch.softmax(self.weights, dim=0), x)

    def mix_weights(self) -> np.ndarray:
        """Softmax layer weights, (layers,) float64 summing to 1."""
        return torch.softmax(self.weights.detach().double().cpu(), dim=0).numpy()


class Standardize(nn.Module):
    """(x - shift) * scale with per-feature statistics of the training rows (or tokens), saved with the head.

    Hidden states have a few huge dimensions (and CLS vectors of early layers a tiny spread); a head on raw
    features needs many more steps, or never leaves the majority class. ``shape`` is the per-row feature shape it
    broadcasts over: ``(dim,)`` (pooled heads, flattened), ``(layers, hidden)`` (layered and pair heads) or
    ``(hidden,)`` (token heads, one statistic per feature over all training tokens). Identity until ``fit_stats``.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale

    @torch.no_grad()
    def fit_stats(self, inputs: "Inputs", rows: np.ndarray, array: int = 0, chunk: int = 4096) -> None:
        """Mean and 1/std (:func:`inverse_scale`, as StandardScaler) over ``rows`` of input ``array`` (over their
        tokens for token inputs), in two float64 passes (the mean, then centred squares), chunk by chunk."""
        width = int(np.prod(self.shift.shape))

        def parts() -> Any:
            if inputs.shape.kind == "tokens":
                values, offsets = inputs.arrays
                for start in range(0, len(rows), chunk):
                    r = rows[start : start + chunk]
                    pieces = [values[offsets[i] : offsets[i + 1]] for i in r]
                    if pieces:
                        yield np.concatenate(pieces).astype(np.float64)
                return
            src = inputs.arrays[array]
            for start in range(0, len(rows), chunk):
                r = rows[start : start + chunk]
                yield src[r].reshape(len(r), width).astype(np.float64)

        n, total = 0, np.zeros(width)
        for x in parts():
            n += len(x)
            total += x.sum(0)
        mean = total / max(1, n)
        m2 = np.zeros(width)
        for x in parts():
            m2 += ((x - mean) ** 2).sum(0)
        self.shift.copy_(torch.from_numpy(mean.reshape(self.shift.shape)))
        self.scale.copy_(torch.from_numpy(inverse_scale(m2 / max(1, n), mean, n).reshape(self.shift.shape)))


def inverse_scale(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """1 / std per feature as scikit-learn's StandardScaler divides: features indistinguishable from a constant
    (variance within the float64 two-pass error bound, ``n eps var + (n mean eps)^2``) get 1 (they stay centred at
    0), every other feature 1 / std, however small its std."""
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    std = np.sqrt(np.where(constant, 1.0, var))
    return 1.0 / std


def fit_input_stats(module: nn.Module, inputs: "Inputs", rows: np.ndarray) -> None:
    """Fit every input :class:`Standardize` of a head on the training ``rows`` (the pair head has one per tower)."""
    for name, array in (("standardize", 0), ("standardize_a", 0), ("standardize_b", 1)):
        std = getattr(module, name, None)
        if isinstance(std, Standardize):
            std.fit_stats(inputs, rows, array=array)


class LinearHead(nn.Module):
    """Logistic regression: (batch, dim) or (batch, layers, hidden) flattened -> (batch, classes)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        # Only the nn.Linear draws from the RNG: fit_linear_probes rebuilds the same init under the same seed.
        self.linear = nn.Linear(dim, n_classes)
        self.standardize = Standardize(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardize(x.flatten(1)))


class RankHead(nn.Module):
    """A rank-constrained linear probe: (batch, dim) -> A (rank, no bias) -> B (classes); a linear map of rank at
    most ``rank`` (Hewitt & Liang 2019)."""

    def __init__(self, dim: int, rank: int, n_classes: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.out = nn.Linear(rank, n_classes)
        self.standardize = Standardize(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.down(self.standardize(x.flatten(1))))


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPHead(nn.Module):
    """[Linear -> activation -> Dropout] per hidden size, then Linear; (batch, dim) -> (batch, classes)."""

    def __init__(self, dim: int, hidden: tuple[int, ...], activation: str, dropout: float, n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for size in hidden:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)
        self.standardize = Standardize(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x.flatten(1)))


class ConvHead(nn.Module):
    """A strided conv over hidden and a pointwise conv across layers, then an MLP.

    ``order='layers-first'``: each layer its own k3/s3 kernel, then the pointwise merge:
    (batch, layers, hidden) -> (batch, layers, hidden // 3) -> (batch, 1, hidden // 3) -> (batch, classes).
    ``order='merge-first'`` (the YouTube-titles study): the pointwise (1x1) conv merges the layers first, then one
    k3/s3 conv: (batch, layers, hidden) -> (batch, 1, hidden) -> (batch, 1, hidden // 3) -> (batch, classes); one
    layer goes straight to the k3/s3 conv.
    """

    def __init__(
        self, layers: int, hidden: int, conv_hidden: int, dropout: float, n_classes: int, order: str = "layers-first"
    ) -> None:
        super().__init__()
        self.order = order
        if order == "merge-first":
            # one layer has nothing to merge: the study applied the 1x1 conv to several layers only
            self.merge: nn.Module = nn.Conv1d(layers, 1, kernel_size=1) if layers > 1 else nn.Identity()
            self.strided = nn.Conv1d(1, 1, kernel_size=3, stride=3)
        else:
            # groups=layers: each layer gets its own kernel, so layers are not mixed before the pointwise conv.
            self.depthwise = nn.Conv1d(layers, layers, kernel_size=3, stride=3, groups=layers)
            self.pointwise = nn.Conv1d(layers, 1, kernel_size=1)
        reduced = (hidden - 3) // 3 + 1
        self.mlp = nn.Sequential(
            nn.Linear(reduced, conv_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(conv_hidden, n_classes)
        )
        self.standardize = Standardize(layers, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        if self.order == "merge-first":
            return self.mlp(self.strided(self.merge(x)).flatten(1))
        return self.mlp(self.pointwise(self.depthwise(x)).flatten(1))


class SumHead(nn.Module):
    """Sum the layers, then Linear -> tanh -> Linear; (batch, layers, hidden) -> (batch, classes)."""

    def __init__(self, layers: int, hidden: int, sum_hidden: int, n_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, sum_hidden)
        self.out = nn.Linear(sum_hidden, n_classes)
        self.standardize = Standardize(layers, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.standardize(x).sum(dim=1))))


class MixHead(nn.Module):
    """Scalar mix of the layers, then Linear; (batch, layers, hidden) -> (batch, classes)."""

    def __init__(self, layers: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.mix = ScalarMix(layers)
        self.linear = nn.Linear(hidden, n_classes)
        self.standardize = Standardize(layers, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.mix(self.standardize(x)))


class _Sum(nn.Module):
    """The fixed sum of the layers: (batch, layers, hidden) -> (batch, hidden)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1)


class PairHead(nn.Module):
    """Two towers (each: merge its layers, Linear layers with ``activation`` between them, tanh after the last), then
    the chosen features of u and v ([u, v, |u-v|, u*v] by default) -> Dropout -> Linear.

    ``a`` (batch, layers_a, hidden_a), ``b`` (batch, layers_b, hidden_b) -> (batch, classes). ``merge`` 'mix' is a
    learnt scalar mix per tower, 'sum' the fixed sum of the layers.
    """

    def __init__(
        self,
        shape_a: tuple[int, ...],
        shape_b: tuple[int, ...],
        sum_hidden: int,
        dropout: float,
        n_classes: int,
        *,
        tower: tuple[int, ...] | None = None,
        features: tuple[str, ...] = ("u", "v", "absdiff", "product"),
        merge: str = "mix",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = tuple(tower) if tower else (sum_hidden,)
        self.features = tuple(features)
        self.mix_a: nn.Module
        self.mix_b: nn.Module
        if merge == "sum":
            self.mix_a, self.mix_b = _Sum(), _Sum()
        else:
            self.mix_a, self.mix_b = ScalarMix(shape_a[0]), ScalarMix(shape_b[0])
        # every layer but the last in pre_*, the last (tanh after it) in proj_*: one layer keeps the old names
        self.pre_a, last_a = self._layers(shape_a[1], widths, activation)
        self.pre_b, last_b = self._layers(shape_b[1], widths, activation)
        self.proj_a, self.proj_b = nn.Linear(last_a, widths[-1]), nn.Linear(last_b, widths[-1])
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(len(self.features) * widths[-1], n_classes)
        self.standardize_a, self.standardize_b = Standardize(*shape_a), Standardize(*shape_b)

    @staticmethod
    def _layers(width: int, widths: tuple[int, ...], activation: str) -> tuple[nn.Sequential, int]:
        layers: list[nn.Module] = []
        for size in widths[:-1]:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            width = size
        return nn.Sequential(*layers), width

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(self.proj_a(self.pre_a(self.mix_a(self.standardize_a(a)))))  # (batch, tower width)
        v = torch.tanh(self.proj_b(self.pre_b(self.mix_b(self.standardize_b(b)))))
        parts = {"u": u, "v": v, "absdiff": (u - v).abs(), "product": u * v}
        return self.out(self.dropout(torch.cat([parts[f] for f in self.features], dim=1)))


_RNNS: dict[str, Any] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentHead(nn.Module):
    """RNN/GRU/LSTM over padded tokens, masked mean/max/last aggregation, Dropout, Linear.

    ``x`` (batch, max_len, hidden) float32, ``lengths`` (batch,) int64 >= 1 -> (batch, classes).
    """

    def __init__(self, kind: str, hidden: int, cfg: HeadConfig, n_classes: int) -> None:
        super().__init__()
        self.aggregate = cfg.aggregate
        self.directions = 2 if cfg.bidirectional else 1
        self.rnn = _RNNS[kind](
            hidden,
            cfg.rnn_hidden,
            num_layers=cfg.rnn_layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            # torch warns (and does nothing) when dropout is set on a single-layer RNN.
            dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(self.directions * cfg.rnn_hidden, n_classes)
        self.standardize = Standardize(hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Packing keeps padding out of the recurrence, so a row's result does not depend on its batch.
        packed = pack_padded_sequence(self.standardize(x), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out_packed, h_n = self.rnn(packed)
        if self.aggregate == "last":
            h = h_n[0] if isinstance(h_n, tuple) else h_n  # LSTM returns (h_n, c_n)
            # h: (layers * directions, batch, rnn_hidden); the last layer's final states of each direction.
            pooled = h[-self.directions :].transpose(0, 1).flatten(1)
        else:
            out, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=x.shape[1])  # (b, L, D*h)
            mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None])[..., None]
            if self.aggregate == "mean":
                pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
            else:
                pooled = out.masked_fill(~mask, float("-inf")).max(dim=1).values
        return self.out(self.dropout(pooled))


def build_module(cfg: HeadConfig, shape: InputShape, n_classes: int) -> nn.Module:
    """The untrained module for ``cfg.head`` on inputs of ``shape``, with ``n_classes`` outputs.

    Draws its initial weights from torch's global RNG: seed it first for a reproducible init.
    """
    head = cfg.head
    s = shape.shapes
    if head in POOLED_HEADS:
        dim = int(np.prod(s[0]))
        if head == "linear":
            return LinearHead(dim, n_classes)
        if head == "rank":
            return RankHead(dim, cfg.rank, n_classes)
        return MLPHead(dim, cfg.hidden, cfg.activation, cfg.dropout, n_classes)
    if head in LAYERED_HEADS:
        layers, hidden = s[0]
        if head == "conv":
            return ConvHead(layers, hidden, cfg.conv_hidden, cfg.dropout, n_classes, cfg.conv_order)
        if head == "sum":
            return SumHead(layers, hidden, cfg.sum_hidden, n_classes)
        return MixHead(layers, hidden, n_classes)
    if head in PAIR_HEADS:
        return PairHead(
            s[0],
            s[1],
            cfg.sum_hidden,
            cfg.dropout,
            n_classes,
            tower=cfg.tower_hidden,
            features=cfg.pair_features,
            merge=cfg.tower_merge,
            activation=cfg.activation,
        )
    if head in TOKEN_HEADS:
        return RecurrentHead(head, s[0][0], cfg, n_classes)
    raise AssertionError(f"unhandled head {head!r}")  # HeadConfig validates head names
