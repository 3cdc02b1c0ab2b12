"""The knobs the five studies need (docs/studies.md), each exercised on small real models and data written here.

The study configs themselves, and every config chain of configs/ and the docs, are run in test_config_chains.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import ROOT, layered, pitch_clips, separable, tone

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore.errors import ConfigError, DataError

# -- study A: the conv head's order and the reported epoch ------------------------------------------------------------


def test_merge_first_conv_merges_the_layers_before_the_strided_conv():
    from heads.probe.modules import ConvHead

    torch.manual_seed(0)
    head = ConvHead(4, 384, 512, 0.0, 6, order="merge-first")
    assert (head.merge.in_channels, head.merge.out_channels, head.merge.kernel_size) == (4, 1, (1,))
    assert (head.strided.in_channels, head.strided.kernel_size, head.strided.stride) == (1, (3,), (3,))
    assert head.mlp[0].in_features == 128 and head.mlp[0].out_features == 512 and head.mlp[-1].out_features == 6
    x = torch.randn(5, 4, 384)
    by_hand = head.mlp(head.strided(head.merge(x)).flatten(1))  # the pointwise merge first, then the k3/s3 conv
    assert torch.allclose(head(x), by_hand)
    single = ConvHead(1, 384, 512, 0.0, 6, order="merge-first")
    assert isinstance(single.merge, torch.nn.Identity)  # one layer: straight to the k3/s3 conv, as the study did
    layers_first = ConvHead(4, 384, 512, 0.0, 6)
    assert layers_first.depthwise.groups == 4 and layers_first.pointwise.in_channels == 4


@pytest.mark.parametrize("trainer", ["estimator", "stacked"])
def test_report_epoch_last_keeps_the_last_epochs_weights(trainer):
    from heads.probe.config import HeadConfig
    from heads.probe.ensemble import Member, fit_stacked
    from heads.probe.estimator import HeadClassifier
    from heads.probe.modules import as_inputs

    X, y = layered(0, n=120)
    Xv, yv = layered(1, n=60)
    # patience larger than the epochs: nothing stops, and 'best' restores the best validation epoch
    cfg = HeadConfig(head="mlp", hidden=(16,), epochs=8, patience=20, lr=0.05, dropout=0.0)

    def fit(c: HeadConfig) -> HeadClassifier:
        if trainer == "estimator":
            return HeadClassifier(c).fit(X.reshape(len(X), -1), y, Xv.reshape(len(Xv), -1), yv)
        members = [Member(0, 0, np.arange(len(y)), np.arange(len(yv)))]
        inputs, val = as_inputs(X.reshape(len(X), -1), "mlp"), as_inputs(Xv.reshape(len(Xv), -1), "mlp")
        return fit_stacked(c, [inputs], [val], members, y, yv, 3, torch.device("cpu"))[0]

    best, last = fit(cfg), fit(cfg.replace(report_epoch="last"))
    f1 = [h["val_f1_macro"] for h in best.history_]
    assert best.best_epoch_ == int(np.argmax(f1)) and last.best_epoch_ == cfg.epochs - 1
    longer = fit(cfg.replace(epochs=best.best_epoch_ + 1, report_epoch="last"))  # the same run, stopped there
    Xf = Xv.reshape(len(Xv), -1)
    np.testing.assert_allclose(best.predict_proba(Xf), longer.predict_proba(Xf), atol=1e-5)
    if best.best_epoch_ != cfg.epochs - 1:
        assert not np.allclose(best.predict_proba(Xf), last.predict_proba(Xf))


def test_sweep_config_with_runs_runs_one_sweep_each_and_a_report(tmp_path):
    store = _tiny_store(tmp_path)
    config = tmp_path / "study.yaml"
    config.write_text(
        "head: conv\nconv_order: merge-first\npooling: cls\nepochs: 3\npatience: 0\nreport_epoch: last\n"
        "standardize: false\nruns:\n  - name: one\n    layers: '2'\n    combine: single\n"
        "  - name: both\n    layers: 1-2\n    combine: concat\n"
    )
    result = CliRunner().invoke(
        heads_main, ["sweep", "--config", str(config), "--store", store, "--out", str(tmp_path / "study"), "--no-ci"]
    )
    assert result.exit_code == 0, result.output
    report = pd.read_csv(tmp_path / "study" / "report" / "report.csv")
    assert sorted(report["run"]) == ["both", "one"]
    assert sorted(report["layers"].astype(str)) == ["1,2", "2"]
    for name in ("one", "both"):
        row = json.loads((tmp_path / "study" / name / "results.jsonl").read_text().splitlines()[0])
        assert row["best_epoch"] == 2 and row["hyperparameters"]["report_epoch"] == "last"


# -- study B: the freeze word, weighted averages, curves, data.png, --preprocess --------------------------------------


def test_freeze_all_but_embeddings_and_last_trains_only_those(tmp_path):
    """Read from the saved model against the initial weights: the embeddings and the last layer moved, no other."""
    import yaml
    from safetensors.torch import load_file

    from embstore.backbones.registry import load_backbone
    from heads.finetune.surgery import parse_freeze

    assert parse_freeze("all-but-embeddings-and-last", 6) == {1, 2, 3, 4, 5}
    four = tmp_path / "four-layers.yaml"  # four layers: three of them must stay as they were
    four.write_text(
        yaml.safe_dump(
            {"model_type": "bert", "num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 30522}
        )
    )  # fmt: skip
    data = separable(tmp_path / "sep.csv", n_per_class=10)
    out = tmp_path / "ft"
    result = CliRunner().invoke(
        heads_main,
        ["finetune", "--model", f"random:{four}", "--data", str(data), "--freeze", "all-but-embeddings-and-last",
         "--epochs", "2", "--patience", "0", "--lr", "1e-2", "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    initial = {k: v for k, v in load_backbone(f"random:{four}").model.state_dict().items()}
    saved = {}
    for f in (out / "model").glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert set(initial) <= set(saved)
    moved = {k for k, v in saved.items() if k in initial and not torch.equal(v, initial[k])}
    assert all(k.startswith(("embeddings.", "encoder.layer.3.")) for k in moved), sorted(moved)
    embeddings = {k for k in initial if k.startswith("embeddings.") and "position_ids" not in k}
    last = {k for k in initial if k.startswith("encoder.layer.3.")}
    assert last <= moved and {"embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"} <= moved
    # every embedding table trained (the token-type table only gets a gradient where token types are passed)
    assert embeddings - moved <= {"embeddings.token_type_embeddings.weight"}
    assert not any(k.startswith(("encoder.layer.0.", "encoder.layer.1.", "encoder.layer.2.")) for k in moved)


def test_weighted_averages_are_scikit_learns():
    sklearn = pytest.importorskip("sklearn.metrics")
    from heads.report.metrics import classification_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    m = classification_metrics(y, p, ["a", "b", "c"])
    ref = sklearn.precision_recall_fscore_support(y, p, average="weighted", zero_division=0)
    assert [m["weighted"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(ref[:3]))
    ref = sklearn.precision_recall_fscore_support(y, p, average="macro", zero_division=0)
    assert [m["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(ref[:3]))


def test_finetune_records_curves_step_evaluations_split_reports_and_data(tmp_path):
    data = separable(tmp_path / "sep.csv", n_per_class=10)
    out = tmp_path / "ft"
    result = CliRunner().invoke(
        heads_main,
        ["finetune", "--model", "random:tiny-bert", "--data", str(data), "--holdout", "0.25", "--epochs", "2",
         "--batch-size", "4", "--eval-steps", "3", "--split-reports", "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    for h in row["history"]:
        assert 0 <= h["train_accuracy"] <= 1 and h["val_loss"] > 0 and h["train_loss"] > 0
    meta = json.loads((out / "run.json").read_text())
    fit_rows = len(meta["rows"]["fit"])
    steps = 2 * -(-fit_rows // 4)  # optimizer steps of 2 epochs of batch 4
    assert [e["step"] for e in row["extra"]["step_evaluations"]] == list(range(3, steps + 1, 3))
    reports = row["extra"]["split_reports"]
    assert sorted(reports) == ["evaluation", "fit", "validation"]
    assert sum(c["support"] for c in reports["fit"]["per_class"].values()) == fit_rows
    assert reports["evaluation"]["accuracy"] == row["accuracy"]
    assert {"precision", "recall", "f1"} <= set(reports["fit"]["weighted"])
    assert sum(meta["data"]["train"]["class_counts"]) == fit_rows + len(meta["rows"]["validation"])
    assert sum(meta["data"]["test"]["class_counts"]) == len(meta["rows"]["evaluation"])
    assert (out / "data.png").is_file() and (out / "learning_curves.png").is_file()
    text = (out / "summary.md").read_text()
    assert "*weighted avg*" in text and "Classification report per split" in text and "data.png" in text


def test_preprocess_is_applied_and_part_of_the_store_id(tmp_path, tiny_csv):
    from embstore import ExtractConfig, extract, open_store
    from embstore.data.spec import DataSpec

    norm = tmp_path / "norm.py"
    norm.write_text("def shout(text):\n    return text.upper()\n")
    spec = DataSpec(data=str(tiny_csv), label_col="label", preprocess=f"{norm}:shout")
    assert spec.load().splits["all"].texts[0] == "THE STRIKER SCORED TWICE IN THE FINAL MINUTE"
    base = dict(model="random:tiny-bert", out=str(tmp_path / "stores"))
    plain = extract(ExtractConfig(source=DataSpec(data=str(tiny_csv), label_col="label"), **base), show_progress=False)
    shouted = extract(ExtractConfig(source=spec, **base), show_progress=False)
    assert open_store(plain.path).fingerprint != open_store(shouted.path).fingerprint
    assert open_store(shouted.path).provenance.sources[0]["preprocess"] == f"{norm}:shout"
    typed = open_store(shouted.path).provenance.preprocess  # a typed field of the store's provenance
    assert typed is not None and typed["function"] == f"{norm}:shout" and len(typed["sha256"]) == 64
    assert open_store(plain.path).provenance.preprocess is None
    assert "preprocess" not in open_store(plain.path).provenance.to_dict()  # older stores' attribute is unchanged
    norm.write_text("def shout(text):\n    return text.upper() + '!'\n")  # an edited function: another store
    again = extract(ExtractConfig(source=spec, **base), show_progress=False)
    assert open_store(again.path).fingerprint != open_store(shouted.path).fingerprint
    with pytest.raises(ConfigError, match=r"--preprocess option must be MODULE:FUNCTION"):
        DataSpec(data=str(tiny_csv), preprocess="nofunction").load()
    norm.write_text("def shout(text):\n    return 3\n")
    with pytest.raises(DataError, match=r"returned int for row 0 .* it must return a str"):
        spec.load()


# -- study C: labels from file names, balancing, pitch, noise amplitude, a roll in seconds ----------------------------


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    return float(np.fft.rfftfreq(8 * len(x), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("steps", [-1.0, 1.0, 2.0])
def test_pitch_shift_keeps_the_duration_and_moves_the_pitch(steps):
    from embstore.data.pitch import pitch_shift

    x = tone(440.0, 1.5)
    y = pitch_shift(x, steps)
    assert len(y) == len(x) and y.dtype == np.float32
    assert _peak_hz(y, 16000) == pytest.approx(440.0 * 2 ** (steps / 12), rel=2e-3)  # a semitone is 5.9%
    assert 0.5 < np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(x**2)) < 1.2  # the level is about kept


def test_noise_std_and_a_roll_in_seconds():
    from embstore.data.augment import AugmentSpec, apply, draw_copies

    x = tone(300.0, 1.0)
    spec = AugmentSpec(transforms=("noise", "shift"), noise_std=0.005, shift_max_seconds=0.2, seed=3)
    (p,) = draw_copies(spec, [(0, 1)], np.array([7]))
    assert -0.2 <= p.shift_seconds <= 0.2 and np.isnan(p.shift_fraction) and np.isnan(p.snr_db)
    y = apply(x, p, None, 16000)
    rolled = np.roll(x, int(round(p.shift_seconds * 16000)))
    assert np.std(y - rolled) == pytest.approx(0.005, rel=0.05)  # an absolute amplitude, whatever the level
    quiet = apply(0.01 * x, p, None, 16000)
    assert np.std(quiet - 0.01 * rolled) == pytest.approx(0.005, rel=0.05)
    with pytest.raises(ConfigError, match="needs the sampling rate"):
        apply(x, p, None)


def test_balance_copies_bring_every_class_to_the_majority():
    from embstore.data.augment import balance_copies

    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    copies = balance_copies(labels, 4)  # class 3 has no row: it cannot be copied
    counts = np.bincount(np.concatenate([labels, labels[[p for p, _ in copies]]]), minlength=4)
    assert counts.tolist() == [5, 5, 5, 0]
    assert sorted(c for p, c in copies if p == 7) == [1, 2, 3, 4]  # the lone row of class 2, copied 4 times
    assert sorted(c for p, c in copies if p in (5, 6)) == [1, 1, 2]


def test_extract_balances_the_training_split_with_labels_from_file_names(tmp_path):
    from embstore import ExtractConfig, extract, open_store
    from embstore.data.spec import DataSpec

    table = pitch_clips(tmp_path)  # audio/r00.wav ... r23.wav
    source = DataSpec(data=str(table), audio_col="file", label_from_path=r"^r(\d)", holdout=0.25, seed=1)
    config = ExtractConfig(
        model="random:hubert-tiny",
        source=source,
        augment=("noise", "shift", "pitch"),
        noise_std=0.005,
        shift_max_seconds=0.05,
        balance="oversample",
        out=str(tmp_path / "stores"),
    )
    s = open_store(extract(config, show_progress=False).path)
    assert s.label_names == ["0", "1", "2"]  # r0x, r1x, r2x: 10, 10 and 4 files
    y, copies = s.labels("train"), s.augmented("train")
    counts, originals = np.bincount(y, minlength=3), np.bincount(y[~copies], minlength=3)
    assert counts.tolist() == [originals.max()] * 3 and (counts - originals).sum() == copies.sum() > 0
    assert not s.augmented("test").any()
    aug = s.augmentation("train")
    assert set(aug["pitch"][copies].tolist()) <= {-1.0, 0.0, 1.0} and np.isnan(aug["pitch"][~copies]).all()
    assert np.all(aug["noise_std"][copies] == np.float32(0.005)) and np.all(
        np.abs(aug["shift_seconds"][copies]) <= 0.05
    )
    assert s.provenance.augment["balance"] == "oversample" and s.provenance.label_from_path == r"^r(\d)"
    with pytest.raises(DataError, match=r"'r00.wav' .* does not match --label-from-path"):
        DataSpec(data=str(table), audio_col="file", label_from_path=r"^x(\d)").load()
    with pytest.raises(ConfigError, match="must hold a capture group"):
        DataSpec(data=str(table), audio_col="file", label_from_path=r"^r\d")


def test_finetune_balances_the_fitting_rows_each_epoch(tmp_path):
    from embstore.data.audio import load_waveform
    from embstore.data.spec import DataSpec
    from heads.finetune.audio import Clips, balanced_rows
    from heads.finetune.config import FinetuneConfig

    table = pitch_clips(tmp_path)
    split = DataSpec(data=str(table), audio_col="file", label_from_path=r"^r(\d)").load().splits["all"]
    fit = np.arange(len(split))
    rows, copies = balanced_rows(fit, split.labels[fit], 3)
    assert np.bincount(split.labels[rows]).tolist() == [10, 10, 10]
    cfg = FinetuneConfig(
        model="random:hubert-tiny",
        source=DataSpec(data=str(table), audio_col="file", label_from_path=r"^r(\d)"),
        augment="noise",
        noise_std=0.01,
        balance="oversample",
    )
    clips = Clips(split, rows, split.labels[rows], 16000, seed=0, augment=cfg.augment_spec, copies=copies)
    original = load_waveform(split.audio[rows[0]], 16000)
    np.testing.assert_array_equal(clips[(0, 1)][0], original)  # an original clip is read as it is
    first_copy = int(np.flatnonzero(copies > 0)[0])
    a, b = clips[(first_copy, 1)][0], clips[(first_copy, 2)][0]
    assert not np.array_equal(a, load_waveform(split.audio[rows[first_copy]], 16000)) and not np.array_equal(a, b)
    with pytest.raises(ConfigError, match="--balance oversample adds augmented copies of speech clips"):
        FinetuneConfig(model="random:hubert-tiny", source=cfg.source, balance="oversample")


# -- study D: the pair head's towers, features and fixed sum ---------------------------------------------------------


def test_pair_head_towers_features_and_fixed_sum():
    from heads.probe.config import HeadConfig
    from heads.probe.modules import InputShape, build_module

    cfg = HeadConfig(
        head="pair", tower_hidden=(128, 32), pair_features=("u", "v"), tower_merge="sum", standardize=False
    )
    head = build_module(cfg, InputShape("pair", ((4, 24), (4, 24))), 2).eval()
    assert [m.out_features for m in head.pre_a if isinstance(m, torch.nn.Linear)] == [128]
    assert head.proj_a.in_features == 128 and head.proj_a.out_features == 32 and head.out.in_features == 64
    assert not any("mix" in name for name, _ in head.named_parameters())  # a fixed sum learns no layer weights
    a, b = torch.randn(3, 4, 24), torch.randn(3, 4, 24)
    u = torch.tanh(head.proj_a(head.pre_a(a.sum(1))))
    v = torch.tanh(head.proj_b(head.pre_b(b.sum(1))))
    assert torch.allclose(head(a, b), head.out(torch.cat([u, v], 1)))
    default = build_module(HeadConfig(head="pair"), InputShape("pair", ((4, 24), (4, 24))), 2)
    assert default.out.in_features == 4 * 256 and hasattr(default.mix_a, "weights")


def test_pair_sweep_with_combine_sum_trains_the_fixed_sum(tmp_path):
    from embstore import ExtractConfig, extract
    from embstore.data.spec import DataSpec
    from heads.probe.estimator import HeadClassifier
    from heads.probe.sweep import SweepConfig, run_sweep

    data = separable(tmp_path / "sep.csv", n_per_class=12)
    source = DataSpec(data=str(data), text_col="text", text_pair_col="other", label_col="label", holdout=0.25)
    store = extract(
        ExtractConfig(model="random:tiny-bert", source=source, pair_mode="towers", out=str(tmp_path / "s")),
        show_progress=False,
    ).path
    config = SweepConfig.from_dict(
        {"store": store, "head": "pair", "layers": "all", "combine": "sum,mix", "pooling": "mean", "epochs": 2,
         "tower_hidden": "16,8", "pair_features": "u,v,absdiff", "out": str(tmp_path / "run"), "ci": False}
    )  # fmt: skip
    result = run_sweep(config, show_progress=False)
    rows = [json.loads(line) for line in (result.run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["combine"] for r in rows) == ["pair", "sum"]
    est = HeadClassifier.load(result.run_dir / "best_head")
    assert est.config.tower_merge == ("sum" if result.best["combine"] == "sum" else "mix")


def test_replace_negatives_script(tmp_path):
    pairs = pd.DataFrame(
        {
            "word": ["bank", "bank", "bank", "bat", "bat", "bat", "cup", "cup"],
            "sentence": [f"sentence {i}" for i in range(8)],
            "definition": ["river side", "money house", "a slope", "animal", "club", "to blink", "vessel", "trophy"],
            "label": [1, 0, 0, 1, 0, 0, 0, 0],
        }
    )
    src, fixed = tmp_path / "pairs.csv", tmp_path / "fixed.txt"
    pairs.to_csv(src, index=False)
    fixed.write_text("a fixed sentence\nanother fixed sentence\n")

    def run(out: Path, fraction: str, seed: str = "0") -> pd.DataFrame:
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "replace_negatives.py"), str(src), str(out), "--key-col", "word",
             "--fixed", str(fixed), "--fraction", fraction, "--seed", seed],
            check=True, capture_output=True,
        )  # fmt: skip
        return pd.read_csv(out)

    half, full = run(tmp_path / "half.csv", "0.5"), run(tmp_path / "full.csv", "1.0")
    assert half["replaced"].sum() == 3 and full["replaced"].sum() == 6
    assert (full.loc[full.label == 1] == pairs.loc[pairs.label == 1].assign(replaced=0)).all().all()
    replaced = full[full.replaced == 1]
    assert set(replaced["sentence"]) <= {"a fixed sentence", "another fixed sentence"}
    assert set(replaced.loc[replaced.word == "bank", "definition"]) == {"river side"}  # the word's label-1 definition
    assert list(replaced.loc[replaced.word == "cup", "definition"]) == ["vessel", "trophy"]  # no positive: kept
    assert (full["label"] == pairs["label"]).all()
    assert run(tmp_path / "again.csv", "0.5").equals(half)


# -- study E: fold models and their ensemble --------------------------------------------------------------------------


def test_finetune_keeps_fold_models_and_scores_their_ensemble(tmp_path):
    from heads.finetune.predict import predict_finetuned, predict_folds

    data = separable(tmp_path / "sep.csv", n_per_class=10)
    df = pd.read_csv(data)
    df[:21].to_csv(tmp_path / "train.csv", index=False)
    df[21:].to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "ft"
    result = CliRunner().invoke(
        heads_main,
        ["finetune", "--model", "random:tiny-bert", "--split", f"train={tmp_path / 'train.csv'}", "--split",
         f"test={tmp_path / 'test.csv'}", "--folds", "3", "--keep-fold-models", "--epochs", "1",
             "--validation-fraction", "0.25", "--out", str(out),
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    ensemble = meta["fold_ensemble"]
    assert ensemble["folds"] == [0, 1, 2] and ensemble["split"] == "test" and ensemble["rows"] == 9
    texts = list(df[21:]["text"])
    labels, proba, names = predict_folds(out, texts, None, "cpu", audio=False)
    by_hand = np.mean([predict_finetuned(out / "folds" / f"fold-{k}", texts)[1] for k in range(3)], axis=0)
    np.testing.assert_allclose(proba, by_hand, atol=1e-5)
    y = np.array([names.index(v) for v in df[21:]["label"]])
    assert ensemble["accuracy"] == pytest.approx(float(np.mean(proba.argmax(1) == y)))
    cli = CliRunner().invoke(heads_main, ["predict", "--run", str(out)], input="\n".join(texts) + "\n")
    assert cli.exit_code == 0, cli.output
    shown = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [r["label"] for r in shown] == labels
    assert "Fold ensemble" in (out / "summary.md").read_text()


def test_sweep_keeps_fold_heads_and_predict_averages_them(tmp_path):
    from heads.probe.predict import fold_heads, predict_texts

    store = _tiny_store(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        heads_main,
        ["sweep", "--store", store, "--layers", "2", "--combine", "single", "--head", "mlp", "--hidden", "8",
         "--epochs", "2", "--folds", "2", "--validation-fraction", "0.3", "--keep-fold-models", "--out", str(out),
         "--no-ci"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["fold_ensemble"]["folds"] == [0, 1] and meta["fold_ensemble"]["split"] == "test"
    heads = fold_heads(out)
    assert len(heads) == 2
    texts = ["goal match striker", "planet orbit rocket"]
    by_hand = np.mean([predict_texts(h, texts, None, device="cpu")[1] for h in heads], axis=0)
    cli = CliRunner().invoke(heads_main, ["predict", "--run", str(out)], input="\n".join(texts) + "\n")
    assert cli.exit_code == 0, cli.output
    shown = np.array([list(json.loads(line)["probabilities"].values()) for line in cli.stdout.splitlines()])
    np.testing.assert_allclose(shown, by_hand, atol=1e-5)
    with pytest.raises(ConfigError, match="--keep-fold-models keeps the heads of --folds K"):
        from heads.probe.sweep import SweepConfig

        SweepConfig(keep_fold_models=True)


def test_sweep_writes_the_data_profile(tmp_path):
    store = _tiny_store(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        heads_main, ["sweep", "--store", store, "--layers", "2", "--combine", "single", "--out", str(out), "--no-ci"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "run.json").read_text())["data"]
    assert sorted(data) == ["test", "train"] and data["train"]["length_unit"] == "tokens"
    assert sum(data["train"]["class_counts"]) + sum(data["test"]["class_counts"]) == 36
    assert (out / "data.png").is_file()


def _tiny_store(tmp_path: Path, holdout: float = 0.25) -> str:
    """A random tiny-bert store of 36 keyword texts in 3 classes (factories.separable)."""
    table = separable(tmp_path / "sep.csv", n_per_class=12)
    result = CliRunner().invoke(
        embstore_main,
        ["extract", "--model", "random:tiny-bert", "--data", str(table), "--holdout", str(holdout), "--out",
         str(tmp_path / "stores"), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]
