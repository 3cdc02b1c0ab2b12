"""How sure a sweep's answer is: per-row predictions, bootstrap intervals, paired tests against the best, the
random-weights control and the online codelength (MDL), each checked against an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from factories import VOCAB, needs_shared, random_model_dir, separable
from scipy.stats import binomtest

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, extract, open_store
from heads.report.metrics import classification_metrics
from heads.report.uncertainty import bootstrap_scores, holm, mcnemar_p, percentile_interval, resample_counts


def heads(*args: str):
    return CliRunner().invoke(heads_main, list(args))


def noisy(path: Path, n_per_class: int = 70, flip: float = 0.25, seed: int = 1) -> Path:
    """The separable keyword texts with a share of labels replaced at random: a task no probe gets right."""
    separable(path, n_per_class=n_per_class, seed=seed)
    df = pd.read_csv(path)
    rng = np.random.default_rng(seed)
    hit = rng.random(len(df)) < flip
    df.loc[hit, "label"] = rng.choice(sorted(VOCAB), size=int(hit.sum()))
    df.to_csv(path, index=False)
    return path


def _extract(base: Path, data: Path, **kw) -> str:
    cfg = dict(
        model="random:tiny-bert", data=str(data), label_col="label", holdout=0.3, pooling=("cls", "mean"), out=str(base)
    )
    cfg.update(kw)
    return extract(ExtractConfig.from_dict(cfg), show_progress=False).path


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("noisy")
    return _extract(base, noisy(base / "noisy.csv"))


@pytest.fixture(scope="module")
def noisy_sweep(noisy_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisysweep") / "run"
    res = heads(
        "sweep",
        "--store",
        noisy_store,
        "--combine",
        "single,concat",
        "--seeds",
        "2",
        "--mdl",
        "--tol",
        "1e-6",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


# -- the statistics on their own -----------------------------------------------------------------------------


def test_bootstrap_interval_of_accuracy_agrees_with_clopper_pearson():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 3)
    acc, _ = bootstrap_scores(y, pred[None], 3, seed=7)
    lo, hi = percentile_interval(acc[0])
    exact = binomtest(int((pred == y).sum()), n).proportion_ci(0.95, method="exact")
    width = exact.high - exact.low
    assert abs((hi - lo) - width) <= 0.1 * width
    assert abs(lo - exact.low) <= 0.1 * width and abs(hi - exact.high) <= 0.1 * width


def test_every_resample_is_scored_as_the_table_scores_it():
    """Resample r's accuracy and macro-F1 equal classification_metrics on the rows it drew (every class counts)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    preds = np.stack([np.where(rng.random(300) < p, y, rng.integers(0, 4, 300)) for p in (0.9, 0.5)])
    acc, f1 = bootstrap_scores(y, preds, 4, n_resamples=5, seed=3)
    counts = np.concatenate(list(resample_counts(300, 5, 3)))
    for r in range(5):
        drawn = np.repeat(np.arange(300), counts[r].astype(int))
        for m in range(2):
            ref = classification_metrics(y[drawn], preds[m][drawn], list("abcd"))
            assert acc[m, r] == pytest.approx(ref["accuracy"]) and f1[m, r] == pytest.approx(ref["f1_macro"])
    # models share the resamples: a model scored twice gets the same distribution
    again, _ = bootstrap_scores(y, preds[[0, 0]], 4, n_resamples=50, seed=3)
    assert np.array_equal(again[0], again[1])


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 5), (5, 9), (7, 7), (30, 12), (100, 131), (1, 40)])
def test_mcnemar_equals_scipy_binomtest(b, c):
    a = np.array([True] * b + [False] * c + [True] * 20 + [False] * 3)
    other = np.array([False] * b + [True] * c + [True] * 20 + [False] * 3)
    p, nb, nc = mcnemar_p(a, other)
    assert (nb, nc) == (b, c)
    assert p == pytest.approx(1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max 0.06)
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(holm([0.5, 0.9]), [1.0, 1.0])


