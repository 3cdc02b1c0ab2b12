"""heads.finetune.run on random:tiny-bert (2 layers, 2 heads) and a tiny separable 3-class CSV."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factories import SEPARABLE_VOCAB, separable_csv

from embstore import ExtractConfig, extract, open_store
from embstore.backbones.registry import load_backbone
from embstore.errors import ConfigError, LayerSpecError
from heads.finetune.config import FinetuneConfig
from heads.finetune.model import SequenceClassifier
from heads.finetune.run import run_finetune
from heads.finetune.surgery import count_parameters
from heads.report.results import read_run


@pytest.fixture
def sep_csv(tmp_path: Path) -> Path:
    """60 rows, 3 classes, each with its own vocabulary."""
    return separable_csv(tmp_path / "sep.csv")


def cfg(data: Path, out: Path, **kw: object) -> FinetuneConfig:
    base = dict(
        model="random:tiny-bert",
        data=str(data),
        label_col="label",
        holdout=0.25,
        lr=5e-3,
        epochs=3,
        patience=3,
        batch_size=8,
        out=str(out),
    )
    base.update(kw)
    return FinetuneConfig.from_dict(base)


def test_run_writes_outputs_and_beats_majority(sep_csv, tmp_path):
    res = run_finetune(cfg(sep_csv, tmp_path / "run", epochs=4, pooling="mean"))
    for name in (
        "results.csv",
        "summary.md",
        "run.json",
        "model/config.json",
        "model/classifier/classifier.safetensors",
        "model/classifier/classifier.json",
        "checkpoint/finetune_state.json",
    ):
        assert (res.run_dir / name).is_file(), name
    meta, rows = read_run(res.run_dir)
    assert meta["kind"] == "finetune" and meta["label_names"] == sorted(SEPARABLE_VOCAB)
    assert res.accuracy > meta["majority_accuracy"] + 0.2
    (row,) = rows
    assert row.combine == "finetune" and row.layers == "2" and row.pooling == "mean" and len(row.history) == 4
    assert row.history[0]["head_lr"] / row.history[0]["lr"] == pytest.approx(FinetuneConfig().head_lr / 5e-3)
    assert row.accuracy == res.accuracy and row.extra["total_params"] == res.total_params
    # Totals match the encoder plus the classifier; only the unused pooler is not trainable.
    backbone = load_backbone("random:tiny-bert")
    clf = SequenceClassifier(backbone.model, 3)
    assert res.total_params == count_parameters(clf)[1]
    pooler = sum(p.numel() for p in backbone.model.pooler.parameters())
    assert res.trainable_params == res.total_params - pooler
    assert json.loads((res.run_dir / "model/classifier/classifier.json").read_text())["label_names"] == sorted(
        SEPARABLE_VOCAB
    )


def test_freeze_keeps_frozen_weights_bit_identical(sep_csv, tmp_path):
    res = run_finetune(cfg(sep_csv, tmp_path / "run", freeze="0-1", epochs=2))
    before = load_backbone("random:tiny-bert").model.state_dict()
    after = load_backbone(str(res.run_dir / "model")).model.state_dict()
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("embeddings.", "encoder.layer.0.", "pooler."))]
    trained = [k for k in before if k.startswith("encoder.layer.1.")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    layer2 = sum(v.numel() for k, v in before.items() if k.startswith("encoder.layer.1."))
    head = 32 * 3 + 3
    assert res.trainable_params == layer2 + head
    assert res.total_params == sum(v.numel() for v in before.values()) + head


def test_truncate_gives_a_model_extract_can_use(sep_csv, tmp_path):
    res = run_finetune(cfg(sep_csv, tmp_path / "run", truncate=1, epochs=1))
    model_dir = res.run_dir / "model"
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 1
    assert read_run(res.run_dir)[1][0].layers == "1"
    out = extract(
        ExtractConfig.from_dict(
            dict(model=str(model_dir), data=str(sep_csv), label_col="label", out=str(tmp_path / "s.zarr"))
        ),
        show_progress=False,
    )
    store = open_store(out.path)
    assert store.layers == [0, 1]


def test_prune_heads_spec_reloads_with_one_head(sep_csv, tmp_path):
    res = run_finetune(cfg(sep_csv, tmp_path / "run", prune_heads="2:0", epochs=1))
    model = load_backbone(str(res.run_dir / "model")).model
    assert model.encoder.layer[1].attention.self.query.out_features == 16  # 1 head of 16
    assert model.encoder.layer[0].attention.self.query.out_features == 32
    assert read_run(res.run_dir)[1][0].extra["pruned_heads"]["spec"] == {"2": [0]}


@pytest.mark.slow
def test_prune_fraction_prunes_after_the_first_epoch(sep_csv, tmp_path):
    res = run_finetune(cfg(sep_csv, tmp_path / "run", prune_fraction=0.5, epochs=2))
    row = read_run(res.run_dir)[1][0]
    pruned = row.extra["pruned_heads"]["importance"]
    assert sum(len(v) for v in pruned.values()) == 2 and all(len(v) == 1 for v in pruned.values())
    assert row.extra["pruned_heads"]["importance_after_epoch"] == 1 and len(row.history) == 2
    assert load_backbone(str(res.run_dir / "model")).identity["config"]["embstore_pruned_heads"] == pruned


def _count_epochs(monkeypatch) -> list[int]:
    """The epochs RoundTrainer trains from now on, in order."""
    from heads.finetune.loop import RoundTrainer

    real, trained = RoundTrainer.epoch, []

    def epoch(self, n, *rest):
        trained.append(n)
        return real(self, n, *rest)

    monkeypatch.setattr(RoundTrainer, "epoch", epoch)
    return trained


def test_resume_continues_and_refuses_another_config(sep_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_finetune(cfg(sep_csv, out, epochs=1))
    trained = _count_epochs(monkeypatch)
    res = run_finetune(cfg(sep_csv, out, epochs=2, resume=True))
    assert trained == [2]  # only the epoch after the checkpoint
    history = read_run(res.run_dir)[1][0].history
    assert [h["epoch"] for h in history] == [1, 2]
    with pytest.raises(ConfigError, match=r"checkpoint in .*differing: lr"):
        run_finetune(cfg(sep_csv, out, epochs=3, resume=True, lr=1e-3))


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one_and_checkpoints_hold_no_pickle(sep_csv, tmp_path, monkeypatch):
    """A run killed in epoch 2 and resumed trains exactly what the same run in one go trains: the optimizer,
    schedule and RNG states come back from safetensors + JSON (accelerate's save_state would pickle them)."""
    from heads.finetune.loop import RoundTrainer

    whole = run_finetune(cfg(sep_csv, tmp_path / "whole", epochs=3, patience=0))
    real_epoch, calls = RoundTrainer.epoch, []

    def dies_in_epoch_2(self, epoch, *rest):
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real_epoch(self, epoch, *rest)

    monkeypatch.setattr(RoundTrainer, "epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg(sep_csv, tmp_path / "split", epochs=3, patience=0))
    monkeypatch.setattr(RoundTrainer, "epoch", real_epoch)
    assert calls == [1, 2]
    trained = _count_epochs(monkeypatch)
    resumed = run_finetune(cfg(sep_csv, tmp_path / "split", epochs=3, patience=0, resume=True))
    h_whole, h_resumed = (read_run(r.run_dir)[1][0].history for r in (whole, resumed))
    assert trained == [2, 3] and [h["epoch"] for h in h_resumed] == [1, 2, 3]  # epoch 1 came from the checkpoint
    assert [h["train_loss"] for h in h_resumed] == pytest.approx([h["train_loss"] for h in h_whole], rel=1e-5)
    assert resumed.accuracy == whole.accuracy and resumed.f1_macro == pytest.approx(whole.f1_macro)
    files = {p.name for p in (tmp_path / "split" / "checkpoint").rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "training_state.json" in files
    assert not {f for f in files if f.endswith((".bin", ".pkl", ".pt", ".pth"))}, files


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"freeze": "0-9"}, LayerSpecError, r"\[0, 2\]"),
        ({"prune_heads": "2:0,1"}, ConfigError, "cannot remove all 2 heads of layer 2"),
        ({"truncate": 5}, LayerSpecError, r"between 1 and 2"),
        ({"prune_heads": "3:0"}, LayerSpecError, r"attention layers are \[1, 2\]"),
    ],
)
def test_bad_surgery_is_refused(sep_csv, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        run_finetune(cfg(sep_csv, tmp_path / "run", **kw))


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"pooling": "max"},
            r"'pooling' parameter of FinetuneConfig must be one of cls, mean, last\. Got 'max' instead\.",
        ),
        ({"prune_fraction": 0.3, "epochs": 1}, "at least 2"),
        ({"lr": 0}, "'lr' parameter of OptimConfig must be a positive number. Got 0 instead."),
        (
            {"head_lr": -1e-3},
            r"'head_lr' .* must be positive \(it is the classifier's learning rate\)\. Got -0.001 "
            r"instead\. Use e\.g\. --head-lr 0\.001\.",
        ),
        ({"min_epochs": 0}, "'min_epochs' parameter of FinetuneConfig must be a positive number of epochs. Got 0"),
        ({"max_grad_norm": -1}, r"'max_grad_norm' parameter of OptimConfig must be 0 \(no clipping\) or more\. Got -1"),
        ({"bogus": 1}, r"Unknown finetune config keys \['bogus'\]"),
    ],
)
def test_config_validation(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig.from_dict({"data": "x.csv", **kw})


def test_config_round_trip():
    c = FinetuneConfig.from_dict(
        dict(data=None, splits=(("train", "a.csv"), ("test", "b.csv")), classifier_hidden=(8, 4))
    )
    assert FinetuneConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.slow
def test_cli_finetune_study_and_bad_input(sep_csv, tmp_path):
    """`heads finetune` runs one config or a study ('runs:' list) and renders one report; bad input is one line."""
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main

    base = [
        "finetune",
        "--model",
        "random:tiny-bert",
        "--data",
        str(sep_csv),
        "--holdout",
        "0.25",
        "--label-col",
        "label",
    ]
    res = CliRunner().invoke(heads_main, [*base, "--epochs", "2", "--lr", "0.005", "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "one")
    assert "trainable" in res.stderr
    study = tmp_path / "study.yaml"
    study.write_text(
        f"model: random:tiny-bert\ndata: {sep_csv}\nholdout: 0.25\nlabel_col: label\nepochs: 2\nlr: 0.005\n"
        "runs:\n  - name: full\n  - name: frozen\n    freeze: 0-1\n  - name: truncated\n    truncate: 1\n"
    )
    res = CliRunner().invoke(heads_main, ["finetune", "--config", str(study), "--out", str(tmp_path / "study")])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert all(name in report for name in ("full", "frozen", "truncated"))
    res = CliRunner().invoke(heads_main, [*base, "--freeze", "0-9", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "[0, 2]" in res.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_cpu_run(sep_csv, tmp_path):
    """The same loop on 2 CPU processes (torchrun; `accelerate launch` sets the same environment): DDP over gloo."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cli.heads_cli",
        "finetune",
        "--model",
        "random:tiny-bert",
        "--data",
        str(sep_csv),
        "--holdout",
        "0.25",
        "--label-col",
        "label",
        "--epochs",
        "2",
        "--lr",
        "0.005",
        "--batch-size",
        "8",
        "--out",
        str(out),
    ]
    from factories import recorded_calls, recording_env

    env = recording_env(tmp_path, "heads.training.session:Session.step")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(out)]  # only rank 0 reports
    # 40 rows to fit in batches of 8 are 5 batches an epoch; each rank took 3 of them (accelerate evens the shards)
    assert {rank: len(steps) for rank, steps in recorded_calls(tmp_path).items()} == {"0": 2 * 3, "1": 2 * 3}
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 1 and df["combine"].iloc[0] == "finetune"
    from embstore.backbones.registry import load_backbone

    assert load_backbone(str(out / "model")).n_layers == 2


def test_predict_with_a_finetuned_run(sep_csv, tmp_path):
    """heads predict --run on a fine-tune run uses its model/ (backbone + classifier): on the run's own test rows it
    scores exactly what the run recorded."""
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main
    from heads.report.metrics import classification_metrics

    # Every 6th row carries the next class's label: a model of the vocabularies errs on those, so its test score is
    # a number of its own, told apart from a score of other rows or of another model.
    df = pd.read_csv(sep_csv)
    names = sorted(SEPARABLE_VOCAB)
    df.loc[::6, "label"] = [names[(names.index(v) + 1) % 3] for v in df.label[::6]]
    noisy = tmp_path / "noisy.csv"
    df.to_csv(noisy, index=False)
    config = cfg(noisy, tmp_path / "ft", epochs=4)
    res = run_finetune(config)
    ds = config.source.load()
    test = ds.splits["test"]
    assert len(test) == json.loads((res.run_dir / "run.json").read_text())["eval_rows"] == 15
    out = CliRunner().invoke(heads_main, ["predict", "--run", str(res.run_dir)], input="\n".join(test.texts) + "\n")
    assert out.exit_code == 0, out.output
    preds = [ds.label_names.index(json.loads(x)["label"]) for x in out.stdout.strip().splitlines()]
    scored = classification_metrics(np.asarray(test.labels), np.asarray(preds), ds.label_names)
    assert scored["accuracy"] == res.accuracy and scored["f1_macro"] == pytest.approx(res.f1_macro)
    assert 0.6 < res.accuracy < 1.0, res.accuracy


@pytest.mark.slow
def test_real_minilm_finetune_beats_the_majority_class(tmp_path):
    """A short real run at the default learning rates and batch size: MiniLM on 160 AG News rows, embeddings and
    layers 1-4 frozen, evaluated on 160 test rows (2 epochs and 64 tokens to keep it short)."""
    from factories import needs_shared

    ag = needs_shared("ag_news")
    pd.read_csv(ag / "train_pool.csv").sample(160, random_state=0)[["text", "label"]].to_csv(
        tmp_path / "train.csv", index=False
    )
    pd.read_csv(ag / "test.csv").sample(160, random_state=0)[["text", "label"]].to_csv(
        tmp_path / "test.csv", index=False
    )
    res = run_finetune(
        FinetuneConfig.from_dict(
            dict(
                model="minilm",
                data=None,
                splits=[["train", str(tmp_path / "train.csv")], ["test", str(tmp_path / "test.csv")]],
                label_col="label",
                max_length=64,
                epochs=2,
                freeze="0-4",
                out=str(tmp_path / "run"),
            )
        ),
        show_progress=False,
    )
    majority = json.loads((res.run_dir / "run.json").read_text())["majority_accuracy"]
    assert res.accuracy > majority + 0.25, (res.accuracy, majority)
    assert res.trainable_params < res.total_params / 4


def test_folds_are_disjoint_stratified_seeded_and_cover_the_data(sep_csv):
    from heads.finetune.data import load_rows, rounds

    config = FinetuneConfig.from_dict({"data": str(sep_csv), "label_col": "label", "folds": 4, "seed": 3})
    data = load_rows(config)
    tr, te, rows_tr = data.train, data.evaluation, data.train_rows
    assert tr is te and len(rows_tr) == 60  # one split, no holdout: every row is cross-validated
    plan = rounds(config.folds, data, config.source.seed)
    held = [set(r.eval_rows.tolist()) for r in plan]
    assert [r.fold for r in plan] == [0, 1, 2, 3]
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1 :])
    assert set().union(*held) == set(rows_tr.tolist())
    for r in plan:
        assert set(r.fit_rows.tolist()) == set(rows_tr.tolist()) - set(r.eval_rows.tolist())
        assert sorted(pd.Series(tr.labels[r.eval_rows]).value_counts().tolist()) == [5, 5, 5]  # stratified
    again = [r.eval_rows.tolist() for r in rounds(config.folds, data, 3)]
    other = [r.eval_rows.tolist() for r in rounds(config.folds, data, 4)]
    assert again == [r.eval_rows.tolist() for r in plan] and other != again
    with pytest.raises(ConfigError, match="--folds 30 needs at least 30 training rows of every class"):
        rounds(30, data, 3)
    with pytest.raises(ConfigError, match="'folds' parameter of FinetuneConfig must be at least 2"):
        FinetuneConfig.from_dict({"data": "x.csv", "folds": 1})


def test_splits_keep_groups_apart(monkeypatch):
    """Rows with groups (speakers, say): every carve fine-tuning makes keeps a group on one side, as a sweep's do:
    the evaluation carve of a one-split data set, the --folds rounds and each round's early-stopping carve."""
    from embstore.data.spec import DataSpec
    from embstore.data.tables import Dataset, SplitData
    from heads.finetune.data import early_stopping_carve, load_rows, rounds

    n = 60
    labels, groups = np.arange(n) % 3, np.arange(n) // 4  # 15 groups, each holding rows of every class
    split = SplitData(
        name="all", row_ids=np.arange(n), texts=[f"row {i}" for i in range(n)], pairs=None, labels=labels, groups=groups
    )
    monkeypatch.setattr(
        DataSpec,
        "load",
        lambda self: Dataset(splits={"all": split}, label_names=["a", "b", "c"], sources=[], skipped_empty={}),
    )

    def apart(a: np.ndarray, b: np.ndarray) -> None:
        assert len(a) and len(b) and not set(groups[a].tolist()) & set(groups[b].tolist())

    for folds in (None, 3):
        data = load_rows(FinetuneConfig.from_dict({"data": "x.csv", "label_col": "label", "folds": folds, "seed": 1}))
        plan = rounds(folds, data, 1)
        assert len(plan) == (folds or 1)
        for rnd in plan:
            apart(rnd.fit_rows, rnd.eval_rows)
            apart(*early_stopping_carve(data, rnd.fit_rows, 0.2, 1))
    assert len(data.train_rows) == n  # with --folds every row is cross-validated


@pytest.mark.slow
def test_folds_report_mean_and_std_and_resume_skips_finished_folds(sep_csv, tmp_path, monkeypatch):
    res = run_finetune(cfg(sep_csv, tmp_path / "cv", folds=3, epochs=1, classifier="mlp", classifier_hidden=[64]))
    meta, rows = read_run(res.run_dir)
    assert [r.fold for r in rows] == [0, 1, 2] and sum(r.extra["eval_rows"] for r in rows) == meta["train_rows"] == 45
    assert res.folds == 3 and res.accuracy == pytest.approx(sum(r.accuracy for r in rows) / 3)
    assert res.accuracy_std == pytest.approx(float(pd.Series([r.accuracy for r in rows]).std(ddof=0)))
    assert meta["folds"]["k"] == 3 and meta["folds"]["f1_macro_std"] == pytest.approx(res.f1_macro_std)
    summary = (res.run_dir / "summary.md").read_text()
    assert (
        f"{res.accuracy:.4f} ± {res.accuracy_std:.4f}" in summary and "**3**" in summary
    )  # 3 runs (the only config is the best, in bold)
    assert not (res.run_dir / "model").exists() and (res.run_dir / "checkpoint/fold-2/finetune_state.json").is_file()
    assert rows[0].head == "mlp" and rows[0].trainable_params > 64 * 32  # the 32 -> 64 -> 3 MLP is trained
    # Killed in fold 1 and resumed: fold 0 is read back from its checkpoint, never trained again.
    import heads.finetune.run as run_module
    from heads.finetune.loop import RoundTrainer

    folds_trained: list[int] = []
    real_fit, real_epoch = run_module.fit_round, RoundTrainer.epoch

    def fit_round(spec, encoder, rnd, ckpt, resumed):
        folds_trained.append(rnd.fold)
        return real_fit(spec, encoder, rnd, ckpt, resumed)

    def killed_in_fold_1(self, epoch, *args, **kwargs):
        if folds_trained[-1] == 1:
            raise KeyboardInterrupt("killed in fold 1")
        return real_epoch(self, epoch, *args, **kwargs)

    monkeypatch.setattr(run_module, "fit_round", fit_round)
    with monkeypatch.context() as m:
        m.setattr(RoundTrainer, "epoch", killed_in_fold_1)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(cfg(sep_csv, tmp_path / "cv2", folds=3, epochs=1, classifier="mlp", classifier_hidden=[64]))
    assert folds_trained == [0, 1]
    folds_trained.clear()
    again = run_finetune(
        cfg(sep_csv, tmp_path / "cv2", folds=3, epochs=1, classifier="mlp", classifier_hidden=[64], resume=True)
    )
    assert folds_trained == [1, 2]
    assert [r.accuracy for r in read_run(again.run_dir)[1]] == [r.accuracy for r in rows]
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main

    out = CliRunner().invoke(heads_main, ["predict", "--run", str(res.run_dir)], input="some text\n")
    assert out.exit_code == 2 and "cross-validation run" in out.stderr and "without --folds" in out.stderr


def test_cli_finetune_folds_with_an_mlp(sep_csv, tmp_path):
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main

    res = CliRunner().invoke(
        heads_main,
        [
            "finetune",
            "--model",
            "random:tiny-bert",
            "--data",
            str(sep_csv),
            "--label-col",
            "label",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--lr",
            "0.005",
            "--classifier",
            "mlp",
            "--classifier-hidden",
            "48",
            "--out",
            str(tmp_path / "f"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "2 folds: accuracy" in res.stderr and " ± " in res.stderr
    hp = read_run(tmp_path / "f")[1][0].hyperparameters
    assert hp["classifier"] == "mlp" and hp["classifier_hidden"] == [48] and hp["folds"] == 2


def test_cli_head_lr_must_be_positive(sep_csv, tmp_path):
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main

    res = CliRunner().invoke(
        heads_main,
        [
            "finetune",
            "--model",
            "random:tiny-bert",
            "--data",
            str(sep_csv),
            "--holdout",
            "0.25",
            "--label-col",
            "label",
            "--head-lr",
            "0",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines() == [
        "error: The --head-lr option must be positive (it is the classifier's learning rate). Got 0.0 instead. "
        "Use e.g. --head-lr 0.001."
    ]
    assert not (tmp_path / "r").exists()


def test_the_classifier_gets_its_own_learning_rate_when_the_backbone_is_frozen(sep_csv, tmp_path):
    """Everything but the classifier frozen, default learning rates: the new head moves at head_lr, not lr."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    res = run_finetune(
        FinetuneConfig.from_dict(
            {
                "model": "random:tiny-bert",
                "data": str(sep_csv),
                "label_col": "label",
                "holdout": 0.25,
                "freeze": "all",
                "out": str(tmp_path / "r"),
            }
        ),
        show_progress=False,
    )
    row = read_run(res.run_dir)[1][0]
    assert res.trainable_params == 32 * 3 + 3
    assert row.history[0]["lr"] is None and row.history[0]["head_lr"] > 0  # no backbone parameter trains
    set_seed(0)  # the run's seed: the classifier it started from
    start = SequenceClassifier(load_backbone("random:tiny-bert").model, 3).head.state_dict()
    end = load_file(str(res.run_dir / "model/classifier/classifier.safetensors"))
    moved = max(float((end[k] - start[k]).abs().max()) for k in start)
    defaults = FinetuneConfig()
    steps = len(row.history) * math.ceil(40 / defaults.optim.batch_size)  # 45 training rows - 5 validation rows
    # An Adam update moves a weight by at most about the learning rate: the head moved further than the
    # backbone's lr could have taken it in these steps, and at a good share of its own.
    assert moved > 2 * steps * defaults.optim.lr and moved > 0.3 * steps * defaults.head_lr, moved


def test_param_groups_split_backbone_and_classifier():
    from heads.training.optim import param_groups

    model = SequenceClassifier(load_backbone("random:tiny-bert").model.requires_grad_(True), 3)
    groups = param_groups(model, 1e-5, 0.01, head_prefix="head.", head_lr=1e-3)
    head = [g for g in groups if g["head"]]
    assert {g["lr"] for g in head} == {1e-3} and {g["lr"] for g in groups if not g["head"]} == {1e-5}
    assert sum(p.numel() for g in head for p in g["params"]) == 32 * 3 + 3
    assert all(p.ndim == 1 for g in groups if g["weight_decay"] == 0.0 for p in g["params"])  # biases, LayerNorm


def test_early_stopping_waits_for_the_classifier_to_move_and_for_min_epochs():
    from heads.finetune.loop import EarlyStopping

    def run(stopper, epochs):  # [(val macro-F1, all one class?)] -> epochs trained
        for epoch, (f1, one_class) in enumerate(epochs, 1):
            stopper.update(epoch, f1, one_class, lambda: {"epoch": epoch})
            if stopper.stopped:
                return epoch
        return len(epochs)

    # Two one-class epochs do not use up patience 1; the first real epoch is the best, the next worse stops.
    s = EarlyStopping(patience=1, min_epochs=1, last_epoch=6)
    assert run(s, [(0.2, True), (0.2, True), (0.6, False), (0.5, False), (0.9, False), (0.9, False)]) == 4
    assert s.best_epoch == 3 and s.state == {"epoch": 3}
    # patience 1 would stop after epoch 2; min_epochs 3 keeps training through epoch 3.
    s = EarlyStopping(patience=1, min_epochs=3, last_epoch=6)
    assert run(s, [(0.6, False), (0.5, False), (0.4, False), (0.9, False)]) == 3 and s.best_epoch == 1
    # Once the classifier has moved, a collapse counts like any worse epoch.
    s = EarlyStopping(patience=1, min_epochs=1, last_epoch=6)
    assert run(s, [(0.6, False), (0.2, True), (0.9, False)]) == 2
    # A run that never moves still ends with the last epoch's weights as its result.
    s = EarlyStopping(patience=1, min_epochs=1, last_epoch=3)
    assert run(s, [(0.2, True)] * 3) == 3 and s.best_epoch == 3
    restored = EarlyStopping(patience=1, min_epochs=1, last_epoch=3)
    restored.load(s.to_dict(), s.state)
    assert restored.to_dict() == s.to_dict() and restored.state == {"epoch": 3}
    assert EarlyStopping.one_class(np.array([0, 1, 2]), np.array([1, 1, 1]))
    assert not EarlyStopping.one_class(np.array([1, 1]), np.array([1, 1]))  # one class is all there is


def test_cli_shows_a_progress_bar_per_epoch(sep_csv, tmp_path):
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main

    base = [
        "finetune",
        "--model",
        "random:tiny-bert",
        "--data",
        str(sep_csv),
        "--holdout",
        "0.25",
        "--label-col",
        "label",
        "--epochs",
        "2",
    ]
    res = CliRunner().invoke(heads_main, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "finetune epoch 1" in res.stderr and "finetune epoch 2" in res.stderr
    assert "loss=" in res.stderr and "ex_s=" in res.stderr
    quiet = CliRunner().invoke(heads_main, [*base[:-1], "1", "--no-progress", "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0 and "finetune epoch" not in quiet.stderr


def test_holdout_scores_exactly_the_rows_extract_puts_in_test(tmp_path):
    """A fine-tune of a file with --holdout F --seed S is scored on the test rows of the store that
    `embstore extract --holdout F --seed S` makes of the same file: the same eval_set id a sweep records."""
    from heads.evalset import eval_set, source_sha256

    rng = random.Random(1)
    names = list(SEPARABLE_VOCAB)
    rows = [(" ".join(rng.choice(SEPARABLE_VOCAB[names[i % 3]]) for _ in range(4)), names[i % 3]) for i in range(50)]
    rows[7] = ("", rows[7][1])  # an empty row, dropped by skip_empty: positions in the file must still agree
    data = tmp_path / "data.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(data, index=False)
    common = {"label_col": "label", "holdout": 0.3, "seed": 5, "skip_empty": True}
    store = open_store(
        extract(
            ExtractConfig.from_dict(
                {"model": "random:tiny-bert", "data": str(data), **common, "out": str(tmp_path / "s.zarr")}
            ),
            show_progress=False,
        ).path
    )
    expected = eval_set(source_sha256(store.provenance.sources, "test"), store.row_ids("test"))
    res = run_finetune(cfg(data, tmp_path / "ft", epochs=1, **common), show_progress=False)
    recorded = json.loads((res.run_dir / "run.json").read_text())["eval_set"]
    assert recorded == expected and recorded["rows"] == store.n_rows("test") == 15
    # each fold fits on 17 rows: a 0.2 early-stopping carve (4 rows) holds the 3 classes, 0.1 (2 rows) is refused
    folds = run_finetune(
        cfg(data, tmp_path / "cv", epochs=1, folds=2, validation_fraction=0.2, **common), show_progress=False
    )
    cv = json.loads((folds.run_dir / "run.json").read_text())
    train_ids = store.row_ids("train")
    assert cv["eval_set"] == eval_set(expected["source_sha256"], train_ids)  # every held-out fold: the training rows
    assert cv["eval_set"]["id"] != expected["id"]


def test_resume_refuses_an_edited_data_file(sep_csv, tmp_path):
    out = tmp_path / "run"
    run_finetune(cfg(sep_csv, out, epochs=1), show_progress=False)
    df = pd.read_csv(sep_csv)
    df.loc[0, "text"] = "apple apple apple"
    df.to_csv(sep_csv, index=False)
    with pytest.raises(ConfigError, match=r"differing: data_content"):
        run_finetune(cfg(sep_csv, out, epochs=2, resume=True), show_progress=False)
