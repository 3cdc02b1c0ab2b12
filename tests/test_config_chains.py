"""Every config chain of configs/ and the docs runs as written, on a small --limit, and gives what its study depends on.

A chain is the commands a config's header (or a doc) says to run in turn: an extract config, then the sweep or train
config that reads its store; a pretrain config, then the fine-tune config that reads its model. Each chain is run
here through the two CLIs with the config as written plus ``--limit`` (and ``--out``, ``--store``, ``--model`` to tie
the steps together), then the options its study depends on are read back from what it wrote: freeze sets, head
shapes, learning rates, the split rule, balanced counts, the report epoch. The fast tests check that every config
is in a chain, that every config the docs name exists, and that every study config's header names its study and
its differences.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from factories import ROOT, needs_shared

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main

CONFIGS = ROOT / "configs"
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
SHARED_DATA = {"ag_news", "youtube_6class", "sentipers", "emodb", "wic"}


@dataclass(frozen=True)
class Step:
    """One command of a chain: ``cli`` ('embstore' or 'heads'), its arguments ({store}: the store the last extract
    printed; {out}: this step's directory; {prev}: the previous step's directory)."""

    cli: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Chain:
    name: str
    data: str | None
    """The shared data set it reads (the test skips without it); None for built-in data."""
    steps: tuple[Step, ...]
    check: Callable[[list[Path]], None] = field(default=lambda dirs: None)
    """Reads the steps' output directories (in step order) and asserts what the study depends on."""


def _cfg(name: str) -> str:
    return str(CONFIGS / name)


def _extract(config: str, limit: int) -> Step:
    return Step("embstore", ("extract", "--config", _cfg(config), "--limit", str(limit), "-q"))


def _run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta = json.loads((path / "run.json").read_text())
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines() if line.strip()]
    return meta, rows


def _head(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "best_head" / "head.json").read_text()))


# -- what each study depends on, read back from its runs ---------------------------------------------------------


def _check_gru(dirs: list[Path]) -> None:
    _, rows = _run(dirs[1])
    assert {(r["layers"], r["combine"], r["head"]) for r in rows} == {("6", "tokens", "gru")}
    _, rows = _run(dirs[2])
    assert {r["head"] for r in rows} == {"conv"} and {r["layers"] for r in rows} == {str(i) for i in range(7)}
    assert len(rows) == 7 * 3  # every layer 0..6 alone, 3 seeds


def _check_youtube(dirs: list[Path]) -> None:
    study = dirs[1]
    report = pd.read_csv(study / "report" / "report.csv")
    assert sorted(report["run"]) == sorted(["layer-6", "layer-5", "layer-4", "layer-3", "layers-6+5", "layers-6-3"])
    layers = dict(zip(report["run"], report["layers"].astype(str)))
    assert layers["layers-6+5"] == "5,6" and layers["layers-6-3"] == "3-6" and layers["layer-3"] == "3"
    for run in report["run"]:
        _, rows = _run(study / run)
        head = _head(study / run)
        cfg = head["config"]
        assert (cfg["conv_order"], cfg["report_epoch"], cfg["patience"]) == ("merge-first", "last", 0)
        assert (cfg["dropout"], cfg["standardize"], cfg["conv_hidden"]) == (0.0, False, 512)
        assert rows[0]["best_epoch"] == cfg["epochs"] - 1  # the last epoch is the one scored
        from heads.probe.estimator import HeadClassifier

        module = HeadClassifier.load(study / run / "best_head").module_
        assert module.strided.kernel_size == (3,) and module.strided.stride == (3,) and module.mlp[0].in_features == 128
        k = {"layers-6+5": 2, "layers-6-3": 4}.get(run, 1)
        assert module.merge.in_channels == k if k > 1 else module.merge.__class__.__name__ == "Identity"


def _freeze_check(run: Path, variant: str) -> None:
    meta, rows = _run(run)
    cfg = meta["config"]
    assert cfg["epochs"] == 5 and cfg["patience"] == 0 and cfg["split_reports"] is True
    assert len(rows[0]["history"]) == 5  # fixed epochs: no early stop
    assert sorted(rows[0]["extra"]["split_reports"]) == ["evaluation", "fit", "validation"]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(rows[0]["history"][0])
    if variant == "freeze-all-but-embeddings-and-last":
        from embstore.backbones.registry import load_backbone

        model = load_backbone(cfg["model"]).model
        n = model.config.num_hidden_layers
        expect = sum(p.numel() for p in model.embeddings.parameters()) + sum(
            p.numel() for p in model.encoder.layer[n - 1].parameters()
        )
        classifier = rows[0]["trainable_params"] - expect
        assert 0 < classifier <= (model.config.hidden_size + 1) * 3  # the rest is the linear classifier alone


