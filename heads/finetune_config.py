"""Typed, frozen configuration of one fine-tuning run (``heads finetune``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from embstore.config import DEFAULT_DATA, reject_unknown_keys
from embstore.errors import ConfigError

__all__ = ["FinetuneConfig"]


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """One fine-tuning run; saved in run.json and fingerprinted into every checkpoint."""

    model: str = "minilm"
    """Backbone: 'minilm', 'random:NAME', a local HF directory or a cached Hub id."""
    data: str | None = DEFAULT_DATA
    """One data file or 'builtin:tweets'; None when ``splits`` is given."""
    splits: tuple[tuple[str, str], ...] = ()
    """(split name, file) pairs."""
    holdout: float | None = None
    """Fraction of ``data`` held out as 'test' by load_dataset (seeded, stratified)."""
    seed: int = 0
    """Seed of the holdout, the validation carve, initialisation and shuffling."""
    text_col: str | None = None
    """Text column (None: 'text' or the builtin default)."""
    text_pair_col: str | None = None
    """Second text column for sentence pairs (encoded jointly)."""
    label_col: str | None = None
    """Label column (None: the builtin default); fine-tuning needs labels."""
    limit: int | None = None
    """First N rows of each split."""
    skip_empty: bool = False
    """Drop empty text rows instead of failing."""
    max_length: int = 128
    """Inputs are truncated to this many tokens."""
    freeze: str | None = None
    """Layers to freeze: '0-8', 'embeddings', 'all', 'all-but-last', '0,3', negative indices (0 = embeddings)."""
    truncate: int | None = None
    """Keep encoder layers 1..K and classify from layer K."""
    prune_heads: str | None = None
    """Heads removed before training: '11:0,3;10:5' (layers 1..L, heads from 0)."""
    prune_fraction: float | None = None
    """Remove this fraction of the least important heads after the first epoch (Michel et al. 2019)."""
    min_heads_per_layer: int = 1
    """prune_fraction keeps at least this many heads in every layer."""
    prune_batches: int = 8
    """Training batches used to estimate head importance."""
    classifier: Literal["linear", "mlp"] = "linear"
    """Head on the pooled vector."""
    classifier_hidden: tuple[int, ...] = (2048,)
    """mlp: hidden layer sizes."""
    dropout: float = 0.1
    """mlp: dropout before each linear layer after the first."""
    pooling: Literal["cls", "mean"] = "cls"
    """'cls' (first token) or attention-masked 'mean' of the last hidden state."""
    lr: float = 2e-5
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    batch_size: int = 16
    epochs: int = 3
    patience: int = 2
    """Epochs without a better validation macro-F1 before stopping (0: never; the last epoch wins)."""
    warmup_ratio: float = 0.1
    """Share of the optimizer steps with a linear warmup."""
    schedule: Literal["linear", "cosine", "exponential"] = "linear"
    """lr decay after the warmup (per optimizer step)."""
    gamma: float = 0.9
    """exponential: lr multiplier per epoch."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate mixed precision (fp16 needs a GPU)."""
    train_split: str = "train"
    eval_split: str | None = None
    """None: 'test' if present, else 'validation'."""
    validation_fraction: float = 0.1
    """Share of the training rows carved (seeded, stratified) for early stopping."""
    folds: int | None = None
    """Stratified, seeded K-fold cross-validation of the training rows: K models from the same backbone, each
    scored on its held-out fold (the evaluation split is unused); results are reported as mean +- std."""
    resume: bool = False
    """Continue from ``out``/checkpoint when its fingerprint matches."""
    out: str | None = None
    """Run directory; None: runs/<time>-finetune."""
    device: str | None = None
    """'cpu', 'cuda'...; None picks CUDA when present."""

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"The '{name}' option must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")

        choice("classifier", ("linear", "mlp"))
        choice("pooling", ("cls", "mean"))
        choice("schedule", ("linear", "cosine", "exponential"))
        choice("mixed_precision", ("no", "fp16", "bf16"))
        if self.data is not None and self.splits:
            raise ConfigError("You cannot pass both --data and --split; pass one file with --data or one --split per file.")
        if self.data is None and not self.splits:
            raise ConfigError("No data given: pass --data FILE or --split NAME=FILE.")
        for name in ("max_length", "batch_size", "epochs", "grad_accum", "prune_batches", "min_heads_per_layer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"The '{name}' option must be a positive integer; got {getattr(self, name)}.")
        if self.max_length < 2:
            raise ConfigError(f"The 'max_length' option must be at least 2 tokens; got {self.max_length}.")
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"The 'folds' option must be at least 2 (K-fold cross-validation); got {self.folds}.")
        if self.patience < 0:
            raise ConfigError(f"The 'patience' option must be 0 (off) or more epochs; got {self.patience}.")
        if self.lr <= 0:
            raise ConfigError(f"The 'lr' option must be positive; got {self.lr}.")
        if self.weight_decay < 0:
            raise ConfigError(f"The 'weight_decay' option must be 0 or more; got {self.weight_decay}.")
        for name in ("holdout", "validation_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v < 1.0:
                raise ConfigError(f"The '{name}' option must be a fraction in (0, 1); got {v}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"The 'warmup_ratio' option must be in [0, 1); got {self.warmup_ratio}.")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"The 'gamma' option must be in (0, 1]; got {self.gamma}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"The 'dropout' option must be in [0, 1); got {self.dropout}.")
        if any(h < 1 for h in self.classifier_hidden):
            raise ConfigError(f"The 'classifier_hidden' option must be positive layer sizes; got {self.classifier_hidden}.")
        if self.truncate is not None and self.truncate < 1:
            raise ConfigError(f"The 'truncate' option must keep at least 1 encoder layer; got {self.truncate}.")
        if self.prune_fraction is not None:
            if not 0.0 < self.prune_fraction < 1.0:
                raise ConfigError(f"The 'prune_fraction' option must be in (0, 1); got {self.prune_fraction}. "
                                  "Use e.g. 0.2 to remove 20% of the heads.")
            if self.epochs < 2:
                raise ConfigError(f"prune_fraction prunes after the first epoch and keeps training, so 'epochs' must be "
                                  f"at least 2; got {self.epochs}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["splits"] = [list(s) for s in self.splits]
        d["classifier_hidden"] = list(self.classifier_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        reject_unknown_keys(d, {f.name for f in dataclasses.fields(cls)}, "finetune")
        d = dict(d)
        if d.get("splits") is not None:
            d["splits"] = tuple(tuple(s) for s in d["splits"])
        else:
            d.pop("splits", None)
        if "classifier_hidden" in d:
            h = d["classifier_hidden"]
            d["classifier_hidden"] = tuple(int(x) for x in (str(h).split(",") if isinstance(h, (str, int)) else h))
        return cls(**d)
