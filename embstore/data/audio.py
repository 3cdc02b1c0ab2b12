"""Audio input: probing and reading files, mono mixdown, polyphase resampling, cropping, and the clip rules every
product shares (clip lengths from headers, the crop, the bad-file message, the minimum length and usable rows, and
the longest clip a fixed-window model such as Whisper reads).

Files are read with ``soundfile`` (WAV, FLAC, OGG and whatever libsndfile reads). Only file
headers are read while planning (:func:`probe_files`); samples are decoded when their row
chunk is encoded (:func:`load_waveform`), so memory does not grow with the dataset.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from embstore.errors import DataError

__all__ = [
    "AudioInfo",
    "probe_files",
    "read_audio",
    "resample",
    "resampled_length",
    "rational",
    "load_waveform",
    "AUDIO_SUFFIXES",
    "clip_lengths",
    "cropped_lengths",
    "bad_files_error",
    "min_samples",
    "usable_rows",
    "check_window",
]

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the clip rules every product shares


def clip_lengths(frames: np.ndarray, rates: np.ndarray, rate: int) -> np.ndarray:
    """(n,) int64 samples of each whole clip at the model's ``rate``, from the file headers alone (``frames`` and
    ``rates`` as :func:`probe_files` reads them): what :func:`load_waveform` will return, before any crop or
    augmentation. Extraction, fine-tuning and prediction all size their clips with it."""
    return np.array(
        [resampled_length(int(n), *rational(Fraction(rate, int(r)))) for n, r in zip(frames, rates)], dtype=np.int64
    )


def cropped_lengths(lengths: np.ndarray, max_samples: int | None) -> np.ndarray:
    """(n,) int64 samples the model sees of clips of ``lengths`` under ``--max-seconds`` (``max_samples``; None:
    whole clips)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths if max_samples is None else np.minimum(lengths, max_samples)


def bad_files_error(info: AudioInfo, n: int, where: str, fix: str) -> DataError:
    """The one message for missing, unreadable or empty audio files: how many of ``n``, ``where`` they are listed
    (e.g. "listed in data.csv (column 'path')"; "" when they were given one by one), the first three reasons, and
    the ``fix``."""
    shown = "; ".join(reason for _, reason in info.bad[:3]) + ("; ..." if len(info.bad) > 3 else "")
    where = f" {where}" if where else ""
    return DataError(f"{len(info.bad)} of {n} audio files{where} cannot be used: {shown}. {fix}")


def min_samples(frames_of: Callable[[np.ndarray], np.ndarray], frames: int = 1, limit: int = 1 << 22) -> int:
    """The fewest samples that give ``frames`` output frames (1: the conv front end's receptive field), by
    bisection over the model's own frame arithmetic ``frames_of`` ((n,) samples -> (n,) frames)."""
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if int(frames_of(np.array([mid]))[0]) >= frames:
            hi = mid
        else:
            lo = mid + 1
    return lo


def usable_rows(
    paths: Sequence[str], lengths: np.ndarray, rows: np.ndarray, *, minimum: int, rate: int, split: str, skip_bad: bool
) -> np.ndarray:
    """``rows`` (positions into ``paths``/``lengths``, sorted) without the clips shorter than ``minimum`` samples,
    which give the model no frame: the one rule for too-short clips. With ``skip_bad`` they are dropped and counted
    in the log; otherwise a DataError names the first three, the minimum and both fixes."""
    rows = np.asarray(rows, dtype=np.int64)
    short = rows[np.asarray(lengths)[rows] < minimum]
    if not len(short):
        return rows
    if not skip_bad:
        shown = "; ".join(f"{paths[i]} ({int(lengths[i])} samples)" for i in short[:3])
        more = f" and {len(short) - 3} more" if len(short) > 3 else ""
        raise DataError(
            f"{len(short)} clips of split {split!r} are shorter than the model's receptive field of {minimum} samples "
            f"({minimum / rate:.3f} s at {rate} Hz), so they give no frame: {shown}{more}. Remove them from the "
            "table, or pass --skip-bad to drop them."
        )
    log.warning("skipped %d clips of split %r shorter than %d samples (--skip-bad)", len(short), split, minimum)
    return np.setdiff1d(rows, short)


def check_window(
    paths: Sequence[str],
    lengths: np.ndarray,
    *,
    window: int | None,
    rate: int,
    split: str,
    max_seconds: float | None,
    fix: str,
) -> None:
    """The one rule for a model that reads one fixed window (Whisper's 30 s; ``window`` in samples, None for every
    other model): ``max_seconds`` may not exceed it (a ConfigError), and no clip of ``lengths`` (samples the model
    would see, aligned with ``paths``) may be longer (a DataError naming the first three and ``fix``). Nothing is cut
    silently: a clip is cut only by an explicit ``--max-seconds``."""
    from embstore.errors import ConfigError

    if window is None:
        return
    if max_seconds is not None and int(round(max_seconds * rate)) > window:
        raise ConfigError(
            f"--max-seconds {max_seconds:g} is longer than the model's input window of {window / rate:g} s (Whisper "
            f"reads one window); pass --max-seconds {window / rate:g} or less."
        )
    long = np.flatnonzero(np.asarray(lengths) > window)
    if not len(long):
        return
    shown = "; ".join(f"{paths[i]} ({int(lengths[i]) / rate:.2f} s)" for i in long[:3])
    more = f" and {len(long) - 3} more" if len(long) > 3 else ""
    raise DataError(
        f"{len(long)} clips of split {split!r} are longer than the model's input window of {window / rate:g} s, "
        f"which is all it reads: {shown}{more}. {fix}"
    )
