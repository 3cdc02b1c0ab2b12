"""Shared fixtures: tiny data files written per test, the shared datasets, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

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
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"../shared/datasets/{name} is not present (the shared datasets sit beside the checkout)")
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBSTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    """12 rows, 4 string classes, a 'text' and a 'label' column."""
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"text": TEXTS, "label": LABELS}).to_csv(path, index=False)
    return path


@pytest.fixture
def pair_csv(tmp_path: Path) -> Path:
    """Sentence pairs with integer labels."""
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"s1": TEXTS, "s2": TEXTS[::-1], "label": [i % 2 for i in range(len(TEXTS))]}).to_csv(
        path, index=False
    )
    return path


def synthetic_csv(
    tmp_path: Path, n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 40, name: str = "synthetic.csv"
) -> Path:
    """``n`` rows of random words (lengths min_words..max_words-1) with 3 integer labels: for tests that
    need many rows, long and short, but no real distribution."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array("the a model layer store token chunk resume crash probe head sweep vector news sport".split())
    texts = [" ".join(rng.choice(words, size=rng.integers(min_words, max_words))) for _ in range(n)]
    path = tmp_path / name
    pd.DataFrame({"text": texts, "label": rng.integers(0, 3, size=n)}).to_csv(path, index=False)
    return path


def recording_env(tmp_path: Path, target: str) -> dict[str, str]:
    """The environment under which every new Python process logs its calls of ``target`` (``module:Class.method``)
    to ``tmp_path``/calls.<rank or pid>: tests/recording/sitecustomize.py does it. Read them with
    :func:`recorded_calls`."""
    root = Path(__file__).resolve().parents[1]
    return {
        **os.environ,
        "RECORD_TARGET": target,
        "RECORD_LOG": str(tmp_path / "calls"),
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests" / "recording")]),
        "OMP_NUM_THREADS": "1",
    }


def recorded_calls(tmp_path: Path) -> dict[str, list[list[str]]]:
    """{rank (or 'pid<n>'): [the logged arguments of each call]} under :func:`recording_env`."""
    return {
        f.name.split(".", 1)[1]: [line.split() for line in f.read_text().splitlines()]
        for f in sorted(tmp_path.glob("calls.*"))
    }


def write_table(df: pd.DataFrame, path: Path) -> Path:
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


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