def _check_sentiment(dirs: list[Path]) -> None:
    study = dirs[0]
    for variant in ("full", "freeze-0-4", "freeze-all-but-embeddings-and-last", "truncate-4", "prune-30pct"):
        _freeze_check(study / variant, variant)
    assert (study / "full" / "data.png").is_file() and (study / "full" / "learning_curves.png").is_file()


def _check_variants(dirs: list[Path]) -> None:
    report = pd.read_csv(dirs[0] / "report" / "report.csv")
    assert sorted(report["run"]) == sorted(["full", "freeze-0-4", "freeze-all-but-last", "truncate-4", "prune-30pct"])


def _check_emodb_store(dirs: list[Path]) -> None:
    meta, rows = _run(dirs[1])
    assert meta["augmented_rows"] > 0 and rows


def _speakers(meta: dict[str, Any]) -> tuple[set[str], set[str]]:
    table = pd.read_csv(ROOT.parent / "shared" / "datasets" / "emodb" / "labels.csv")
    rows = meta["rows"]
    return set(table["speaker"].iloc[rows["fit"]]), set(table["speaker"].iloc[rows["evaluation"]])


def _as_written(config: str, cfg: dict[str, Any], overridden: set[str]) -> None:
    """Every key of the YAML file ``config`` reached the run's config as written, but those the test overrides."""
    written = yaml.safe_load((CONFIGS / config).read_text())
    for key, value in written.items():
        if key in overridden:
            continue
        got = cfg[key]
        assert got == value or (isinstance(value, float) and got == pytest.approx(value)), (key, got, value)


def _check_speech_recipe(config: str, grouped: bool) -> Callable[[list[Path]], None]:
    def check(dirs: list[Path]) -> None:
        meta, rows = _run(dirs[0])
        cfg = meta["config"]
        _as_written(config, cfg, {"model", "epochs"})  # SPEECH_SMALL's overrides
        assert (cfg["lr"], cfg["head_lr"], cfg["batch_size"]) == (1e-5, 1e-5, 2)  # one lr for everything
        assert (cfg["classifier"], cfg["classifier_hidden"], cfg["freeze"]) == ("mlp", [3072], "feature-encoder")
        assert (cfg["holdout"], cfg["seed"], cfg["validation_fraction"]) == (0.2, 44, 0.5)
        assert (cfg["balance"], cfg["noise_std"], cfg["shift_max_seconds"]) == ("oversample", 0.005, 0.2)
        assert cfg["augment"] == "noise,shift,pitch" and cfg["eval_steps"] == 200
        assert meta["label_names"] == sorted("WLEAFTN")  # the emotion letter of each file name
        epoch = meta["data"]["fitting rows per epoch"]
        counts = [c for c in epoch["class_counts"] if c]
        originals = [c - a for c, a in zip(epoch["class_counts"], epoch["augmented_counts"])]
        assert counts == [max(originals)] * 7 and sum(epoch["augmented_counts"]) > 0  # all at the majority's count
        fit, held = _speakers(meta)
        assert (not fit & held) if grouped else bool(fit & held)  # the random split puts speakers on both sides
        assert sorted(rows[0]["extra"]["split_reports"]) == ["evaluation", "fit", "validation"]

    return check


def _check_wic_towers(dirs: list[Path]) -> None:
    meta, rows = _run(dirs[1])
    assert {(r["layers"], r["combine"], r["head"]) for r in rows} == {("3-6", "sum", "pair")}
    cfg = _head(dirs[1])["config"]
    assert (cfg["tower_merge"], cfg["tower_hidden"], cfg["pair_features"]) == ("sum", [128, 32], ["u", "v"])
    assert (cfg["lr"], cfg["batch_size"], cfg["epochs"], cfg["report_epoch"]) == (1e-4, 4, 10, "last")
    assert rows[0]["best_epoch"] == 9 and meta["val_split"] == "dev"
    _, rows = _run(dirs[2])
    assert {r["combine"] for r in rows} == {"sum"}


