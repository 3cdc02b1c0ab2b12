"""Word-level rows: sentences given as words, with labels per word (part of speech, dependency head and relation).

Two sources give them:

* a CoNLL-U file (``.conllu``), read with the ``conllu`` package: one row per sentence, its words the FORM column,
  labels ``upos``, ``xpos`` and ``deprel`` per word and its dependency ``head`` (1-based word index, 0 = root).
  Multi-word token lines (ids like ``3-4``) and empty nodes (``5.1``) are not words and are skipped. Every word line
  must have the format's 10 tab-separated columns; a line that has not is an error naming the file and the line.
* a JSONL or Parquet table with a ``tokens`` list column (the words) and one or more list columns of per-word
  labels, each as long as its row's ``tokens`` (a row where one is not is an error naming it); a list column named
  ``head`` holds integer heads as in CoNLL-U.

The text of a row is rebuilt from its words, joined by single spaces, and every word knows its character span in
it (:attr:`WordRow.spans`): extraction aligns words to subword tokens by the tokenizer's offsets into that text,
never by guessing at whitespace (:mod:`embstore.extraction.words`).

Plain Python and numpy; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import DataError

__all__ = [
    "WORD_POOLINGS",
    "WORDS_COL",
    "HEAD_COL",
    "CONLLU_LABELS",
    "CONLLU_SUFFIXES",
    "WordRow",
    "is_conllu",
    "read_conllu",
    "word_rows_from_table",
    "tree_depths",
    "tree_distances",
]

WORD_POOLINGS = ("first", "last", "mean")
"""How a word's subword states become the word's state (``--word-pooling``)."""
WORDS_COL = "tokens"
"""The list column of a word table that holds the words."""
HEAD_COL = "head"
"""The list column (or CoNLL-U field) of dependency heads: 1-based index of the head word, 0 for the root."""
CONLLU_LABELS = ("upos", "xpos", "deprel")
"""The per-word label columns read from CoNLL-U (HEAD is kept apart: it is a word index, not a label)."""
CONLLU_SUFFIXES = (".conllu", ".conll")
_CONLLU_FIELDS = 10


@dataclass(frozen=True)
class WordRow:
    """The words of one row (sentence) and their labels."""

    forms: tuple[str, ...]
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Label column -> one string per word."""
    heads: tuple[int, ...] | None = None
    """1-based head of every word (0: the root), or None when the source has no heads."""

    @property
    def text(self) -> str:
        """The row's text: its words joined by single spaces."""
        return " ".join(self.forms)

    @property
    def spans(self) -> np.ndarray:
        """(n_words, 2) int64 [start, stop) character span of each word in :attr:`text`."""
        lengths = np.fromiter((len(w) for w in self.forms), dtype=np.int64, count=len(self.forms))
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        return np.stack([starts, starts + lengths], axis=1) if len(lengths) else np.zeros((0, 2), np.int64)


def is_conllu(path: str | Path) -> bool:
    """Whether ``path`` is read as CoNLL-U (by its suffix)."""
    return Path(path).suffix.lower() in CONLLU_SUFFIXES