# -- a sweep's files ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predictions_npz_holds_every_run_and_row(noisy_sweep, noisy_store):
    rows = _rows(noisy_sweep)
    p = np.load(noisy_sweep / "predictions.npz")
    assert set(p.files) >= {"run", "row_id", "y_true", "y_pred", "proba"}
    store = open_store(noisy_store)
    test_ids = store.row_ids("test")
    assert sorted(set(p["run"].tolist())) == list(range(len(rows)))
    assert np.allclose(p["proba"].sum(1), 1.0, atol=1e-5) and np.array_equal(p["y_pred"], p["proba"].argmax(1))
    truth = dict(zip(test_ids.tolist(), store.labels("test").tolist()))
    for i, row in enumerate(rows):
        mine = p["run"] == i
        assert sorted(p["row_id"][mine].tolist()) == sorted(test_ids.tolist())  # one entry per evaluation row
        assert [truth[r] for r in p["row_id"][mine]] == p["y_true"][mine].tolist()
        ref = classification_metrics(p["y_true"][mine], p["y_pred"][mine], store.label_names)
        assert ref["accuracy"] == pytest.approx(row["accuracy"]) and ref["f1_macro"] == pytest.approx(row["f1_macro"])
        assert row["accuracy_lo"] <= row["accuracy"] <= row["accuracy_hi"]
        assert row["f1_macro_lo"] <= row["f1_macro"] <= row["f1_macro_hi"]


@pytest.mark.slow
def test_p_vs_best_is_the_exact_mcnemar_of_the_predictions_and_holm_corrected(noisy_sweep):
    rows = _rows(noisy_sweep)
    p = np.load(noisy_sweep / "predictions.npz")
    best = {r["layers"] + r["combine"] + r["pooling"] for r in rows if r["is_best"]}
    assert len(best) == 1
    seed0 = [i for i, r in enumerate(rows) if r["seed"] == 0]
    correct = {}
    for i in seed0:
        mine = p["run"] == i
        order = np.argsort(p["row_id"][mine])
        correct[rows[i]["layers"] + rows[i]["combine"] + rows[i]["pooling"]] = (p["y_pred"][mine] == p["y_true"][mine])[
            order
        ]
    (b_key,) = best
    raw, keys, direction = [], [], {}
    for key, ok in correct.items():
        if key == b_key:
            continue
        b = int((correct[b_key] & ~ok).sum())
        c = int((~correct[b_key] & ok).sum())
        raw.append(1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue)
        keys.append(key)
        direction[key] = "better" if c > b else "worse"
    adjusted = dict(zip(keys, holm(raw)))
    for i, r in enumerate(rows):
        key = r["layers"] + r["combine"] + r["pooling"]
        if key == b_key:
            assert r["p_vs_best"] is None and r["tied_with_best"] is None and r["vs_best"] == "best"
            continue
        assert r["p_vs_best"] == pytest.approx(raw[keys.index(key)], rel=1e-9)
        assert r["p_vs_best_holm"] == pytest.approx(adjusted[key], rel=1e-9)
        assert r["tied_with_best"] == (adjusted[key] >= 0.05)
        assert r["vs_best"] == ("tied" if adjusted[key] >= 0.05 else direction[key])  # worse, or better on test
        assert r["f1_macro_diff_lo"] <= r["f1_macro_diff_hi"]
    summary = (noisy_sweep / "summary.md").read_text()
    assert summary.startswith("# Heads run") and "## Answer" in summary.split("## Run")[0]
    assert "seed 0's runs" in summary
    assert "path stops once its validation macro-F1 has fallen at 2 consecutive Cs" in summary  # the C path's rule
    tied = sum(1 for k in keys if adjusted[k] >= 0.05)
    if tied:
        assert f"{tied} configuration" in summary and "statistically indistinguishable" in summary


