"""A learnable synthetic speech set for tests: noisy sine tones of 4 pitch classes, by a few "speakers".

Each clip is about 1 s at 16 kHz: a tone of its class's pitch, shifted by its speaker's own pitch offset (a few
percent, as voices differ), with a second harmonic, a random phase, amplitude and length, a short fade in and out
and white noise at 10-20 dB SNR. The classes are a musical fourth or more apart, so pitch alone tells them apart,
whoever speaks; a speaker-disjoint split checks that a model learnt pitch, not speakers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PITCHES = {"low": 220.0, "mid": 330.0, "high": 495.0, "top": 742.5}
"""Hz of each class (each 1.5x the one below)."""
RATE = 16000


def tone(pitch: float, rng: np.random.Generator, seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    """(samples,) float32: a noisy two-harmonic tone of ``pitch`` Hz."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    phase = rng.uniform(0, 2 * np.pi, size=2)
    x = np.sin(2 * np.pi * pitch * t + phase[0]) + 0.4 * np.sin(4 * np.pi * pitch * t + phase[1])
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * rate))  # 20 ms in and out
    x = rng.uniform(0.1, 0.5) * fade * x
    snr_db = rng.uniform(10.0, 20.0)
    noise = rng.standard_normal(n) * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


def write_tones(
    directory: Path, per_class: int = 6, speakers: int = 4, seed: int = 0, seconds: float = 1.0, rate: int = RATE
) -> Path:
    """Write ``speakers`` x 4 classes x ``per_class`` WAV clips under ``directory``/wav and a table
    ``directory``/tones.csv (file, label, speaker); returns the table's path."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    (directory / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(speakers):
        offset = rng.uniform(0.96, 1.04)  # the speaker's voice: a few percent higher or lower
        for label, pitch in PITCHES.items():
            for k in range(per_class):
                name = f"wav/spk{s}-{label}-{k}.wav"
                sf.write(
                    directory / name,
                    tone(pitch * offset, rng, seconds * rng.uniform(0.8, 1.2), rate),
                    rate,
                    subtype="PCM_16",
                )
                rows.append((name, label, f"spk{s}"))
    path = directory / "tones.csv"
    pd.DataFrame(rows, columns=["file", "label", "speaker"]).to_csv(path, index=False)
    return path
