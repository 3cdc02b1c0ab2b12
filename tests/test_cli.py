"""The CLI: happy path, info/ls/verify, and every user mistake as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from factories import LABELS, TEXTS

from cli.embstore_cli import main

TINY = ["--model", "random:tiny-bert", "-q"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def extract_ok(*args: str) -> str:
    res = run("extract", *TINY, *args)
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


def test_extract_info_ls_verify(tiny_csv, tmp_path):
    path = extract_ok("--data", str(tiny_csv), "--label-col", "label", "--holdout", "0.5", "--tokens", "-1")
    assert Path(path).is_dir() and path.endswith(".zarr")
    info = json.loads(run("info", path, "--json").stdout)
    assert info["complete"] and info["layers"] == [0, 1, 2] and info["hidden"] == 32
    assert {k: v["rows"] for k, v in info["splits"].items()} == {"train": 6, "test": 6}
    assert info["poolings"] == ["cls", "mean"] and info["dtype"] == "float16" and info["modality"] == "text"
    assert info["provenance"]["sources"][0]["holdout"] == {
        "fraction": 0.5,
        "seed": 0,
        "stratified": True,
        "carve": "row-ids-2",
    }
    text = run("info", path).stdout
    assert "complete" in text and "train: 6 rows" in text
    listing = run("ls").stdout
    assert path in listing and "complete" in listing
    res = run("verify", path)
    assert res.exit_code == 0 and "ok (2 row chunks verified)" in res.stdout
    again = run("extract", *TINY, "--data", str(tiny_csv), "--label-col", "label", "--holdout", "0.5", "--tokens", "-1")
    assert "already complete" in again.stderr and again.stdout.strip() == path


def test_verify_detects_a_corrupted_chunk(tiny_csv):
    path = Path(extract_ok("--data", str(tiny_csv), "--chunk-rows", "4"))
    chunk = path / "splits/all/text/pooled/mean/c/1/1/0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    res = run("verify", str(path))
    assert res.exit_code == 1
    assert "split all: row chunk 1 does not match its checksum (corrupted)" in res.stderr


def test_config_file_with_flag_override(tiny_csv, tmp_path):
    conf = tmp_path / "extract.yaml"
    conf.write_text(f"data: {tiny_csv}\nlabel_col: label\nlayers: '-1'\npooling: [cls, max]\nmodel: random:tiny-bert\n")
    path = extract_ok("--config", str(conf), "--layers", "0-1")
    info = json.loads(run("info", path, "--json").stdout)
    assert info["layers"] == [0, 1] and info["poolings"] == ["cls", "max"]


def test_h5_by_suffix(tiny_csv, tmp_path):
    path = extract_ok("--data", str(tiny_csv), "--out", str(tmp_path / "x.h5"))
    assert path == str(tmp_path / "x.h5")
    assert json.loads(run("info", path, "--json").stdout)["format"] == "h5"


def _bad(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    csv = tmp_path / "d.csv"
    texts, labels = list(TEXTS), list(LABELS)
    if kind == "empty_rows":
        texts[3] = "   "
    if kind == "missing_labels":
        labels[5] = None
    if kind == "empty_dataset":
        csv.write_text("text,label\n")
    else:
        pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    base = ["--data", str(csv), "--label-col", "label"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {
        "missing_file": (["--data", str(tmp_path / "nope.csv")], r"nope\.csv does not exist"),
        "missing_column": (base + ["--text-col", "body"], r"Column 'body' .* its columns are: text, label"),
        "empty_dataset": (base, r"has a header but no data rows"),
        "empty_rows": (base, r"1 of 12 rows .* empty or missing text .*--skip-empty"),
        "missing_labels": (base, r"1 of 12 rows .* no label in column 'label' \(rows 5\)"),
        "unknown_model": (base + ["--model", "bert-nonexistent-xyz"], r"'bert-nonexistent-xyz' is not a built-in name"),
        "layers_out_of_range": (base + ["--layers", "9-12"], r"must name layers in \[0, 2\] .* got '9-12'"),
        "bad_pooling": (
            base + ["--pooling", "cls,sum"],
            r"The --pooling option must be a comma list of cls, last, mean, max\. Got 'cls,sum' instead\.",
        ),
        "unwritable_out": (base + ["--out", str(blocker / "sub")], r"Cannot write the store under .*a-file/sub"),
        "bad_split": (["--split", "train"], r"expected NAME=FILE"),
        "data_and_split": (base + ["--split", f"test={csv}"], r"cannot pass both --data and --split"),
        "bad_holdout": (base + ["--holdout", "1.5"], r"The --holdout option must be a fraction in \(0, 1\)\. Got 1\.5"),
    }
    return cases[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "missing_file",
        "missing_column",
        "empty_dataset",
        "empty_rows",
        "missing_labels",
        "unknown_model",
        "layers_out_of_range",
        "bad_pooling",
        "unwritable_out",
        "bad_split",
        "data_and_split",
        "bad_holdout",
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, kind):
    import re

    args, pattern = _bad(tmp_path, kind)
    res = run("extract", *TINY, *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert re.search(pattern, err), err
    if kind != "bad_split":  # click's own usage errors add a usage line
        assert len(err.splitlines()) == 1, err
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.name.endswith(".zarr") for p in cache.iterdir())


def test_info_on_missing_and_incomplete_stores(tmp_path):
    res = run("info", str(tmp_path / "none.zarr"))
    assert res.exit_code == 2 and "No store at" in res.stderr
    (tmp_path / "x.h5.partial.zarr").mkdir()
    res = run("info", str(tmp_path / "x.h5"))
    assert res.exit_code == 2 and "resume" in res.stderr
