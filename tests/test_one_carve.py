"""One carve for every product: the same data, seed and fraction give the same rows, whatever order they sit in.

The unit tests shuffle rows (as a store sorts them by length) and check the carves pick the same source rows; the
end-to-end test is a new user's path on one ``sentence,label`` file: ``embstore extract`` -> ``heads sweep`` ->
``heads finetune`` -> ``heads report`` merges them without ``--allow-mixed``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore.data.carve import carve
from embstore.errors import CarveError, ConfigError
from heads.protocol import carve_with_copies, fold_rounds, validation_carve

WORDS = {
    "pos": "great lovely superb enjoyable wonderful delightful brilliant charming".split(),
    "neg": "awful boring dreadful tedious terrible clumsy dull painful".split(),
    "neu": "ordinary average plain usual standard typical regular common".split(),
}
FILLER = "the film was quite and a story with some scenes of it".split()


def my_csv(path: Path, n: int = 400, *, seed: int = 0, speakers: bool = False) -> Path:
    """``n`` rows of ``sentence,label`` (learnable: each class has its own words), of very different lengths so a
    store's length order differs from the file's; with ``speakers`` a ``speaker`` column of 40 groups."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(list(WORDS), size=n, p=[0.5, 0.3, 0.2])
    rows = []
    for i, label in enumerate(labels):
        words = list(rng.choice(WORDS[label], size=2)) + list(rng.choice(FILLER, size=rng.integers(1, 12)))
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label, **({"speaker": f"s{i % 40}"} if speakers else {})})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def shuffled(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


@pytest.mark.parametrize("grouped", [False, True])
def test_carve_picks_the_same_source_rows_in_any_order(grouped):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    groups = rng.integers(0, 30, size=200) if grouped else None
    ids = np.arange(200)
    kept, held = carve(y, 0.2, 7, groups=groups, row_ids=ids)
    perm = shuffled(200)  # the same rows in another order (a store sorts them by length)
    g_perm = None if groups is None else groups[perm] + 1000  # and other group codes: the names do not matter
    kept_p, held_p = carve(y[perm], 0.2, 7, groups=g_perm, row_ids=ids[perm])
    assert set(ids[perm][held_p]) == set(ids[held]) and set(ids[perm][kept_p]) == set(ids[kept])
    assert len(held) == 40 if not grouped else not set(groups[held]) & set(groups[kept])
    # without the row ids the carve is of positions: another order, other rows (the bug this module fixes)
    assert set(ids[perm][carve(y[perm], 0.2, 7, groups=g_perm)[1]]) != set(ids[held])


def test_carve_is_stratified_and_ignores_the_label_encoding():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    _, held = carve(y, 0.1, 4, row_ids=np.arange(100))
    assert np.bincount(y[held]).tolist() == [5, 3, 2]  # each class its share of ceil(0.1 * 100) rows
    names = np.array(["pos", "neg", "neu"])[y]  # the same labels as strings, numbered otherwise
    assert np.array_equal(carve(names, 0.1, 4, row_ids=np.arange(100))[1], held)
    skewed = np.repeat([0, 1, 2], [96, 2, 2])
    _, rare = carve(skewed, 0.05, 0)
    assert len(rare) == 5 and set(skewed[rare]) == {0, 1, 2}  # at least one row of each class


@pytest.mark.parametrize("grouped", [False, True])
def test_carve_refuses_in_one_line_a_carve_that_cannot_hold_every_class(grouped):
    y = np.repeat([0, 1, 2], [40, 40, 1]) if not grouped else np.repeat([0, 1], [40, 40])
    groups = None if not grouped else np.repeat([0, 1], [40, 40])  # each group holds one class
    with pytest.raises(CarveError, match="cannot hold every one of the|no carve of them holds every one") as e:
        carve(y, 0.2, 0, groups=groups)
    assert "\n" not in str(e.value)
    kept, held = carve(y, 0.2, 0, groups=groups, every_class=False)  # the holdout's choice: carved anyway
    assert len(kept) and len(held) and (grouped or 2 in y[kept])  # the kept side keeps the single-row class
    with pytest.raises(ConfigError, match=r"validation carve of the rows .*; raise --validation-fraction"):
        validation_carve(y, 0.2, 0, groups, what="the rows", fix="raise --validation-fraction")


def test_every_class_false_carves_the_same_rows_when_every_class_fits():
    rng = np.random.default_rng(3)
    y, groups, ids = rng.integers(0, 4, size=150), rng.integers(0, 25, size=150), rng.permutation(150)
    for g in (None, groups):
        a = carve(y, 0.2, 5, groups=g, row_ids=ids)
        b = carve(y, 0.2, 5, groups=g, row_ids=ids, every_class=False)
        assert all(np.array_equal(x, z) for x, z in zip(a, b))


def test_every_validation_carve_is_the_one_carve():
    """The sweep's validation carve, make_split (HeadClassifier.fit, fit_linear_probes) and fine-tuning's early
    stopping pick the same rows for the same labels, seed, fraction, groups and row ids."""
    from embstore.data.tables import SplitData
    from heads.finetune.data import FinetuneData, early_stopping_carve
    from heads.protocol import make_split

    rng = np.random.default_rng(2)
    y, groups, ids = rng.integers(0, 3, size=120), rng.integers(0, 20, size=120), rng.permutation(120)
    for g in (None, groups):
        fit, val = carve(y, 0.1, 0, groups=g, row_ids=ids)
        assert np.array_equal(validation_carve(y, 0.1, 0, g, row_ids=ids)[1], val)
        split = make_split(y, None, validation_fraction=0.1, seed=0, patience=5, groups=g, row_ids=ids)
        assert np.array_equal(split.train_idx, fit) and np.array_equal(split.val_idx, val)
        train = SplitData(name="train", row_ids=ids, texts=["x"] * 120, pairs=None, labels=y, groups=g)
        data = FinetuneData(train, train, np.arange(120), np.arange(120), ["a", "b", "c"], [], {})
        es_fit, es_val = early_stopping_carve(data, np.arange(120), 0.1, 0)
        assert np.array_equal(es_fit, fit) and np.array_equal(es_val, val)


def test_a_store_with_copies_is_carved_as_its_table():
    """Augmented copies (sharing their source's row id) follow their source: the original rows are carved as a
    table without copies is, and no copy of a carved row is on the kept side."""
    rng = np.random.default_rng(4)
    y, ids = rng.integers(0, 3, size=90), np.arange(90)
    src = rng.choice(90, size=60)  # 60 copies of random rows, then a store's length order
    y_all, ids_all = np.concatenate([y, y[src]]), np.concatenate([ids, ids[src]])
    aug = np.arange(150) >= 90
    perm = shuffled(150)
    kept, held = carve_with_copies(y_all[perm], 0.2, 1, groups=None, row_ids=ids_all[perm], augmented=aug[perm])
    t_kept, t_held = carve(y, 0.2, 1, row_ids=ids)
    assert sorted(ids_all[perm][held]) == sorted(ids[t_held]) and not aug[perm][held].any()
    assert set(ids_all[perm][kept]) == set(ids[t_kept]) and aug[perm][kept].sum() == np.isin(src, t_kept).sum()


def test_validation_carve_and_folds_follow_source_rows():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=120)
    ids = np.arange(120)
    perm = shuffled(120)
    _, val = validation_carve(y, 0.1, 0, row_ids=ids)
    _, val_p = validation_carve(y[perm], 0.1, 0, row_ids=ids[perm])
    assert set(ids[perm][val_p]) == set(ids[val])

    def held(y_: np.ndarray, ids_: np.ndarray) -> list[set[int]]:
        rounds = fold_rounds(3, y_, None, "all", "all", None, y_, 0, None, np.zeros(len(y_), bool), ids_)
        out = []
        for r in rounds:
            assert r.eval_rows is not None and np.array_equal(r.y_eval, y_[r.eval_rows])  # labels stay aligned
            out.append(set(ids_[r.eval_rows].tolist()))
        return out

    assert held(y[perm], ids[perm]) == held(y, ids)


