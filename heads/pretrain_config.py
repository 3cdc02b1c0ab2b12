"""Typed, frozen configuration of one masked-LM pretraining run (``heads pretrain``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from embstore.config import reject_unknown_keys
from embstore.errors import ConfigError

__all__ = ["NOT_FINGERPRINTED", "SPECIAL_TOKENS", "PretrainConfig"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens of a trained WordPiece vocabulary, ids 0..4 in this order."""
NOT_FINGERPRINTED = ("out", "resume", "epochs", "max_steps", "max_minutes", "device")
"""Options a resumed run may change (how long to train, where); every other one must match the checkpoint."""


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """One pretraining run; saved in run.json and fingerprinted into every checkpoint."""

    data: str | None = None
    """One data file (CSV/TSV/JSONL/Parquet); None when ``splits`` is given."""
    splits: tuple[tuple[str, str], ...] = ()
    """(split name, file) pairs; ``train_split`` is the corpus, ``eval_split`` the held-out text."""
    text_col: str | None = None
    """Text column (None: 'text')."""
    text_pair_col: str | None = None
    """Second sentence column: rows become pairs [CLS] A [SEP] B [SEP]."""
    limit: int | None = None
    """First N rows of each split."""
    skip_empty: bool = False
    """Drop empty text rows instead of failing."""
    train_split: str = "train"
    """Split used for training (a single --data file is always the corpus)."""
    eval_split: str | None = None
    """Held-out split for perplexity; None: 'validation', 'dev' or 'test' if present, else carve ``heldout_fraction``."""
    heldout_fraction: float = 0.05
    """Share of the corpus rows carved (seeded) for held-out perplexity when no evaluation split is given."""
    tokenizer: str | None = None
    """Reuse this tokenizer (a directory with tokenizer.json, or a model directory); None trains a WordPiece one."""
    vocab_size: int = 8000
    """Target WordPiece vocabulary size (special tokens and the corpus alphabet included)."""
    min_frequency: int = 2
    """WordPiece: a merge must occur this often in the corpus."""
    lowercase: bool = True
    """Lower-case (and strip accents from) text before WordPiece."""
    cjk_chars: bool = True
    """Split CJK ideographs into single characters (BERT's handle_chinese_chars)."""
    model_config: str | None = None
    """BERT config YAML/JSON (e.g. configs/models/mini-bert.yaml); the layers/hidden/... options override its fields."""
    layers: int | None = None
    """Encoder layers (default 4 without a model_config)."""
    hidden: int | None = None
    """Hidden size (default 256)."""
    heads: int | None = None
    """Attention heads (default 4); must divide ``hidden``."""
    intermediate: int | None = None
    """Feed-forward size (default 4 x hidden)."""
    max_positions: int | None = None
    """Position embeddings (default 512); must be at least ``max_length``."""
    seed: int = 0
    """Seed of initialisation, the held-out carve, shuffling and masking."""
    max_length: int = 128
    """Token sequences (specials included) are truncated to this length."""
    mask_prob: float = 0.15
    """Bernoulli probability that a token (or a whole word) is selected for prediction."""
    whole_word: bool = False
    """Select whole words (all their WordPiece pieces) instead of single tokens."""
    swap_augment: bool = False
    """Sentence pairs: train on both orders (A, B) and (B, A), doubling the corpus."""
    pair_objective: Literal["sop", "nsp"] | None = None
    """Sentence pairs: add sentence-order ('sop') or next-sentence ('nsp') prediction on [CLS], trained jointly."""
    pair_weight: float = 1.0
    """Weight of the pair-objective loss added to the MLM loss."""
    lr: float = 5e-4
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    batch_size: int = 32
    epochs: int = 1
    """Passes over the corpus (a bound; ``max_steps`` and ``max_minutes`` may stop earlier)."""
    max_steps: int | None = None
    """Optimizer steps in total; when given it sets the schedule length instead of ``epochs``."""
    max_minutes: float | None = None
    """Stop (and save) after this many minutes of training; the schedule is unchanged."""
    warmup_ratio: float = 0.06
    """Share of the optimizer steps with a linear warmup."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """lr decay after the warmup (per optimizer step)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate mixed precision (fp16 needs a GPU)."""
    resume: bool = False
    """Continue from ``out``/checkpoint when its fingerprint matches."""
    out: str | None = None
    """Run directory; None: runs/<time>-pretrain. The backbone is written to ``out``/model."""
    device: str | None = None
    """'cpu', 'cuda'...; None picks CUDA when present."""

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[Any, ...]) -> None:
            if getattr(self, name) not in allowed:
                shown = ", ".join("none" if a is None else str(a) for a in allowed)
                raise ConfigError(f"The '{name}' option must be one of {shown}; got {getattr(self, name)!r}.")

        choice("pair_objective", (None, "sop", "nsp"))
        choice("schedule", ("linear", "cosine", "constant"))
        choice("mixed_precision", ("no", "fp16", "bf16"))
        if self.data is not None and self.splits:
            raise ConfigError("You cannot pass both --data and --split; pass one file with --data or one --split per file.")
        if self.data is None and not self.splits:
            raise ConfigError("No data given: pass --data FILE or --split NAME=FILE.")
        for name in ("batch_size", "epochs", "grad_accum", "min_frequency", "max_steps", "layers", "hidden", "heads",
                     "intermediate", "max_positions", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"The '{name}' option must be a positive integer; got {v}.")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ConfigError(f"The 'vocab_size' option must leave room beyond the {len(SPECIAL_TOKENS)} special tokens "
                              f"({', '.join(SPECIAL_TOKENS)}); got {self.vocab_size}. Use e.g. 8000.")
        if self.max_length < 4:
            raise ConfigError(f"The 'max_length' option must be at least 4 tokens ([CLS] A [SEP] B [SEP]); got {self.max_length}.")
        if self.max_positions is not None and self.max_positions < self.max_length:
            raise ConfigError(f"max_positions {self.max_positions} is shorter than max_length {self.max_length}: the model "
                              f"could not embed the last positions. Raise --max-positions to at least {self.max_length} "
                              "or lower --max-length.")
        if self.hidden is not None and self.heads is not None and self.hidden % self.heads:
            raise ConfigError(f"hidden {self.hidden} is not a multiple of heads {self.heads}; each head gets hidden/heads "
                              "dimensions, so pick e.g. --hidden 256 --heads 4.")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"The 'mask_prob' option must be in (0, 1); got {self.mask_prob}. BERT uses 0.15.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"The 'heldout_fraction' option must be a fraction in (0, 1); got {self.heldout_fraction}.")
        if self.lr <= 0:
            raise ConfigError(f"The 'lr' option must be positive; got {self.lr}.")
        if self.weight_decay < 0 or self.pair_weight < 0:
            raise ConfigError("The 'weight_decay' and 'pair_weight' options must be 0 or more; "
                              f"got {self.weight_decay} and {self.pair_weight}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"The 'warmup_ratio' option must be in [0, 1); got {self.warmup_ratio}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"The 'max_minutes' option must be positive; got {self.max_minutes}.")
        if (self.swap_augment or self.pair_objective) and not self.text_pair_col:
            raise ConfigError("--swap-augment and --pair-objective need sentence pairs; pass --text-pair-col COLUMN.")
        if self.swap_augment and self.pair_objective == "sop":
            raise ConfigError("--pair-objective sop predicts which order is the original one, but --swap-augment "
                              "presents both orders as original, so it cannot be learnt; use --pair-objective nsp "
                              "or drop --swap-augment.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["splits"] = [list(s) for s in self.splits]
        return d

    def fingerprinted(self) -> dict[str, Any]:
        """The options a resumed run must share with its checkpoint."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        reject_unknown_keys(d, {f.name for f in dataclasses.fields(cls)}, "pretrain")
        d = dict(d)
        if d.get("splits"):
            d["splits"] = tuple(tuple(s) for s in d["splits"])
        else:
            d.pop("splits", None)
        if d.get("pair_objective") in ("none", ""):
            d["pair_objective"] = None
        return cls(**d)
