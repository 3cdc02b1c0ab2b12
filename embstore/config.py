"""Typed, frozen configuration of one extraction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from embstore.data.augment import BALANCE, TRANSFORMS
from embstore.data.spec import DATA_KEYS, DEFAULT_DATA, DEFAULT_MAX_LENGTH, DataSpec
from embstore.data.words import WORD_POOLINGS
from embstore.errors import Choice, ConfigError, Constraint, Interval, ListOf, Optional, validate_params
from embstore.extraction.textspec import POOL_TOKENS, PoolTokens, TextSpec

__all__ = [
    "ExtractConfig",
    "POOLINGS",
    "DEFAULT_DATA",
    "reject_unknown_keys",
    "default_pooling",
    "default_pool_tokens",
    "BFLOAT16_STORAGE",
    "parse_steps",
]

POOLINGS = ("cls", "last", "mean", "max")
AUDIO_POOLINGS = ("mean", "max")
PairMode = Literal["joint", "towers"]
Dtype = Literal["float16", "float32"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
StoreFormat = Literal["zarr", "h5"]
Quantize = Literal["none", "int8"]
DeviceMap = Literal["auto", "balanced", "sequential"]

BFLOAT16_STORAGE = (
    "bfloat16 is not a storage dtype: zarr 3 has no bfloat16 data type (even with ml_dtypes installed it refuses "
    "the dtype) and HDF5 would keep it as opaque 2-byte words other readers cannot read as numbers; store float16 "
    "(or float32 where values pass float16's 65504), and compute in bfloat16 with --compute-dtype bfloat16."
)
"""Why ``--dtype bfloat16`` is refused (checked with zarr 3.1, h5py 3.16 and ml_dtypes 0.7)."""


def default_pooling(modality: str, causal: bool = False) -> tuple[str, ...]:
    """cls and mean for encoders; last and mean for causal models (whose position 0 has seen only itself); mean and
    max over frames for audio (which has no [CLS] frame)."""
    if modality == "audio":
        return AUDIO_POOLINGS
    return ("last", "mean") if causal else ("cls", "mean")


def default_pool_tokens(causal: bool) -> str:
    """Which tokens mean and max cover by default: the text's own for causal models (their BOS position is an
    attention sink, orders of magnitude larger than the rest), every token for encoders (sentence-transformers')."""
    return "text" if causal else "all"


def parse_steps(value: Any) -> tuple[float, ...]:
    """'-1,0,1' or a list of numbers -> semitones as a tuple of floats (AugmentSpec checks their range)."""
    parts = str(value).split(",") if isinstance(value, (str, int, float)) else list(value)
    try:
        return tuple(float(p) for p in parts if str(p).strip())
    except ValueError:
        raise ConfigError(
            f"The --pitch-steps option must be a comma list of semitones such as -1,0,1. Got {value!r}."
        ) from None


def reject_unknown_keys(d: dict[str, Any], known: set[str], what: str) -> None:
    """A config file's misspelt key is an error naming it and the valid keys, never silently ignored."""
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"Unknown {what} config keys {unknown}; valid keys are {sorted(known)}.")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """Everything ``embstore extract`` needs; saved into the store's attributes."""

    model: str = "minilm"
    """Backbone: 'minilm', 'random:NAME', a local HF directory, or a Hub id in the local cache."""
    source: DataSpec = DataSpec()
    """Where the rows come from (data or splits, holdout and seed, columns, limit, skip_empty/skip_bad);
    its keys stay flat in YAML, on the command line and in the stored config."""
    pair_mode: PairMode = "joint"
    """'joint' encodes [CLS] a [SEP] b; 'towers' encodes each column alone and stores both."""
    max_seconds: float | None = None
    """Audio: crop each recording to its first this many seconds (cropped rows are counted)."""
    augment: tuple[str, ...] = ()
    """Audio: transforms of augmented training copies (of :data:`embstore.data.augment.TRANSFORMS`); () for none."""
    copies: int = 1
    """Augmented copies per chosen training row."""
    augment_classes: str = "minority"
    """Rows to augment: 'minority' (classes below the mean class size), 'all', or a comma list of labels."""
    snr_db: float = 20.0
    """noise: signal-to-noise ratio of the added Gaussian noise, dB."""
    noise_std: float | None = None
    """noise: a fixed standard deviation of the added noise instead of ``snr_db`` (an absolute amplitude)."""
    shift_max_seconds: float | None = None
    """shift: roll by up to this many seconds either way, instead of by any fraction of the clip."""
    pitch_steps: tuple[float, ...] = (-1.0, 0.0, 1.0)
    """pitch: semitones, one drawn per copy (the duration is kept: :mod:`embstore.data.pitch`)."""
    balance: str = "none"
    """'oversample': augmented copies bring every class of the training split to the majority class's count
    (instead of ``copies`` of the ``augment_classes`` rows); needs ``augment``."""
    batch_seconds: float = 60.0
    """Audio: most padded seconds of audio in one forward batch (the audio token budget)."""
    bucket: bool = True
    """Sort rows by length (tokens or duration) so batches hold similar lengths; False keeps source order."""
    layers: str = "all"
    """Layers to store: 'all', '9-12', '-4--1', '3,6'. 0 is the embedding output."""
    pooling: tuple[str, ...] | None = None
    """Poolings to store, any of :data:`POOLINGS` (masked); None: :func:`default_pooling` of the modality (and of a
    causal model)."""
    pool_tokens: PoolTokens | None = None
    """Which tokens mean and max cover: 'text' (the row's own text tokens: no BOS/EOS/CLS/SEP or template tokens) or
    'all' (every non-pad token); None: :func:`default_pool_tokens` of the model. Part of the store id."""
    template: str | None = None
    """A prompt around each text, with ``{text}`` (and ``{text_pair}`` for pairs); part of the store id."""
    chat_template: bool = False
    """Wrap each text in the tokenizer's chat template as the user turn, generation prompt added; part of the id."""
    system: str | None = None
    """The system turn of ``chat_template``."""
    tokens: str | None = None
    """Layers whose per-token states are also stored (ragged); None stores none."""
    word_pooling: tuple[str, ...] | None = None
    """Word-level data (CoNLL-U, or a table with a ``tokens`` list column): how each word's subword states become
    its state, any of :data:`embstore.data.words.WORD_POOLINGS`, stored for every layer of ``layers``; None: 'first'
    for word-level data, nothing for sentences."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Inputs longer than this many tokens are truncated (and counted); the default is fine-tuning's
    (:data:`embstore.data.spec.DEFAULT_MAX_LENGTH` says why)."""
    batch_size: int = 64
    """Most rows in one forward batch."""
    token_budget: int = 16384
    """Most padded tokens (rows x longest row) in one forward batch."""
    dtype: Dtype = "float16"
    """Storage dtype of hidden states (bfloat16 is refused: :data:`BFLOAT16_STORAGE`)."""
    compute_dtype: ComputeDtype = "auto"
    """The dtype of the model's parameters during the forward: 'auto' is float32 on the CPU (a bf16 checkpoint is
    cast up) and bfloat16 on CUDA where supported. Recorded as it was and part of the store id."""
    device_map: DeviceMap | None = None
    """Spread a model bigger than one device over the GPUs, the CPU and ``offload_dir`` (transformers/accelerate
    big-model inference): 'auto', 'balanced' or 'sequential'; None loads it whole on ``device``."""
    max_device_memory: str | None = None
    """With ``device_map``: the most memory per device, '0=20GiB,1=20GiB,cpu=64GiB' (accelerate's max_memory)."""
    offload_dir: str | None = None
    """With ``device_map``: the directory that weights which fit no device are offloaded to."""
    gpus_per_rank: int | None = None
    """Under torchrun/accelerate: each rank maps the model over its own group of this many GPUs (local rank r gets
    GPUs r*K .. r*K+K-1)."""
    format: StoreFormat = "zarr"
    """Store format."""
    out: str | None = None
    """Store path (ends in .zarr/.h5) or a directory for content-addressed stores; None: the cache."""
    chunk_rows: int = 2048
    """Rows per work unit and per storage chunk; the unit of resume and of multi-process work."""
    num_processes: int = 1
    """Worker processes that split the chunks between them."""
    device: str | None = None
    """'cpu', 'cuda', 'cuda:1'...; None picks CUDA when present."""
    wait: bool = False
    """When another process is writing the same store, wait for it (then resume or find it complete) instead of
    failing."""
    quantize: Quantize = "none"
    """'int8': dynamic int8 quantisation of the backbone's Linear layers, CPU only (faster; the
    measured deviation from float32 is recorded in provenance). Part of the store id."""
    allow_pickle: bool = False
    """Accept a model directory whose weights are pickle files (.bin/.pt), loaded with weights_only=True."""
    random_weights: int | None = None
    """A control store: the model's architecture and tokenizer with its weights re-initialised from its config the
    way ``from_config`` does, under this seed (what the architecture gives without pretraining). Part of the store
    id."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded in provenance, never in the fingerprint."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "pooling": Optional(ListOf(Choice(POOLINGS))),
        "word_pooling": Optional(ListOf(Choice(WORD_POOLINGS))),
        "augment": ListOf(Choice(TRANSFORMS), min_len=0),
        "balance": Choice(BALANCE),
        "max_seconds": Optional(Interval(float, 0, None, closed="neither", desc="a positive number of seconds")),
        "batch_seconds": Interval(float, 0, None, closed="neither", desc="a positive number of seconds"),
        "max_length": Interval(int, 2, None, desc="at least 2 tokens"),
        "batch_size": Interval(int, 1, None),
        "token_budget": Interval(int, 1, None),
        "chunk_rows": Interval(int, 1, None),
        "num_processes": Interval(int, 1, None),
        "pair_mode": Choice(PairMode),
        "pool_tokens": Optional(Choice(POOL_TOKENS)),
        "dtype": Choice(Dtype, hint=BFLOAT16_STORAGE),
        "compute_dtype": Choice(ComputeDtype),
        "device_map": Optional(Choice(DeviceMap)),
        "gpus_per_rank": Optional(Interval(int, 1, None)),
        "quantize": Choice(Quantize),
        "random_weights": Optional(Interval(int, 0, None, desc="a seed, a whole number >= 0")),
        "format": Choice(StoreFormat),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); the CLI's choices and help come from
    it too."""

    def __post_init__(self) -> None:
        validate_params(self)
        src = self.source
        if self.pooling is not None and src.audio_col and {"cls", "last"} & set(self.pooling):
            raise ConfigError(
                "Audio has no [CLS] frame and no last token: pass --pooling mean, max or mean,max with --audio-col."
            )
        if src.audio_col and (self.template is not None or self.chat_template or self.pool_tokens == "text"):
            raise ConfigError("--template, --chat-template and --pool-tokens text are for text models; drop them.")
        self.text_spec(causal=False).check_columns(
            pairs=src.text_pair_col is not None, towers=self.pair_mode == "towers"
        )  # validates the template too
        self._check_placement()
        if self.augment and not src.audio_col:
            raise ConfigError("--augment makes audio copies: it needs --audio-col (and a speech model).")
        if self.augment and src.holdout is None and "train" not in dict(src.splits):
            raise ConfigError(
                "Augmented rows may only enter a training split: pass --holdout F (making 'train' and 'test') or "
                "--split train=FILE."
            )
        if self.balance != "none" and not self.augment:
            raise ConfigError(
                f"--balance {self.balance} adds augmented copies: pass --augment with the transforms to apply "
                "(e.g. --augment noise,shift,pitch)."
            )
        self.augment_spec()  # validates the transforms and copies
        if self.word_pooling and (src.audio_col or src.text_pair_col):
            raise ConfigError(
                "--word-pooling stores the words of single sentences; it does not take --audio-col or --text-pair-col."
            )
        if self.pair_mode == "towers" and not src.text_pair_col:
            raise ConfigError("Towers mode encodes two columns separately: give --text-pair-col too.")
        from embstore.backbones.quantize import check_quantize_device

        check_quantize_device(self.quantize, self.device)

    def _check_placement(self) -> None:
        """The compute dtype and the device map options fit together."""
        if self.quantize == "int8" and self.compute_dtype not in ("auto", "float32"):
            raise ConfigError(
                f"--quantize int8 quantises float32 Linear layers; drop --compute-dtype {self.compute_dtype} (or "
                "--quantize)."
            )
        mapped = {
            "--max-device-memory": self.max_device_memory,
            "--offload-dir": self.offload_dir,
            "--gpus-per-rank": self.gpus_per_rank,
        }
        if self.device_map is None:
            given = [flag for flag, v in mapped.items() if v is not None]
            if given:
                raise ConfigError(f"{given[0]} places a device map: pass --device-map auto (or balanced/sequential).")
            return
        if self.quantize == "int8":
            raise ConfigError("--quantize int8 runs a whole model on the CPU; drop --device-map or --quantize.")
        if self.num_processes > 1:
            raise ConfigError(
                "--device-map spreads one model copy over the devices; with --num-processes each process would load "
                "its own: drop --num-processes (use torchrun with --gpus-per-rank for several copies)."
            )
        if self.max_device_memory is not None:
            from embstore.device import parse_device_memory

            parse_device_memory(self.max_device_memory)

    def text_spec(self, causal: bool) -> TextSpec:
        """The text spec of this extraction for a model that is ``causal`` or not (its ``pool_tokens`` default)."""
        return TextSpec(
            template=self.template,
            chat_template=self.chat_template,
            system=self.system,
            pool_tokens=self.pool_tokens or default_pool_tokens(causal),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready flat dict (tuples become lists; the data source's keys at the top level)."""
        d = {
            "model": self.model,
            **self.source.to_dict(),
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "source")},
        }
        d["extra"] = dict(self.extra)
        d["pooling"] = None if self.pooling is None else list(self.pooling)
        d["word_pooling"] = None if self.word_pooling is None else list(self.word_pooling)
        d["augment"] = list(self.augment)
        d["pitch_steps"] = list(self.pitch_steps)
        return d

    @classmethod
    def from_dict(cls, d_in: dict[str, Any]) -> "ExtractConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        reject_unknown_keys(d_in, ({f.name for f in dataclasses.fields(cls)} - {"source"}) | set(DATA_KEYS), "extract")
        d: dict[str, Any] = {k: v for k, v in d_in.items() if k not in DATA_KEYS}
        d["source"] = DataSpec.from_dict({k: v for k, v in d_in.items() if k in DATA_KEYS})
        if d.get("augment") is None:
            d.pop("augment", None)
        for key in ("pooling", "augment", "word_pooling"):
            p = d.get(key)
            if p is not None:
                d[key] = tuple(x.strip() for x in p.split(",") if x.strip()) if isinstance(p, str) else tuple(p)
        if d.get("pitch_steps") is not None:
            d["pitch_steps"] = parse_steps(d["pitch_steps"])
        else:
            d.pop("pitch_steps", None)
        return cls(**d)

    def augment_extras(self) -> dict[str, Any]:
        """The augmentation settings beyond transforms, copies, classes, SNR and seed, only where they are used: what
        the store's provenance and id add (a store made without them keeps the id it had)."""
        out: dict[str, Any] = {}
        if self.balance != "none":
            out["balance"] = self.balance
        if "noise" in self.augment and self.noise_std is not None:
            out["noise_std"] = self.noise_std
        if "shift" in self.augment and self.shift_max_seconds is not None:
            out["shift_max_seconds"] = self.shift_max_seconds
        if "pitch" in self.augment:
            out["pitch_steps"] = list(self.pitch_steps)
        return out

    def augment_spec(self) -> Any:
        """The :class:`embstore.data.augment.AugmentSpec` of this extraction, or None without --augment."""
        if not self.augment:
            return None
        from embstore.data.augment import AugmentSpec

        return AugmentSpec(
            transforms=self.augment,
            copies=self.copies,
            classes=self.augment_classes,
            snr_db=self.snr_db,
            noise_std=self.noise_std,
            shift_max_seconds=self.shift_max_seconds,
            pitch_steps=self.pitch_steps,
            balance=self.balance,
            seed=self.source.seed,
        )
