"""Run directory writer/reader, summary, plots, report merging, and the metrics they are built from."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embstore.errors import DataFileNotFoundError, OutputNotWritableError
from heads.report import ResultRow, RunWriter, read_run, write_report
from heads.report.metrics import classification_metrics, majority_accuracy, mean_std

LABELS = ["neg", "neu", "pos"]
EVAL_SET = {"id": "0123456789abcdef", "source_sha256": "f" * 64, "rows": 30}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(layers: str, combine: str, pooling: str, head: str, seed: int, f1: float, **kw: Any) -> ResultRow:
    fields: dict[str, Any] = dict(
        accuracy=round(f1 + 0.05, 4),
        train_seconds=1.0 + seed,
        hyperparameters={"lr": 0.001, "hidden": [64]},
        per_class={n: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 10} for n in LABELS},
        confusion=[[5, 3, 2], [1, 8, 1], [0, 2, 8]],
        store_id="store-a",
        trainable_params=1000,
        seconds_per_epoch=0.1,
    )
    fields.update(kw)
    return ResultRow(layers=layers, combine=combine, pooling=pooling, head=head, seed=seed, f1_macro=f1, **fields)


def _rows() -> list[ResultRow]:
    rows = []
    for pooling, bonus in (("cls", 0.0), ("mean", 0.05)):
        for layer in (2, 0, 1):  # written out of order: the summary must sort them
            for seed in (0, 1):
                rows.append(
                    _row(
                        str(layer), "single", pooling, "linear", seed, round(0.5 + 0.1 * layer + bonus + 0.02 * seed, 4)
                    )
                )
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.6 + 0.05 * e, "val_f1_macro": 0.5 + 0.1 * e, "lr": 0.001}
        for e in (1, 2, 3)
    ]
    # The unambiguous best: mean macro-F1 0.82 ± 0.02 (single layers reach at most 0.76).
    rows.append(_row("0-2", "concat", "cls", "mlp", 0, 0.80, history=history, best_epoch=3, fold=None))
    rows.append(_row("0-2", "concat", "cls", "mlp", 1, 0.84, history=history, best_epoch=2))
    rows.append(_row("1,2", "mix", "cls", "mix", 0, 0.70, mix_weights=[0.25, 0.75]))
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[ResultRow]]:
    run_dir = tmp_path_factory.mktemp("runs") / "sweep-a"
    meta = {
        "store_path": "/stores/abc",
        "store_fingerprint": "store-a",
        "model": "minilm",
        "label_names": LABELS,
        "majority_accuracy": 0.4,
        "eval_set": EVAL_SET,
    }
    writer = RunWriter(run_dir, meta)
    rows = _rows()
    for row in rows:
        writer.add(row)
    summary = writer.finish(LABELS)
    return run_dir, summary, rows


def test_jsonl_round_trip(run: tuple[Path, dict[str, Any], list[ResultRow]]) -> None:
    run_dir, _, rows = run
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == len(rows) == 15
    meta, back = read_run(run_dir)
    assert back == rows
    assert meta["model"] == "minilm" and meta["label_names"] == LABELS and "created" in meta
    assert back[-1].mix_weights == [0.25, 0.75] and back[12].config_key == ("0-2", "concat", "cls", "mlp")


def test_results_csv(run: tuple[Path, dict[str, Any], list[ResultRow]]) -> None:
    run_dir, _, rows = run
    with open(run_dir / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    expected = [
        "layers",
        "combine",
        "pooling",
        "head",
        "seed",
        "fold",
        "accuracy",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "val_accuracy",
        "val_f1_macro",
        "train_seconds",
        "best_epoch",
        "trainable_params",
        "seconds_per_epoch",
        "store_id",
        "accuracy_lo",
        "accuracy_hi",
        "f1_macro_lo",
        "f1_macro_hi",
        "is_best",
        "p_vs_best",
        "p_vs_best_holm",
        "f1_macro_diff_lo",
        "f1_macro_diff_hi",
        "tied_with_best",
        "vs_best",
        "control_accuracy",
        "control_f1_macro",
        "gain_f1_macro",
        "gain_f1_macro_lo",
        "gain_f1_macro_hi",
        "mdl_bits",
        "compression",
        "control_task_accuracy",
        "control_task_accuracy_lo",
        "control_task_accuracy_hi",
        "selectivity",
        "selectivity_lo",
        "selectivity_hi",
        "val_selectivity",
        "hp_hidden",
        "hp_lr",
    ]
    assert list(table[0]) == expected
    assert len(table) == len(rows)
    best = table[13]
    assert (best["layers"], best["combine"], best["seed"], best["f1_macro"]) == ("0-2", "concat", "1", "0.84")
    assert best["fold"] == "" and best["best_epoch"] == "2" and best["hp_lr"] == "0.001"
    assert json.loads(best["hp_hidden"]) == [64]


def test_summary_marks_best_and_computes_mean_std(run: tuple[Path, dict[str, Any], list[ResultRow]]) -> None:
    run_dir, summary, _ = run
    text = (run_dir / "summary.md").read_text()
    best_lines = [line for line in text.splitlines() if "← best" in line]
    assert len(best_lines) == 1
    assert "**0-2**" in best_lines[0] and "**0.8200 ± 0.0200**" in best_lines[0] and "**mlp**" in best_lines[0]
    # layer 1, mean pooling: f1 0.65 and 0.67 -> 0.6600 ± 0.0100; accuracy 0.70/0.72 -> 0.7100 ± 0.0100.
    # then the weighted F1 of the per-class table (every class 0.5)
    assert "| 1 | single | mean | linear | 0.7100 ± 0.0100 | 0.6600 ± 0.0100 | 0.5000 | 2 |" in text
    assert summary["best"]["layers"] == "0-2" and summary["best"]["f1_macro_mean"] == pytest.approx(0.82)
    assert "minilm" in text and "/stores/abc" in text and "majority-class baseline accuracy: 0.4000" in text
    # Order: single layers per pooling in layer order, then the combinations.
    table = [
        line.split(" | ")[0].strip("| *")
        for line in text.splitlines()
        if line.startswith("| ") and ("single" in line or "concat" in line or "| mix |" in line)
    ]
    assert table == ["0", "1", "2", "0", "1", "2", "0-2", "1,2"]
    # Per-class table and confusion matrix of the best config with label names.
    assert "| neg | 0.5000 | 0.5000 | 0.5000 | 10 |" in text
    assert "| neu | 1 | 8 | 1 |" in text
    for name in ("metric_per_layer.png", "learning_curves.png", "confusion_best.png"):
        assert f"({name})" in text


@pytest.mark.parametrize("name", ["metric_per_layer.png", "learning_curves.png", "confusion_best.png"])
def test_plots_are_png(run: tuple[Path, dict[str, Any], list[ResultRow]], name: str) -> None:
    data = (run[0] / name).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_missing_single_layers_and_history_skip_plots(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "r", {"model": "m"})
    writer.add(_row("0-2", "concat", "cls", "mlp", 0, 0.8))
    summary = writer.finish(LABELS)
    assert not (tmp_path / "r" / "metric_per_layer.png").exists()
    assert not (tmp_path / "r" / "learning_curves.png").exists()
    assert (tmp_path / "r" / "confusion_best.png").exists()
    assert summary["skipped_plots"] == ["metric_per_layer.png", "learning_curves.png"]
    assert "metric_per_layer.png: skipped (no single-layer configs)" in (tmp_path / "r" / "summary.md").read_text()


def test_best_key_override_and_truncated_last_line(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "r", {})
    for row in _rows()[:4]:
        writer.add(row)
    summary = writer.finish(LABELS, best_key=("2", "single", "cls", "linear"))
    assert summary["best"]["layers"] == "2"
    with open(tmp_path / "r" / "results.jsonl", "a") as fh:
        fh.write('{"layers": "3", "comb')  # a sweep killed mid-write
    assert len(read_run(tmp_path / "r")[1]) == 4


def test_resume_keeps_rows_written_before_a_crash(tmp_path: Path) -> None:
    rows = _rows()
    first = RunWriter(tmp_path / "r", {"model": "m"})
    for row in rows[:3]:
        first.add(row)  # the process dies here: no finish()
    resumed = RunWriter(tmp_path / "r", {"model": "m"}, resume=True)
    resumed.add(rows[3])
    assert resumed.finish(LABELS)["n_rows"] == 4
    assert read_run(tmp_path / "r")[1] == rows[:4]
    assert len(read_run(RunWriter(tmp_path / "r", {}).run_dir)[1]) == 0  # without resume the run starts over


def test_classification_metrics_by_hand() -> None:
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    # a: P = R = 1/2; b: P = R = 2/3; c: no support, all 0 -> macro = (1/2 + 2/3 + 0) / 3.
    assert m["f1_macro"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["confusion"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    json.dumps(m)  # JSON-ready: no numpy scalars


def test_majority_and_mean_std() -> None:
    assert majority_accuracy(np.array([1, 1, 0]), np.array([1, 0, 1, 1])) == pytest.approx(0.75)
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 1.0))


def test_report_merges_runs_sorted(run: tuple[Path, dict[str, Any], list[ResultRow]], tmp_path: Path) -> None:
    finetune = RunWriter(tmp_path / "finetune-b", {"store_fingerprint": "store-b", "eval_set": EVAL_SET})
    for seed, f1 in ((0, 0.90), (1, 0.92)):
        finetune.add(
            _row("all", "finetune", "cls", "linear", seed, f1, store_id="store-b", trainable_params=22_000_000)
        )
    finetune.finish(LABELS)
    path = write_report([run[0], tmp_path / "finetune-b"], tmp_path / "report")
    with open(tmp_path / "report" / "report.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    f1s = [float(r["f1_macro_mean"]) for r in table]
    assert len(table) == 9 and f1s == sorted(f1s, reverse=True)
    assert (table[0]["run"], table[0]["combine"]) == ("finetune-b", "finetune")
    assert (table[1]["run"], table[1]["layers"]) == ("sweep-a", "0-2")
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| **finetune-b** |") and "**0.9100 ± 0.0100**" in rows[0] and "22,000,000" in rows[0]
    assert "**" not in "".join(rows[1:])
    assert "store-a" in text and "store-b" in text and "different stores" in text
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_read_non_run_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=r"is not a heads run directory \(no results.jsonl\); pass a"):
        read_run(tmp_path)
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        read_run(tmp_path / "missing")


def test_unwritable_run_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(
        OutputNotWritableError, match=r"Cannot write the run directory .*file/run \(.*\); choose a writable"
    ):
        RunWriter(blocker / "run", {})
