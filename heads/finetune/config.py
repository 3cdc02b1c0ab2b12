"""Typed, frozen configuration of one fine-tuning run (``heads finetune``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from embstore.data.augment import BALANCE, TRANSFORMS, AugmentSpec
from embstore.data.spec import DEFAULT_MAX_LENGTH, DataSpec
from embstore.errors import Choice, ConfigError, Constraint, Interval, ListOf, Optional, validate_params
from heads.training.optim import OptimConfig, flat_keys, nested_values

__all__ = ["DATA_KEYS", "FinetuneConfig"]

DATA_KEYS = (
    "data",
    "splits",
    "holdout",
    "seed",
    "text_col",
    "text_pair_col",
    "label_col",
    "group_col",
    "audio_col",
    "limit",
    "skip_empty",
    "skip_bad",
    "label_from_path",
    "preprocess",
)
"""The flat data-source keys ``heads finetune`` takes: text or audio tables, with groups (e.g. speakers)."""
Classifier = Literal["linear", "mlp"]
Pooling = Literal["cls", "mean"]
FEATURE_ENCODER = "feature-encoder"
"""The freeze word for a speech model's convolutional feature encoder (alone, as ``freeze_feature_encoder()``)."""
FREEZE_SPEC = (
    "none, embeddings, all, all-but-last, all-but-embeddings-and-last, a range 0-8, a list 0,3, negative indices, "
    "and for speech models "
    f"{FEATURE_ENCODER} (the conv front end, alone or in a list such as {FEATURE_ENCODER},1-4)"
)
"""What ``freeze`` accepts, in words (its parser is :func:`heads.finetune.surgery.parse_freeze`, which needs the
model's layer count); the CLI's help and the parser's error say it."""
# Measured on 400-800 rows of four data sets (README, "Fine-tuning defaults"): the Trainer's lr and batch, no
# warmup or decay, and 5 epochs rather than 3 (small sets need the steps; early stopping keeps the best epoch).
_DEFAULT_OPTIM = OptimConfig(lr=5e-5, weight_decay=0.0, batch_size=8, epochs=5, warmup_ratio=0.0)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """One fine-tuning run; saved in run.json and fingerprinted into every checkpoint."""

    model: str = "minilm"
    """Backbone: 'minilm', 'random:NAME', a local HF directory or a cached Hub id."""
    source: DataSpec = DataSpec()
    """Where the rows come from (data or splits, holdout, seed, columns, limit, skip_empty); flat keys in YAML.
    Its seed also seeds the validation carve, initialisation and shuffling. Fine-tuning needs labels."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Inputs are truncated to this many tokens; the default is extraction's, so a sweep and a fine-tune of one
    file see the same text (:data:`embstore.data.spec.DEFAULT_MAX_LENGTH` says why 128)."""
    freeze: str | None = None
    """Layers to freeze, any of :data:`FREEZE_SPEC` (0 = embeddings; for speech the conv feature encoder, its
    projection and the position embedding; :data:`FEATURE_ENCODER` is the conv front end alone, as the Trainer's
    ``freeze_feature_encoder()``). None: nothing for text, the feature encoder for speech (the recipe of speech
    fine-tuning since wav2vec 2.0)."""
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
    classifier: Classifier = "linear"
    """Head on the pooled vector."""
    classifier_hidden: tuple[int, ...] = (2048,)
    """mlp: hidden layer sizes."""
    dropout: float = 0.1
    """mlp: dropout before each linear layer after the first."""
    pooling: Pooling | None = None
    """'cls' (first token) or attention-masked 'mean' of the last hidden state; None: 'cls' for text, 'mean' (of the
    frames, masked by each clip's frame count) for speech, which has no CLS."""
    max_seconds: float | None = 20.0
    """Speech: a training clip longer than this is cut to a random window of this length, drawn anew each epoch
    (seeded); evaluation always reads whole clips. None: never cut. 20 s is the Hugging Face audio-classification
    example's ``max_length_seconds``."""
    batch_seconds: float = 60.0
    """Speech: a batch holds at most this many seconds of padded audio (rows x longest clip) and at most
    ``batch_size`` rows; a clip longer than this is a batch of its own. Batches are formed from rows of similar
    length (a seeded order each epoch), so little of the budget is padding."""
    augment: str | None = None
    """Speech: on-the-fly augmentation of the training clips, a comma list of the extraction side's augmenters
    (:data:`embstore.data.augment.TRANSFORMS`), drawn anew each epoch from a generator seeded by (seed, epoch,
    row)."""
    snr_db: float = 20.0
    """augment noise: signal-to-noise ratio of the added Gaussian noise, in dB."""
    noise_std: float | None = None
    """augment noise: a fixed standard deviation of the added noise instead of ``snr_db``."""
    shift_max_seconds: float | None = None
    """augment shift: roll by up to this many seconds either way, instead of by any fraction of the clip."""
    pitch_steps: tuple[float, ...] = (-1.0, 0.0, 1.0)
    """augment pitch: semitones, one drawn per clip and epoch (the duration is kept)."""
    balance: str = "none"
    """Speech, 'oversample': each epoch, augmented copies (``augment``'s transforms, drawn anew) of the fitting rows
    of every class below the majority's count bring it to that count; the original clips are then read as they are
    (only the copies are augmented). The validation and evaluation rows are never copied."""
    eval_steps: int | None = None
    """Also score the validation rows (loss, accuracy, macro-F1) every this many optimizer steps, as the Trainer's
    ``eval_steps``; recorded with the run (``step_evaluations``) and drawn in learning_curves.png."""
    split_reports: bool = False
    """After training, a classification report (per-class and weighted precision, recall, F1) of every split: the
    fitting rows, the validation rows and the evaluation rows, in summary.md and results.jsonl."""
    keep_fold_models: bool = False
    """With ``folds``: keep every fold's model (``fold-K/model``), score their averaged probabilities on the
    evaluation split (the fold ensemble, in run.json and summary.md), and let ``heads predict --run`` average them."""
    optim: OptimConfig = _DEFAULT_OPTIM
    """lr, weight_decay, batch_size, epochs, warmup_ratio, schedule (those of ``optim.schedule`` below), grad_accum,
    mixed_precision, max_grad_norm (clipping, as the Trainer does); flat keys in YAML."""
    head_lr: float = 1e-3
    """Learning rate of the freshly initialised classifier (the backbone gets ``lr``): a random head needs a far
    larger step than pretrained weights, or a small data set ends in a majority-class model."""
    patience: int = 2
    """Epochs without a better validation macro-F1 before stopping (0: never; the last epoch wins)."""
    min_epochs: int = 3
    """Early stopping never stops before this many epochs; epochs whose validation predictions are all one
    class (the classifier has not moved yet) do not count against the patience."""
    gamma: float = 0.9
    """exponential: lr multiplier per epoch."""
    train_split: str = "train"
    eval_split: str | None = None
    """None: 'test' if present, else 'validation'."""
    validation_fraction: float = 0.1
    """Share of the training rows carved (seeded, stratified, group-disjoint with groups) for early stopping: the
    sweep's validation carve, so ``heads sweep`` of the same data, seed and fraction validates on the same rows."""
    folds: int | None = None
    """Stratified, seeded K-fold cross-validation of the training rows: K models from the same backbone, each
    scored on its held-out fold (the evaluation split is unused); results are reported as mean +- std."""
    resume: bool = False
    """Continue from ``out``/checkpoint when its fingerprint matches."""
    out: str | None = None
    """Run directory; None: runs/<time>-finetune."""
    device: str | None = None
    """'cpu', 'cuda'...; None or 'auto' picks CUDA when present (:func:`embstore.device.resolve_device`)."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "classifier": Choice(Classifier),
        "pooling": Optional(Choice(Pooling)),
        "optim.schedule": Choice(("linear", "cosine", "exponential")),
        "max_length": Interval(int, 2, None, desc="at least 2 tokens"),
        **{k: Interval(int, 1, None) for k in ("prune_batches", "min_heads_per_layer")},
        "folds": Optional(Interval(int, 2, None, desc="at least 2 (K-fold cross-validation)")),
        "patience": Interval(int, 0, None, desc="0 (off) or more epochs"),
        "min_epochs": Interval(int, 1, None, desc="a positive number of epochs"),
        "head_lr": Interval(
            float,
            0,
            None,
            closed="neither",
            desc="positive (it is the classifier's learning rate)",
            hint="Use e.g. --head-lr 0.001.",
        ),
        "validation_fraction": Interval(float, 0, 1, closed="neither"),
        "gamma": Interval(float, 0, 1, closed="right"),
        "dropout": Interval(float, 0, 1, closed="left"),
        "classifier_hidden": ListOf(Interval(int, 1, None), min_len=0, desc="positive layer sizes"),
        "max_seconds": Optional(Interval(float, 0, None, closed="neither", desc="a positive number of seconds")),
        "batch_seconds": Interval(float, 0, None, closed="neither", desc="a positive number of seconds"),
        "augment": Optional(ListOf(Choice(TRANSFORMS))),
        "balance": Choice(BALANCE),
        "eval_steps": Optional(Interval(int, 1, None, desc="a positive number of optimizer steps")),
        "truncate": Optional(Interval(int, 1, None, desc="at least 1 encoder layer")),
        "prune_fraction": Optional(
            Interval(float, 0, 1, closed="neither", hint="Use e.g. 0.2 to remove 20% of the heads.")
        ),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); the CLI's choices and help come from
    it too. ``optim.schedule``: the schedules this loop implements."""

    def __post_init__(self) -> None:
        validate_params(self)
        self.source.only(DATA_KEYS, "heads finetune")
        if self.audio:
            if self.pooling == "cls":
                raise ConfigError("Speech models have no CLS frame: pass --pooling mean (the default for speech).")
        elif self.augment is not None:
            raise ConfigError(
                f"The 'augment' option ({self.augment!r}) transforms audio clips; pass --audio-col COLUMN "
                "with a table of audio files, or drop --augment."
            )
        if self.augment is not None:
            self.augment_spec(0)  # names a bad transform now, not in the first epoch
        if self.balance != "none" and (not self.audio or self.augment is None):
            raise ConfigError(
                f"--balance {self.balance} adds augmented copies of speech clips: pass --audio-col COLUMN and "
                "--augment with the transforms to apply (e.g. --augment noise,shift,pitch)."
            )
        if self.keep_fold_models and self.folds is None:
            raise ConfigError("--keep-fold-models keeps the models of --folds K; pass --folds too, or drop it.")
        if self.prune_fraction is not None and self.optim.epochs < 2:
            raise ConfigError(
                f"prune_fraction prunes after the first epoch and keeps training, so 'epochs' must be "
                f"at least 2; got {self.optim.epochs}."
            )

    @property
    def audio(self) -> bool:
        """Whether the rows are audio clips (``audio_col``)."""
        return self.source.modality == "audio"

    @property
    def pooling_(self) -> str:
        """The pooling in effect: ``pooling``, or the modality's default."""
        return self.pooling or ("mean" if self.audio else "cls")

    @property
    def freeze_(self) -> str:
        """The freeze spec in effect: ``freeze``, or the modality's default."""
        return self.freeze or (FEATURE_ENCODER if self.audio else "none")

    def augment_spec(self, epoch: int) -> AugmentSpec | None:
        """The augmenters of one epoch (None without ``augment``): one copy per row, seeded by (seed, epoch), so a
        resumed run draws what an uninterrupted one does."""
        if self.augment is None:
            return None
        return AugmentSpec(
            transforms=tuple(t.strip() for t in self.augment.split(",") if t.strip()),
            copies=1,
            classes="all",
            snr_db=self.snr_db,
            noise_std=self.noise_std,
            shift_max_seconds=self.shift_max_seconds,
            pitch_steps=self.pitch_steps,
            seed=self.source.seed * 100_003 + epoch,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready flat dict (tuples become lists; the data and optimiser keys at the top level)."""
        d = flat_keys(self, DATA_KEYS, first=("model",))
        d["classifier_hidden"] = list(self.classifier_hidden)
        d["pitch_steps"] = list(self.pitch_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        """Inverse of :meth:`to_dict` (flat keys, as in YAML); unknown keys are an error naming them."""
        values = nested_values(cls, d, DATA_KEYS, _DEFAULT_OPTIM, "finetune")
        if "classifier_hidden" in values:
            h = values["classifier_hidden"]
            values["classifier_hidden"] = tuple(int(x) for x in (str(h).split(",") if isinstance(h, (str, int)) else h))
        if values.get("pitch_steps") is not None:
            from embstore.config import parse_steps

            values["pitch_steps"] = parse_steps(values["pitch_steps"])
        else:
            values.pop("pitch_steps", None)
        return cls(**values)
