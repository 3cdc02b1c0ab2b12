"""The store id: every option that can change a stored value changes it; the others do not.

The id is computed from cheap inputs (``quick_id``: no model load, no tokenizing) and the full
plan computes the very same one, which is what lets a finished store answer at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from factories import LABELS, TEXTS, random_model_dir, write_clips

import embstore.extraction.store_id as identity
from embstore import ExtractConfig, extract
from embstore.extraction.plan import make_plan as _plan
from embstore.extraction.plan import quick_id as _quick_id


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "rows.csv"
    pd.DataFrame({"text": TEXTS, "other": TEXTS[::-1], "label": LABELS, "group": [i % 3 for i in range(12)]}).to_csv(
        path, index=False
    )
    return path


def cfg(**kw) -> ExtractConfig:
    """A config from flat keys, as YAML and the CLI give them."""
    return ExtractConfig.from_dict(kw)


def _id(cfg: ExtractConfig, device: str = "cpu") -> str:
    quick = _quick_id(cfg, device)
    assert quick is not None
    return quick[0]


def test_the_cheap_id_is_the_full_plans_id(table):
    for c in (
        cfg(model="random:tiny-bert", data=str(table), label_col="label", holdout=0.5, tokens="-1"),
        cfg(model="minilm", data=str(table), text_col="text", text_pair_col="other", layers="2-4"),
    ):
        assert _id(c) == _plan(c, "cpu").fingerprint


CHANGES = {
    "layers": dict(layers="0-1"),
    "pooling": dict(pooling=("cls", "max")),
    "tokens": dict(tokens="1"),
    "max_length": dict(max_length=16),
    "dtype": dict(dtype="float32"),
    "text_col": dict(text_col="other"),
    "pair": dict(text_pair_col="other"),
    "label_col": dict(label_col=None),
    "group_col": dict(group_col="group"),
    "limit": dict(limit=5),
    "skip_empty": dict(skip_empty=True),
    "holdout": dict(holdout=0.5),
    "bucket": dict(bucket=False),
    "model": dict(model="random:mini-bert"),
    "quantize": dict(quantize="int8"),
    "compute_dtype": dict(compute_dtype="bfloat16"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_options_that_change_values_change_the_id(table, change):
    base = dict(model="random:tiny-bert", data=str(table), label_col="label")
    assert _id(cfg(**{**base, **CHANGES[change]})) != _id(cfg(**base))


def test_holdout_seed_file_bytes_device_and_libraries_change_the_id(table, tmp_path, monkeypatch):
    base = dict(model="random:tiny-bert", data=str(table), label_col="label", holdout=0.5)
    ref = _id(cfg(**base))
    assert _id(cfg(**base, seed=1)) != ref
    import torch

    # --compute-dtype auto is bfloat16 on a GPU that supports it: other values, another id (no GPU needed to plan it)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _id(cfg(**base), "cuda") != ref
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _id(cfg(**base), "cuda") == ref  # float32 there too: the same values
    edited = tmp_path / "edited.csv"
    edited.write_text(table.read_text().replace("twice", "thrice"))
    assert _id(cfg(**{**base, "data": str(edited)})) != ref
    monkeypatch.setattr(identity, "library_versions", lambda: {"torch": "9.9", "transformers": "9.9"})
    assert _id(cfg(**base)) != ref


def test_options_that_cannot_change_values_keep_the_id(table, tmp_path):
    base = dict(model="random:tiny-bert", data=str(table), label_col="label")
    ref = _id(cfg(**base))
    same = [
        dict(num_processes=2),
        dict(batch_size=3),
        dict(token_budget=64),
        dict(chunk_rows=4),
        dict(wait=True),
        dict(device="cpu"),
        dict(out=str(tmp_path / "elsewhere")),
        dict(extra={"note": "x"}),
    ]
    for change in same:
        assert _id(cfg(**{**base, **change})) == ref, change
    moved = tmp_path / "moved" / "copy.csv"
    moved.parent.mkdir()
    shutil.copy(table, moved)
    assert _id(cfg(**{**base, "data": str(moved)})) == ref  # the bytes count, not the path


def test_audio_batching_is_in_the_id_only_where_it_changes_values(tmp_path):
    """A mapped speech family is exact at any batch size, with or without the attention mask its feature extractor
    returns (extraction always gives one), so batching stays out of its id; with --quantize int8 (one activation
    scale per batch) it is in."""
    table = write_clips(tmp_path, [4000 + 400 * i for i in range(4)])  # 0.25 to 0.325 s
    unmasked = random_model_dir(tmp_path / "unmasked-hubert", "random:hubert-tiny", mask=False)
    for model, quantize, batching_counts in (
        ("random:hubert-tiny", "none", False),
        (str(unmasked), "none", False),
        ("random:hubert-tiny", "int8", True),
    ):
        base = dict(model=model, data=str(table), audio_col="file", label_col="label", quantize=quantize)
        for change in (dict(batch_seconds=1.0), dict(batch_size=2), dict(chunk_rows=2)):
            assert (_id(cfg(**base, **change)) != _id(cfg(**base))) is batching_counts, (model, change)
        assert _id(cfg(**base, max_seconds=0.3)) != _id(cfg(**base))
        assert _id(cfg(**base)) == _plan(cfg(**base), "cpu").fingerprint
    base = cfg(model="random:hubert-tiny", data=str(table), audio_col="file", label_col="label")
    before = _id(base)
    (tmp_path / "audio" / "r2.wav").write_bytes((tmp_path / "audio" / "r1.wav").read_bytes())  # a recording changed
    assert _id(base) != before


def test_a_finished_store_answers_without_loading_the_model(table, monkeypatch):
    import embstore.extraction.plan as planner
    import embstore.extraction.run as extraction

    c = cfg(model="random:tiny-bert", data=str(table), label_col="label")
    first = extract(c, show_progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for a complete store")

    monkeypatch.setattr(planner, "load_backbone", refuse)
    monkeypatch.setattr(extraction, "load_backbone", refuse)
    again = extract(c, show_progress=False)
    assert (again.status, again.path, again.rows) == ("already complete", first.path, first.rows)
