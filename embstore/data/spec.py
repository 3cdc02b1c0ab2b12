"""Where the rows come from: one typed, frozen description shared by extraction, fine-tuning and pretraining.

``ExtractConfig``, ``FinetuneConfig`` and ``PretrainConfig`` each nest one :class:`DataSpec` (as ``source``).
Their YAML files, CLI flags, ``to_dict`` output and stored provenance keep the data keys flat
(``data``, ``splits``, ``holdout``, ``label_col``...): :func:`split_flat` takes them out of a flat dict
and :meth:`DataSpec.to_dict` puts them back, so a store or run.json written before this class existed
reads (and fingerprints) the same.

The same spec loads the same rows everywhere: a fine-tune of a file with ``holdout=0.2, seed=0``
evaluates on exactly the rows ``embstore extract --holdout 0.2 --seed 0`` stores as its test split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from embstore.errors import ConfigError, Constraint, Interval, Optional, validate_params

__all__ = ["DATA_KEYS", "DEFAULT_DATA", "DEFAULT_MAX_LENGTH", "DataSpec", "split_flat"]

DEFAULT_DATA = "builtin:tweets"
DEFAULT_MAX_LENGTH = 128
"""Tokens a text row is cut to, by default, in ``embstore extract`` and ``heads finetune`` alike: a sweep and a
fine-tune of the same file then see the same text. 128, not 256: the fine-tuning defaults (lr, batch, epochs,
early stopping) were measured at 128 tokens (BENCHMARKS.md), where 95% of the benchmark rows fit, and doubling
the length roughly doubles a fine-tuning epoch; extraction sorts rows by length, so the cut costs it nothing
on short rows and every cut row is counted and reported."""


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """One data source: a file (optionally split by a seeded holdout) or one file per split, and its columns."""

    data: str | None = DEFAULT_DATA
    """One data file (CSV/TSV/JSONL/Parquet) or 'builtin:tweets'; None when ``splits`` is given."""
    splits: tuple[tuple[str, str], ...] = ()
    """(split name, file) pairs, one file per split; exclusive with ``data``."""
    holdout: float | None = None
    """Fraction of ``data`` held out as a 'test' split (seeded; group-disjoint with ``group_col``, else stratified)."""
    seed: int = 0
    """Seed of the holdout. The configs that nest a spec have one ``seed`` key, so the same seed also drives
    whatever else they randomise (augmentation, the validation carve, initialisation, shuffling)."""
    text_col: str | None = None
    """Text column; None means the source's default ('text', or the builtin's)."""
    text_pair_col: str | None = None
    """Second text column for sentence pairs."""
    label_col: str | None = None
    """Label column (strings or integers); None means none (or the builtin source's default)."""
    group_col: str | None = None
    """Column of groups (e.g. speaker): the holdout keeps each group in one split."""
    audio_col: str | None = None
    """Column of audio file paths (relative to the table): the rows are recordings, not text."""
    limit: int | None = None
    """Keep only the first N rows of each split (after the holdout)."""
    skip_empty: bool = False
    """Drop empty/NaN text rows instead of failing."""
    skip_bad: bool = False
    """Audio: drop rows whose file is missing, unreadable or empty instead of failing (the audio
    counterpart of ``skip_empty``: it decides which rows load, so it belongs to the source)."""
    label_from_path: str | None = None
    """Audio: a regular expression whose first capture group, searched in each file's name, is the row's label
    (instead of a label column), e.g. ``^.{5}(.)`` for Emo-DB's emotion letter; a name that does not match is an
    error naming it."""
    preprocess: str | None = None
    """Text: ``MODULE:FUNCTION``, a str -> str function applied to every text (and pair) before tokenisation
    (:mod:`embstore.data.preprocess`); its name and source hash are part of the store id and run fingerprint."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "holdout": Optional(Interval(float, 0, 1, closed="neither")),
        "limit": Optional(Interval(int, 1, None, desc="a positive number of rows")),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`)."""

    def __post_init__(self) -> None:
        if self.data is not None and self.splits:
            raise ConfigError(
                "You cannot pass both --data and --split; pass one file with --data or one --split per file."
            )
        if self.data is None and not self.splits:
            raise ConfigError("No data given: pass --data FILE or --split NAME=FILE.")
        validate_params(self)
        if self.holdout is not None and self.splits:
            raise ConfigError("--holdout splits one --data file; with --split files the splits are already given.")
        if self.audio_col and (self.text_col or self.text_pair_col):
            raise ConfigError(
                "You cannot pass both --audio-col and --text-col/--text-pair-col; a store holds text or audio."
            )
        names = [n for n, _ in self.splits]
        if len(set(names)) != len(names):
            raise ConfigError(f"Split names must be unique; got {', '.join(names)}.")
        if self.label_from_path is not None:
            import re

            if not self.audio_col:
                raise ConfigError("--label-from-path reads each audio file's name: it needs --audio-col COLUMN.")
            if self.label_col:
                raise ConfigError(
                    "You cannot pass both --label-col and --label-from-path; the labels come from one of them."
                )
            try:
                groups = re.compile(self.label_from_path).groups
            except re.error as exc:
                raise ConfigError(
                    f"The --label-from-path option must be a regular expression; {self.label_from_path!r} is not "
                    f"({exc})."
                ) from None
            if groups < 1:
                raise ConfigError(
                    f"The --label-from-path option must hold a capture group, the label; got "
                    f"{self.label_from_path!r}. Wrap the label part in parentheses, e.g. '^.{{5}}(.)'."
                )
        if self.preprocess is not None and self.audio_col:
            raise ConfigError("--preprocess transforms texts; an audio table (--audio-col) has none. Drop it.")

    def only(self, keys: Iterable[str], command: str) -> DataSpec:
        """``self``, refused (naming the option) when a field outside ``keys`` is set: a command that reads
        text does not take ``audio_col``, one without a holdout does not take ``holdout``."""
        keys = set(keys)
        for f in dataclasses.fields(self):
            if f.name not in keys and getattr(self, f.name) != f.default:
                raise ConfigError(
                    f"{command} does not take the '{f.name}' option (got {getattr(self, f.name)!r}); "
                    f"its data options are {', '.join(k for k in DATA_KEYS if k in keys)}."
                )
        return self

    @property
    def modality(self) -> str:
        """'audio' with ``audio_col``, else 'text'."""
        return "audio" if self.audio_col else "text"

    def load(self) -> Any:
        """Read, validate and split the rows: an :class:`embstore.data.tables.Dataset` (errors name the file and
        the fix)."""
        from embstore.data.tables import load_dataset

        return load_dataset(
            data=self.data,
            splits=self.splits,
            holdout=self.holdout,
            seed=self.seed,
            text_col=self.text_col,
            text_pair_col=self.text_pair_col,
            label_col=self.label_col,
            limit=self.limit,
            skip_empty=self.skip_empty,
            audio_col=self.audio_col,
            group_col=self.group_col,
            skip_bad=self.skip_bad,
            label_from_path=self.label_from_path,
            preprocess=self.preprocess,
        )

    @property
    def labelled(self) -> bool:
        """Whether the rows get labels (a label column, or labels from the file names)."""
        return bool(self.label_col or self.label_from_path)

    def fingerprinted(self, sources: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """What decides the loaded text rows, for a fingerprint: each file's content hash (not its path) and
        the holdout, the columns and the row filters. ``sources`` is the loaded Dataset's provenance (whose
        ``columns`` also name the group and audio columns). These are the data keys of a store's fingerprint."""
        out: dict[str, Any] = {
            "data": [
                {k: s.get(k) for k in ("split", "sha256", "columns", "holdout", "audio_sha256") if k in s}
                for s in sources
            ],
            "columns": [self.text_col, self.text_pair_col, self.label_col],
            "limit": self.limit,
            "skip_empty": self.skip_empty,
        }
        if self.label_from_path is not None:  # only when set: the fingerprints made before these keys stay the same
            out["label_from_path"] = self.label_from_path
        if self.preprocess is not None:
            from embstore.data.preprocess import preprocess_identity

            out["preprocess"] = preprocess_identity(self.preprocess)
        return out

    def to_dict(self, keys: Iterable[str] = ()) -> dict[str, Any]:
        """The flat JSON-ready keys (tuples become lists); ``keys`` limits them to those a config accepts."""
        d = dataclasses.asdict(self)
        d["splits"] = [list(s) for s in self.splits]
        wanted = tuple(keys) or DATA_KEYS
        return {k: d[k] for k in wanted}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`; ``splits`` may be lists of [name, file]."""
        d = dict(d)
        if d.get("splits") is not None:
            d["splits"] = tuple(tuple(s) for s in d["splits"])
        else:
            d.pop("splits", None)
        return cls(**d)


DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataSpec))
"""Every flat key a :class:`DataSpec` owns."""


def split_flat(
    d: dict[str, Any], keys: Iterable[str], defaults: dict[str, Any] | None = None
) -> tuple[DataSpec, dict[str, Any]]:
    """(the DataSpec built from the data ``keys`` of a flat config dict, the remaining keys)."""
    keys = set(keys)
    data = {**(defaults or {}), **{k: v for k, v in d.items() if k in keys}}
    return DataSpec.from_dict(data), {k: v for k, v in d.items() if k not in keys}
