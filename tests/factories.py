"""The shared builders of the tests: small tables, separable data, tones, tiny model directories, the recording of
spawned processes' calls and the store comparison. Plain functions, no fixtures: conftest.py turns some into
fixtures, test modules import the rest from here (and never from one another).

Heavy imports (torch, transformers, the project) happen inside the builders that need them, so that importing this
module stays cheap (benchmarks/finetune_audio.py imports the tone generator).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

# -- small text tables ----------------------------------------------------------------------------------------------

TEXTS = [
    "the striker scored twice in the final minute",
    "stocks fell sharply after the central bank raised rates",
    "a new telescope images distant galaxies in infrared light",
    "parliament passed the budget after a long night of debate",
    "the goalkeeper saved a penalty to win the cup",
    "the company reported record quarterly profit",
    "researchers trained a neural network on protein structures",
    "elections were held across the country on sunday",
    "the tennis champion retired after twenty years",
    "oil prices climbed for the third straight week",
    "engineers launched a satellite to study the climate",
    "the prime minister met foreign leaders at the summit",
]
LABELS = ["sport", "business", "science", "world"] * 3


def needs_shared(name: str) -> Path:
    """Path of a shared dataset folder, or skip the test with the reason."""
    import pytest

    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"../shared/datasets/{name} is not present (the shared datasets sit beside the checkout)")
    return path


SEPARABLE_VOCAB = {
    "fruit": "apple banana cherry grape lemon mango peach".split(),
    "vehicle": "car truck bus train bicycle engine wheel".split(),
    "color": "red blue green yellow purple orange pink".split(),
}
"""Three classes, each with its own words: a task any backbone that trains at all can learn."""


def separable_csv(path: Path, n: int = 60) -> Path:
    """``n`` rows of 5 words, 3 classes (:data:`SEPARABLE_VOCAB`), each class with its own vocabulary; seeded."""
    import random

    rng = random.Random(0)
    names = list(SEPARABLE_VOCAB)
    rows = [(" ".join(rng.choice(SEPARABLE_VOCAB[names[i % 3]]) for _ in range(5)), names[i % 3]) for i in range(n)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


def tiny_csv(path: Path) -> Path:
    """12 rows (:data:`TEXTS`), 4 string classes (:data:`LABELS`), a 'text' and a 'label' column."""
    pd.DataFrame({"text": TEXTS, "label": LABELS}).to_csv(path, index=False)
    return path


def pair_csv(path: Path) -> Path:
    """Sentence pairs ('s1', 's2': :data:`TEXTS` forwards and backwards) with integer labels."""
    pd.DataFrame({"s1": TEXTS, "s2": TEXTS[::-1], "label": [i % 2 for i in range(len(TEXTS))]}).to_csv(
        path, index=False
    )
    return path


def synthetic_csv(
    tmp_path: Path, n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 40, name: str = "synthetic.csv"
) -> Path:
    """``n`` rows of random words (lengths min_words..max_words-1) with 3 integer labels: for tests that
    need many rows, long and short, but no real distribution."""
    rng = np.random.default_rng(seed)
    words = np.array("the a model layer store token chunk resume crash probe head sweep vector news sport".split())
    texts = [" ".join(rng.choice(words, size=rng.integers(min_words, max_words))) for _ in range(n)]
    path = tmp_path / name
    pd.DataFrame({"text": texts, "label": rng.integers(0, 3, size=n)}).to_csv(path, index=False)
    return path


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """``df`` written in the format its suffix names (.csv, .tsv, .jsonl, .parquet)."""
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        df.to_parquet(path)
    else:  # pragma: no cover
        raise ValueError(suffix)
    return path


# -- separable data -------------------------------------------------------------------------------------------------

VOCAB = {
    "sport": "goal match striker keeper league cup coach penalty team season".split(),
    "money": "stock bank profit market shares rates investor budget trade price".split(),
    "space": "planet orbit rocket galaxy telescope star moon comet astronaut launch".split(),
}
"""Each class's own keywords: a text of one class's words is easy to tell apart, even by a random encoder."""


def separable(path: Path, n_per_class: int = 40, seed: int = 0) -> Path:
    """A shuffled CSV of keyword texts ('text', 4 to 9 words of one :data:`VOCAB` class), their 'label' and an
    'other' text of the same class (for pairs and towers)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in VOCAB.items():
        for _ in range(n_per_class):
            rows.append(
                {
                    "text": " ".join(rng.choice(words, size=rng.integers(4, 10))),
                    "label": label,
                    "other": " ".join(rng.choice(words, size=5)),
                }
            )
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    df.to_csv(path, index=False)
    return path


