"""heads report of a probe sweep, a full fine-tune, a LoRA fine-tune and the scratch baseline of one file: one table
on the same test rows, with paired intervals, McNemar against the best (Holm), trainable parameters and seconds
per row beside each score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from factories import VOCAB, separable

from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, extract
from heads.finetune.config import FinetuneConfig
from heads.finetune.run import run_finetune
from heads.report.uncertainty import holm, mcnemar_p


def noisy(path: Path) -> Path:
    """Separable keyword texts with 20% of the labels redrawn: no model scores 1.0, so the tests have pairs."""
    separable(path, n_per_class=30, seed=3)
    df = pd.read_csv(path)
    rng = np.random.default_rng(3)
    hit = rng.random(len(df)) < 0.2
    df.loc[hit, "label"] = rng.choice(sorted(VOCAB), size=int(hit.sum()))
    df.to_csv(path, index=False)
    return path


def finetune(data: Path, out: Path, **kw: object) -> Path:
    base = dict(
        model="random:tiny-bert",
        data=str(data),
        text_col="text",
        label_col="label",
        holdout=0.25,
        lr=5e-3,
        epochs=3,
        patience=0,
        batch_size=8,
        out=str(out),
    )
    base.update(kw)
    return run_finetune(FinetuneConfig.from_dict(base), show_progress=False).run_dir


@pytest.mark.slow
def test_report_puts_probes_finetunes_lora_and_scratch_in_one_paired_table(tmp_path):
    data = noisy(tmp_path / "noisy.csv")
    store = extract(
        ExtractConfig.from_dict(
            dict(model="random:tiny-bert", data=str(data), label_col="label", holdout=0.25, out=str(tmp_path / "s"))
        ),
        show_progress=False,
    ).path
    sweep = tmp_path / "sweep"
    res = CliRunner().invoke(
        heads_main, ["sweep", "--store", store, "--layers", "1,2", "--combine", "single", "--out", str(sweep)]
    )
    assert res.exit_code == 0, res.output
    runs = [
        sweep,
        finetune(data, tmp_path / "full"),
        finetune(data, tmp_path / "lora", lora=8, lr=2e-2),
        finetune(
            data,
            tmp_path / "scratch",
            model="scratch:gru",
            vocab_min_count=2,
            embedding_dim=16,
            rnn_hidden=16,
            lr=1e-2,
            head_lr=1e-2,
        ),
    ]
    res = CliRunner().invoke(heads_main, ["report", *map(str, runs), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "rep" / "report.csv")
    assert set(table.run) == {"sweep", "full", "lora", "scratch"}
    assert len(table) == 2 * 2 + 3  # 2 layers x 2 poolings of the sweep, and one row per fine-tune
    assert table.paired_f1_macro_lo.notna().all() and table.seconds_per_row.gt(0).all()
    assert (table.paired_f1_macro_lo <= table.f1_macro_mean).all() and (
        table.f1_macro_mean <= table.paired_f1_macro_hi
    ).all()
    assert list(table.paired_vs_best).count("best") == 1 and table.paired_vs_best.iloc[0] == "best"
    # trainable parameters: the LoRA run trains far fewer than the full fine-tune, the scratch model all of its own
    params = table.set_index("run").trainable_params
    assert params["lora"] < params["full"] / 10

    # McNemar against the best, Holm-corrected over every other configuration, from the runs' own predictions
    def correct(run: Path, line: int) -> np.ndarray:
        z = np.load(run / "predictions.npz")
        sel = z["run"] == line
        order = np.argsort(z["row_id"][sel])
        return (z["y_pred"][sel] == z["y_true"][sel])[order]

    lines = {"sweep": None, "full": 0, "lora": 0, "scratch": 0}
    sweep_rows = pd.read_json(sweep / "results.jsonl", lines=True)
    hits = []
    for _, row in table.iterrows():
        run = tmp_path / row.run
        if row.run == "sweep":
            match = (sweep_rows.layers.astype(str) == str(row.layers)) & (sweep_rows.pooling == row.pooling)
            line = int(np.flatnonzero(match)[0])
        else:
            line = lines[row.run]
        hits.append(correct(run, line))
    raw = [mcnemar_p(hits[0], h)[0] for h in hits[1:]]
    np.testing.assert_allclose(table.paired_p_vs_best_holm.iloc[1:].to_numpy(), holm(raw), rtol=1e-9)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "vs best (McNemar, Holm p)" in text and "train s / row" in text and "trainable params" in text
    n = len(correct(runs[1], 0))
    assert f"Every run scored the same {n} evaluation rows" in text and "different stores" not in text
