"""Audio augmentation paid once: extra training rows made from chosen source rows.

Each augmented copy applies every chosen transform, in this order: speed perturbation
(resampling by a factor, which changes tempo and pitch together, as Kaldi's speed
perturbation), a circular time shift, then Gaussian noise at a target SNR. Parameters are
drawn at planning time from a generator seeded by (seed, source row, copy), and stored with
the row, so a resumed or multi-process run makes the same rows bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from embstore.data.audio import rational, resample, resampled_length
from embstore.errors import Choice, ConfigError, Constraint, Interval, ListOf, validate_params

__all__ = ["TRANSFORMS", "AugmentSpec", "AugmentParams", "choose_sources", "draw_params", "augmented_length", "apply"]

TRANSFORMS = ("noise", "shift", "speed")


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
    seed: int = 0

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "transforms": ListOf(Choice(TRANSFORMS)),
        "copies": Interval(int, 1, None, desc="at least 1"),
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


def draw_params(spec: AugmentSpec, sources: np.ndarray, source_ids: np.ndarray) -> list[AugmentParams]:
    """Parameters of every copy, seeded by (seed, source row id in the file, copy)."""
    out = []
    for pos, rid in zip(sources.tolist(), source_ids[sources].tolist()):
        for copy in range(1, spec.copies + 1):
            rng = np.random.default_rng([spec.seed, int(rid), copy])
            speed = round(float(rng.uniform(*spec.speed_range)), 2) if "speed" in spec.transforms else float("nan")
            shift = float(rng.uniform(0.0, 1.0)) if "shift" in spec.transforms else float("nan")
            snr = spec.snr_db if "noise" in spec.transforms else float("nan")
            out.append(
                AugmentParams(
                    source=pos,
                    copy=copy,
                    speed=speed,
                    shift_fraction=shift,
                    snr_db=snr,
                    noise_seed=int(rng.integers(0, 2**63 - 1)),
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


def apply(x: np.ndarray, params: AugmentParams, max_samples: int | None) -> np.ndarray:
    """The augmented copy of ``x`` (float32 mono at the model's rate, not yet cropped)."""
    if not np.isnan(params.speed):
        x = resample(x, *_speed_ratio(params.speed))
    if max_samples is not None:
        x = x[:max_samples]
    if not np.isnan(params.shift_fraction):
        x = np.roll(x, int(params.shift_fraction * len(x)))
    if not np.isnan(params.snr_db):
        power = float(np.mean(x.astype(np.float64) ** 2))
        noise_power = power / (10.0 ** (params.snr_db / 10.0))
        noise = np.random.default_rng(params.noise_seed).standard_normal(len(x))
        x = (x + np.sqrt(noise_power) * noise).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)