def layered(seed: int, n: int = 240, k: int = 3, h: int = 24, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Stored-feature-like data without a store: (n, k, h) float16 (rows, layers, hidden) with far-apart class
    means, sharper in the last layer, and balanced int64 labels (row i is class i % classes). The class means are
    the same for every ``seed``, so two seeds give a training and a validation set of one task."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = np.random.default_rng(123).normal(size=(classes, k, h)) * np.linspace(0.5, 1.5, k)[None, :, None]
    X = means[y] + rng.normal(scale=0.7, size=(n, k, h))
    return X.astype(np.float16), y.astype(np.int64)


# -- tones ----------------------------------------------------------------------------------------------------------

RATE = 16000
PITCHES = {"low": 220.0, "mid": 330.0, "high": 495.0, "top": 742.5}
"""Hz of each class of :func:`write_tones` (each 1.5x the one below)."""


def tone(freq: float, seconds: float, rate: int = RATE, rng: np.random.Generator | None = None) -> np.ndarray:
    """(round(seconds * rate),) float32: a tone of ``freq`` Hz.

    Without ``rng``, a clean sine of amplitude 0.5 (its peak frequency, length and level are exactly known).
    With ``rng``, a voice-like noisy tone: a second harmonic, random phases and amplitude (0.1-0.5), a 20 ms fade in
    and out and white noise at 10-20 dB SNR, drawn from ``rng`` in that order.
    """
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    if rng is None:
        return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    x = np.sin(2 * np.pi * freq * t + phase[0]) + 0.4 * np.sin(4 * np.pi * freq * t + phase[1])
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * rate))  # 20 ms in and out
    x = rng.uniform(0.1, 0.5) * fade * x
    snr_db = rng.uniform(10.0, 20.0)
    noise = rng.standard_normal(n) * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


def write_tones(
    directory: Path, per_class: int = 6, speakers: int = 4, seed: int = 0, seconds: float = 1.0, rate: int = RATE
) -> Path:
    """A learnable synthetic speech set: ``speakers`` x 4 pitch classes (:data:`PITCHES`) x ``per_class`` noisy
    tones (:func:`tone` with an rng) as WAV clips under ``directory``/wav, and a table ``directory``/tones.csv
    (file, label, speaker); returns the table's path.

    Each speaker shifts every pitch by its own few percent (as voices differ) and each clip lasts ``seconds`` x
    0.8-1.2. The classes are a musical fourth or more apart, so pitch alone tells them apart, whoever speaks; a
    speaker-disjoint split checks that a model learnt pitch, not speakers.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    (directory / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(speakers):
        offset = rng.uniform(0.96, 1.04)  # the speaker's voice: a few percent higher or lower
        for label, pitch in PITCHES.items():
            for k in range(per_class):
                name = f"wav/spk{s}-{label}-{k}.wav"
                samples = int(seconds * rng.uniform(0.8, 1.2) * rate)
                sf.write(directory / name, tone(pitch * offset, samples / rate, rate, rng), rate, subtype="PCM_16")
                rows.append((name, label, f"spk{s}"))
    path = directory / "tones.csv"
    pd.DataFrame(rows, columns=["file", "label", "speaker"]).to_csv(path, index=False)
    return path


def pitch_clips(directory: Path) -> Path:
    """24 clean-tone recordings in ``directory``/audio (r00.wav ... r23.wav at 22.05, 16 and 8 kHz in turn; r05 is
    stereo), 0.3 + 0.05 * (i % 5) s long, labelled low (even i, 200 Hz + 15 i) or high (odd i, 2 kHz + 15 i), by 6
    speakers who each say both (2 low, 2 high), so a speaker-disjoint carve can hold both classes. Returns the
    table ``directory``/labels.csv (file, label, speaker)."""
    import soundfile as sf

    d = directory / "audio"
    d.mkdir(parents=True)
    rows = []
    rates = [22050, 16000, 8000]
    for i in range(24):
        label = "low" if i % 2 == 0 else "high"
        freq = (200 if label == "low" else 2000) + 15 * i
        rate = rates[i % 3]
        x = tone(freq, 0.3 + 0.05 * (i % 5), rate)
        if i == 5:
            x = np.stack([x, 0.5 * x], axis=1)  # stereo
        sf.write(d / f"r{i:02d}.wav", x, rate)
        rows.append({"file": f"audio/r{i:02d}.wav", "label": label, "speaker": f"s{(i // 2) % 6}"})
    path = directory / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_clips(directory: Path, samples: list[int], rate: int = RATE) -> Path:
    """One clean tone per entry of ``samples`` (that many samples at ``rate``) as ``directory``/audio/r<i>.wav,
    labelled i % 2, in the table ``directory``/labels.csv (file, label); returns the table's path."""
    import soundfile as sf

    d = directory / "audio"
    d.mkdir(parents=True)
    rows = []
    for i, n in enumerate(samples):
        sf.write(d / f"r{i}.wav", tone(300.0 + 50 * i, n / rate, rate), rate)
        rows.append({"file": f"audio/r{i}.wav", "label": i % 2})
    path = directory / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# -- tiny model directories -----------------------------------------------------------------------------------------


