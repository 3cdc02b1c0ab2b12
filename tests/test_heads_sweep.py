"""heads sweep / train / predict / report on tiny stores made here, plus one real MiniLM store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from factories import needs_shared, separable

from cli.heads_cli import main as heads_main
from embstore import ConfigError, ExtractConfig, LayerSpecError, extract, open_store
from heads.probe.specs import expand, parse_combine


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("sweepstore")
    data = separable(base / "sep.csv")
    return extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-bert",
                data=str(data),
                label_col="label",
                holdout=0.25,
                pooling=("cls", "mean"),
                tokens="-1",
                out=str(base),
            )
        ),
        show_progress=False,
    ).path


@pytest.fixture(scope="module")
def tower_store(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("towerstore")
    data = separable(base / "sep.csv")
    return extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-bert",
                data=str(data),
                label_col="label",
                holdout=0.25,
                text_pair_col="other",
                pair_mode="towers",
                pooling=("mean",),
                out=str(base),
            )
        ),
        show_progress=False,
    ).path


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(heads_main, list(args), input=input)


def test_expand_layers_and_combinations():
    combos = expand(
        layers="1-2",
        combine=parse_combine("single,concat,sum,mean,mix"),
        poolings=("cls",),
        heads=("linear",),
        store_layers=[0, 1, 2],
        store_poolings=["cls", "mean"],
        token_layers=[],
        towers=["text"],
        store_path="s",
    )
    assert [(c.layers_label, c.combine, c.head) for c in combos] == [
        ("1", "single", "linear"),
        ("2", "single", "linear"),
        ("1,2", "concat", "linear"),
        ("1,2", "sum", "linear"),
        ("1,2", "mean", "linear"),
        ("1,2", "mix", "mix"),
    ]
    one = expand(
        layers="-1",
        combine=("single", "concat"),
        poolings=("cls",),
        heads=("conv",),
        store_layers=[0, 1, 2],
        store_poolings=["cls"],
        token_layers=[],
        towers=["text"],
        store_path="s",
    )
    assert [(c.layers, c.combine) for c in one] == [((2,), "single")]


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"layers": "9-12"}, LayerSpecError, r"must name layers in \[0, 2\].*got '9-12'"),
        ({"poolings": ("max",)}, ConfigError, r"Pooling max is not in s; it stores cls"),
        ({"heads": ("gru",)}, ConfigError, r"'gru' head reads per-token states, but s has them for layers none"),
        ({"heads": ("pair",)}, ConfigError, r"'pair' head needs a store extracted in towers mode"),
    ],
)
def test_expand_errors(kw, exc, match):
    args = dict(
        layers="all",
        combine=("single",),
        poolings=("cls",),
        heads=("linear",),
        store_layers=[0, 1, 2],
        store_poolings=["cls"],
        token_layers=[],
        towers=["text"],
        store_path="s",
    )
    args.update(kw)
    with pytest.raises(exc, match=match):
        expand(**args)


def test_combine_spec_error():
    with pytest.raises(
        ConfigError, match=r"'combine' parameter .* must be a comma list of single, concat, sum, mean, mix\. Got 'avg'"
    ):
        parse_combine("avg")


@pytest.mark.slow
def test_sweep_writes_the_run_and_the_best_head_predicts(tiny_store, tmp_path):
    out = tmp_path / "run"
    res = run(
        "sweep",
        "--store",
        tiny_store,
        "--layers",
        "all",
        "--epochs",
        "20",
        "--lr",
        "0.02",
        "--batch-size",
        "16",
        "--seeds",
        "2",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out)
    for name in (
        "results.jsonl",
        "results.csv",
        "summary.md",
        "run.json",
        "metric_per_layer.png",
        "learning_curves.png",
        "confusion_best.png",
        "best_head/head.json",
        "best_head/head.safetensors",
    ):
        assert (out / name).is_file(), name
    df = pd.read_csv(out / "results.csv")
    assert {"layers", "combine", "pooling", "head", "seed", "accuracy", "f1_macro", "train_seconds"} <= set(df.columns)
    # 3 single layers + concat/mean/mix over 0-2 (sum is the mean's model after standardisation), cls and mean, two
    # seeds
    assert len(df) == (3 + 3) * 2 * 2 and "sum" not in set(df["combine"])
    assert set(df.layers.astype(str)) == {"0", "1", "2", "0-2"}
    assert df.val_f1_macro.notna().all() and df.val_accuracy.notna().all()
    assert df[df["head"] == "linear"].hp_C.notna().all()  # the C chosen on validation, per L-BFGS probe
    meta = json.loads((out / "run.json").read_text())
    assert df.accuracy.max() > meta["majority_accuracy"] + 0.3  # separable vocabulary: far above the majority class
    summary = (out / "summary.md").read_text()
    assert "best" in summary and tiny_store in summary
    assert "combine sum was not trained where mean is" in summary and "highest mean validation macro-F1" in summary
    # the best row and the saved head are the configuration with the highest mean validation macro-F1
    means = (
        df.astype({"layers": str})
        .groupby(["layers", "combine", "pooling", "head"])[["val_f1_macro", "val_accuracy"]]
        .mean()
    )
    top = means[(means.val_f1_macro == means.val_f1_macro.max())]
    top = top[top.val_accuracy == top.val_accuracy.max()]
    saved = json.loads((out / "best_head" / "head.json").read_text())["extra"]
    assert (saved["layers_label"], saved["combine"], saved["pooling"], saved["head"]) in set(top.index)
    best_line = next(line for line in summary.splitlines() if "← best (validation)" in line)
    assert (
        f"**{saved['layers_label']}** | **{saved['combine']}** | **{saved['pooling']}** | **{saved['head']}**"
        in best_line
    )
    assert meta["eval_set"]["rows"] == 30 and len(meta["eval_set"]["id"]) == 16
    pred = run(
        "predict",
        "--run",
        str(out),
        input="goal match striker keeper league cup\nplanet orbit rocket galaxy telescope\n",
    )
    assert pred.exit_code == 0, pred.output
    lines = [json.loads(x) for x in pred.stdout.strip().splitlines()]
    assert [x["label"] for x in lines] == ["sport", "space"]
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-4


def test_predict_equals_the_head_on_stored_features(tiny_store, tmp_path):
    """Texts re-encoded by heads predict give the same probabilities as the stored features."""
    from heads.probe.features import FeatureBank
    from heads.probe.predict import load_head, predict_texts
    from heads.probe.specs import Combo

    out = tmp_path / "run"
    assert (
        run(
            "sweep",
            "--store",
            tiny_store,
            "--layers",
            "1-2",
            "--combine",
            "concat",
            "--pooling",
            "mean",
            "--epochs",
            "3",
            "--out",
            str(out),
        ).exit_code
        == 0
    )
    est = load_head(str(out))
    store = open_store(tiny_store)
    src = store.provenance.sources[0]["path"]
    texts = pd.read_csv(src).text.tolist()
    rid = store.row_ids("test")[:20]
    _, proba = predict_texts(est, [texts[i] for i in rid])
    combo = Combo((1, 2), "concat", "mean", "linear")
    stored = est.predict_proba(FeatureBank(store, [combo], ["test"], 1 << 30).features(combo, "test", np.arange(20)))
    np.testing.assert_allclose(proba, stored, atol=1e-3)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param("mlp", marks=pytest.mark.slow),
        pytest.param("conv", marks=pytest.mark.slow),
        "sum",
        "mix",
        "gru",
        "lstm",
        "rnn",
    ],
)
def test_every_head_trains_from_the_store(tiny_store, tmp_path, head):
    out = tmp_path / head
    layers = "-1" if head in ("gru", "lstm", "rnn") else "1-2"
    res = run(
        "train" if head in ("gru", "lstm", "rnn") else "sweep",
        "--store",
        tiny_store,
        "--head",
        head,
        "--layers",
        layers,
        "--pooling",
        "mean",
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
        "--out",
        str(out),
        *(["--combine", "single,concat"] if head not in ("gru", "lstm", "rnn") else []),
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "results.csv")
    majority = json.loads((out / "run.json").read_text())["majority_accuracy"]
    assert df.accuracy.max() > majority + 0.2, df[["layers", "combine", "head", "accuracy"]]


def test_pair_head_on_a_towers_store(tower_store, tmp_path):
    out = tmp_path / "pair"
    res = run(
        "sweep",
        "--store",
        tower_store,
        "--head",
        "pair",
        "--layers",
        "1-2",
        "--combine",
        "mix",
        "--epochs",
        "15",
        "--lr",
        "0.01",
        "--batch-size",
        "16",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "results.csv")
    assert list(df["head"]) == ["pair"] and df.accuracy.iloc[0] > 0.6
    pred = run("predict", "--run", str(out), input="goal match cup\tstriker keeper league\n")
    assert pred.exit_code == 0, pred.output
    assert json.loads(pred.stdout)["label"] == "sport"


def test_folds_and_default_store(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSTORE_CACHE", str(Path(tiny_store).parent))
    res = run(
        "sweep",
        "--layers",
        "-1",
        "--combine",
        "single",
        "--pooling",
        "mean",
        "--folds",
        "3",
        "--epochs",
        "4",
        "--out",
        str(tmp_path / "f"),
    )
    assert res.exit_code == 0, res.output
    assert f"using store {tiny_store}" in res.stderr
    df = pd.read_csv(tmp_path / "f" / "results.csv")
    assert sorted(df.fold) == [0, 1, 2]


def test_report_merges_runs(tiny_store, tmp_path):
    for name, head in (("a", "linear"), ("b", "mlp")):
        assert (
            run(
                "sweep",
                "--store",
                tiny_store,
                "--head",
                head,
                "--layers",
                "-1",
                "--combine",
                "single",
                "--epochs",
                "3",
                "--hidden",
                "16",
                "--out",
                str(tmp_path / name),
            ).exit_code
            == 0
        )
    res = run("report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep"))
    assert res.exit_code == 0, res.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "linear" in text and "mlp" in text


def _bad(kind: str, tiny_store: str, tower_store: str, tmp_path: Path) -> tuple[list[str], str]:
    if kind == "incomplete":
        import shutil

        import zarr

        copy = tmp_path / "copy.zarr"
        shutil.copytree(tiny_store, copy)
        g = zarr.open_group(str(copy), mode="r+")
        g.attrs["embstore"] = {**g.attrs["embstore"], "complete": False}
        return ["--store", str(copy)], r"is incomplete .* re-run the same 'embstore extract'"
    if kind == "config_key":
        conf = tmp_path / "c.yaml"
        conf.write_text("layer: all\n")
        return ["--store", tiny_store, "--config", str(conf)], r"Unknown sweep config keys \['layer'\]"
    if kind == "absent_class":
        data = tmp_path / "absent.csv"
        df = pd.read_csv(separable(tmp_path / "s.csv"))
        train, test = df[df.label != "space"], df
        train.to_csv(tmp_path / "train.csv", index=False)
        test.to_csv(data, index=False)
        store = extract(
            ExtractConfig.from_dict(
                dict(
                    model="random:tiny-bert",
                    data=None,
                    splits=(("train", str(tmp_path / "train.csv")), ("test", str(data))),
                    label_col="label",
                    out=str(tmp_path),
                )
            ),
            show_progress=False,
        ).path
        return ["--store", store], r"Class 'space' has no rows in the training split 'train'"
    cases = {
        "layer": (["--store", tiny_store, "--layers", "5"], r"must name layers in \[0, 2\]"),
        "tokens": (["--store", tower_store, "--head", "gru"], r"'gru' head reads per-token states"),
        "pair": (["--store", tiny_store, "--head", "pair"], r"needs a store extracted in towers mode"),
        "head": (
            ["--store", tiny_store, "--head", "svm"],
            r"The --head option must be a comma list of linear, mlp, .*\. Got 'svm'",
        ),
        "eval_split": (
            ["--store", tiny_store, "--eval-split", "dev"],
            r"--eval-split 'dev' is not in .* its splits are train, test",
        ),
        "no_store": (["--store", str(tmp_path / "none.zarr")], r"No store at"),
    }
    return cases[kind]


@pytest.mark.parametrize(
    "kind", ["layer", "tokens", "pair", "head", "eval_split", "no_store", "incomplete", "config_key", "absent_class"]
)
def test_bad_input_is_one_line_exit_2(kind, tiny_store, tower_store, tmp_path):
    args, pattern = _bad(kind, tiny_store, tower_store, tmp_path)
    res = run("sweep", *args, "--epochs", "1", "--out", str(tmp_path / "r"))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err


@pytest.mark.slow
def test_real_minilm_store_beats_the_majority_class_and_equals_scikit_learn(tmp_path):
    """A real distribution: MiniLM on AG News (train_pool -> test), linear probes on the last layers, CLS (with its
    few huge dimensions) and mean. At a fixed C every probe is within one test row (0.33 points) of scikit-learn's
    make_pipeline(StandardScaler(), LogisticRegression(C=0.01)) on the same rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from heads.probe.config import HeadConfig
    from heads.probe.sweep import SweepConfig, run_sweep
    from heads.protocol import validation_carve

    ag = needs_shared("ag_news")
    store = extract(
        ExtractConfig.from_dict(
            dict(
                model="minilm",
                data=None,
                splits=(("train", str(ag / "train_pool.csv")), ("test", str(ag / "test.csv"))),
                label_col="label",
                limit=300,
                layers="-2--1",
                pooling=("cls", "mean"),
            )
        ),
        show_progress=False,
    ).path
    res = run_sweep(SweepConfig(store=store, layers="all", combine=("single", "concat"), out=str(tmp_path / "run")))
    df = pd.read_csv(res.run_dir / "results.csv")
    majority = json.loads((res.run_dir / "run.json").read_text())["majority_accuracy"]
    assert df.accuracy.min() > majority + 0.3, (df.accuracy.tolist(), majority)
    s = open_store(store)
    assert s.label_names == ["0", "1", "2", "3"]

    # C=0.01 from the default grid: at C=1, 270 training rows for up to 768 dims leave the optimum so flat that
    # scikit-learn itself moves by a test row (0.33 points here) between tol 1e-4 and 1e-6
    fixed = run_sweep(
        SweepConfig(
            store=store,
            layers="all",
            combine=("single", "concat"),
            head=HeadConfig(c_grid=(0.01,)),
            out=str(tmp_path / "fixed"),
        )
    )
    y, y_test = s.labels("train"), s.labels("test")
    fit, _ = validation_carve(y, 0.1, 0, row_ids=s.row_ids("train"))  # the rows the sweep fitted on (seed 0)
    for _, row in pd.read_csv(fixed.run_dir / "results.csv").iterrows():
        layers = [int(x) for x in str(row.layers).replace("-", ",").split(",")]
        X, X_test = (s.pooled(split, row.pooling, layers).astype(np.float32) for split in ("train", "test"))
        X, X_test = X.reshape(len(X), -1), X_test.reshape(len(X_test), -1)
        sk = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=1000)).fit(X[fit], y[fit])
        theirs = float(np.mean(sk.predict(X_test) == y_test))
        # one test row at most (1/300): with the fit rows of the sweep's validation carve (drawn in source-row
        # order) one borderline test row of one configuration flips between the two converged solvers
        assert abs(row.accuracy - theirs) <= 1 / len(y_test) + 1e-9, (
            row.layers,
            row["combine"],
            row.pooling,
            row.accuracy,
            theirs,
        )


