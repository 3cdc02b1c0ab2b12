"""heads finetune --model scratch:gru|lstm|rnn: the vocabulary of the training rows (and its round trip), the
recurrent classifier (batch invariance, aggregations, the study's MLP), the run (run.json, model/, heads predict)
and bad input; a slow test on a 2,000-row sample of ../shared/datasets/ag_news."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import needs_shared

from cli.heads_cli import main as heads_main
from embstore.errors import ConfigError
from heads.finetune.config import FinetuneConfig
from heads.finetune.run import run_finetune
from heads.finetune.scratch import RecurrentEncoder, ScratchClassifier, ScratchSpec, Vocabulary, words
from heads.report.results import read_run

WORDS = {
    "fruit": "apple banana cherry grape lemon mango peach".split(),
    "vehicle": "car truck bus train bicycle engine wheel".split(),
    "color": "red blue green yellow purple orange pink".split(),
}


@pytest.fixture
def sep_csv(tmp_path: Path) -> Path:
    rng = random.Random(0)
    names = list(WORDS)
    rows = [(" ".join(rng.choice(WORDS[names[i % 3]]) for _ in range(5)) + "!", names[i % 3]) for i in range(90)]
    path = tmp_path / "sep.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


def cfg(data: Path, out: Path, **kw: object) -> FinetuneConfig:
    base = dict(
        model="scratch:gru",
        data=str(data),
        text_col="text",
        label_col="label",
        holdout=0.25,
        lr=1e-2,
        head_lr=1e-2,
        epochs=4,
        patience=0,
        batch_size=8,
        vocab_min_count=2,
        embedding_dim=16,
        rnn_hidden=16,
        out=str(out),
    )
    base.update(kw)
    return FinetuneConfig.from_dict(base)


def test_words_lowercase_and_strip_punctuation():
    assert words("Wall St. Bears Claw-Back (Reuters) don't, U.S.!") == [
        "wall",
        "st",
        "bears",
        "clawback",
        "reuters",
        "dont",
        "us",
    ]
    assert words("Wall St.", lowercase=False) == ["Wall", "St"]


def test_vocabulary_counts_orders_and_round_trips(tmp_path):
    vocab = Vocabulary.build(["b a a", "c a b", "d"], min_count=2, lowercase=True)
    assert vocab.words == ["a", "b"] and len(vocab) == 4  # most frequent first; pad and unknown before them
    assert vocab.encode("A b zebra") == [2, 3, 1] and vocab.encode("...") == [1]
    assert vocab(["a b a b a"], max_length=3) == {"input_ids": [[2, 3, 2]]}
    vocab.save_pretrained(tmp_path)
    again = Vocabulary.load(tmp_path)
    assert again == vocab and again.encode("b, a; x") == vocab.encode("b, a; x")


def test_an_empty_vocabulary_names_the_option():
    with pytest.raises(ConfigError, match=r"no word occurs 50 times \(--vocab-min-count 50; the most frequent word "):
        Vocabulary.build(["a b", "a"], min_count=50, lowercase=True)


@pytest.mark.parametrize("core", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("aggregate", ["mean", "max", "last"])
def test_logits_do_not_depend_on_the_batch(core, aggregate):
    """Packed sequences: a row's logits are the same alone and padded in a batch of longer rows (bidirectional)."""
    torch.manual_seed(0)
    spec = ScratchSpec(core=core, vocab_size=20, embedding_dim=8, rnn_layers=2, rnn_hidden=6, bidirectional=True)
    clf = ScratchClassifier(RecurrentEncoder(spec), 3, pooling=aggregate, classifier="mlp", hidden=(5,)).eval()
    rows = [[2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (ids != 0).long()
    with torch.no_grad():
        batch = clf(ids, mask)
        alone = torch.cat([clf(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    torch.testing.assert_close(batch, alone, atol=1e-6, rtol=0)
    assert [type(m).__name__ for m in clf.head] == ["Tanh", "Linear", "Dropout", "Tanh", "Linear"]


def test_scratch_run_learns_saves_its_vocabulary_and_predicts(sep_csv, tmp_path):
    res = run_finetune(cfg(sep_csv, tmp_path / "run", classifier="mlp", classifier_hidden=[16]), show_progress=False)
    meta, (row,) = read_run(res.run_dir)
    assert meta["model"]["name"] == "scratch:gru" and meta["model"]["kind"] == "scratch"
    assert res.accuracy >= 0.9 and row.pooling == "mean" and row.combine == "finetune"
    assert res.trainable_params == res.total_params == meta["parameters"]["trainable"]
    # The vocabulary holds only training-row words; the evaluation rows are not counted.
    vocab = Vocabulary.load(res.run_dir / "model")
    df = pd.read_csv(sep_csv)
    fit_and_val = meta["rows"]["fit"] + meta["rows"]["validation"]
    expected = Vocabulary.build(df.text.iloc[sorted(fit_and_val)], min_count=2, lowercase=True)
    assert vocab == expected and meta["model"]["vocabulary_size"] == len(vocab.words)
    texts = df.text.iloc[meta["rows"]["evaluation"]].tolist()
    out = CliRunner().invoke(heads_main, ["predict", "--run", str(res.run_dir)], input="\n".join(texts) + "\n")
    assert out.exit_code == 0, out.output
    labels = [json.loads(x)["label"] for x in out.stdout.strip().splitlines()]
    truth = df.label.iloc[meta["rows"]["evaluation"]].tolist()
    assert np.mean([a == b for a, b in zip(labels, truth)]) == pytest.approx(res.accuracy)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--audio-col", "file"],
            r"--model scratch:gru trains on words from the training rows; it cannot read the audio",
        ),
        (["--vocab-min-count", "1000"], r"no word occurs 1000 times \(--vocab-min-count 1000"),
        (["--freeze", "0"], "--freeze does not apply to --model scratch:gru"),
        (["--lora", "4"], "--lora does not apply to --model scratch:gru"),
        (["--model", "scratch:transformer"], "names no recurrent core; use one of scratch:gru, scratch:lstm"),
        (["--model", "random:tiny-bert", "--aggregate", "max"], "--aggregate pools a scratch: model"),
    ],
)
def test_bad_scratch_input_is_one_line_and_writes_nothing(sep_csv, tmp_path, flags, message):
    import re

    out = tmp_path / "run"
    args = ["finetune", "--model", "scratch:gru", "--data", str(sep_csv), "--holdout", "0.25", "--label-col", "label"]
    if "--audio-col" not in flags:
        args += ["--text-col", "text"]
    result = CliRunner().invoke(heads_main, [*args, "--out", str(out), *flags])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_scratch_gru_on_a_2000_row_ag_news_sample(tmp_path):
    """A GRU from nothing on 2,000 rows of AG News (1,600 train, 400 held out): well above the majority class.
    Measured: 0.75 held-out accuracy (a tf-idf logistic regression on the same rows reaches 0.85; the study's
    89.8-91.7% come from 120,000 training rows)."""
    pool = needs_shared("ag_news") / "train_pool.csv"
    sample = pd.read_csv(pool).sample(2000, random_state=0)[["text", "label"]]
    data = tmp_path / "ag2k.csv"
    sample.to_csv(data, index=False)
    config = cfg(
        data,
        tmp_path / "run",
        holdout=0.2,
        epochs=6,
        patience=3,
        batch_size=32,
        max_length=256,
        schedule="exponential",
        gamma=0.9,
        max_grad_norm=0,
        embedding_dim=64,
        rnn_hidden=64,
        classifier="mlp",
        classifier_hidden=[64],
    )
    res = run_finetune(config, show_progress=False)
    meta, _ = read_run(res.run_dir)
    assert res.accuracy >= 0.70 and res.accuracy > meta["majority_accuracy"] + 0.4, res.accuracy


def test_exponential_epoch_steps_the_rate_once_per_epoch():
    """schedule exponential-epoch: torch's ExponentialLR stepped per epoch (a staircase), not the smooth decay."""
    from heads.protocol.schedule import make_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "exponential-epoch", warmup=0, total=9, per_epoch=3, gamma=0.5)
    rates = []
    for _ in range(9):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