def _check_pretrain(dirs: list[Path]) -> None:
    meta = json.loads((dirs[0] / "run.json").read_text())
    cfg = meta["config"]
    assert (cfg["lr"], cfg["warmup_ratio"], cfg["schedule"], cfg["epochs"]) == (5e-5, 0.0, "linear", 50)
    assert cfg["swap_augment"] is True and cfg["whole_word"] is False and cfg["mask_prob"] == 0.15
    study = dirs[1]
    for run in ("mlp-5fold", "linear-5fold"):
        meta, rows = _run(study / run)
        assert len(rows) == 5 and meta["fold_ensemble"]["folds"] == [0, 1, 2, 3, 4]
        assert meta["fold_ensemble"]["split"] == "test" and 0 <= meta["fold_ensemble"]["accuracy"] <= 1
        assert len(list((study / run / "folds").glob("fold-*/model"))) == 5
    meta, _ = _run(study / "mlp")
    assert meta["config"]["classifier_hidden"] == [2048] and meta["config"]["classifier"] == "mlp"


SIX_LAYERS = ("--model", "random:{six}", "--max-length", "32")
"""The text fine-tune studies run on a tiny random BERT of MiniLM's depth (6 layers, 32 wide, MiniLM's tokenizer;
written by the test as {six}), so every freeze set, truncation and pruning of the config means what it means on
MiniLM: five MiniLM fine-tunes of 400 rows take about 40 minutes of this shared CPU."""
SIX_LAYER_MODEL = {
    "model_type": "bert",
    "num_hidden_layers": 6,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "vocab_size": 30522,
}

SPEECH_SMALL = ("--model", "random:hubert-tiny", "--epochs", "1")
"""The speech fine-tunes run with the tiny HuBERT for one epoch: random:hubert-base (as written) takes about 20
minutes of this CPU for 40 clips, and even the tiny one about 2 minutes per epoch of 200 clips (its conv front end
runs on every clip, frozen or not); every other option is the config's, checked against the file."""


def _finetune(config: str, limit: int, *extra: str) -> Step:
    return Step(
        "heads",
        ("finetune", "--config", _cfg(config), "--limit", str(limit), *extra, "--out", "{out}", "--no-progress"),
    )


def _on_store(command: str, config: str) -> Step:
    return Step("heads", (command, "--config", _cfg(config), "--store", "{store}", "--out", "{out}"))


CHAINS = [
    Chain(
        "ag-news-tokens",
        "ag_news",
        (
            _extract("extract-ag-news.yaml", 40),
            _on_store("train", "train-gru-tokens.yaml"),
            _on_store("sweep", "sweep-cls-conv.yaml"),
        ),
        _check_gru,
    ),
    Chain(
        "youtube-titles-conv",
        "youtube_6class",
        (_extract("extract-youtube-titles.yaml", 150), _on_store("sweep", "study-youtube-conv.yaml")),
        _check_youtube,
    ),
    Chain(
        "persian-sentiment",
        "sentipers",
        (_finetune("study-persian-sentiment.yaml", 30, *SIX_LAYERS),),
        _check_sentiment,
    ),
    # the first 400 rows of ag_news/train_pool.csv are the first to hold all four classes
    Chain(
        "finetune-variants",
        "ag_news",
        (_finetune("finetune-variants-ag-news.yaml", 400, *SIX_LAYERS, "--epochs", "2"),),
        _check_variants,
    ),
    Chain(
        "emodb-store",
        "emodb",
        (
            _extract("extract-emodb.yaml", 200),  # the table is sorted by speaker: enough rows for every class
            Step("heads", ("sweep", "--store", "{store}", "--layers", "-1", "--combine", "single", "--out", "{out}")),
        ),
        _check_emodb_store,
    ),
    # 200 rows: the table is sorted by speaker, and a speaker-disjoint split needs that many for every class to
    # reach training
    Chain(
        "speech-emotion-recipe",
        "emodb",
        (_finetune("study-speech-emotion.yaml", 200, *SPEECH_SMALL),),
        _check_speech_recipe("study-speech-emotion.yaml", grouped=False),
    ),
    Chain(
        "speech-emotion-speakers",
        "emodb",
        (_finetune("study-speech-emotion-speakers.yaml", 200, *SPEECH_SMALL),),
        _check_speech_recipe("study-speech-emotion-speakers.yaml", grouped=True),
    ),
    Chain("speech-emodb", "emodb", (_finetune("finetune-speech-emodb.yaml", 48, *SPEECH_SMALL),)),
    Chain(
        "wic-towers",
        "wic",
        (
            _extract("extract-wic-towers.yaml", 40),
            _on_store("sweep", "study-wic-towers.yaml"),
            _on_store("sweep", "sweep-pair-sum-last4.yaml"),
        ),
        _check_wic_towers,
    ),
    Chain(
        "pretrain-then-finetune",
        "wic",
        (
            Step(
                "heads",
                (
                    "pretrain",
                    "--config",
                    _cfg("study-pretrain-wic.yaml"),
                    "--limit",
                    "32",
                    "--out",
                    "{out}",
                    "--no-progress",
                ),
            ),
            _finetune("study-pretrain-finetune.yaml", 40, "--model", "{prev}/model"),
        ),  # fmt: skip
        _check_pretrain,
    ),
    Chain(
        "llm-sentiment",
        None,  # builtin:tweets and a tiny random Qwen2
        (
            Step(
                "embstore",
                ("extract", "--config", _cfg("extract-llm-sentiment.yaml"), "--limit", "60", "--holdout", "0.3", "-q"),
            ),
            Step("heads", ("sweep", "--store", "{store}", "--pooling", "last,mean", "--layers", "2", "--out", "{out}")),
        ),  # fmt: skip
    ),
    Chain(
        "pretrain-wic",
        "wic",
        (
            Step(
                "heads",
                ("pretrain", "--config", _cfg("pretrain-wic.yaml"), "--limit", "16", "--out", "{out}", "--no-progress"),
            ),
        ),  # fmt: skip
    ),
]