def test_memory_budget_reads_per_configuration(tiny_store, tmp_path):
    """Over --max-memory the bank reads each configuration's layers when it trains (the linear solver's stream
    path is tested in test_heads_stream.py)."""
    from heads.probe.features import FeatureBank
    from heads.probe.specs import Combo

    store = open_store(tiny_store)
    combos = [Combo((x,), "single", "mean", "linear") for x in store.layers]
    full = FeatureBank(store, combos, ["train", "test"], 1 << 30)
    assert full.preloaded and full.needed == 120 * 3 * 32 * 2
    small = FeatureBank(store, combos, ["train", "test"], 10_000)  # one layer of one split is 90*32*2 = 5,760 bytes
    assert not small.preloaded
    for c in combos:
        np.testing.assert_array_equal(full.features(c, "train"), small.features(c, "train"))
    with pytest.raises(ConfigError, match=r"needs .* GB, over --max-memory"):
        FeatureBank(store, [Combo((0, 1, 2), "concat", "mean", "linear")], ["train"], 10_000).features(
            Combo((0, 1, 2), "concat", "mean", "linear"), "train"
        )


def test_train_takes_one_configuration_from_a_config_file(tiny_store, tmp_path):
    conf = tmp_path / "train.yaml"
    conf.write_text("layers: 1-2\ncombine: concat\npooling: mean\nhead: linear\nepochs: 3\n")
    res = run("train", "--config", str(conf), "--store", tiny_store, "--out", str(tmp_path / "t"))
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "t" / "results.csv")
    assert list(zip(df.layers.astype(str), df["combine"], df.pooling)) == [("1,2", "concat", "mean")]
    res = run("train", "--store", tiny_store, "--head", "linear,mlp", "--out", str(tmp_path / "u"))
    assert res.exit_code == 2 and "heads train trains one configuration; --head has 2 values" in res.stderr
