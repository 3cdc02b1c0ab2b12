"""Audio augmentation paid once: extra training rows made from chosen source rows.

Each augmented copy applies every chosen transform, in this order: speed perturbation
(resampling by a factor, which changes tempo and pitch together, as Kaldi's speed
perturbation), a pitch shift by semitones that keeps the duration (:mod:`embstore.data.pitch`,
librosa's ``pitch_shift`` recipe), a circular time shift (a fraction of the clip, or up to
``shift_max_seconds`` either way), then Gaussian noise at a target SNR or of a fixed standard
deviation (``noise_std``). Parameters are drawn at planning time from a generator seeded by
(seed, source row, copy), and stored with the row, so a resumed or multi-process run makes the
same rows bit for bit.

Which rows are copied: every row of the chosen classes ``copies`` times, or with ``balance='oversample'``
as many copies of each class's rows (in turn) as bring the class to the majority class's count
(:func:`balance_copies`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from embstore.data.audio import rational, resample, resampled_length
from embstore.errors import Choice, ConfigError, Constraint, Interval, ListOf, Optional, validate_params

__all__ = [
    "TRANSFORMS",
    "BALANCE",
    "AugmentSpec",
    "AugmentParams",
    "choose_sources",
    "balance_copies",
    "planned_copies",
    "draw_params",
    "draw_copies",
    "augmented_length",
    "apply",
]

TRANSFORMS = ("noise", "shift", "speed", "pitch")
BALANCE = ("none", "oversample")
"""``--balance``: 'oversample' adds augmented copies until every training class has the majority class's rows."""


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """What to augment and how (from ``--augment``, ``--copies``, ``--augment-classes``...)."""

    transforms: tuple[str, ...]
    copies: int = 1
    classes: str = "minority"
    """'minority' (classes with fewer training rows than the mean class), 'all', or a comma list of labels."""
    snr_db: float = 20.0
    """noise: signal-to-noise ratio of the added Gaussian noise, in dB."""
    speed_range: tuple[float, float] = (0.9, 1.1)
    """speed: factors are drawn uniformly from this range (rounded to 0.01)."""
    noise_std: float | None = None
    """noise: the standard deviation of the added Gaussian noise (an absolute amplitude, whatever the clip's level);
    None: ``snr_db`` decides it."""
    shift_max_seconds: float | None = None
    """shift: roll by a uniform draw of up to this many seconds either way; None: by a uniform fraction of the
    clip (anywhere in it)."""
    pitch_steps: tuple[float, ...] = (-1.0, 0.0, 1.0)
    """pitch: semitones, one drawn uniformly per copy (the duration is kept)."""
    balance: str = "none"
    """'oversample': copies bring every class to the majority's count (``copies`` and ``classes`` are unused)."""
    seed: int = 0

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "transforms": ListOf(Choice(TRANSFORMS)),
        "copies": Interval(int, 1, None, desc="at least 1"),
        "noise_std": Optional(Interval(float, 0, None, closed="neither", desc="a positive standard deviation")),
        "shift_max_seconds": Optional(Interval(float, 0, None, closed="neither", desc="a positive number of seconds")),
        "pitch_steps": ListOf(Interval(float, -24, 24), desc="a comma list of semitones in [-24, 24]"),
        "balance": Choice(BALANCE),
    }

    def __post_init__(self) -> None:
        validate_params(self)
        lo, hi = self.speed_range
        if not 0.5 <= lo <= hi <= 2.0:
            raise ConfigError(f"The speed range must satisfy 0.5 <= low <= high <= 2.0; got {lo}-{hi}.")


@dataclass(frozen=True)
class AugmentParams:
    """One augmented copy: which row it comes from and what was done to it (NaN: not applied)."""

    source: int
    """Position of the source row in its split (before length ordering)."""
    copy: int
    """1..copies."""
    speed: float
    shift_fraction: float
    """Circular shift as a fraction of the (speed-perturbed, cropped) length."""
    snr_db: float
    noise_seed: int
    pitch: float = float("nan")
    """Semitones of the duration-keeping pitch shift."""
    shift_seconds: float = float("nan")
    """Circular shift in seconds (negative: to the left), used instead of ``shift_fraction`` when set."""
    noise_std: float = float("nan")
    """Standard deviation of the added noise, used instead of ``snr_db`` when set."""


def choose_sources(labels: np.ndarray | None, label_names: list[str] | None, classes: str) -> np.ndarray:
    """Row positions of the training split to augment. (k,) int64, ascending."""
    n = 0 if labels is None else len(labels)
    if classes == "all":
        return np.arange(n, dtype=np.int64)
    if labels is None or label_names is None:
        raise ConfigError(
            "--augment-classes minority or LABELS needs labels: pass --label-col, or use --augment-classes all."
        )
    if classes == "minority":
        counts = np.bincount(labels, minlength=len(label_names))
        present = counts[counts > 0]
        chosen = {c for c in range(len(label_names)) if 0 < counts[c] < present.mean()}
    else:
        wanted = [c.strip() for c in classes.split(",") if c.strip()]
        unknown = [w for w in wanted if w not in label_names]
        if unknown:
            raise ConfigError(
                f"--augment-classes names {', '.join(map(repr, unknown))}, not among the labels "
                f"{', '.join(label_names)}; use minority, all, or a comma list of those labels."
            )
        chosen = {label_names.index(w) for w in wanted}
    return np.flatnonzero(np.isin(labels, sorted(chosen))).astype(np.int64)


