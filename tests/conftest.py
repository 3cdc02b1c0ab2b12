"""Fixtures: an isolated cache per test, tiny data files written per test, and the inputs and stores that many
tests only read, built once per session. The builders themselves are in factories.py; test modules import them
from there, never from here or from one another."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import factories
import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBSTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    """12 rows, 4 string classes, a 'text' and a 'label' column (factories.tiny_csv)."""
    return factories.tiny_csv(tmp_path / "tiny.csv")


@pytest.fixture
def pair_csv(tmp_path: Path) -> Path:
    """Sentence pairs with integer labels (factories.pair_csv)."""
    return factories.pair_csv(tmp_path / "pairs.csv")


@pytest.fixture(scope="session")
def pitch_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """factories.pitch_clips written once per session. Read it only: a test that edits the table or writes beside
    it writes its own copy (test_audio's ``tones``)."""
    return factories.pitch_clips(tmp_path_factory.mktemp("pitch"))


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any], Any]:
    """``shared_store(config)`` -> the ExtractResult of ``extract(config)``, made once per session for each distinct
    config (its ``out`` is replaced by one session directory), so tests that read the same store share it.

    Read the store only: a test that writes into a store, interrupts, resumes or times an extraction makes its own.
    The result is the first extraction's (its status 'created'), whichever test asked first.
    """
    from embstore.extraction.run import extract

    root = tmp_path_factory.mktemp("stores")
    made: dict[str, Any] = {}

    def get(config: Any) -> Any:
        config = dataclasses.replace(config, out=str(root))
        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        if key not in made:
            made[key] = extract(config, show_progress=False)
        return made[key]

    return get


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