def _configs_of(chain: Chain) -> set[str]:
    return {Path(a).name for s in chain.steps for a in s.args if a.endswith(".yaml")}


# -- fast: the chains cover configs/ and the docs, the study headers say what they are -------------------------------


def test_every_config_is_in_a_chain():
    covered = set().union(*(_configs_of(c) for c in CHAINS))
    assert {p.name for p in CONFIGS.glob("*.yaml")} == covered


def test_every_config_the_docs_run_exists_and_is_in_a_chain():
    covered = set().union(*(_configs_of(c) for c in CHAINS))
    for doc in DOCS:
        for name in re.findall(r"--config\s+configs/([A-Za-z0-9_.-]+\.yaml)", doc.read_text()):
            assert (CONFIGS / name).is_file(), f"{doc.name} runs configs/{name}, which does not exist"
            assert name in covered, f"{doc.name} runs configs/{name}, which no chain of this test runs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("study-*.yaml")), ids=lambda p: p.name)
def test_every_study_config_names_its_study_and_its_differences(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"Study [A-E]\b", header), f"{path.name}: the header must name its study"
    assert "docs/studies.md" in header and "Deliberate differences" in header
    assert header.splitlines()[0].startswith(("# heads ", "# embstore ")), "the first line is the command to run"


def test_every_config_header_starts_with_the_command_that_runs_it():
    for path in CONFIGS.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert f"configs/{path.name}" in first or path.name.startswith("extract-"), path.name


# -- slow: run every chain -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.study
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: c.name)
def test_config_chain_runs_as_written(chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chain as the docs run it. The chains take from one to over fifteen minutes each on 2 cores, so they run
    only with ``EMBSTORE_STUDY_CHAINS=1`` (``EMBSTORE_STUDY_CHAINS=1 python -m pytest -m study``), beside the full
    suite, which they would take past its 10-minute budget."""
    if os.environ.get("EMBSTORE_STUDY_CHAINS") != "1":
        pytest.skip("the study chains run with EMBSTORE_STUDY_CHAINS=1 (minutes each on 2 cores; see README)")
    if chain.data is not None:
        needs_shared(chain.data)
    monkeypatch.chdir(ROOT)  # the configs name ../shared/datasets and configs/models relative to the checkout
    six = tmp_path / "six-layers.yaml"
    six.write_text(yaml.safe_dump(SIX_LAYER_MODEL))
    store = ""
    dirs: list[Path] = []
    for i, step in enumerate(chain.steps):
        out = tmp_path / f"step{i}"
        args = [
            a.format(store=store, out=out, prev=dirs[-1] if dirs else "", six=six)
            for a in step.args
        ]  # fmt: skip
        group = embstore_main if step.cli == "embstore" else heads_main
        result = CliRunner().invoke(group, args)
        assert result.exit_code == 0, f"{step.cli} {' '.join(args)}:\n{result.output}"
        if step.cli == "embstore":
            store = result.stdout.strip().splitlines()[-1]
            dirs.append(Path(store))
        else:
            dirs.append(out)
    chain.check(dirs)
    np.testing.assert_equal(len(dirs), len(chain.steps))
