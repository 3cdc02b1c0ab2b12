"""Typed, frozen configuration of one extraction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from embstore.errors import ConfigError

__all__ = ["ExtractConfig", "POOLINGS", "DEFAULT_DATA", "reject_unknown_keys", "default_pooling"]

POOLINGS = ("cls", "mean", "max")
QUANTIZE_MODES = ("none", "int8")
AUDIO_POOLINGS = ("mean", "max")


def default_pooling(modality: str) -> tuple[str, ...]:
    """cls and mean for text; mean and max over frames for audio (which has no [CLS] frame)."""
    return AUDIO_POOLINGS if modality == "audio" else ("cls", "mean")
DEFAULT_DATA = "builtin:tweets"


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
    data: str | None = DEFAULT_DATA
    """One data file (CSV/TSV/JSONL/Parquet) or 'builtin:tweets'; None when ``splits`` is given."""
    splits: tuple[tuple[str, str], ...] = ()
    """(split name, file) pairs, one file per split; exclusive with ``data``."""
    holdout: float | None = None
    """Fraction of ``data`` held out as a 'test' split (seeded, stratified by label)."""
    seed: int = 0
    """Seed of the holdout split."""
    text_col: str | None = None
    """Text column; None means the source's default ('text')."""
    text_pair_col: str | None = None
    """Second text column for sentence pairs."""
    pair_mode: Literal["joint", "towers"] = "joint"
    """'joint' encodes [CLS] a [SEP] b; 'towers' encodes each column alone and stores both."""
    label_col: str | None = None
    """Label column (strings or integers); None means none (or the builtin source's default)."""
    audio_col: str | None = None
    """Audio: column of audio file paths (relative to the table); the model must be a speech model."""
    group_col: str | None = None
    """Column of groups (e.g. speaker): --holdout keeps each group in one split; stored per row."""
    max_seconds: float | None = None
    """Audio: crop each recording to its first this many seconds (cropped rows are counted)."""
    skip_bad: bool = False
    """Audio: drop rows whose file is missing, unreadable or empty instead of failing."""
    augment: tuple[str, ...] = ()
    """Audio: transforms of augmented training copies, any of noise, shift, speed; () for none."""
    copies: int = 1
    """Augmented copies per chosen training row."""
    augment_classes: str = "minority"
    """Rows to augment: 'minority' (classes below the mean class size), 'all', or a comma list of labels."""
    snr_db: float = 20.0
    """noise: signal-to-noise ratio of the added Gaussian noise, dB."""
    batch_seconds: float = 60.0
    """Audio: most padded seconds of audio in one forward batch (the audio token budget)."""
    bucket: bool = True
    """Sort rows by length (tokens or duration) so batches hold similar lengths; False keeps source order."""
    layers: str = "all"
    """Layers to store: 'all', '9-12', '-4--1', '3,6'. 0 is the embedding output."""
    pooling: tuple[str, ...] | None = None
    """Poolings to store, any of cls, mean, max (masked); None: cls,mean for text, mean,max for audio."""
    tokens: str | None = None
    """Layers whose per-token states are also stored (ragged); None stores none."""
    max_length: int = 256
    """Inputs longer than this many tokens are truncated (and counted)."""
    batch_size: int = 64
    """Most rows in one forward batch."""
    token_budget: int = 16384
    """Most padded tokens (rows x longest row) in one forward batch."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of hidden states."""
    format: Literal["zarr", "h5"] = "zarr"
    """Store format."""
    out: str | None = None
    """Store path (ends in .zarr/.h5) or a directory for content-addressed stores; None: the cache."""
    limit: int | None = None
    """Keep only the first N rows of each split (quick runs)."""
    skip_empty: bool = False
    """Drop empty/NaN text rows instead of failing."""
    chunk_rows: int = 2048
    """Rows per work unit and per storage chunk; the unit of resume and of multi-process work."""
    num_processes: int = 1
    """Worker processes that split the chunks between them."""
    device: str | None = None
    """'cpu', 'cuda', 'cuda:1'...; None picks CUDA when present."""
    quantize: Literal["none", "int8"] = "none"
    """'int8': dynamic int8 quantisation of the backbone's Linear layers, CPU only (faster; the
    measured deviation from float32 is recorded in provenance). Part of the store id."""
    allow_pickle: bool = False
    """Accept a model directory whose weights are pickle files (.bin/.pt), loaded with weights_only=True."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded in provenance, never in the fingerprint."""

    def __post_init__(self) -> None:
        if self.pooling is not None:
            bad = [p for p in self.pooling if p not in POOLINGS]
            if bad or not self.pooling:
                raise ConfigError(
                    f"The 'pooling' option must be a comma list of {', '.join(POOLINGS)}; got {','.join(self.pooling) or 'nothing'}."
                )
            if self.audio_col and "cls" in self.pooling:
                raise ConfigError("Audio has no [CLS] frame: pass --pooling mean, max or mean,max with --audio-col.")
        if self.audio_col and (self.text_col or self.text_pair_col):
            raise ConfigError("You cannot pass both --audio-col and --text-col/--text-pair-col; a store holds text or audio.")
        if self.augment and not self.audio_col:
            raise ConfigError("--augment makes audio copies: it needs --audio-col (and a speech model).")
        if self.augment and self.holdout is None and "train" not in dict(self.splits):
            raise ConfigError("Augmented rows may only enter a training split: pass --holdout F (making 'train' and 'test') or --split train=FILE.")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"The 'max_seconds' option must be a positive number of seconds; got {self.max_seconds}.")
        if self.batch_seconds <= 0:
            raise ConfigError(f"The 'batch_seconds' option must be a positive number of seconds; got {self.batch_seconds}.")
        self.augment_spec()  # validates the transforms and copies
        if self.data is not None and self.splits:
            raise ConfigError("You cannot pass both --data and --split; pass one file with --data (and --holdout) or one --split per file.")
        if self.data is None and not self.splits:
            raise ConfigError("No data given: pass --data FILE or --split NAME=FILE.")
        if self.holdout is not None and not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"The 'holdout' option must be a fraction in (0, 1); got {self.holdout}.")
        if self.holdout is not None and self.splits:
            raise ConfigError("--holdout splits one --data file; with --split files the splits are already given.")
        for name, value in (("max_length", self.max_length), ("batch_size", self.batch_size),
                            ("token_budget", self.token_budget), ("chunk_rows", self.chunk_rows),
                            ("num_processes", self.num_processes)):
            if value < 1:
                raise ConfigError(f"The '{name}' option must be a positive integer; got {value}.")
        if self.max_length < 2:
            raise ConfigError(f"The 'max_length' option must be at least 2 tokens; got {self.max_length}.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"The 'limit' option must be a positive number of rows; got {self.limit}.")
        if self.pair_mode not in ("joint", "towers"):
            raise ConfigError(f"The 'pair_mode' option must be 'joint' or 'towers'; got {self.pair_mode!r}.")
        if self.pair_mode == "towers" and not self.text_pair_col:
            raise ConfigError("Towers mode encodes two columns separately: give --text-pair-col too.")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"The 'dtype' option must be float16 or float32; got {self.dtype!r}.")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"The 'quantize' option must be one of {', '.join(QUANTIZE_MODES)}; got {self.quantize!r}.")
        from embstore.quantize import check_quantize_device

        check_quantize_device(self.quantize, self.device)
        if self.format not in ("zarr", "h5"):
            raise ConfigError(f"The 'format' option must be zarr or h5; got {self.format!r}.")
        names = [n for n, _ in self.splits]
        if len(set(names)) != len(names):
            raise ConfigError(f"Split names must be unique; got {', '.join(names)}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["splits"] = [list(s) for s in self.splits]
        d["pooling"] = None if self.pooling is None else list(self.pooling)
        d["augment"] = list(self.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        reject_unknown_keys(d, {f.name for f in dataclasses.fields(cls)}, "extract")
        d = dict(d)
        if "splits" in d:
            d["splits"] = tuple(tuple(s) for s in d["splits"])
        if d.get("augment") is None:
            d.pop("augment", None)
        for key in ("pooling", "augment"):
            p = d.get(key)
            if p is not None:
                d[key] = tuple(x.strip() for x in p.split(",") if x.strip()) if isinstance(p, str) else tuple(p)
        return cls(**d)

    def augment_spec(self) -> Any:
        """The :class:`embstore.augment.AugmentSpec` of this extraction, or None without --augment."""
        if not self.augment:
            return None
        from embstore.augment import AugmentSpec

        return AugmentSpec(transforms=self.augment, copies=self.copies, classes=self.augment_classes,
                           snr_db=self.snr_db, seed=self.seed)
