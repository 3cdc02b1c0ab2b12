"""A pitch shift by semitones that keeps the duration: librosa's ``pitch_shift`` recipe in numpy and scipy.

librosa is not a dependency, so its recipe is written out here: a phase-vocoder time stretch by
``rate = 2 ** (-steps / 12)`` (the clip becomes ``1 / rate`` times longer at the same pitch), then resampling by
``rate`` (back to the original length, every frequency times ``2 ** (steps / 12)``), then trimmed or zero-padded to
exactly the input's length. The STFT is librosa's default (n_fft 2048, hop 512, a periodic Hann window, centred
frames with zero padding); the resampling is :func:`embstore.data.audio.resample` (scipy's polyphase filter) at a
rational approximation of ``rate`` (denominator at most 1000: within 1e-5, a fiftieth of a cent).
"""

from __future__ import annotations

import numpy as np

from embstore.data.audio import rational, resample

__all__ = ["pitch_shift", "time_stretch"]

N_FFT, HOP = 2048, 512


def _window(n_fft: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float64)  # periodic Hann


def _stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(n_fft // 2 + 1, frames) complex: centred frames (n_fft // 2 zeros on both sides, librosa's default)."""
    pad = n_fft // 2
    xp = np.pad(x.astype(np.float64), pad)
    if len(xp) < n_fft:
        xp = np.pad(xp, (0, n_fft - len(xp)))
    frames = 1 + (len(xp) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    return np.fft.rfft(xp[idx] * _window(n_fft)[None, :], axis=1).T


def _istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    """Overlap-add inverse of :func:`_stft`, normalised by the summed squared window, cut to ``length`` samples."""
    frames = spec.shape[1]
    window = _window(n_fft)
    total = n_fft + hop * (frames - 1)
    out, norm = np.zeros(total), np.zeros(total)
    chunks = np.fft.irfft(spec.T, n=n_fft, axis=1) * window[None, :]
    for t in range(frames):
        out[t * hop : t * hop + n_fft] += chunks[t]
        norm[t * hop : t * hop + n_fft] += window**2
    out = np.divide(out, norm, out=np.zeros_like(out), where=norm > 1e-10)
    pad = n_fft // 2
    out = out[pad : pad + length]
    return np.pad(out, (0, max(0, length - len(out))))


def time_stretch(x: np.ndarray, rate: float, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """``x`` played ``rate`` times faster at the same pitch (phase vocoder): about ``len(x) / rate`` samples."""
    spec = _stft(x, n_fft, hop)
    steps = np.arange(0, spec.shape[1], rate)
    padded = np.pad(spec, ((0, 0), (0, 2)))
    advance = np.linspace(0, np.pi * hop, spec.shape[0])  # expected phase advance per hop of each bin
    phase = np.angle(spec[:, 0])
    out = np.zeros((spec.shape[0], len(steps)), dtype=np.complex128)
    for t, step in enumerate(steps):
        left, right = padded[:, int(step)], padded[:, int(step) + 1]
        alpha = step - int(step)
        out[:, t] = ((1 - alpha) * np.abs(left) + alpha * np.abs(right)) * np.exp(1j * phase)
        delta = np.angle(right) - np.angle(left) - advance
        delta -= 2 * np.pi * np.round(delta / (2 * np.pi))
        phase = phase + advance + delta
    return _istft(out, n_fft, hop, int(round(len(x) / rate)))


def pitch_shift(x: np.ndarray, steps: float, bins_per_octave: int = 12) -> np.ndarray:
    """(n,) float32: ``x`` (n,) with every frequency times ``2 ** (steps / bins_per_octave)``, the same n samples."""
    if steps == 0 or len(x) == 0:
        return np.asarray(x, dtype=np.float32)
    rate = 2.0 ** (-float(steps) / bins_per_octave)
    stretched = time_stretch(np.asarray(x, dtype=np.float64), rate).astype(np.float32)
    up, down = rational(rate, 1000)
    shifted = resample(stretched, up, down)
    n = len(x)
    return np.ascontiguousarray(np.pad(shifted[:n], (0, max(0, n - len(shifted)))), dtype=np.float32)