@pytest.mark.slow
def test_mdl_equals_a_scikit_learn_online_code(noisy_sweep, noisy_store):
    """The same definition from scratch: source order, the seeded permutation, the block ends, scikit-learn's
    scaled logistic regression at the run's C on each prefix, -log2 p of the next block."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    store = open_store(noisy_store)
    y = store.labels("train")
    K = len(store.label_names)
    checked = 0
    for r in _rows(noisy_sweep):
        if r["combine"] != "single" or r["seed"] != 0:
            continue
        X = store.pooled("train", r["pooling"], [int(r["layers"])])[:, 0].astype(np.float32)
        order = np.argsort(store.row_ids("train"), kind="stable")
        order = order[np.random.default_rng(0).permutation(len(order))]
        n = len(order)
        ends = sorted(
            {max(1, round(f * n)) for f in (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)}
        )
        bits = ends[0] * math.log2(K)
        for a, b in zip(ends[:-1], ends[1:]):
            prefix, block = order[:a], order[a:b]
            if len(np.unique(y[prefix])) < K:
                bits += (b - a) * math.log2(K)
                continue
            clf = make_pipeline(
                StandardScaler(), LogisticRegression(C=r["hyperparameters"]["C"], tol=1e-8, max_iter=100000)
            )
            lp = clf.fit(X[prefix], y[prefix]).predict_log_proba(X[block])
            bits -= lp[np.arange(len(block)), y[block]].sum() / math.log(2)
        assert r["mdl_bits"] == pytest.approx(bits, rel=0.005), r
        assert r["compression"] == pytest.approx(n * math.log2(K) / r["mdl_bits"])
        checked += 1
    assert checked >= 6


def test_mdl_compresses_a_separable_task_and_not_random_labels(tmp_path):
    sep = tmp_path / "sep.csv"
    separable(sep, n_per_class=60)
    shuffled = tmp_path / "random.csv"
    df = pd.read_csv(sep)
    df["label"] = np.random.default_rng(5).permutation(df["label"].to_numpy())
    df.to_csv(shuffled, index=False)
    found = {}
    for name, data in (("sep", sep), ("random", shuffled)):
        store = _extract(tmp_path / name, data, pooling=("mean",))
        res = heads("sweep", "--store", store, "--combine", "single", "--mdl", "--out", str(tmp_path / f"run-{name}"))
        assert res.exit_code == 0, res.output
        found[name] = [r["compression"] for r in _rows(tmp_path / f"run-{name}")]
    assert min(found["sep"]) > 3.0, found
    assert max(found["random"]) <= 1.05, found


def test_no_ci_turns_the_uncertainty_layer_off_but_keeps_the_predictions(noisy_store, tmp_path):
    res = heads("sweep", "--store", noisy_store, "--combine", "single", "--no-ci", "--out", str(tmp_path / "r"))
    assert res.exit_code == 0, res.output
    for r in _rows(tmp_path / "r"):
        assert r["accuracy_lo"] is None and r["p_vs_best"] is None and r["is_best"] is None
    assert (tmp_path / "r" / "predictions.npz").is_file()
    assert "--no-ci" in (tmp_path / "r" / "summary.md").read_text()


@pytest.mark.slow
def test_report_keeps_the_new_columns(noisy_sweep, tmp_path):
    res = heads("report", str(noisy_sweep), "--out", str(tmp_path / "rep"))
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "rep" / "report.csv")
    for column in ("f1_macro_lo", "f1_macro_hi", "p_vs_best_holm", "tied_with_best", "mdl_bits", "compression"):
        assert column in table.columns
    assert table["f1_macro_lo"].notna().all() and (table["f1_macro_lo"] <= table["f1_macro_mean"]).all()


@pytest.mark.slow
def test_predict_writes_the_same_arrays(noisy_sweep, tmp_path):
    out = tmp_path / "p.npz"
    res = CliRunner().invoke(
        heads_main,
        ["predict", "--run", str(noisy_sweep), "--predictions", str(out)],
        input="goal match striker\nstock bank market\nplanet orbit rocket\n",
    )
    assert res.exit_code == 0, res.output
    p = np.load(out)
    assert p["row_id"].tolist() == [0, 1, 2] and p["y_true"].tolist() == [-1, -1, -1] and p["run"].tolist() == [0, 0, 0]
    labels = [json.loads(line)["label"] for line in res.output.splitlines()]
    assert [str(p["label_names"][i]) for i in p["y_pred"]] == labels


# -- the random-weights control -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """random:tiny-bert saved as a local model directory (its 'pretrained' weights are seed 0's)."""
    return random_model_dir(tmp_path_factory.mktemp("tinymodel") / "model")


@pytest.mark.slow
def test_random_weights_store_is_reproducible_differs_and_keeps_the_rows(tiny_model_dir, noisy_store, tmp_path):
    data = open_store(noisy_store).provenance.sources[0]
    csv = tmp_path / "n.csv"
    noisy(csv)
    real = _extract(tmp_path / "real", csv, model=str(tiny_model_dir))
    ctl_a = _extract(tmp_path / "a", csv, model=str(tiny_model_dir), random_weights=3)
    ctl_b = _extract(tmp_path / "b", csv, model=str(tiny_model_dir), random_weights=3)
    other = _extract(tmp_path / "c", csv, model=str(tiny_model_dir), random_weights=4)
    r, a, b, o = (open_store(p) for p in (real, ctl_a, ctl_b, other))
    assert a.fingerprint == b.fingerprint and len({r.fingerprint, a.fingerprint, o.fingerprint}) == 3
    assert "random3" in Path(ctl_a).name and a.provenance.model["random_weights"] == 3
    for split in ("train", "test"):
        assert np.array_equal(a.pooled(split, "mean", [1]), b.pooled(split, "mean", [1]))
        assert not np.allclose(a.pooled(split, "mean", [1]), r.pooled(split, "mean", [1]))
        assert not np.allclose(a.pooled(split, "mean", [1]), o.pooled(split, "mean", [1]))
        assert np.array_equal(a.row_ids(split), r.row_ids(split)) and np.array_equal(a.labels(split), r.labels(split))
    assert data["sha256"] == r.provenance.sources[0]["sha256"]
    runs = {}
    for name, path in (("real", real), ("ctl", ctl_a)):
        res = heads("sweep", "--store", path, "--combine", "single", "--no-ci", "--out", str(tmp_path / f"s-{name}"))
        assert res.exit_code == 0, res.output
        runs[name] = json.loads((tmp_path / f"s-{name}" / "run.json").read_text())["eval_set"]["id"]
    assert runs["real"] == runs["ctl"]
    # and the control sweep: every configuration twice, the gain with its interval, the control curve drawn
    res = heads("sweep", "--store", real, "--control", ctl_a, "--combine", "single", "--out", str(tmp_path / "both"))
    assert res.exit_code == 0, res.output
    rows = _rows(tmp_path / "both")
    ctl_rows = {(r["layers"], r["pooling"]): r for r in _rows(tmp_path / "s-ctl")}
    for row in rows:
        twin = ctl_rows[(row["layers"], row["pooling"])]
        assert row["control_f1_macro"] == pytest.approx(twin["f1_macro"])  # same rows, carve and selection
        assert row["gain_f1_macro"] == pytest.approx(row["f1_macro"] - twin["f1_macro"])
        assert row["gain_f1_macro_lo"] <= row["gain_f1_macro"] <= row["gain_f1_macro_hi"]
    summary = (tmp_path / "both" / "summary.md").read_text()
    assert "random weights, seed 3" in summary and "control macro-F1" in summary


def test_random_weights_of_a_model_without_config_is_one_line(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    csv = separable(tmp_path / "s.csv", n_per_class=5)
    res = CliRunner().invoke(
        embstore_main,
        [
            "extract",
            "--model",
            str(bare),
            "--data",
            str(csv),
            "--label-col",
            "label",
            "--random-weights",
            "0",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "config.json" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "kind",
    [
        "other rows",
        pytest.param("other shape", marks=pytest.mark.slow),  # a store of the real MiniLM
        "itself",
        "mdl with folds",
        "mdl without linear",
    ],
)
def test_bad_control_and_mdl_options_are_one_line(kind, noisy_store, tmp_path):
    out = tmp_path / "run"
    if kind == "other rows":
        store = _extract(tmp_path / "x", separable(tmp_path / "s.csv", n_per_class=30))
        args, match = ["--control", store], "rows"
    elif kind == "other shape":
        store = _extract(tmp_path / "y", noisy(tmp_path / "n.csv"), model="minilm")
        args, match = ["--control", store], "another model shape"
    elif kind == "itself":
        args, match = ["--control", noisy_store], "the store itself"
    elif kind == "mdl with folds":
        args, match = ["--mdl", "--folds", "3"], "--folds"
    else:
        args, match = ["--mdl", "--head", "mlp"], "--head linear"
    res = heads("sweep", "--store", noisy_store, "--combine", "single", *args, "--out", str(out))
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_pretrained_layers_gain_over_the_random_encoder_on_ag_news(tmp_path):
    folder = needs_shared("ag_news")
    kw = dict(
        model="minilm",
        text_col="text",
        label_col="label",
        holdout=0.3,
        limit=500,
        max_length=64,
        pooling=("mean",),
        layers="3,6",
    )
    real = _extract(tmp_path / "r", folder / "test.csv", **kw)
    ctl = _extract(tmp_path / "c", folder / "test.csv", random_weights=0, **kw)
    res = heads("sweep", "--store", real, "--control", ctl, "--combine", "single", "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    for r in _rows(tmp_path / "run"):
        assert r["gain_f1_macro_lo"] > 0, r  # pretraining helps with a 95% interval above 0
