"""The probe engine's answers: standardised inputs for every head, the batched L-BFGS against scikit-learn,
choices on validation, evaluation-set ids in reports, and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import layered, random_model_dir, separable

from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(heads_main, list(args), input=input)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    """random:tiny-bert with 3 hidden dims of every layer's output scaled (and shifted) by 300, as MiniLM's CLS
    vectors have a few dims hundreds of times larger than the rest; saved as a local model directory."""

    def scale(model) -> None:
        model.embeddings.LayerNorm.weight[:3] *= 300.0
        for layer in model.encoder.layer:
            layer.output.LayerNorm.weight[:3] *= 300.0
            layer.output.LayerNorm.bias[:3] += 300.0

    return random_model_dir(tmp_path_factory.mktemp("outlier") / "model", edit=scale)


@pytest.fixture(scope="module")
def outlier_store(outlier_model, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("outlierstore")
    data = separable(base / "sep.csv", n_per_class=60)
    return extract(
        ExtractConfig.from_dict(
            dict(
                model=str(outlier_model),
                data=str(data),
                label_col="label",
                holdout=0.25,
                pooling=("cls",),
                tokens="-1",
                out=str(base),
            )
        ),
        show_progress=False,
    ).path


def test_the_outlier_store_has_a_few_huge_dims(outlier_store):
    from embstore import open_store

    std = open_store(outlier_store).pooled("train", "cls", [1])[:, 0].astype(np.float32).std(0)
    assert np.sort(std)[-3:].min() > 50 * np.median(std)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param("linear", marks=pytest.mark.slow),
        "mlp",
        pytest.param("conv", marks=pytest.mark.slow),
        "sum",
        "mix",
        pytest.param("gru", marks=pytest.mark.slow),
    ],
)
def test_every_head_beats_the_majority_class_when_a_few_dims_are_huge(outlier_store, tmp_path, head):
    tokens = head == "gru"
    out = tmp_path / head
    res = run(
        "train" if tokens else "sweep",
        "--store",
        outlier_store,
        "--head",
        head,
        "--layers",
        "-1" if tokens else "1-2",
        "--epochs",
        "15",
        "--lr",
        "0.01",
        "--batch-size",
        "16",
        "--hidden",
        "32",
        "--rnn-hidden",
        "16",
        *([] if tokens else ["--combine", "single,concat"]),
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "results.csv")
    majority = json.loads((out / "run.json").read_text())["majority_accuracy"]
    assert df.accuracy.min() > majority + 0.15, df[["layers", "combine", "head", "accuracy"]]
    assert df.accuracy.mean() > majority + 0.25


def test_without_standardisation_the_outlier_store_defeats_the_conv_head(outlier_store, tmp_path):
    """The store really has the property: unstandardised, the conv head predicts the majority class."""
    conf = tmp_path / "raw.yaml"
    conf.write_text("standardize: false\n")
    res = run(
        "sweep",
        "--config",
        str(conf),
        "--store",
        outlier_store,
        "--head",
        "conv",
        "--layers",
        "1-2",
        "--combine",
        "single",
        "--epochs",
        "15",
        "--lr",
        "0.01",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path / "c"),
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "c" / "results.csv")
    majority = json.loads((tmp_path / "c" / "run.json").read_text())["majority_accuracy"]
    assert df.accuracy.max() <= majority + 0.1


# -- the batched L-BFGS against scikit-learn -------------------------------------------------------------------


def _chunks(features: list[np.ndarray], y: np.ndarray, rows: np.ndarray, size: int = 50):
    def gen():
        for start in range(0, len(rows), size):
            r = rows[start : start + size]
            yield [f[r] for f in features], y[r], None

    return gen


def _problem(n_classes: int, seed: int = 0, n: int = 300, d: int = 12) -> tuple[list[np.ndarray], np.ndarray]:
    """Two feature sets (widths d and 2d) with a few huge, uninformative dims, and noisy class means."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    means = rng.normal(size=(n_classes, 2 * d))
    X = means[y] + rng.normal(scale=2.0, size=(n, 2 * d))
    X[:, :2] = 300 * rng.normal(size=(n, 2)) + 1000
    return [X[:, :d].astype(np.float32), X.astype(np.float32)], y


