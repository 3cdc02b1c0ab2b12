"""One carve for every product: the same data, seed and fraction give the same rows, whatever order they sit in.

The unit tests shuffle rows (as a store sorts them by length) and check the carves pick the same source rows; the
end-to-end test is a new user's path on one ``sentence,label`` file: ``embstore extract`` -> ``heads sweep`` ->
``heads finetune`` -> ``heads report`` merges them without ``--allow-mixed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore.data.carve import carve
from heads.protocol import fold_rounds, validation_carve

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
    kept, held = carve(y, 0.2, 7, groups, ids)
    perm = shuffled(200)  # the same rows in another order (a store sorts them by length)
    kept_p, held_p = carve(y[perm], 0.2, 7, None if groups is None else groups[perm], ids[perm])
    assert set(ids[perm][held_p]) == set(ids[held]) and set(ids[perm][kept_p]) == set(ids[kept])
    assert len(held) == 40 if not grouped else not set(groups[held]) & set(groups[kept])
    # without the row ids the carve is of positions: another order, other rows (the bug this module fixes)
    assert (
        set(ids[perm][carve(y[perm], 0.2, 7, None if groups is None else groups[perm])[1]]) != set(ids[held]) or grouped
    )


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


def _eval_set(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())["eval_set"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["one-file", "groups", "folds"])
def test_sweep_and_finetune_of_one_file_merge_without_allow_mixed(case, tmp_path):
    data = my_csv(tmp_path / "my.csv", speakers=case == "groups")
    extra = ["--group-col", "speaker"] if case == "groups" else []
    folds = ["--folds", "3"] if case == "folds" else []
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
            ],
        ),
        "finetune",
    )
    a, b = _eval_set(sw), _eval_set(ft)
    assert a == b and a["rows"] == (400 if folds else 80)
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
