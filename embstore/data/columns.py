"""Which columns hold the text and the labels when the options do not say.

A table with a column named ``label`` (or ``labels``) is labelled: extracting it without labels, silently, was the
commonest first mistake (the store only fails later, in ``heads sweep``). So when ``--label-col`` is not given,
:func:`find_columns` reads the table's header and uses such a column, saying so in one line; ``--no-labels``
extracts without. The text column is found the same way (``text`` or ``sentence``; a line says so unless it is
``text``, the default it always was). Names match case-insensitively;
two candidates, or none where one is needed, are an error naming the table's columns and the option to pass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from embstore.data.spec import DataSpec
from embstore.data.tables import SUFFIXES, read_table
from embstore.data.words import WORDS_COL, is_conllu
from embstore.errors import ColumnNotFoundError, ConfigError

__all__ = ["TEXT_COLUMNS", "LABEL_COLUMNS", "find_columns", "table_columns"]

TEXT_COLUMNS = ("text", "sentence")
"""Column names taken as the text when ``--text-col`` is not given."""
LABEL_COLUMNS = ("label", "labels")
"""Column names taken as the labels when ``--label-col`` is not given (and not ``--no-labels``)."""


def table_columns(path: str | Path) -> list[str]:
    """The column names of a CSV/TSV/JSONL/Parquet file, from its header (or first record) only."""
    p = Path(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if not p.is_file() or kind is None:
        return [str(c) for c in read_table(p).columns]  # raises the error that names the fix
    if kind in ("csv", "tsv"):
        import pandas as pd

        try:
            return [
                str(c)
                for c in pd.read_csv(p, nrows=0, sep="\t" if kind == "tsv" else ",", encoding_errors="replace").columns
            ]
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
            return [str(c) for c in read_table(p).columns]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(p).names)
    with open(p, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if isinstance(record, dict):
                    return [str(k) for k in record]
                break
    return [str(c) for c in read_table(p).columns]


def _pick(columns: list[str], names: tuple[str, ...], option: str, what: str, path: str) -> str | None:
    """The one column of ``columns`` named like one of ``names`` (case-insensitively), None if there is none."""
    found = [c for c in columns if c.lower() in names]
    if len(found) > 1:
        raise ConfigError(
            f"{path} has {len(found)} columns that could be the {what} ({', '.join(map(repr, found))}); "
            f"pass {option} with the one that holds the {what}."
        )
    return found[0] if found else None


def find_columns(spec: DataSpec, *, labels: bool = True, need_labels: bool = False) -> tuple[DataSpec, list[str]]:
    """``spec`` with its text and label columns filled in from the table's header where the options left them
    out, and one line per column found (for the user: what was chosen and how to choose otherwise).

    ``labels`` False (``--no-labels``) never looks for labels; ``need_labels`` (fine-tuning) makes a table without
    a label column an error. Built-in data and audio rows keep their own defaults for the text.
    """
    if not labels and spec.label_col is not None:
        raise ConfigError(f"You cannot pass both --label-col {spec.label_col} and --no-labels; pass only one.")
    if spec.data is not None and spec.data.startswith("builtin:"):
        return spec, []
    path = spec.data if spec.data is not None else spec.splits[0][1] if spec.splits else None
    if path is None:
        return spec, []
    if is_conllu(path):  # words and their labels; the text is rebuilt from the words, and there is no row label
        return spec, [f"words: CoNLL-U {path} (one row per sentence, labels upos, xpos, deprel and head per word)"]
    columns = table_columns(path)
    if WORDS_COL in columns and not any(c.lower() in TEXT_COLUMNS for c in columns) and spec.text_col is None:
        # a word table: the text is rebuilt from its words (extraction checks that the column holds lists)
        said = [f"words: column {WORDS_COL!r} of {path} (the text is rebuilt from them)"]
        spec = dataclasses.replace(spec, text_col=WORDS_COL)
        columns = [c for c in columns if c != WORDS_COL]
        if not labels or spec.label_col is not None:
            return spec, said
        label = _pick(columns, LABEL_COLUMNS, "--label-col", "labels", path)
        if label is not None:
            said.append(f"labels: column {label!r} of {path} (a label per row; pass --no-labels to leave it out)")
            return dataclasses.replace(spec, label_col=label), said
        if need_labels:
            raise ColumnNotFoundError(
                f"No --label-col given and {path} has no column named label or labels; pass --label-col NAME."
            )
        return spec, said
    shown = ", ".join(columns)
    notes: list[str] = []
    changes: dict[str, Any] = {}
    if spec.text_col is None and spec.audio_col is None:
        text = _pick(columns, TEXT_COLUMNS, "--text-col", "text", path)
        if text is None:
            raise ColumnNotFoundError(
                f"No --text-col given and {path} has no column named text or sentence; its columns "
                f"are: {shown}. Pass --text-col NAME."
            )
        changes["text_col"] = text
        if text != "text":  # 'text' was always the default: only another choice is news
            notes.append(f"text: column {text!r} of {path} (pass --text-col to choose another)")
    if labels and spec.label_col is None and spec.label_from_path is None:
        label = _pick(columns, LABEL_COLUMNS, "--label-col", "labels", path)
        if label is not None:
            changes["label_col"] = label
            notes.append(
                f"labels: column {label!r} of {path} (pass --label-col to choose another, or --no-labels "
                "to extract without)"
            )
        elif need_labels:
            raise ColumnNotFoundError(
                f"No --label-col given and {path} has no column named label or labels; its "
                f"columns are: {shown}. Pass --label-col NAME."
            )
        else:
            notes.append(
                f"no labels: {path} has no column named label or labels (its columns: {shown}); pass "
                "--label-col NAME to store labels"
            )
    return dataclasses.replace(spec, **changes), notes
