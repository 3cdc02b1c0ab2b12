"""Typed, frozen configuration of one extraction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from embstore.data.spec import DATA_KEYS, DEFAULT_DATA, DEFAULT_MAX_LENGTH, DataSpec
from embstore.errors import ConfigError

__all__ = ["ExtractConfig", "POOLINGS", "DEFAULT_DATA", "reject_unknown_keys", "default_pooling"]

POOLINGS = ("cls", "mean", "max")
QUANTIZE_MODES = ("none", "int8")
AUDIO_POOLINGS = ("mean", "max")


def default_pooling(modality: str) -> tuple[str, ...]:
    """cls and mean for text; mean and max over frames for audio (which has no [CLS] frame)."""
    return AUDIO_POOLINGS if modality == "audio" else ("cls", "mean")


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
    pair_mode: Literal["joint", "towers"] = "joint"
    """'joint' encodes [CLS] a [SEP] b; 'towers' encodes each column alone and stores both."""
    max_seconds: float | None = None
    """Audio: crop each recording to its first this many seconds (cropped rows are counted)."""
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
    max_length: int = DEFAULT_MAX_LENGTH
    """Inputs longer than this many tokens are truncated (and counted); the default is fine-tuning's
    (:data:`embstore.data.spec.DEFAULT_MAX_LENGTH` says why)."""
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
    chunk_rows: int = 2048
    """Rows per work unit and per storage chunk; the unit of resume and of multi-process work."""
    num_processes: int = 1
    """Worker processes that split the chunks between them."""
    device: str | None = None
    """'cpu', 'cuda', 'cuda:1'...; None picks CUDA when present."""
    wait: bool = False
    """When another process is writing the same store, wait for it (then resume or find it complete) instead of
    failing."""
    quantize: Literal["none", "int8"] = "none"
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

    def __post_init__(self) -> None:
        src = self.source
        if self.pooling is not None:
            bad = [p for p in self.pooling if p not in POOLINGS]
            if bad or not self.pooling:
                raise ConfigError(
                    f"The 'pooling' option must be a comma list of {', '.join(POOLINGS)}; got "
                    f"{','.join(self.pooling) or 'nothing'}."
                )
            if src.audio_col and "cls" in self.pooling:
                raise ConfigError("Audio has no [CLS] frame: pass --pooling mean, max or mean,max with --audio-col.")
        if self.augment and not src.audio_col:
            raise ConfigError("--augment makes audio copies: it needs --audio-col (and a speech model).")
        if self.augment and src.holdout is None and "train" not in dict(src.splits):
            raise ConfigError(
                "Augmented rows may only enter a training split: pass --holdout F (making 'train' and 'test') or "
                "--split train=FILE."
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"The 'max_seconds' option must be a positive number of seconds; got {self.max_seconds}.")
        if self.batch_seconds <= 0:
            raise ConfigError(
                f"The 'batch_seconds' option must be a positive number of seconds; got {self.batch_seconds}."
            )
        self.augment_spec()  # validates the transforms and copies
        for name, value in (
            ("max_length", self.max_length),
            ("batch_size", self.batch_size),
            ("token_budget", self.token_budget),
            ("chunk_rows", self.chunk_rows),
            ("num_processes", self.num_processes),
        ):
            if value < 1:
                raise ConfigError(f"The '{name}' option must be a positive integer; got {value}.")
        if self.max_length < 2:
            raise ConfigError(f"The 'max_length' option must be at least 2 tokens; got {self.max_length}.")
        if self.pair_mode not in ("joint", "towers"):
            raise ConfigError(f"The 'pair_mode' option must be 'joint' or 'towers'; got {self.pair_mode!r}.")
        if self.pair_mode == "towers" and not src.text_pair_col:
            raise ConfigError("Towers mode encodes two columns separately: give --text-pair-col too.")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"The 'dtype' option must be float16 or float32; got {self.dtype!r}.")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"The 'quantize' option must be one of {', '.join(QUANTIZE_MODES)}; got {self.quantize!r}."
            )
        if self.random_weights is not None and (
            isinstance(self.random_weights, bool) or not isinstance(self.random_weights, int) or self.random_weights < 0
        ):
            raise ConfigError(
                f"The 'random_weights' option must be a seed, a whole number >= 0; got {self.random_weights!r}."
            )
        from embstore.backbones.quantize import check_quantize_device

        check_quantize_device(self.quantize, self.device)
        if self.format not in ("zarr", "h5"):
            raise ConfigError(f"The 'format' option must be zarr or h5; got {self.format!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready flat dict (tuples become lists; the data source's keys at the top level)."""
        d = {
            "model": self.model,
            **self.source.to_dict(),
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "source")},
        }
        d["extra"] = dict(self.extra)
        d["pooling"] = None if self.pooling is None else list(self.pooling)
        d["augment"] = list(self.augment)
        return d

    @classmethod
    def from_dict(cls, d_in: dict[str, Any]) -> "ExtractConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        reject_unknown_keys(d_in, ({f.name for f in dataclasses.fields(cls)} - {"source"}) | set(DATA_KEYS), "extract")
        d: dict[str, Any] = {k: v for k, v in d_in.items() if k not in DATA_KEYS}
        d["source"] = DataSpec.from_dict({k: v for k, v in d_in.items() if k in DATA_KEYS})
        if d.get("augment") is None:
            d.pop("augment", None)
        for key in ("pooling", "augment"):
            p = d.get(key)
            if p is not None:
                d[key] = tuple(x.strip() for x in p.split(",") if x.strip()) if isinstance(p, str) else tuple(p)
        return cls(**d)

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
            seed=self.source.seed,
        )
