"""Word- and edge-level probing: CoNLL-U and word tables in, words aligned to subwords, word states in the store,
word/edge/arc/regression sweeps, control tasks and selectivity, ridge, and the errors of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from factories import needs_shared

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, extract, open_store
from embstore.data.tables import load_dataset
from embstore.data.words import WordRow, tree_depths, tree_distances
from embstore.extraction.encode import tokenize
from embstore.extraction.words import align_words, batch_index

# a tiny grammar: DET (ADJ) NOUN VERB DET NOUN PUNCT; the verb heads the sentence
LEXICON = {
    "DET": ["the", "a", "this"],
    "ADJ": ["big", "unbelievable", "green"],
    "NOUN": ["dog", "tokenizer", "house", "Cat"],
    "VERB": ["sees", "likes", "builds"],
    "PUNCT": [".", "!"],
}


def write_conllu(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for s in range(n):
        words: list[tuple[str, str]] = [("DET", rng.choice(LEXICON["DET"]))]
        if rng.random() < 0.5:
            words.append(("ADJ", rng.choice(LEXICON["ADJ"])))
        words += [("NOUN", rng.choice(LEXICON["NOUN"])), ("VERB", rng.choice(LEXICON["VERB"]))]
        words += [("DET", rng.choice(LEXICON["DET"])), ("NOUN", rng.choice(LEXICON["NOUN"]))]
        words.append(("PUNCT", rng.choice(LEXICON["PUNCT"])))
        verb = next(i for i, (p, _) in enumerate(words) if p == "VERB") + 1
        subj, obj = verb - 1, verb + 2
        lines.append(f"# sent_id = s{s}")
        for i, (pos, form) in enumerate(words, start=1):
            if pos == "VERB":
                head, rel = 0, "root"
            elif pos == "PUNCT":
                head, rel = verb, "punct"
            elif i == subj:
                head, rel = verb, "nsubj"
            elif i < verb:
                head, rel = subj, ("det" if pos == "DET" else "amod")
            else:
                head, rel = (verb, "obj") if i == obj else (obj, "det")
            lines.append(f"{i}\t{form}\t{form.lower()}\t{pos}\t{pos[:2]}\t_\t{head}\t{rel}\t_\t_")
        if s == 0:  # a multi-word token line and an empty node: not words
            lines.insert(len(lines) - len(words), "1-2\tthedog\t_\t_\t_\t_\t_\t_\t_\t_")
            lines.append("7.1\tghost\tghost\tX\tX\t_\t_\t_\t_\t_")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def word_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("words")
    data = write_conllu(base / "tiny.conllu", 60)
    cfg = ExtractConfig.from_dict(
        dict(
            model="random:tiny-bert",
            data=str(data),
            holdout=0.25,
            word_pooling="first,last,mean",
            tokens="all",
            dtype="float32",
            batch_size=7,
            chunk_rows=16,
            out=str(base / "store.zarr"),
        )
    )
    return extract(cfg, show_progress=False).path


def _tokenizer():  # the tokenizer of random:tiny-bert (MiniLM's)
    from transformers import AutoTokenizer

    from embstore.backbones.registry import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_words_align_to_subwords_as_checked_by_hand():
    tok = _tokenizer()
    row = WordRow(forms=("Unbelievably", ",", "the", "tokenizer's", "offsets", "work", "!"))
    enc = tokenize(tok, [row.text], None, 64)
    assert tok.convert_ids_to_tokens(enc.ids[0]) == [
        "[CLS]", "un", "##bel", "##ie", "##va", "##bly", ",", "the", "token", "##izer", "'", "s", "offset", "##s",
        "work", "!", "[SEP]",
    ]  # fmt: skip
    aligned = align_words(tok, [row], enc.ids, 64)
    assert aligned.spans[0].tolist() == [[1, 6], [6, 7], [7, 8], [8, 12], [12, 14], [14, 15], [15, 16]]
    assert not aligned.cut.any()
    # cut at 6 tokens: the first word lost its last subword, the rest lost everything: all counted as truncated
    short = tokenize(tok, [row.text], None, 6)
    cut = align_words(tok, [row], short.ids, 6)
    assert cut.spans[0].tolist() == [[0, 0]] * 7 and cut.truncated.all() and not cut.empty.any()
    index = batch_index(aligned.spans, width=17)
    assert index.first.tolist() == [1, 6, 7, 8, 12, 14, 15] and index.last.tolist() == [5, 6, 7, 11, 13, 14, 15]
    assert index.counts.tolist() == [5, 1, 1, 4, 2, 1, 1]


def test_conllu_rows_skip_multiword_tokens_and_empty_nodes(tmp_path: Path):
    ds = load_dataset(data=str(write_conllu(tmp_path / "t.conllu", 3)))
    first = ds.splits["all"].words[0]
    assert "thedog" not in first.forms and "ghost" not in first.forms and first.heads is not None
    assert ds.splits["all"].texts[0] == " ".join(first.forms)
    assert ds.word_labels is not None and set(ds.word_labels) == {"upos", "xpos", "deprel"}
    depth = tree_depths(np.array(first.heads), np.array([0, len(first.forms)]))
    assert depth[first.heads.index(0)] == 0 and depth.min() == 0 and (depth > 0).sum() == len(depth) - 1
    assert tree_depths(np.array([2, 1]), np.array([0, 2])).tolist() == [-1, -1]  # a cycle is no tree
    d = tree_distances(np.array([2, 0, 2]))
    assert d.tolist() == [[0, 1, 2], [1, 0, 1], [2, 1, 0]]


def test_word_states_are_the_pooled_subword_states(word_store: str):
    store = open_store(word_store)
    assert store.meta.schema_version == 2 and store.word_poolings == ["first", "last", "mean"]
    tok = _tokenizer()
    for split in store.splits:
        ds_rows = [WordRow(forms=tuple(f)) for f in _sentences(store, split)]
        enc = tokenize(tok, [r.text for r in ds_rows], None, 128)
        aligned = align_words(tok, ds_rows, enc.ids, 128)
        offsets = store.word_offsets(split)
        assert len(store.word_sentence(split)) == offsets[-1] == len(store.word_forms(split))
        for layer in store.layers:
            tokens = store.tokens(split, layer)
            states = {p: store.word_states(split, [layer], p)[:, 0] for p in store.word_poolings}
            for i, spans in enumerate(aligned.spans):
                for w, (a, b) in enumerate(spans):
                    j = offsets[i] + w
                    np.testing.assert_allclose(states["first"][j], tokens[i][a], atol=1e-6)
                    np.testing.assert_allclose(states["last"][j], tokens[i][b - 1], atol=1e-6)
                    np.testing.assert_allclose(states["mean"][j], tokens[i][a:b].mean(0), atol=1e-5)
    assert store.word_states("train").shape == (store.layout.splits["train"].n_words, len(store.layers), 32)
    assert store.verify() == []


def _sentences(store, split: str) -> list[list[str]]:
    forms, offsets = store.word_forms(split), store.word_offsets(split)
    return [forms[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def test_plan_counts_the_word_states_to_the_byte(tmp_path: Path):
    from embstore.extraction.estimate import plan_extraction

    data = write_conllu(tmp_path / "p.conllu", 20)
    cfg = ExtractConfig.from_dict(
        dict(model="random:tiny-bert", data=str(data), word_pooling="first,mean", out=str(tmp_path / "p.zarr"))
    )
    report = plan_extraction(cfg)
    assert report.bytes_exact and report.bytes_detail["words"]["first"] > 0
    assert report.splits["all"]["words"] == sum(1 for line in data.read_text().splitlines() if line[:1].isdigit()) - 2
    assert report.bytes == open_store(extract(cfg, show_progress=False).path).nbytes()


def test_a_word_table_with_a_tokens_column_works_and_a_short_label_list_names_its_row(tmp_path: Path):
    df = pd.DataFrame(
        {
            "tokens": [["the", "dog", "barks"], ["a", "cat", "sleeps", "."]],
            "pos": [["DET", "NOUN", "VERB"], ["DET", "NOUN", "VERB", "PUNCT"]],
            "head": [[2, 3, 0], [2, 3, 0, 3]],
        }
    )
    good = tmp_path / "w.jsonl"
    df.to_json(good, orient="records", lines=True)
    ds = load_dataset(data=str(good))
    assert ds.word_labels == {"pos": ["DET", "NOUN", "PUNCT", "VERB"]} and ds.splits["all"].words[1].heads == (
        2,
        3,
        0,
        3,
    )
    bad = tmp_path / "bad.jsonl"
    df.assign(pos=[["DET", "NOUN"], ["DET", "NOUN", "VERB", "PUNCT"]]).to_json(bad, orient="records", lines=True)
    out = tmp_path / "never.zarr"
    result = CliRunner().invoke(
        embstore_main, ["extract", "-q", "--model", "random:tiny-bert", "--data", str(bad), "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "row 0: column 'pos' has 2 labels for 3 words" in result.stderr and not out.exists()


def test_a_conllu_line_with_the_wrong_column_count_names_the_file_and_line(tmp_path: Path):
    path = write_conllu(tmp_path / "c.conllu", 4)
    lines = path.read_text().splitlines()
    lines[9] = "\t".join(lines[9].split("\t")[:7])  # a word line of sentence 2 loses three columns
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "never.zarr"
    result = CliRunner().invoke(
        embstore_main, ["extract", "-q", "--model", "random:tiny-bert", "--data", str(path), "--out", str(out)]
    )
    assert result.exit_code == 2 and not out.exists()
    assert f"{path} line 10 has 7 tab-separated columns, CoNLL-U needs 10" in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        result.stderr.strip().splitlines()[-1]
    ]


def test_control_labels_are_a_function_of_the_word_type_alone():
    from heads.probe.word import control_labels

    dist = np.array([0.5, 0.3, 0.2])
    types = ["the", "dog", "the", "cat", "dog", "the"]
    a = control_labels(types, dist, seed=0)
    assert a[0] == a[2] == a[5] and a[1] == a[4]
    # another type list, other neighbours: every type keeps its label
    b = control_labels(["zebra", "cat", "the", "dog"], dist, seed=0)
    assert (b[1], b[2], b[3]) == (a[3], a[0], a[1])
    many = control_labels([f"w{i}" for i in range(20000)], dist, seed=0)
    np.testing.assert_allclose(np.bincount(many, minlength=3) / 20000, dist, atol=0.02)  # drawn from the distribution
    assert not np.array_equal(control_labels([f"w{i}" for i in range(200)], dist, seed=1), many[:200])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_selectivity_is_accuracy_minus_control_accuracy_row_by_row(word_store: str, tmp_path: Path):
    from heads.probe.sweep import SweepConfig, run_sweep

    res = run_sweep(
        SweepConfig.from_dict(
            dict(
                store=word_store,
                task="word",
                label="upos",
                combine="single",
                control_task=True,
                out=str(tmp_path / "r"),
            )
        ),
        show_progress=False,
    )
    rows = _rows(res.run_dir)
    assert len(rows) == 9  # 3 layers x 3 word poolings
    for r in rows:
        assert r["selectivity"] == pytest.approx(r["accuracy"] - r["control_task_accuracy"], abs=1e-12)
        assert r["selectivity_lo"] <= r["selectivity"] <= r["selectivity_hi"]
        assert r["control_task_accuracy_lo"] <= r["control_task_accuracy"] <= r["control_task_accuracy_hi"]
    meta = json.loads((res.run_dir / "run.json").read_text())
    assert "Hewitt & Liang" in meta["task"]["control_task"]["citation"] and meta["timings"]["control_task_s"] > 0
    summary = (res.run_dir / "summary.md").read_text()
    assert "## Accuracy and selectivity per layer" in summary and "most selective" in summary
    assert "- task: word (label `upos`, word pooling first, last, mean" in summary
    assert (res.run_dir / "selectivity_per_layer.png").is_file()
    preds = np.load(res.run_dir / "predictions.npz")
    assert {"sentence_id", "word_id"} <= set(preds.files)
    np.testing.assert_array_equal(preds["row_id"], preds["sentence_id"] * 65536 + preds["word_id"])


def test_carves_keep_every_sentences_words_on_one_side(word_store: str):
    from heads.probe.sweep import SweepConfig, _setup

    for task, label in (("word", "upos"), ("edge", "deprel")):
        setup = _setup(SweepConfig.from_dict(dict(store=word_store, task=task, label=label, seeds=2)), word_store)
        store = setup.store
        for rnd in setup.rounds:
            fit = set(store.groups(rnd.train_split)[rnd.fit_rows])
            val = set(store.groups(rnd.val_split)[rnd.val_rows])
            assert fit and val and not fit & val
            assert rnd.eval_split == "test" and rnd.train_split == "train"


def test_a_one_split_word_store_is_carved_by_sentence(tmp_path: Path):
    from heads.probe.sweep import SweepConfig, _setup

    data = write_conllu(tmp_path / "one.conllu", 40, seed=3)
    path = extract(
        ExtractConfig.from_dict(dict(model="random:tiny-bert", data=str(data), out=str(tmp_path / "one.zarr"))),
        show_progress=False,
    ).path
    setup = _setup(SweepConfig.from_dict(dict(store=path, task="word", label="upos")), path)
    rnd = setup.rounds[0]
    groups = setup.store.groups("all")
    sides = [set(groups[rnd.fit_rows]), set(groups[rnd.val_rows]), set(groups[rnd.eval_rows])]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


def test_ridge_equals_scikit_learn_at_the_same_penalty():
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    from heads.probe.ridge import fit_ridge_path

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(400, 12)) * rng.uniform(0.5, 5, 12) + rng.normal(size=12)).astype(np.float32)
    y = X @ rng.normal(size=12) + rng.normal(size=400)

    def blocks():
        return ((X[i : i + 50], y[i : i + 50]) for i in range(0, 400, 50))

    for standardize in (False, True):
        path = fit_ridge_path(blocks, 12, (0.1, 10.0, 1000.0), standardize=standardize)
        Xs = StandardScaler().fit_transform(X.astype(np.float64)) if standardize else X.astype(np.float64)
        for k, alpha in enumerate(path.alphas):
            ref = Ridge(alpha=alpha).fit(Xs, y)
            np.testing.assert_allclose(path.predict(X, k), ref.predict(Xs), atol=1e-4)
            if not standardize:
                np.testing.assert_allclose(path.weights[k], ref.coef_, atol=1e-4)
                assert path.intercepts[k] == pytest.approx(ref.intercept_, abs=1e-4)


@pytest.mark.parametrize(
    "args, metric",
    [
        (["--task", "regression", "--label", "depth"], "r2"),
        (["--task", "edge", "--label", "distance"], "r2"),
        (["--task", "arc", "--control-task"], "uas"),
    ],
)
def test_edge_arc_and_regression_tasks_run_end_to_end_with_intervals(word_store: str, tmp_path: Path, args, metric):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        heads_main,
        ["sweep", "--store", word_store, "--layers", "0-1", "--pooling", "first", "--combine", "single",
         "--c-grid", "0.1,10", "--out", str(out), *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 2 and all(r["metric"] == metric for r in rows)
    for r in rows:
        assert r["value_lo"] <= r["value"] <= r["value_hi"]
    assert sum(r["is_best"] for r in rows) == 1 and {r["vs_best"] for r in rows} <= {"best", "tied", "worse", "better"}
    if "--control-task" in args:
        assert all(r["selectivity"] == pytest.approx(r["value"] - r["control_task_accuracy"]) for r in rows)
    summary = (out / "summary.md").read_text()
    assert "## Answer" in summary and "95% CI" in summary and (out / "metric_per_layer.png").is_file()


def test_the_edge_classification_task_reads_pair_features(word_store: str):
    from heads.probe.word import ExampleStore

    base = open_store(word_store)
    view = ExampleStore.open(base, "edge", "deprel", base.splits, "train")
    X = view.pooled("train", "first", [1])
    ex = view.examples["train"]
    states = base.word_states("train", [1], "first")
    h = states.shape[2]
    assert X.shape == (len(ex), 1, 3 * h)
    np.testing.assert_allclose(X[:, 0, :h], states[ex.dep, 0])
    np.testing.assert_allclose(X[:, 0, h : 2 * h], states[ex.head, 0])
    np.testing.assert_allclose(X[:, 0, 2 * h :], states[ex.dep, 0] * states[ex.head, 0], rtol=1e-6)
    assert "root" not in view.label_names  # the root has no head word: not an edge


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "word", "--label", "upos"], r"--task word needs word states, and .* has none"),
        (["--task", "regression", "--control-task"], "draws a random label per word type for classification"),
        (["--task", "word", "--label", "depth", "--control-task"], "--label depth is a regression task"),
        (["--task", "word"], "--task word needs --label NAME"),
    ],
)
def test_bad_word_sweeps_stop_with_one_line_and_write_nothing(tiny_csv: Path, tmp_path: Path, args, message):
    import re

    store = extract(
        ExtractConfig.from_dict(
            dict(model="random:tiny-bert", data=str(tiny_csv), label_col="label", out=str(tmp_path / "s.zarr"))
        ),
        show_progress=False,
    ).path
    out = tmp_path / "run"
    result = CliRunner().invoke(heads_main, ["sweep", "--store", store, "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert not out.exists()


def test_rank_constrained_probes_and_mlp_widths_are_one_configuration_each(word_store: str, tmp_path: Path):
    from heads.probe.sweep import SweepConfig, run_sweep

    res = run_sweep(
        SweepConfig.from_dict(
            dict(
                store=word_store,
                task="word",
                label="upos",
                layers="1",
                pooling="first",
                combine="single",
                heads="linear,mlp",
                ranks="2,4",
                mlp_widths="8,16",
                epochs=3,
                control_task=True,
                out=str(tmp_path / "rk"),
            )
        ),
        show_progress=False,
    )
    rows = _rows(res.run_dir)
    assert sorted(r["head"] for r in rows) == ["linear", "mlp-16", "mlp-8", "rank-2", "rank-4"]
    params = {r["head"]: r["trainable_params"] for r in rows}
    assert params["rank-2"] < params["rank-4"] and params["mlp-8"] < params["mlp-16"]
    assert next(r for r in rows if r["head"] == "rank-4")["hyperparameters"]["rank"] == 4
    assert "most selective" in (res.run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_upos_of_minilm_on_a_treebank_no_one_here_has_seen(tmp_path: Path):
    """UD English-EWT (dev as training, test as evaluation; 600 sentences each): a linear probe of MiniLM's middle
    layers reaches UPOS accuracy 0.90, and selectivity is positive on every layer above the embeddings."""
    ud = needs_shared("ud_ewt")
    path = extract(
        ExtractConfig.from_dict(
            dict(
                model="minilm",
                data=None,
                splits=(("train", str(ud / "dev.conllu")), ("test", str(ud / "test.conllu"))),
                limit=600,
                out=str(tmp_path / "ewt.zarr"),
            )
        ),
        show_progress=False,
    ).path
    from heads.probe.sweep import SweepConfig, run_sweep

    res = run_sweep(
        SweepConfig.from_dict(
            dict(store=path, task="word", label="upos", combine="single", control_task=True, out=str(tmp_path / "r"))
        ),
        show_progress=False,
    )
    rows = {int(r["layers"]): r for r in _rows(res.run_dir)}
    assert max(rows[layer]["accuracy"] for layer in (2, 3, 4)) >= 0.90
    assert all(rows[layer]["selectivity_lo"] > 0 for layer in range(1, 7))