def random_model_dir(
    directory: Path, name: str = "random:tiny-bert", *, edit: Callable[[Any], None] | None = None, mask: bool = True
) -> Path:
    """The random model ``name`` saved as a local model directory (weights and tokenizer or feature extractor), as
    ``embstore extract --model DIR`` loads one; ``edit(model)`` first changes its weights (under no_grad).
    ``mask=False`` saves a speech feature extractor that returns no attention mask (as HuBERT's own does), so the
    model sees the zero padding of a batch."""
    import torch

    from embstore.backbones.registry import load_backbone

    bb = load_backbone(name)
    if edit is not None:
        with torch.no_grad():
            edit(bb.model)
    bb.model.save_pretrained(directory)
    if not mask:
        bb.tokenizer.return_attention_mask = False
    bb.tokenizer.save_pretrained(directory)
    return directory


# -- stores ---------------------------------------------------------------------------------------------------------


def assert_same_store(a: str, b: str) -> None:
    """The stores at ``a`` and ``b`` have one fingerprint and identical rows, labels, pooled and token states, and
    both verify."""
    from embstore import open_store

    sa, sb = open_store(a), open_store(b)
    assert sa.fingerprint == sb.fingerprint
    for split in sa.splits:
        np.testing.assert_array_equal(sa.row_ids(split), sb.row_ids(split))
        np.testing.assert_array_equal(sa.labels(split), sb.labels(split))
        for pooling in sa.poolings:
            np.testing.assert_array_equal(sa.pooled(split, pooling), sb.pooled(split, pooling))
        for layer in sa.token_layers:
            np.testing.assert_array_equal(sa.tokens(split, layer).values, sb.tokens(split, layer).values)
    assert sa.verify() == [] and sb.verify() == []


# -- processes a test cannot monkeypatch ----------------------------------------------------------------------------


def recording_env(tmp_path: Path, target: str) -> dict[str, str]:
    """The environment under which every new Python process logs its calls of ``target`` (``module:Class.method``)
    to ``tmp_path``/calls.<rank or pid>: tests/recording/sitecustomize.py does it. Read them with
    :func:`recorded_calls`."""
    return {
        **os.environ,
        "RECORD_TARGET": target,
        "RECORD_LOG": str(tmp_path / "calls"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "recording")]),
        "OMP_NUM_THREADS": "1",
    }


def recorded_calls(tmp_path: Path) -> dict[str, list[list[str]]]:
    """{rank (or 'pid<n>'): [the logged arguments of each call]} under :func:`recording_env`."""
    return {
        f.name.split(".", 1)[1]: [line.split() for line in f.read_text().splitlines()]
        for f in sorted(tmp_path.glob("calls.*"))
    }