def _ok(result, what: str) -> str:
    assert result.exit_code == 0, f"{what}: {result.output}"
    return result.stdout.strip().splitlines()[-1]


def _run_json(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


def _sorted_rows(rows: dict | list) -> list[dict[str, list[int]]]:
    """run.json's ``rows`` (one object, or one per fold) as sorted source-row ids."""
    return [{k: sorted(v) for k, v in r.items()} for r in (rows if isinstance(rows, list) else [rows])]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["one-file", "groups", "folds", "holdout"])
def test_sweep_and_finetune_of_one_file_merge_without_allow_mixed(case, tmp_path):
    """A sweep and a fine-tune of one file, seed and fraction record the same validation and test row ids (and fit
    rows) in run.json, and merge without --allow-mixed. ``holdout``: ``--holdout 0.2 --seed 3`` and a validation
    fraction of 0.2, the sweep's seed from its config file."""
    data = my_csv(tmp_path / "my.csv", speakers=case == "groups")
    extra = ["--group-col", "speaker"] if case == "groups" else []
    folds = ["--folds", "3"] if case == "folds" else []
    holdout = ["--holdout", "0.2", "--seed", "3"] if case == "holdout" else []
    fraction = ["--validation-fraction", "0.2"] if case == "holdout" else []
    sweep_seed = []
    if case == "holdout":
        (tmp_path / "sweep.yaml").write_text("seed: 3\n")
        sweep_seed = ["--config", str(tmp_path / "sweep.yaml")]
    store = _ok(
        CliRunner().invoke(
            embstore_main,
            [
                "extract",
                "--data",
                str(data),
                "--model",
                "random:tiny-bert",
                "--text-col",
                "sentence",
                "--label-col",
                "label",
                "-q",
                *extra,
                *holdout,
            ],
        ),
        "extract",
    )
    sw = _ok(
        CliRunner().invoke(
            heads_main,
            [
                "sweep",
                "--store",
                store,
                "--layers",
                "-1",
                "--combine",
                "single",
                "--pooling",
                "mean",
                "--no-ci",
                "--no-progress",
                "--out",
                str(tmp_path / "sw"),
                *folds,
                *fraction,
                *sweep_seed,
            ],
        ),
        "sweep",
    )
    ft = _ok(
        CliRunner().invoke(
            heads_main,
            [
                "finetune",
                "--data",
                str(data),
                "--model",
                "random:tiny-bert",
                "--text-col",
                "sentence",
                "--label-col",
                "label",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--no-progress",
                "--out",
                str(tmp_path / "ft"),
                *extra,
                *folds,
                *holdout,
                *fraction,
            ],
        ),
        "finetune",
    )
    a, b = _run_json(sw), _run_json(ft)
    assert a["eval_set"] == b["eval_set"] and a["eval_set"]["rows"] == (400 if folds else 80)
    rows_sw, rows_ft = _sorted_rows(a["rows"]), _sorted_rows(b["rows"])
    assert rows_sw == rows_ft and len(rows_sw) == (3 if folds else 1)
    for r in rows_sw:  # a validation carve of the asked share (about it when grouped), sharing no row
        assert case == "groups" or len(r["validation"]) == math.ceil(
            (0.2 if fraction else 0.1) * (len(r["fit"]) + len(r["validation"]))
        )
        assert not set(r["validation"]) & set(r["fit"]) and not set(r["evaluation"]) & set(r["fit"])
    report = _ok(CliRunner().invoke(heads_main, ["report", sw, ft, "--out", str(tmp_path / "report")]), "report")
    text = Path(report).read_text()
    assert "inputs cut to 128 tokens" in text and "‡" not in text
    if case == "one-file":  # a fine-tune that read shorter text is merged, and marked
        ft64 = _ok(
            CliRunner().invoke(
                heads_main,
                [
                    "finetune",
                    "--data",
                    str(data),
                    "--model",
                    "random:tiny-bert",
                    "--text-col",
                    "sentence",
                    "--label-col",
                    "label",
                    "--epochs",
                    "1",
                    "--max-length",
                    "8",
                    "--no-progress",
                    "--out",
                    str(tmp_path / "ft8"),
                ],
            ),
            "finetune --max-length 8",
        )
        report = _ok(CliRunner().invoke(heads_main, ["report", sw, ft, ft64, "--out", str(tmp_path / "r8")]), "report")
        text = Path(report).read_text()
        assert "‡ inputs truncated otherwise than 128 tokens: ft8 (8 tokens)" in text
        csv = pd.read_csv(Path(report).parent / "report.csv")
        assert sorted(set(csv["truncation"])) == ["128 tokens", "8 tokens"]


def test_extract_holdout_and_the_one_split_carve_hold_out_the_same_rows(tmp_path):
    """A store made with --holdout 0.2 and a fine-tune of the whole file (carved 0.2 for evaluation) are scored on
    the same rows: both carves are embstore.data.carve.carve on source-row ids."""
    from embstore.data.tables import load_dataset
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.data import load_rows

    data = my_csv(tmp_path / "my.csv", n=150)
    held = load_dataset(data=str(data), holdout=0.2, seed=3, text_col="sentence", label_col="label").splits["test"]
    rows = load_rows(
        FinetuneConfig.from_dict(
            {"data": str(data), "seed": 3, "text_col": "sentence", "label_col": "label", "model": "random:tiny-bert"}
        )
    )
    assert sorted(held.row_ids.tolist()) == sorted(rows.evaluation.row_ids[rows.eval_rows].tolist())
