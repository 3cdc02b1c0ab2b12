"""Labels found: a table's ``label``/``labels`` and ``text``/``sentence`` columns are used when no option names
them, and one line says so; ``--no-labels`` extracts without; two candidates or none is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from factories import LABELS, TEXTS, write_table

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore.data.columns import find_columns, table_columns
from embstore.data.spec import DataSpec
from embstore.errors import ColumnNotFoundError, ConfigError

TINY = ["--model", "random:tiny-bert", "-q"]


def table(tmp_path: Path, name: str = "my.csv", **columns: list) -> Path:
    return write_table(pd.DataFrame(columns), tmp_path / name)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_columns_reads_the_header(tmp_path, suffix):
    path = table(tmp_path, "t" + suffix, sentence=TEXTS, Label=LABELS)
    assert table_columns(path) == ["sentence", "Label"]


@pytest.mark.parametrize(
    "columns, text, label",
    [
        ({"sentence": TEXTS, "label": LABELS}, "sentence", "label"),
        ({"text": TEXTS, "labels": LABELS}, "text", "labels"),
        ({"Sentence": TEXTS, "LABEL": LABELS, "other": LABELS}, "Sentence", "LABEL"),
    ],
)
def test_find_columns_fills_what_the_options_left_out(tmp_path, columns, text, label):
    path = table(tmp_path, **columns)
    spec, notes = find_columns(DataSpec(data=str(path)))
    assert (spec.text_col, spec.label_col) == (text, label)
    said_text = [] if text == "text" else [f"text: column {text!r} of {path} (pass --text-col to choose another)"]
    assert notes == said_text + [
        f"labels: column {label!r} of {path} (pass --label-col to choose another, or --no-labels to extract without)"
    ]


def test_given_columns_and_builtin_data_are_kept(tmp_path):
    path = table(tmp_path, body=TEXTS, label=LABELS, topic=LABELS)
    spec, notes = find_columns(DataSpec(data=str(path), text_col="body", label_col="topic"))
    assert (spec.text_col, spec.label_col, notes) == ("body", "topic", [])
    assert find_columns(DataSpec(data="builtin:tweets")) == (DataSpec(data="builtin:tweets"), [])


@pytest.mark.parametrize(
    "columns, kw, error, match",
    [
        (
            {"text": TEXTS, "sentence": TEXTS},
            {},
            ConfigError,
            r"has 2 columns that could be the text \('text', 'sentence'\); pass --text-col with the one",
        ),
        (
            {"text": TEXTS, "label": LABELS, "labels": LABELS},
            {},
            ConfigError,
            r"has 2 columns that could be the labels \('label', 'labels'\); pass --label-col",
        ),
        (
            {"body": TEXTS, "label": LABELS},
            {},
            ColumnNotFoundError,
            r"No --text-col given and .*my.csv has no column named text or sentence; its columns are: body, label. "
            r"Pass --text-col NAME.",
        ),
        (
            {"text": TEXTS, "topic": LABELS},
            {"need_labels": True},
            ColumnNotFoundError,
            r"No --label-col given and .* has no column named label or labels; its columns are: text, topic. "
            r"Pass --label-col NAME.",
        ),
    ],
)
def test_ambiguous_or_absent_columns_are_one_clear_error(tmp_path, columns, kw, error, match):
    with pytest.raises(error, match=match):
        find_columns(DataSpec(data=str(table(tmp_path, **columns))), **kw)


def test_extract_finds_labels_and_says_so(tmp_path):
    path = table(tmp_path, sentence=TEXTS, label=LABELS)
    res = CliRunner().invoke(embstore_main, ["extract", "--data", str(path), *TINY])
    assert res.exit_code == 0, res.output
    assert (
        f"labels: column 'label' of {path} (pass --label-col to choose another, or --no-labels to extract "
        "without)" in res.stderr
    )
    assert f"text: column 'sentence' of {path}" in res.stderr
    info = json.loads(CliRunner().invoke(embstore_main, ["info", res.stdout.strip().splitlines()[-1], "--json"]).stdout)
    assert info["label_names"] == sorted(set(LABELS))

    res = CliRunner().invoke(embstore_main, ["extract", "--data", str(path), "--no-labels", *TINY])
    assert res.exit_code == 0 and "labels:" not in res.stderr
    info = json.loads(CliRunner().invoke(embstore_main, ["info", res.stdout.strip().splitlines()[-1], "--json"]).stdout)
    assert info["label_names"] is None

    res = CliRunner().invoke(embstore_main, ["plan", "--data", str(path), "--no-labels", "--label-col", "label", *TINY])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        "error: You cannot pass both --label-col label and --no-labels; pass only one."
    ]


def test_extract_of_an_unlabelled_table_says_it_has_no_labels(tmp_path):
    path = table(tmp_path, text=TEXTS)
    res = CliRunner().invoke(embstore_main, ["plan", "--data", str(path), *TINY, "--json"])
    assert res.exit_code == 0, res.output
    assert (
        f"no labels: {path} has no column named label or labels (its columns: text); pass --label-col NAME to "
        "store labels" in res.stderr
    )
    json.loads(res.stdout)  # the JSON stays alone on stdout


def test_finetune_needs_a_label_column_and_names_the_columns(tmp_path):
    path = table(tmp_path, sentence=TEXTS, topic=LABELS)
    res = CliRunner().invoke(
        heads_main,
        [
            "finetune",
            "--data",
            str(path),
            "--model",
            "random:tiny-bert",
            "--no-progress",
            "--out",
            str(tmp_path / "ft"),
        ],
    )
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        f"error: No --label-col given and {path} has no column named label or labels; its columns are: sentence, "
        f"topic. "
        "Pass --label-col NAME."
    ]
