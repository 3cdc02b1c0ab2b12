"""Audio input: probing and reading files, mono mixdown, polyphase resampling, cropping.

Files are read with ``soundfile`` (WAV, FLAC, OGG and whatever libsndfile reads). Only file
headers are read while planning (:func:`probe_files`); samples are decoded when their row
chunk is encoded (:func:`load_waveform`), so memory does not grow with the dataset.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "AudioInfo",
    "probe_files",
    "read_audio",
    "resample",
    "resampled_length",
    "rational",
    "load_waveform",
    "AUDIO_SUFFIXES",
]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".mp3")


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of the files of one split, aligned with its rows."""

    frames: np.ndarray
    """(n,) int64 samples per channel in the file."""
    rates: np.ndarray
    """(n,) int64 sampling rate of the file in Hz."""
    bad: list[tuple[int, str]]
    """(row position, reason) of files that are missing, unreadable or empty."""


def probe_files(paths: list[str]) -> AudioInfo:
    """Read every file's header (not its samples); collect the ones that cannot be used."""
    import soundfile as sf

    frames = np.zeros(len(paths), dtype=np.int64)
    rates = np.zeros(len(paths), dtype=np.int64)
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        if not p:
            bad.append((i, "empty path"))
            continue
        if not os.path.isfile(p):
            bad.append((i, f"{p}: no such file"))
            continue
        try:
            info = sf.info(p)
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            bad.append((i, f"{p}: unreadable ({str(exc).splitlines()[0][:80]})"))
            continue
        if info.frames <= 0:
            bad.append((i, f"{p}: zero-length audio"))
            continue
        frames[i], rates[i] = info.frames, info.samplerate
    return AudioInfo(frames=frames, rates=rates, bad=bad)


def read_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """(samples, rate): float32 mono, channels averaged."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    return (data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]).astype(np.float32, copy=False), int(rate)


def rational(ratio: float | Fraction, max_denominator: int = 1000) -> tuple[int, int]:
    """(up, down), the smallest integers with up / down == ratio (to 1 / max_denominator)."""
    f = Fraction(ratio).limit_denominator(max_denominator)
    return f.numerator, f.denominator


def resampled_length(n: int, up: int, down: int) -> int:
    """Samples that :func:`resample` returns for ``n`` input samples (scipy's resample_poly)."""
    return int(math.ceil(n * up / down))


def resample(x: np.ndarray, up: int, down: int) -> np.ndarray:
    """Polyphase resampling by up / down with scipy's anti-aliasing FIR (Kaiser window).

    ``resample(x, *rational(16000 / 22050))`` turns 22.05 kHz audio into 16 kHz. (n,) float32.
    """
    if up == down:
        return x
    from scipy.signal import resample_poly

    return resample_poly(x, up, down).astype(np.float32, copy=False)


def load_waveform(path: str | Path, target_rate: int, max_samples: int | None = None) -> np.ndarray:
    """A file as float32 mono at ``target_rate``, cropped to its first ``max_samples``."""
    x, rate = read_audio(path)
    x = resample(x, *rational(Fraction(target_rate, rate)))
    return x[:max_samples] if max_samples is not None else x
