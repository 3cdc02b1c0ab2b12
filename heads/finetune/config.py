"""Typed, frozen configuration of one fine-tuning run (``heads finetune``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from embstore.data.augment import BALANCE, TRANSFORMS, AugmentSpec
from embstore.data.spec import DEFAULT_MAX_LENGTH, DataSpec
from embstore.errors import Choice, ConfigError, Constraint, Interval, ListOf, Optional, Text, validate_params
from embstore.extraction.textspec import POOL_TOKENS, PoolTokens, TextSpec
from heads.training.optim import OptimConfig, flat_keys, nested_values

__all__ = ["DATA_KEYS", "LORA_LR", "RECURRENT", "SCRATCH", "FinetuneConfig"]

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
Pooling = Literal["cls", "mean", "last"]
Aggregate = Literal["mean", "max", "last"]
SCRATCH = "scratch:"
"""The --model prefix of a recurrent classifier trained from nothing (:mod:`heads.finetune.scratch`)."""
RECURRENT = ("gru", "lstm", "rnn")
"""The cores ``scratch:`` builds (``scratch:gru``...)."""
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
LORA_LR = 5e-4
"""--lr with --lora when none is given: the adapters start at zero (B = 0) and are all that moves in the backbone,
so they take the step size of the LoRA paper's RoBERTa-base runs (4e-4 to 5e-4), not a full fine-tune's."""
_LORA_OPTIM = OptimConfig(lr=LORA_LR, weight_decay=0.0, batch_size=8, epochs=5, warmup_ratio=0.0)


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
    """'cls' (first token), attention-masked 'mean' or 'last' (the last non-pad token) of the last hidden state; None:
    'cls' for a text encoder, 'last' for a causal model (decoder LLMs; 'cls' is refused there), 'mean' (of the frames,
    masked by each clip's frame count) for speech, which has no CLS."""
    template: str | None = None
    """Text: a prompt around each text, with ``{text}`` (and ``{text_pair}`` for pairs), as extraction's
    (:class:`embstore.extraction.textspec.TextSpec`); recorded in run.json and used by ``heads predict``."""
    chat_template: bool = False
    """Text: wrap each text in the tokenizer's chat template as the user turn, generation prompt added."""
    system: str | None = None
    """The system turn of ``chat_template``."""
    pool_tokens: PoolTokens | None = None
    """Which tokens 'mean' covers: 'text' (the row's own text tokens: no BOS/EOS/CLS/SEP or template tokens) or 'all'
    (every non-pad token); None: 'text' for a causal model, 'all' for an encoder (as extraction)."""
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
    """exponential, exponential-epoch: lr multiplier per epoch (smoothly per step, or once per epoch as torch's
    ExponentialLR stepped per epoch)."""
    lora: int | None = None
    """LoRA rank R (peft): low-rank adapters on ``lora_targets`` of every block that ``freeze`` leaves trainable;
    the backbone's own weights stay as they are, the classifier trains fully. None: no adapters (full fine-tune).
    The adapters train at ``lr``, whose default with LoRA (from a config file or flags) is :data:`LORA_LR`."""
    lora_alpha: int | None = None
    """LoRA scaling numerator (the update is scaled by alpha / R); None: 2R."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (peft's default, 0)."""
    lora_targets: str | None = None
    """Comma list of block-relative module names to adapt, matched as peft matches ``target_modules`` (a name, or
    its end after a dot: 'query,value'); None: the attention and MLP projections of the anatomy map
    (:func:`embstore.backbones.anatomy.projections`)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (long inputs): the
    backbone's ``gradient_checkpointing_enable`` (non-reentrant), torch's checkpoint around a scratch model's RNN."""
    vocab_min_count: int = 25
    """scratch: a word enters the vocabulary when it occurs at least this often in the training rows."""
    lowercase: bool = True
    """scratch: lower-case the text before splitting it into words."""
    embedding_dim: int = 300
    """scratch: width of the trainable word embedding."""
    rnn_layers: int = 1
    """scratch: stacked recurrent layers."""
    rnn_hidden: int = 256
    """scratch: hidden size of each recurrent layer (per direction)."""
    bidirectional: bool = False
    """scratch: run the recurrent core both ways and concatenate the two directions."""
    aggregate: Aggregate | None = None
    """scratch: how the states over time become one vector: mean or max over the words, or the last state (of
    each direction); None: mean."""
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
        "pool_tokens": Optional(Choice(POOL_TOKENS)),
        "optim.schedule": Choice(("linear", "cosine", "exponential", "exponential-epoch")),
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
        "lora": Optional(Interval(int, 1, None, desc="a positive rank", hint="Use e.g. --lora 8.")),
        "lora_alpha": Optional(Interval(int, 1, None)),
        "lora_dropout": Interval(float, 0, 1, closed="left"),
        "lora_targets": Optional(
            ListOf(Text(r"[A-Za-z_][\w.]*"), desc="a comma list of module names", hint="Use e.g. query,value.")
        ),
        **{k: Interval(int, 1, None) for k in ("vocab_min_count", "embedding_dim", "rnn_layers", "rnn_hidden")},
        "aggregate": Optional(Choice(Aggregate)),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); the CLI's choices and help come from
    it too. ``optim.schedule``: the schedules this loop implements."""

    def __post_init__(self) -> None:
        validate_params(self)
        self.source.only(DATA_KEYS, "heads finetune")
        if self.audio:
            if self.pooling in ("cls", "last"):
                raise ConfigError(
                    f"Speech models have no {self.pooling} token to pool: pass --pooling mean (the default for speech)."
                )
            if self.template is not None or self.chat_template or self.pool_tokens is not None:
                raise ConfigError(
                    "--template, --chat-template and --pool-tokens shape text; speech models read audio: drop them."
                )
        else:
            self.text_spec(False)  # a bad template is refused now
        if self.augment is not None and not self.audio:
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
        self._check_lora()
        self._check_scratch()
        if self.prune_fraction is not None and self.optim.epochs < 2:
            raise ConfigError(
                f"prune_fraction prunes after the first epoch and keeps training, so 'epochs' must be "
                f"at least 2; got {self.optim.epochs}."
            )

    def _check_lora(self) -> None:
        """LoRA options without --lora, or with head pruning (which cuts the projections the adapters wrap)."""
        if self.lora is None:
            given = [k for k in ("lora_alpha", "lora_targets") if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} sets up LoRA adapters; pass --lora R with it.")
            return
        if self.prune_heads or self.prune_fraction is not None:
            flag = "--prune-heads" if self.prune_heads else "--prune-fraction"
            raise ConfigError(
                f"--lora cannot be combined with {flag}: pruning cuts the attention projections the adapters wrap; "
                "prune in a full fine-tune, or drop one of them."
            )

    def _check_scratch(self) -> None:
        """A scratch: model names a known core and reads words: no audio, no surgery, no LoRA; pretrained backbones
        take no scratch-only options."""
        if not self.scratch:
            if self.aggregate is not None:
                raise ConfigError(
                    "--aggregate pools a scratch: model's recurrent states; a pretrained backbone pools with "
                    "--pooling (cls, mean, last)."
                )
            return
        core = self.model[len(SCRATCH) :]
        if core not in RECURRENT:
            raise ConfigError(
                f"--model {self.model!r} names no recurrent core; use one of "
                f"{', '.join(SCRATCH + c for c in RECURRENT)}."
            )
        if self.audio:
            raise ConfigError(
                f"--model {self.model} trains on words from the training rows; it cannot read the audio column "
                f"{self.source.audio_col!r}: pass --text-col for a text table, or a speech model for audio."
            )
        surgery = [
            flag
            for flag, value in (
                ("--lora", self.lora),
                ("--freeze", self.freeze),
                ("--truncate", self.truncate),
                ("--prune-heads", self.prune_heads),
                ("--prune-fraction", self.prune_fraction),
                ("--pooling", self.pooling),
                ("--text-pair-col", self.source.text_pair_col),
            )
            if value is not None
        ]
        if surgery:
            raise ConfigError(
                f"{surgery[0]} does not apply to --model {self.model} (a recurrent model trained from nothing, with "
                "no pretrained blocks or CLS token): drop it (scratch: pools with --aggregate)."
            )

    @property
    def scratch(self) -> bool:
        """Whether the model is trained from nothing (``scratch:gru``...) rather than loaded."""
        return self.model.startswith(SCRATCH)

    @property
    def aggregate_(self) -> str:
        """scratch: the aggregation in effect (``aggregate``, or mean)."""
        return self.aggregate or "mean"

    @property
    def lora_alpha_(self) -> int:
        """The LoRA alpha in effect: ``lora_alpha``, or 2R."""
        return int(self.lora_alpha if self.lora_alpha is not None else 2 * (self.lora or 0))

    @property
    def audio(self) -> bool:
        """Whether the rows are audio clips (``audio_col``)."""
        return self.source.modality == "audio"

    @property
    def pooling_(self) -> str:
        """The pooling in effect: ``pooling``, or the modality's default."""
        if self.scratch:
            return self.aggregate_
        return self.pooling or ("mean" if self.audio else "cls")

    def text_spec(self, causal: bool) -> TextSpec:
        """The text spec of this run for a model that is ``causal`` or not (its ``pool_tokens`` default)."""
        from embstore.config import default_pool_tokens

        return TextSpec(
            template=self.template,
            chat_template=self.chat_template,
            system=self.system,
            pool_tokens=self.pool_tokens or default_pool_tokens(causal),  # type: ignore[arg-type]
        )

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
        optim = _LORA_OPTIM if d.get("lora") is not None else _DEFAULT_OPTIM
        values = nested_values(cls, d, DATA_KEYS, optim, "finetune")
        if "classifier_hidden" in values:
            h = values["classifier_hidden"]
            values["classifier_hidden"] = tuple(int(x) for x in (str(h).split(",") if isinstance(h, (str, int)) else h))
        if values.get("pitch_steps") is not None:
            from embstore.config import parse_steps

            values["pitch_steps"] = parse_steps(values["pitch_steps"])
        else:
            values.pop("pitch_steps", None)
        return cls(**values)