@pytest.mark.parametrize(
    ("n_classes", "class_weight", "C"), [(3, "none", 1.0), (3, "none", 0.01), (2, "none", 0.3), (4, "balanced", 1.0)]
)
def test_lbfgs_equals_scikit_learn_at_a_fixed_C(n_classes, class_weight, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from heads.probe.solvers import fit_logistic_probes

    feats, y = _problem(n_classes)
    rows = np.arange(len(y))
    fits = fit_logistic_probes(
        _chunks(feats, y, rows), [f.shape[1] for f in feats], n_classes, [C], class_weight=class_weight, tol=1e-5
    )
    for f, fit in zip(feats, fits):
        sk = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=C, max_iter=1000, tol=1e-6, class_weight=None if class_weight == "none" else class_weight
            ),
        )
        sk.fit(f, y)
        assert fit.converged[0]
        ours = ((f - fit.mean) * fit.scale) @ fit.weights[0] + fit.bias[0]
        np.testing.assert_allclose(fit.mean, sk[0].mean_, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(1 / fit.scale, sk[0].scale_, rtol=1e-4)
        theirs = sk.decision_function(f)
        if n_classes == 2:  # scikit-learn's one weight vector = our class-1 minus class-0 logits
            ours = ours[:, 1] - ours[:, 0]
        else:  # softmax logits are defined up to a per-row constant: compare centred
            ours, theirs = ours - ours.mean(1, keepdims=True), theirs - theirs.mean(1, keepdims=True)
        np.testing.assert_allclose(ours, theirs, atol=5e-3 * max(1.0, np.abs(theirs).max()))
        assert np.mean(sk.predict(f) == (ours > 0 if n_classes == 2 else ours.argmax(1))) >= 0.99


def test_probes_on_other_rows_share_one_pass_and_equal_their_own_solves():
    """Seeds and folds are probes of one feature on other rows: solved together, each equals its own solve."""
    from heads.probe.solvers import fit_logistic_probes

    feats, y = _problem(3, seed=2, n=300)
    rows = [np.arange(0, 200), np.arange(100, 300)]
    every = np.arange(300)

    def blocks():  # one feature, read once; each probe's rows marked
        for start in range(0, 300, 64):
            r = every[start : start + 64]
            yield [feats[0][r]], y[r], np.stack([np.isin(r, rows[0]), np.isin(r, rows[1])])

    both = fit_logistic_probes(blocks, [12], 3, [0.1], feature_of=[0, 0], class_weight="balanced")
    for r, fit in zip(rows, both):
        alone = fit_logistic_probes(_chunks([feats[0]], y, r), [12], 3, [0.1], class_weight="balanced")[0]
        np.testing.assert_allclose(fit.mean, alone.mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(fit.weights, alone.weights, atol=2e-3)
        np.testing.assert_allclose(fit.train_loss, alone.train_loss, rtol=1e-4)


def test_lbfgs_picks_C_on_validation_and_every_grid_member_on_its_own_row():
    from heads.probe.scoring import grid_confusions
    from heads.probe.solvers import fit_logistic_probes
    from heads.report.metrics import metrics_from_confusion

    feats, y = _problem(3, seed=1, n=400)
    fit_rows, val_rows = np.arange(300), np.arange(300, 400)
    grid = [1e-3, 1e-1, 10.0]
    fits = fit_logistic_probes(
        _chunks(feats, y, fit_rows), [f.shape[1] for f in feats], 3, grid, val_source=_chunks(feats, y, val_rows)
    )
    again = grid_confusions(fits, _chunks(feats, y, val_rows), 3)
    for fit, cms in zip(fits, again):
        assert fit.val_confusion is not None and fit.refined is not None and fit.refined[fit.chosen]
        f1 = [metrics_from_confusion(cm, ["a", "b", "c"])["f1_macro"] for cm in fit.val_confusion]
        assert f1[fit.chosen] == max(f1)
        np.testing.assert_array_equal(cms[fit.chosen], fit.val_confusion[fit.chosen])  # scored with its final weights
        # the chosen C equals a single-C fit to the same tolerance
        single = (
            fit_logistic_probes(_chunks(feats, y, fit_rows), [fit.weights.shape[1]], 3, [grid[fit.chosen]])[0]
            if fit.weights.shape[1] == feats[0].shape[1]
            else None
        )
        if single is not None:
            np.testing.assert_allclose(fit.weights[fit.chosen], single.weights[0], atol=5e-3)


def test_the_C_path_warm_starts_and_stops_after_two_falls(monkeypatch):
    """Each probe's path: C solved from the smallest up, each from the previous C's solution, and it stops once its
    validation macro-F1 has fallen at two consecutive Cs (the validation scores are set here, per probe and C)."""
    import heads.probe.solvers as solvers

    feats, y = _problem(3, seed=3, n=240)
    fit_rows, val_rows = np.arange(180), np.arange(180, 240)
    grid = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    # probe 0 falls at C index 2 and 3: its path stops there; probe 1 never falls twice in a row: every C is solved
    f1 = {0: [0.5, 0.6, 0.55, 0.5, 0.9, 0.9, 0.9], 1: [0.5, 0.4, 0.6, 0.5, 0.6, 0.5, 0.7]}
    scored: list[tuple[int, int]] = []
    real_score = solvers._Run._score

    def score(self, val_source, pairs):
        real_score(self, val_source, pairs)
        for p, k in pairs:
            scored.append((p, k))
            self.val[p, k] = 0
            self.val[p, k, 0, 0] = 1000 * p + k  # a marker the patched macro-F1 reads back

    monkeypatch.setattr(solvers._Run, "_score", score)
    monkeypatch.setattr(solvers, "macro_f1_present", lambda cm: f1[int(cm[0, 0]) // 1000][int(cm[0, 0]) % 1000])
    starts: list[tuple[int, float]] = []
    real_solve = solvers._Run._solve

    def solve(self, pairs, tol):
        for p, k in pairs:  # the starting point of each C on the path: the previous C's solution (zeros for the first)
            if not self.solved[p, k]:
                th = self.solver.thetas[self.widths[self.fof[p]]][self.groups[self.widths[self.fof[p]]].index(p)]
                starts.append((k, float((th[k] - (th[k - 1] if k else 0 * th[k])).abs().max())))
        real_solve(self, pairs, tol)

    monkeypatch.setattr(solvers._Run, "_solve", solve)
    fits = solvers.fit_logistic_probes(
        _chunks(feats, y, fit_rows), [f.shape[1] for f in feats], 3, grid, val_source=_chunks(feats, y, val_rows)
    )
    assert fits[0].solved.tolist() == [True] * 4 + [False] * 3
    assert fits[1].solved.tolist() == [True] * 7
    assert not fits[0].converged[4:].any() and np.isnan(fits[0].train_loss[4:]).all()
    assert sorted(k for p, k in scored if p == 0) == [0, 1, 1, 2, 3]  # the chosen C (1) scored again once refined
    assert fits[0].chosen == 1 and fits[1].chosen == 6  # the best validation score among the Cs solved
    assert len(starts) == 4 + 7 and all(gap == 0.0 for _k, gap in starts)  # each C started where the previous one ended


@pytest.mark.slow
def test_stacked_heads_equal_their_single_fits():
    """Every member of a stack trains as HeadClassifier.fit would train it alone (dropout 0)."""
    from heads.probe.config import HeadConfig
    from heads.probe.ensemble import Member, fit_stacked
    from heads.probe.estimator import HeadClassifier
    from heads.probe.modules import as_inputs

    X, y = layered(0, n=150)
    Xv, yv = layered(1, n=60)
    rng = np.random.default_rng(0)
    for head, feats, vfeats in (
        ("mlp", [X[:, 0], X[:, 2]], [Xv[:, 0], Xv[:, 2]]),
        ("conv", [X, X[:, ::-1].copy()], [Xv, Xv[:, ::-1].copy()]),
    ):
        cfg = HeadConfig(
            head=head, hidden=(16,), conv_hidden=16, epochs=6, batch_size=32, lr=1e-2, patience=2, dropout=0.0
        )
        members = [
            Member(
                f, seed, np.sort(rng.choice(150, 130 - seed, replace=False)), np.sort(rng.choice(60, 40, replace=False))
            )
            for f in range(2)
            for seed in (0, 1)
        ]
        ests = fit_stacked(
            cfg,
            [as_inputs(f, head) for f in feats],
            [as_inputs(f, head) for f in vfeats],
            members,
            y,
            yv,
            3,
            torch.device("cpu"),
        )
        for m, est in zip(members, ests):
            single = HeadClassifier(cfg.replace(seed=m.seed)).fit(
                feats[m.feature][m.fit_rows], y[m.fit_rows], vfeats[m.feature][m.val_rows], yv[m.val_rows]
            )
            assert est.best_epoch_ == single.best_epoch_ and len(est.history_) == len(single.history_)
            for a, b in zip(est.module_.state_dict().values(), single.module_.state_dict().values()):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


# -- sweeps: choices, duplicates, progress --------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("probestore")
    return extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-bert",
                data=str(separable(base / "sep.csv")),
                label_col="label",
                holdout=0.25,
                pooling=("mean",),
                out=str(base),
            )
        ),
        show_progress=False,
    ).path


def test_single_seed_rows_and_summary(store, tmp_path):
    out = tmp_path / "r"
    res = run(
        "sweep",
        "--store",
        store,
        "--head",
        "linear,mix",
        "--layers",
        "1-2",
        "--epochs",
        "3",
        "--progress",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    assert re.search(r"heads sweep: .*\d+/\d+", res.stderr)  # the tqdm bar: configurations done / total
    df = pd.read_csv(out / "results.csv")
    assert (df["combine"] == "mix").sum() == 1  # asked by both --head linear and --head mix: trained once
    text = (out / "summary.md").read_text()
    assert "±" not in text  # one seed: no ± 0.0000
    mix = next(line for line in text.splitlines() if "| mix | mean | mix |" in line)
    assert mix.split(" | ")[-3].strip("* ") == "1"  # runs


def test_adamw_solver_stays_available(store, tmp_path):
    res = run(
        "sweep",
        "--store",
        store,
        "--layers",
        "1-2",
        "--combine",
        "single",
        "--solver",
        "adamw",
        "--epochs",
        "4",
        "--out",
        str(tmp_path / "a"),
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "a" / "results.csv")
    assert (
        set(df.hp_solver) == {"adamw"}
        and "hp_C" not in df
        and df.best_epoch.notna().all()
        and df.val_f1_macro.notna().all()
    )


def test_summary_best_is_chosen_on_validation_not_on_test(tmp_path):
    """Config a wins on test, b on validation: b is the best row, and the summary says how it was chosen."""
    from heads.report import ResultRow, RunWriter

    def row(layers: str, val: float, test: float) -> ResultRow:
        return ResultRow(
            layers=layers,
            combine="single",
            pooling="cls",
            head="linear",
            seed=0,
            accuracy=test,
            f1_macro=test,
            train_seconds=1.0,
            hyperparameters={},
            per_class={},
            confusion=[],
            store_id="s",
            val_accuracy=val,
            val_f1_macro=val,
        )

    writer = RunWriter(tmp_path / "r", {"validation": "a 0.1 carve"})
    writer.add(row("1", 0.70, 0.95))
    writer.add(row("2", 0.90, 0.80))
    assert writer.finish(["a", "b"])["best"]["layers"] == "2"
    text = (tmp_path / "r" / "summary.md").read_text()
    best = next(line for line in text.splitlines() if "← best" in line)
    assert best.startswith("| **2** |") and "← best (validation)" in best
    assert "highest mean validation macro-F1 (validation: a 0.1 carve)" in text
    assert "| val accuracy | val macro-F1 | test accuracy | test macro-F1 |" in text


def test_val_split_is_used_for_every_choice(tmp_path):
    data = separable(tmp_path / "all.csv", n_per_class=30)
    df = pd.read_csv(data)
    parts = {"train": df.iloc[:50], "dev": df.iloc[50:65].copy(), "test": df.iloc[65:]}
    # Five dev rows carry another class's label: a head scores visibly lower on dev than on test, so scores made
    # on dev can be told from scores made anywhere else.
    labels = sorted(df.label.unique())
    parts["dev"].iloc[:5, parts["dev"].columns.get_loc("label")] = [
        labels[(labels.index(v) + 1) % len(labels)] for v in parts["dev"].label.iloc[:5]
    ]
    for name, part in parts.items():
        part.to_csv(tmp_path / f"{name}.csv", index=False)
    path = extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-bert",
                data=None,
                label_col="label",
                pooling=("mean",),
                splits=tuple((n, str(tmp_path / f"{n}.csv")) for n in parts),
                out=str(tmp_path),
            )
        ),
        show_progress=False,
    ).path
    res = run(
        "sweep",
        "--store",
        path,
        "--layers",
        "-1",
        "--combine",
        "single",
        "--val-split",
        "dev",
        "--out",
        str(tmp_path / "r"),
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["val_split"] == "dev" and meta["validation"].startswith("split `dev` (15 rows)")
    row = json.loads((tmp_path / "r" / "results.jsonl").read_text().splitlines()[0])
    assert sum(sum(r) for r in row["confusion"]) == 25 and row["val_accuracy"] is not None  # test scored, dev chose
    # Re-score the saved head on dev: the validation scores every choice was made on are dev's.
    from embstore import open_store
    from heads.probe.predict import load_head
    from heads.report.metrics import classification_metrics

    est, store = load_head(str(tmp_path / "r")), open_store(path)
    names = store.label_names

    def rescored(split: str) -> dict:
        return classification_metrics(store.labels(split), est.predict(store.pooled(split, "mean", [-1])[:, 0]), names)

    dev, test = rescored("dev"), rescored("test")
    assert dev["accuracy"] < test["accuracy"]
    assert row["val_accuracy"] == pytest.approx(dev["accuracy"]) and row["val_f1_macro"] == pytest.approx(
        dev["f1_macro"]
    )
    assert row["accuracy"] == pytest.approx(test["accuracy"]) and row["f1_macro"] == pytest.approx(test["f1_macro"])
    # C was chosen on those dev scores: the grid's best validation macro-F1 (ties: the smaller C).
    by_c = [(h["val_f1_macro"], -h["C"]) for h in row["history"]]
    assert row["hyperparameters"]["C"] == -max(by_c)[1]


# -- evaluation sets and reports -------------------------------------------------------------------------------


def test_report_refuses_runs_scored_on_other_rows(store, tmp_path):
    args = ["--store", store, "--layers", "-1", "--combine", "single"]
    assert run("sweep", *args, "--out", str(tmp_path / "a")).exit_code == 0
    assert (
        run("sweep", *args, "--head", "mlp", "--hidden", "16", "--epochs", "2", "--out", str(tmp_path / "b")).exit_code
        == 0
    )
    assert run("sweep", *args, "--folds", "2", "--out", str(tmp_path / "folds")).exit_code == 0
    ids = {n: json.loads((tmp_path / n / "run.json").read_text())["eval_set"]["id"] for n in ("a", "b", "folds")}
    assert ids["a"] == ids["b"] != ids["folds"]
    assert (
        json.loads((tmp_path / "folds" / "run.json").read_text())["eval_set"]["rows"] == 90
    )  # the union of held-out folds
    ok = run("report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep"))
    assert ok.exit_code == 0, ok.output
    bad = run("report", str(tmp_path / "a"), str(tmp_path / "folds"), "--out", str(tmp_path / "rep2"))
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert f"eval_set {ids['a']} vs {ids['folds']}" in bad.stderr and "--allow-mixed" in bad.stderr
    assert not (tmp_path / "rep2").exists()
    mixed = run(
        "report", str(tmp_path / "a"), str(tmp_path / "folds"), "--allow-mixed", "--out", str(tmp_path / "rep3")
    )
    assert mixed.exit_code == 0, mixed.output
    text = (tmp_path / "rep3" / "report.md").read_text()
    assert "† scored on other rows" in text and "| folds † |" in text
    old = tmp_path / "old"  # a run made before runs recorded their evaluation set
    (old).mkdir()
    meta = json.loads((tmp_path / "b" / "run.json").read_text())
    meta.pop("eval_set")
    (old / "run.json").write_text(json.dumps(meta))
    (old / "results.jsonl").write_text((tmp_path / "b" / "results.jsonl").read_text())
    res = run("report", str(tmp_path / "a"), str(old), "--out", str(tmp_path / "rep4"))
    assert res.exit_code == 2 and "records no evaluation set (eval_set unknown" in res.stderr