def _check_columns(path: Path) -> None:
    """Every word line of a CoNLL-U file has 10 tab-separated columns (the conllu package does not say which line
    has not); the first line that has not is an error naming the file and the line."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip() or text.startswith("#"):
                continue
            n = len(text.split("\t"))
            if n != _CONLLU_FIELDS:
                raise DataError(
                    f"{path} line {number} has {n} tab-separated columns, CoNLL-U needs {_CONLLU_FIELDS} (ID FORM "
                    f"LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC); fix that line (columns are separated by tabs)."
                )


def read_conllu(path: str | Path) -> list[WordRow]:
    """Every sentence of a CoNLL-U file as a :class:`WordRow`, in file order (multi-word tokens and empty nodes
    skipped). Errors name the file and the line."""
    import conllu

    p = Path(path)
    if not p.is_file():
        from embstore.errors import DataFileNotFoundError

        raise DataFileNotFoundError(f"Data file {p} does not exist; check the path given to --data/--split.")
    _check_columns(p)
    rows: list[WordRow] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        try:
            sentences = list(conllu.parse_incr(fh))
        except conllu.exceptions.ParseException as exc:
            raise DataError(f"Cannot read {p} as CoNLL-U: {str(exc).splitlines()[0]}; fix the file.") from None
    for s, sentence in enumerate(sentences):
        words = [t for t in sentence if isinstance(t["id"], int)]
        if not words:
            continue
        ids = [int(t["id"]) for t in words]
        if ids != list(range(1, len(ids) + 1)):
            raise DataError(
                f"{p} sentence {s + 1} ({sentence.metadata.get('sent_id', 'no sent_id')}) numbers its words "
                f"{ids[:8]}...; CoNLL-U words are numbered 1, 2, 3, ... within each sentence."
            )
        heads = []
        for t in words:
            h = t["head"]
            if h is None or not isinstance(h, int) or not 0 <= h <= len(words):
                raise DataError(
                    f"{p} sentence {s + 1}: word {t['id']} ({t['form']!r}) has head {h!r}; a head is 0 (root) or "
                    f"the number of a word of the sentence (1..{len(words)})."
                )
            heads.append(int(h))
        rows.append(
            WordRow(
                forms=tuple(str(t["form"]) for t in words),
                labels={
                    name: tuple(str(t[name] if t[name] is not None else "_") for t in words) for name in CONLLU_LABELS
                },
                heads=tuple(heads),
            )
        )
    if not rows:
        raise DataError(f"{p} holds no sentence with words; give a CoNLL-U file with at least one sentence.")
    return rows


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def word_rows_from_table(df: Any, path: Path) -> tuple[list[WordRow], list[str]]:
    """The word rows of a table with a ``tokens`` list column, and the per-word label columns found (every other
    column whose values are lists). A label list whose length differs from its row's ``tokens`` is an error naming
    the row and the column."""
    if WORDS_COL not in df.columns:
        raise DataError(
            f"{path} has no {WORDS_COL!r} column; a word table holds the words of each row as a list there."
        )
    tokens = df[WORDS_COL].tolist()
    for i, t in enumerate(tokens):
        if not _is_list(t) or len(t) == 0:
            raise DataError(
                f"{path} row {i}: column {WORDS_COL!r} holds {type(t).__name__ if not _is_list(t) else 'no words'}; "
                f"every row of a word table lists its words there (a non-empty list of strings)."
            )
    label_cols = [str(c) for c in df.columns if c != WORDS_COL and len(df) and all(_is_list(v) for v in df[c].tolist())]
    rows = []
    for i, t in enumerate(tokens):
        labels: dict[str, tuple[str, ...]] = {}
        heads = None
        for c in label_cols:
            values = list(df[c].iloc[i])
            if len(values) != len(t):
                raise DataError(
                    f"{path} row {i}: column {c!r} has {len(values)} labels for {len(t)} words in {WORDS_COL!r}; "
                    f"every word label column needs one label per word."
                )
            if c == HEAD_COL:
                try:
                    heads = tuple(int(h) for h in values)
                except (TypeError, ValueError):
                    raise DataError(
                        f"{path} row {i}: column {HEAD_COL!r} holds {values[:5]}; heads are integers (0 = root, else "
                        "the 1-based number of the head word)."
                    ) from None
                if any(not 0 <= h <= len(t) for h in heads):
                    raise DataError(
                        f"{path} row {i}: column {HEAD_COL!r} has a head outside 0..{len(t)}; a head is 0 (root) or "
                        "the 1-based number of a word of the row."
                    )
            else:
                labels[c] = tuple(_label(v) for v in values)
        rows.append(WordRow(forms=tuple(str(w) for w in t), labels=labels, heads=heads))
    return rows, [c for c in label_cols if c != HEAD_COL]


def _label(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def tree_depths(heads: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n_words,) int64 depth of every word in its sentence's dependency tree (the root word 0, its dependents 1,
    ...). ``heads`` (n_words,) 1-based within each sentence (0 = root), sentences at ``offsets`` (n + 1,). A cycle
    (a malformed tree) gives -1 for the words on it."""
    depth = np.full(len(heads), -1, dtype=np.int64)
    for s in range(len(offsets) - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        h = np.asarray(heads[lo:hi], dtype=np.int64)
        for i in range(hi - lo):
            d, j, seen = 0, i, 0
            while h[j] != 0 and seen <= hi - lo:
                j, d, seen = int(h[j]) - 1, d + 1, seen + 1
            depth[lo + i] = d if seen <= hi - lo else -1
    return depth


def tree_distances(heads: np.ndarray) -> np.ndarray:
    """(n, n) int64 path length between every two words of one sentence's tree (``heads`` (n,) 1-based, 0 = root):
    the structural probe's target (Hewitt & Manning 2019). Breadth-first search from every word."""
    n = len(heads)
    adj: list[list[int]] = [[] for _ in range(n)]
    for i, h in enumerate(heads):
        if h:
            adj[i].append(int(h) - 1)
            adj[int(h) - 1].append(i)
    out = np.full((n, n), -1, dtype=np.int64)
    for src in range(n):
        out[src, src] = 0
        frontier = [src]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adj[u]:
                    if out[src, v] < 0:
                        out[src, v] = out[src, u] + 1
                        nxt.append(v)
            frontier = nxt
    return out
