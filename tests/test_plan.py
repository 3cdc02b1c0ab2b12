"""``embstore plan``: the figures it announces are the ones the extraction then produces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import synthetic_csv, write_clips

from cli.embstore_cli import main
from embstore import ExtractConfig, extract, open_store
from embstore.extraction.estimate import plan_extraction


def _data(tmp_path: Path, n: int = 90) -> Path:
    return synthetic_csv(tmp_path, n, seed=1, min_words=2, max_words=60)


@pytest.mark.parametrize(
    "extra", [dict(), dict(tokens="0,-1", pooling=("cls", "mean", "max"), dtype="float32")], ids=["pooled", "tokens"]
)
def test_planned_bytes_are_the_stores_bytes(tmp_path, extra):
    cfg = ExtractConfig.from_dict(
        dict(
            model="random:tiny-bert",
            data=str(_data(tmp_path)),
            label_col="label",
            holdout=0.3,
            chunk_rows=16,
            max_length=40,
            out=str(tmp_path / "out"),
            **extra,
        )
    )
    report = plan_extraction(cfg)
    assert report.state == "absent" and report.bytes_exact
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # planning writes nothing
    result = extract(cfg, show_progress=False)
    store = open_store(result.path)
    assert report.path == result.path and report.fingerprint == store.fingerprint
    assert report.bytes == store.nbytes()  # exact, to the byte
    for name, s in report.splits.items():
        assert s["rows"] == store.n_rows(name) and s["tokens"] == int(store.n_tokens(name).sum())
        assert s["truncated"] == result.truncated[name] and s["chunks_left"] == s["chunks"]
    assert sum(s["truncated"] for s in report.splits.values()) > 0  # max_length 40 cuts the long rows
    assert set(report.bytes_detail["pooled"]) == set(store.poolings)
    assert report.estimated_seconds > 0 and report.timing["batches_timed"] >= 1
    assert report.free_bytes is not None and report.free_bytes > 0
    again = plan_extraction(cfg)
    assert again.state == "complete" and all(s["chunks_left"] == 0 for s in again.splits.values())


def test_plan_of_a_partial_store_counts_what_is_left(tmp_path, monkeypatch):
    import embstore.store.writer as w

    cfg = ExtractConfig.from_dict(
        dict(model="random:tiny-bert", data=str(_data(tmp_path)), chunk_rows=16, out=str(tmp_path / "s.zarr"))
    )
    original = w.StoreWriter.write_chunk
    written: list[int] = []

    def write_then_stop(self, split, chunk, data):
        if written:
            raise KeyboardInterrupt  # an interrupted run: one chunk on disk
        original(self, split, chunk, data)
        written.append(chunk)

    monkeypatch.setattr(w.StoreWriter, "write_chunk", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, show_progress=False)
    monkeypatch.setattr(w.StoreWriter, "write_chunk", original)
    report = plan_extraction(cfg)
    assert report.state == "partial"
    assert report.splits["all"]["chunks_left"] == report.splits["all"]["chunks"] - 1


def test_cli_plan_text_and_json(tmp_path):
    args = [
        "plan",
        "--model",
        "random:tiny-bert",
        "--data",
        str(_data(tmp_path, 30)),
        "--label-col",
        "label",
        "--tokens",
        "-1",
        "--out",
        str(tmp_path / "o"),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for head in ("store", "split      all: 30 rows", "bytes", "tokens of layer 2", "disk", "time       about"):
        assert head in res.stdout
    res = CliRunner().invoke(main, [*args, "--json"])
    d = json.loads(res.stdout)
    assert {"bytes", "estimated_seconds", "splits", "free_bytes", "path"} <= set(d)
    assert isinstance(d["bytes"], int) and d["estimated_seconds"] > 0
    bad = CliRunner().invoke(main, ["plan", "--model", "random:tiny-bert", "--data", str(tmp_path / "missing.csv")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1  # the same one-line errors as extract


def test_plan_of_audio_counts_seconds(tmp_path):
    table = write_clips(tmp_path, [8000 + 800 * i for i in range(6)])  # 0.5 to 0.75 s at 16 kHz
    cfg = ExtractConfig.from_dict(
        dict(
            model="random:hubert-tiny",
            data=str(table),
            audio_col="file",
            label_col="label",
            out=str(tmp_path / "a.zarr"),
        )
    )
    report = plan_extraction(cfg)
    assert report.modality == "audio"
    assert report.splits["all"]["seconds"] == pytest.approx(sum(0.5 + 0.05 * i for i in range(6)), abs=1e-3)
    store = open_store(extract(cfg, show_progress=False).path)
    assert report.bytes == store.nbytes()


def test_plan_of_an_h5_store_says_it_estimates(tmp_path):
    cfg = ExtractConfig.from_dict(
        dict(model="random:tiny-bert", data=str(_data(tmp_path, 40)), out=str(tmp_path / "s.h5"), format="h5")
    )
    report = plan_extraction(cfg)
    assert not report.bytes_exact and report.peak_bytes > report.bytes
    actual = open_store(extract(cfg, show_progress=False).path).nbytes()
    assert 0.5 * actual < report.bytes < 2 * actual