def balance_copies(labels: np.ndarray, n_classes: int) -> list[tuple[int, int]]:
    """(source position, copy number) of every copy that brings each class of ``labels`` (n,) to the majority
    class's count: a class of n_c rows below the majority's m gets m - n_c copies, its rows in turn (row order),
    copy 1 of each before any copy 2. A class with no rows gets none."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    majority = int(counts.max()) if len(counts) else 0
    out: list[tuple[int, int]] = []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        for k in range(majority - len(rows) if len(rows) else 0):
            out.append((int(rows[k % len(rows)]), k // len(rows) + 1))
    return sorted(out)


def planned_copies(
    spec: AugmentSpec, labels: np.ndarray | None, label_names: list[str] | None
) -> list[tuple[int, int]]:
    """(source position, copy number) of every augmented copy ``spec`` makes of a training split."""
    if spec.balance == "oversample":
        if labels is None or label_names is None:
            raise ConfigError("--balance oversample counts the rows of each class: it needs labels (--label-col).")
        return balance_copies(labels, len(label_names))
    chosen = choose_sources(labels, label_names, spec.classes)
    return [(int(pos), copy) for pos in chosen.tolist() for copy in range(1, spec.copies + 1)]


def draw_params(spec: AugmentSpec, sources: np.ndarray, source_ids: np.ndarray) -> list[AugmentParams]:
    """Parameters of ``spec.copies`` copies of every row of ``sources``, seeded by (seed, source row id in the file,
    copy)."""
    return draw_copies(
        spec, [(pos, copy) for pos in sources.tolist() for copy in range(1, spec.copies + 1)], source_ids
    )


def draw_copies(spec: AugmentSpec, copies: list[tuple[int, int]], source_ids: np.ndarray) -> list[AugmentParams]:
    """Parameters of every (source position, copy number), seeded by (seed, source row id in the file, copy)."""
    nan = float("nan")
    out = []
    for pos, copy in copies:
        rng = np.random.default_rng([spec.seed, int(source_ids[pos]), copy])
        speed = round(float(rng.uniform(*spec.speed_range)), 2) if "speed" in spec.transforms else nan
        shift = float(rng.uniform(0.0, 1.0)) if "shift" in spec.transforms else nan
        snr = spec.snr_db if "noise" in spec.transforms and spec.noise_std is None else nan
        noise_seed = int(rng.integers(0, 2**63 - 1))
        # drawn after the original three, so the copies of a spec without the newer knobs are the same as before
        pitch = float(rng.choice(spec.pitch_steps)) if "pitch" in spec.transforms else nan
        shift_s = nan
        if "shift" in spec.transforms and spec.shift_max_seconds is not None:
            shift_s, shift = float(rng.uniform(-spec.shift_max_seconds, spec.shift_max_seconds)), nan
        std = spec.noise_std if "noise" in spec.transforms and spec.noise_std is not None else nan
        out.append(
            AugmentParams(
                source=pos,
                copy=copy,
                speed=speed,
                shift_fraction=shift,
                snr_db=snr,
                noise_seed=noise_seed,
                pitch=pitch,
                shift_seconds=shift_s,
                noise_std=std if std is not None else nan,
            )
        )
    return out


def _speed_ratio(speed: float) -> tuple[int, int]:
    # Playing `speed` times faster: resample to 1 / speed of the samples at the same rate.
    return rational(1.0 / speed, 100)


def augmented_length(n: int, params: AugmentParams, max_samples: int | None) -> int:
    """Samples of the augmented copy of an ``n``-sample (resampled, uncropped) source."""
    if not np.isnan(params.speed):
        n = resampled_length(n, *_speed_ratio(params.speed))
    return min(n, max_samples) if max_samples is not None else n


def apply(x: np.ndarray, params: AugmentParams, max_samples: int | None, rate: int | None = None) -> np.ndarray:
    """The augmented copy of ``x`` (float32 mono at the model's ``rate``, not yet cropped); ``rate`` is needed for a
    shift in seconds only."""
    if not np.isnan(params.speed):
        x = resample(x, *_speed_ratio(params.speed))
    if not np.isnan(params.pitch) and params.pitch != 0:
        from embstore.data.pitch import pitch_shift

        x = pitch_shift(x, params.pitch)
    if max_samples is not None:
        x = x[:max_samples]
    if not np.isnan(params.shift_seconds):
        if rate is None:
            raise ConfigError("A shift in seconds needs the sampling rate; pass rate= to apply.")
        x = np.roll(x, int(round(params.shift_seconds * rate)))
    elif not np.isnan(params.shift_fraction):
        x = np.roll(x, int(params.shift_fraction * len(x)))
    if not np.isnan(params.noise_std):
        noise = np.random.default_rng(params.noise_seed).standard_normal(len(x))
        x = (x + params.noise_std * noise).astype(np.float32)
    elif not np.isnan(params.snr_db):
        power = float(np.mean(x.astype(np.float64) ** 2))
        noise_power = power / (10.0 ** (params.snr_db / 10.0))
        noise = np.random.default_rng(params.noise_seed).standard_normal(len(x))
        x = (x + np.sqrt(noise_power) * noise).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)
