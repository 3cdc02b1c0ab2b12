"""Typed, frozen configuration of one masked-LM pretraining run (``heads pretrain``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from embstore.data.spec import DataSpec
from embstore.errors import Choice, ConfigError, Constraint, Interval, Optional, validate_params
from heads.training.optim import OptimConfig, flat_keys, nested_values

__all__ = ["DATA_KEYS", "NOT_FINGERPRINTED", "SPECIAL_TOKENS", "PretrainConfig"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens of a trained WordPiece vocabulary, ids 0..4 in this order."""
NOT_FINGERPRINTED = ("out", "resume", "epochs", "max_steps", "max_minutes", "device")
"""Options a resumed run may change (how long to train, where); every other one must match the checkpoint."""
DATA_KEYS = ("data", "splits", "seed", "text_col", "text_pair_col", "limit", "skip_empty")
"""The flat data-source keys ``heads pretrain`` takes (unlabelled text; held-out rows are carved by
``heldout_fraction`` or come from a split, so no holdout)."""
PairObjective = Literal["sop", "nsp"]
NO_PAIR_OBJECTIVE = "none"
"""What ``--pair-objective`` (or a YAML value) types for no pair objective (None)."""
_DEFAULT_OPTIM = OptimConfig(lr=5e-4, weight_decay=0.01, batch_size=32, epochs=1, warmup_ratio=0.06)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """One pretraining run; saved in run.json and fingerprinted into every checkpoint."""

    source: DataSpec
    """The corpus (data or splits, seed, text/pair columns, limit, skip_empty); flat keys in YAML. Its seed
    also seeds initialisation, the held-out carve, shuffling and masking."""
    train_split: str = "train"
    """Split used for training (a single --data file is always the corpus)."""
    eval_split: str | None = None
    """Held-out split for perplexity; None: 'validation', 'dev' or 'test' if present, else carve
    ``heldout_fraction``."""
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
    max_length: int = 128
    """Token sequences (specials included) are truncated to this length."""
    mask_prob: float = 0.15
    """Bernoulli probability that a token (or a whole word) is selected for prediction."""
    whole_word: bool = False
    """Select whole words (all their WordPiece pieces) instead of single tokens."""
    swap_augment: bool = False
    """Sentence pairs: train on both orders (A, B) and (B, A), doubling the corpus."""
    pair_objective: PairObjective | None = None
    """Sentence pairs: add sentence-order ('sop') or next-sentence ('nsp') prediction on [CLS], trained jointly."""
    pair_weight: float = 1.0
    """Weight of the pair-objective loss added to the MLM loss."""
    optim: OptimConfig = _DEFAULT_OPTIM
    """lr, weight_decay, batch_size, epochs (a bound; max_steps and max_minutes may stop earlier), warmup_ratio,
    schedule (those of ``optim.schedule`` below), grad_accum, mixed_precision, max_grad_norm (clipping); flat keys
    in YAML."""
    max_steps: int | None = None
    """Optimizer steps in total; when given it sets the schedule length instead of ``epochs``."""
    max_minutes: float | None = None
    """Stop (and save) after this many minutes of training; the schedule is unchanged."""
    resume: bool = False
    """Continue from ``out``/checkpoint when its fingerprint matches."""
    out: str | None = None
    """Run directory; None: runs/<time>-pretrain. The backbone is written to ``out``/model."""
    device: str | None = None
    """'cpu', 'cuda'...; None or 'auto' picks CUDA when present (:func:`embstore.device.resolve_device`)."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "pair_objective": Optional(Choice(PairObjective), none=NO_PAIR_OBJECTIVE),
        "optim.schedule": Choice(("linear", "cosine", "constant")),
        "min_frequency": Interval(int, 1, None),
        **{k: Optional(Interval(int, 1, None)) for k in ("max_steps", "layers", "hidden", "heads", "intermediate")},
        "max_positions": Optional(Interval(int, 1, None)),
        "vocab_size": Interval(
            int,
            len(SPECIAL_TOKENS) + 1,
            None,
            desc=f"more than the {len(SPECIAL_TOKENS)} special tokens ({', '.join(SPECIAL_TOKENS)})",
            hint="Use e.g. 8000.",
        ),
        "max_length": Interval(int, 4, None, desc="at least 4 tokens ([CLS] A [SEP] B [SEP])"),
        "mask_prob": Interval(float, 0, 1, closed="neither", hint="BERT uses 0.15."),
        "heldout_fraction": Interval(float, 0, 1, closed="neither"),
        "pair_weight": Interval(float, 0, None, desc="0 or more"),
        "max_minutes": Optional(Interval(float, 0, None, closed="neither")),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); the CLI's choices and help come from
    it too. ``optim.schedule``: the schedules this loop implements."""

    def __post_init__(self) -> None:
        validate_params(self)
        self.source.only(DATA_KEYS, "heads pretrain")
        if self.max_positions is not None and self.max_positions < self.max_length:
            raise ConfigError(
                f"max_positions {self.max_positions} is shorter than max_length {self.max_length}: the model "
                f"could not embed the last positions. Raise --max-positions to at least {self.max_length} "
                "or lower --max-length."
            )
        if self.hidden is not None and self.heads is not None and self.hidden % self.heads:
            raise ConfigError(
                f"hidden {self.hidden} is not a multiple of heads {self.heads}; each head gets hidden/heads "
                "dimensions, so pick e.g. --hidden 256 --heads 4."
            )
        if (self.swap_augment or self.pair_objective) and not self.source.text_pair_col:
            raise ConfigError("--swap-augment and --pair-objective need sentence pairs; pass --text-pair-col COLUMN.")
        if self.swap_augment and self.pair_objective == "sop":
            raise ConfigError(
                "--pair-objective sop predicts which order is the original one, but --swap-augment "
                "presents both orders as original, so it cannot be learnt; use --pair-objective nsp "
                "or drop --swap-augment."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready flat dict (the data and optimiser keys at the top level)."""
        return flat_keys(self, DATA_KEYS)

    def fingerprinted(self) -> dict[str, Any]:
        """The options a resumed run must share with its checkpoint."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict` (flat keys, as in YAML); unknown keys are an error naming them."""
        values = nested_values(cls, d, DATA_KEYS, _DEFAULT_OPTIM, "pretrain", data_defaults={"data": None})
        if values.get("pair_objective") in (NO_PAIR_OBJECTIVE, ""):
            values["pair_objective"] = None
        return cls(**values)