# -- bad input: one line, exit 2, nothing written that looks complete ------------------------------------------


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--val-split", "dev"], r"--val-split 'dev' is not in .*; its splits are train, test"),
        (["--val-split", "test"], r"--val-split 'test' is also the evaluation split"),
        (
            ["--validation-fraction", "0.02"],
            r"validation carve of the training split 'train' \(0.02 of 90 rows = 2\) cannot hold every one of the 3 "
            r"classes",
        ),
        (
            ["--c-grid", "1e-3,0,1"],
            r"The --c-grid option must be a comma list of positive inverse L2 strengths C .*Got '0.001,0.0,1.0'",
        ),
        (["--c-grid", "1e-3,-1"], r"The --c-grid option must be a comma list of positive .*Got '0.001,-1.0' instead"),
        (["--c-grid", "big"], r"The --c-grid option must be .*Got 'big' instead\. Pass values such as 1e-4"),
        (["--max-memory", "0"], r"'max_memory' option must be a positive size"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(store, tmp_path, args, pattern):
    out = tmp_path / "r"
    res = run("sweep", "--store", store, "--layers", "-1", "--combine", "single", *args, "--out", str(out))
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not out.exists()


def test_import_heads_stays_light():
    code = (
        "import sys, heads; heads.HeadConfig; assert 'torch' not in sys.modules; "
        "print(len(heads.__all__) > 10 and 'ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
