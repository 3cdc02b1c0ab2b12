"""heads pretrain: tokenizer, masking, the loop on real WiC text, the saved model/ directory, resume, bad input."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import needs_shared

from cli.heads_cli import main as heads_main
from embstore.errors import ConfigError, DataError
from heads.pretrain.config import PretrainConfig
from heads.pretrain.masking import IGNORE, Corpus, PretrainCollator, mask_tokens
from heads.pretrain.report import read_log
from heads.pretrain.run import run_pretrain
from heads.pretrain.tokenizer import train_wordpiece

TINY = {
    "vocab_size": 200,
    "min_frequency": 1,
    "layers": 2,
    "hidden": 32,
    "heads": 2,
    "max_length": 32,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_ratio": 0.0,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and two threads stall when the other core is busy.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _wic_sentences(tmp_path: Path, rows: int) -> Path:
    wic = needs_shared("wic")
    df = pd.read_csv(wic / "train.csv").head(rows)
    path = tmp_path / "wic.csv"
    df[["sentence1", "sentence2", "label"]].to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_mlm_loss_falls_on_real_text(tmp_path):
    data = _wic_sentences(tmp_path, 400)
    res = run_pretrain(
        PretrainConfig.from_dict(
            {**TINY, "data": str(data), "text_col": "sentence1", "max_steps": 60, "out": str(tmp_path / "run")}
        ),
        show_progress=False,
    )
    log = read_log(res.run_dir)
    assert [h["epoch"] for h in log] == [0, 1, 2] and log[0]["steps"] == 0 and res.steps == 60
    assert log[0]["heldout_perplexity"] == pytest.approx(math.exp(log[0]["heldout_mlm_loss"]), rel=1e-6)
    # From about ln(vocab) at initialisation to clearly below it, on held-out text too.
    assert res.heldout_mlm_loss < log[0]["heldout_mlm_loss"] - 0.5, log
    assert log[-1]["train_mlm_loss"] < log[1]["train_mlm_loss"]
    assert res.heldout_masked_accuracy > log[0]["heldout_masked_accuracy"] + 0.05
    assert res.tokens_per_second > 0 and all(h["tokens_per_second"] > 0 for h in log[1:])
    for name in (
        "run.json",
        "pretrain_log.jsonl",
        "loss_curve.png",
        "summary.md",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "checkpoint/pretrain_state.json",
    ):
        assert (res.run_dir / name).is_file(), name
    meta = json.loads((res.run_dir / "run.json").read_text())
    assert meta["kind"] == "pretrain" and meta["final"]["stopped_by"] == "max_steps"
    assert meta["corpus"]["eval_rows"] == 20 and meta["corpus"]["train_rows"] == 380


@pytest.mark.parametrize("prob", [0.15, 0.4])
@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_statistics_match_mask_prob(prob, whole_word):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 5000, (400, 64), generator=gen)
    candidates = torch.ones_like(ids, dtype=torch.bool)
    candidates[:, 0] = candidates[:, -1] = False  # [CLS] ... [SEP]
    words = (torch.arange(64) // 2).expand(400, 64).clone() if whole_word else None  # 2 pieces per word
    inputs, labels = mask_tokens(
        ids, candidates, mask_prob=prob, mask_id=4, vocab_size=5000, generator=gen, word_ids=words
    )
    selected = labels != IGNORE
    assert not selected[~candidates].any()
    assert selected[candidates].float().mean().item() == pytest.approx(prob, abs=0.01)
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(inputs[~selected], ids[~selected])
    n = selected.sum().item()
    masked = (inputs[selected] == 4).sum().item() / n
    unchanged = (inputs[selected] == ids[selected]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.02) and unchanged == pytest.approx(0.1, abs=0.015)
    assert 1 - masked - unchanged == pytest.approx(0.1, abs=0.015)  # random replacements
    if whole_word:  # both pieces of a word share the decision (positions 0/63 are specials)
        inner = selected[:, 2:62].reshape(400, 30, 2)
        assert torch.equal(inner[..., 0], inner[..., 1])


def test_collator_builds_pairs_swaps_and_pair_labels():
    corpus = Corpus(a=[[10, 11, 12], [20, 21], [30]], b=[[40, 41], [50], [60, 61, 62, 63, 64, 65]])
    kw = {"cls_id": 2, "sep_id": 3, "pad_id": 0, "mask_id": 4, "vocab_size": 100, "max_length": 8, "mask_prob": 0.01}
    batch = PretrainCollator(corpus, **kw)([(0, 0), (0, 1), (2, 0)])
    labels = batch["labels"]
    ids = torch.where(labels != IGNORE, labels, batch["input_ids"])  # undo the (rare) masking
    assert ids[0, :7].tolist() == [2, 10, 11, 12, 3, 40, 41] and ids[0, 7].item() == 3
    assert ids[1].tolist() == [2, 40, 41, 3, 10, 11, 12, 3]  # order 1: swapped
    assert ids[2].tolist() == [2, 30, 3, 60, 61, 62, 63, 3]  # longest-first truncation to 8
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    sop = PretrainCollator(corpus, **kw, pair_objective="sop")
    for _ in range(5):
        b = sop([(0, 0)] * 8)
        first = torch.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])[:, 1]
        assert torch.equal(b["pair_labels"], (first == 40).long())  # label 1 exactly when B comes first
    nsp = PretrainCollator(corpus, **kw, pair_objective="nsp")([(0, 0)] * 32)
    second = torch.where(nsp["labels"] != IGNORE, nsp["labels"], nsp["input_ids"])[:, 5]
    assert torch.equal(nsp["pair_labels"], (second != 40).long()) and 0 < nsp["pair_labels"].sum() < 32


def test_tokenizer_lowercase_and_cjk_characters():
    texts = ["Apple pie 你好世界", "apple tart 世界和平", "APPLE juice"] * 20
    cased = train_wordpiece(texts, vocab_size=120, min_frequency=1, lowercase=False)
    lower = train_wordpiece(texts, vocab_size=120, min_frequency=1, lowercase=True)
    assert "Apple" in cased.get_vocab() and "Apple" not in lower.get_vocab()
    assert lower.tokenize("你好世界") == ["你", "好", "世", "界"]  # one token per ideograph
    assert train_wordpiece(texts, vocab_size=120, min_frequency=1, cjk_chars=False).tokenize("你好") != ["你", "好"]


def test_saved_directory_reloads_extracts_and_sweeps(pair_csv, tmp_path):
    from embstore import ExtractConfig, extract, open_store
    from embstore.backbones.registry import load_backbone
    from heads.probe.sweep import SweepConfig, run_sweep

    res = run_pretrain(
        PretrainConfig.from_dict(
            {
                **TINY,
                "data": str(pair_csv),
                "text_col": "s1",
                "text_pair_col": "s2",
                "swap_augment": True,
                "pair_objective": "nsp",
                "whole_word": True,
                "epochs": 2,
                "out": str(tmp_path / "pt"),
            }
        ),
        show_progress=False,
    )
    backbone = load_backbone(str(res.model_dir))
    assert backbone.n_layers == 2 and backbone.hidden == 32 and type(backbone.model).__name__ == "BertModel"
    assert backbone.tokenizer.mask_token == "[MASK]" and len(backbone.tokenizer) == backbone.model.config.vocab_size
    assert read_log(res.run_dir)[-1]["heldout_pair_accuracy"] is not None
    out = extract(
        ExtractConfig.from_dict(
            dict(
                model=str(res.model_dir),
                data=str(pair_csv),
                text_col="s1",
                text_pair_col="s2",
                label_col="label",
                out=str(tmp_path / "s.zarr"),
            )
        ),
        show_progress=False,
    )
    assert open_store(out.path).layers == [0, 1, 2]
    # 9 training rows: a 0.3 validation carve holds both classes (0.1 would be one row, refused)
    sweep = run_sweep(
        SweepConfig.from_dict(
            {
                "store": str(out.path),
                "layers": "all",
                "combine": "single",
                "epochs": 2,
                "validation_fraction": 0.3,
                "out": str(tmp_path / "sweep"),
            }
        )
    )
    assert sweep.rows == 3 * len(open_store(out.path).poolings)  # layers 0-2, each stored pooling
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.run import run_finetune

    ft = run_finetune(
        FinetuneConfig.from_dict(
            dict(
                model=str(res.model_dir),
                data=str(pair_csv),
                text_col="s1",
                text_pair_col="s2",
                label_col="label",
                folds=2,
                epochs=1,
                validation_fraction=0.3,  # 6 rows a fold: as the sweep above, 0.1 would be one row, refused
                batch_size=4,
                classifier="mlp",
                classifier_hidden=(64,),
                out=str(tmp_path / "ft"),
            )
        )
    )
    # heads finetune trained the pretrained model itself, and its figures are those of its two folds
    from heads.report.results import read_run

    meta, rows = read_run(ft.run_dir)
    assert meta["model"]["path"] == str(res.model_dir.resolve())
    assert meta["model"]["weights_sha256"] == backbone.identity["weights_sha256"]
    assert ft.folds == 2 and [r.fold for r in rows] == [0, 1] and sum(r.extra["eval_rows"] for r in rows) == 12
    assert ft.accuracy == pytest.approx(sum(r.accuracy for r in rows) / 2)
    assert ft.accuracy_std == pytest.approx(abs(rows[0].accuracy - rows[1].accuracy) / 2)


def test_resume_continues_and_refuses_another_config(tmp_path):
    data = tmp_path / "corpus.csv"
    pd.DataFrame(
        {
            "text": [
                f"the {w} sat on the {v} mat"
                for w in ("cat", "dog", "cow", "hen")
                for v in ("red", "big", "old", "new", "wet")
            ]
        }
    ).to_csv(data, index=False)
    base = {**TINY, "data": str(data), "batch_size": 4, "out": str(tmp_path / "run")}
    first = run_pretrain(PretrainConfig.from_dict({**base, "max_steps": 3}), show_progress=False)
    state = json.loads((first.run_dir / "checkpoint/pretrain_state.json").read_text())
    assert state["steps"] == 3 and state["epoch_done"] is False and state["batches_done"] == 3
    again = run_pretrain(PretrainConfig.from_dict({**base, "max_steps": 8, "resume": True}), show_progress=False)
    assert again.steps == 8 and [h["steps"] for h in again.history] == [0, 3, 5, 8]
    # the checkpoint and model/ are safetensors + JSON: nothing anywhere in the run is a pickle file
    written = [p for p in again.run_dir.rglob("*") if p.is_file()]
    assert again.run_dir / "checkpoint" / "model.safetensors" in written
    assert not [p for p in written if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    with pytest.raises(ConfigError, match=r"checkpoint in .*differing: mask_prob"):
        run_pretrain(PretrainConfig.from_dict({**base, "max_steps": 9, "resume": True, "mask_prob": 0.3}))


def test_a_run_stopped_in_epoch_2_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Stopped by its time budget in the middle of epoch 2 (a fake clock: 1 s per batch) and resumed, a run ends
    where the same run in one go ends: same batches in the same order (the epoch's shuffle, not epoch 1's), masks,
    optimizer and schedule."""
    import itertools

    import heads.pretrain.run

    data = tmp_path / "corpus.csv"
    pd.DataFrame(
        {
            "text": [
                f"the {w} sat on the {v} mat"
                for w in ("cat", "dog", "cow", "hen")
                for v in ("red", "big", "old", "new", "wet")
            ]
        }
    ).to_csv(data, index=False)
    base = {**TINY, "data": str(data), "batch_size": 4, "epochs": 3}
    whole = run_pretrain(PretrainConfig.from_dict({**base, "out": str(tmp_path / "whole")}), show_progress=False)
    ticks = itertools.count()
    monkeypatch.setattr(heads.pretrain.run, "_clock", lambda: float(next(ticks)))  # two calls per batch: 1 s each
    per_epoch = whole.history[1]["steps"]
    cut = run_pretrain(
        PretrainConfig.from_dict({**base, "out": str(tmp_path / "cut"), "max_minutes": (per_epoch + 2) / 60}),
        show_progress=False,
    )
    assert cut.history[-1]["epoch"] == 2 and not cut.history[-1]["epoch_complete"]
    monkeypatch.setattr(heads.pretrain.run, "_clock", time.perf_counter)
    again = run_pretrain(
        PretrainConfig.from_dict({**base, "out": str(tmp_path / "cut"), "resume": True}), show_progress=False
    )
    assert again.steps == whole.steps
    assert again.heldout_mlm_loss == pytest.approx(whole.heldout_mlm_loss, rel=1e-5)
    assert again.history[-1]["train_mlm_loss"] == pytest.approx(whole.history[-1]["train_mlm_loss"], rel=1e-5)


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_every_optimizer_step_clips_the_gradient_norm(tiny_csv, tmp_path, monkeypatch, max_grad_norm):
    """heads pretrain clips the gradient norm to --max-grad-norm right before every optimizer step, as heads finetune
    does (0: no clipping). Measured on the gradients themselves: larger than the limit before, within it after."""
    from accelerate import Accelerator

    real, seen = Accelerator.clip_grad_norm_, []

    def clip(self, parameters, max_norm, norm_type=2):
        params = [p for p in parameters if p.grad is not None]
        before = real(self, params, max_norm, norm_type)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        seen.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    res = CliRunner().invoke(
        heads_main,
        [
            "pretrain",
            "--data",
            str(tiny_csv),
            "--vocab-size",
            "200",
            "--min-frequency",
            "1",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--max-grad-norm",
            str(max_grad_norm),
            "--no-progress",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "run.json").read_text())["final"]["steps"] == 3
    if not max_grad_norm:
        assert seen == []
        return
    assert len(seen) == 3 and all(limit == max_grad_norm for limit, _, _ in seen)
    assert all(before > 2 * max_grad_norm and after <= max_grad_norm * 1.001 for _, before, after in seen), seen


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--vocab-size", "4"], "The --vocab-size option must be more than the 5 special tokens"),
        (["--max-positions", "16", "--max-length", "32"], "max_positions 16 is shorter than max_length 32"),
        (["--swap-augment"], "need sentence pairs; pass --text-pair-col"),
        (["--text-pair-col", "text", "--swap-augment", "--pair-objective", "sop"], "use --pair-objective nsp"),
        (["--hidden", "30", "--heads", "4"], "not a multiple of heads"),
    ],
)
def test_cli_bad_options_are_one_line(tiny_csv, tmp_path, extra, match):
    res = CliRunner().invoke(heads_main, ["pretrain", "--data", str(tiny_csv), "--out", str(tmp_path / "r"), *extra])
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and match in res.stderr and "Traceback" not in res.output


def test_cli_empty_corpus_and_resume_mismatch(tiny_csv, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    res = CliRunner().invoke(heads_main, ["pretrain", "--data", str(empty), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "no data rows" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    blank = tmp_path / "blank.csv"
    pd.DataFrame({"text": [" ", "  "], "other": [1, 2]}).to_csv(blank, index=False)
    with pytest.raises(DataError, match="empty text"):
        run_pretrain(PretrainConfig.from_dict(dict(data=str(blank), skip_empty=True, out=str(tmp_path / "b"))))
    args = [
        "pretrain",
        "--data",
        str(tiny_csv),
        "--vocab-size",
        "100",
        "--min-frequency",
        "1",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--max-length",
        "16",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    ok = CliRunner().invoke(heads_main, args)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip().splitlines()[-1] == str(tmp_path / "r") and "tokens/s" in ok.stderr
    bad = CliRunner().invoke(heads_main, [*args, "--resume", "--lr", "0.1"])
    assert bad.exit_code == 2 and "differing: lr" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_config_round_trip_and_model_config_file(tmp_path):
    c = PretrainConfig.from_dict(
        dict(
            data=None,
            splits=(("train", "a.csv"), ("validation", "b.csv")),
            text_pair_col="b",
            pair_objective="nsp",
            swap_augment=True,
        )
    )
    assert PretrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match=r"Unknown pretrain config keys \['bogus'\]"):
        PretrainConfig.from_dict({"data": "x.csv", "bogus": 1})
    from heads.pretrain.model import build_bert_config

    cfg = build_bert_config(
        PretrainConfig.from_dict(dict(data="x.csv", model_config="configs/models/mini-bert.yaml", layers=2)),
        vocab_size=321,
        pad_id=0,
    )
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (2, 256, 1024, 321)


def test_cli_config_may_be_a_bert_config_or_an_options_file(tiny_csv, tmp_path):
    """--config takes a BERT config (configs/models/*.yaml) or a YAML of pretrain options; flags override both."""
    common = [
        "--data",
        str(tiny_csv),
        "--vocab-size",
        "100",
        "--min-frequency",
        "1",
        "--max-length",
        "16",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    res = CliRunner().invoke(
        heads_main,
        [
            "pretrain",
            "--config",
            "configs/models/mini-bert.yaml",
            "--layers",
            "1",
            "--hidden",
            "16",
            "--heads",
            "2",
            *common,
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        1,
        16,
        64,
        100,
    )
    options = tmp_path / "opts.yaml"
    options.write_text("layers: 1\nhidden: 16\nheads: 2\nmask_prob: 0.3\n")
    res = CliRunner().invoke(
        heads_main, ["pretrain", "--config", str(options), *common, "--mask-prob", "0.2", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["mask_prob"] == 0.2


_FAKE_CLOCK_RUN = """
import itertools, os, sys
import heads.pretrain.run
from cli.heads_cli import main
# Rank 0's training clock advances 1 s per reading (0.5 s per batch); rank 1's never moves. Only rank 0
# runs out of its --max-minutes budget, so rank 1 stops at the same batch only through the shared decision;
# without it rank 1 would wait forever in the next gradient all-reduce.
ticks = itertools.count()
step = 0.5 if os.environ["RANK"] == "0" else 0.0
heads.pretrain.run._clock = lambda: next(ticks) * step
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_pretrain_with_a_time_budget(tiny_csv, tmp_path):
    """torchrun with 2 CPU processes (the environment `accelerate launch` sets up): DDP over gloo, a
    time budget every rank stops at together, only rank 0 writes and reports, model/ loads.

    The budget runs on a fake clock (see _FAKE_CLOCK_RUN), so the outcome does not depend on machine speed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    script = tmp_path / "fake_clock_run.py"
    script.write_text(_FAKE_CLOCK_RUN)
    # 12 rows, 2 ranks, batch 2: 3 batches per epoch per rank. Budget 0.05 min = 3 s of rank 0's fake clock,
    # i.e. 6 batches: the run stops in epoch 2, well before its 50 epochs.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        "pretrain",
        "--data",
        str(tiny_csv),
        "--vocab-size",
        "100",
        "--min-frequency",
        "1",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--max-length",
        "16",
        "--batch-size",
        "2",
        "--epochs",
        "50",
        "--max-minutes",
        "0.05",
        "--no-progress",
        "--out",
        str(out),
    ]
    from factories import recorded_calls, recording_env

    proc = subprocess.run(
        cmd,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env=recording_env(tmp_path, "heads.training.session:Session.step"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(out)]  # only rank 0 reports
    assert {rank: len(steps) for rank, steps in recorded_calls(tmp_path).items()} == {"0": 6, "1": 6}  # both trained
    assert [h["epoch"] for h in read_log(out)] == [0, 1, 2]  # 3 batches an epoch each: the ranks split the rows
    meta = json.loads((out / "run.json").read_text())
    assert meta["final"]["stopped_by"] == "max_minutes"
    assert meta["final"]["steps"] == 6  # the same batch on both ranks, whatever the machine's speed
    from embstore.backbones.registry import load_backbone

    assert load_backbone(str(out / "model")).n_layers == 1


def test_run_records_which_rows_were_held_out(tiny_csv, tmp_path):
    """run.json's eval_set names the held-out file and rows, like a sweep's or a fine-tune's (heads.evalset)."""
    from embstore.data.tables import file_sha256
    from heads.evalset import eval_set

    held = tmp_path / "held.csv"
    pd.read_csv(tiny_csv).head(5).to_csv(held, index=False)
    res = run_pretrain(
        PretrainConfig.from_dict(
            {
                **TINY,
                "data": None,
                "splits": [["train", str(tiny_csv)], ["validation", str(held)]],
                "max_steps": 1,
                "out": str(tmp_path / "r"),
            }
        ),
        show_progress=False,
    )
    recorded = json.loads((res.run_dir / "run.json").read_text())["eval_set"]
    assert recorded == eval_set(file_sha256(held), range(5)) and recorded["rows"] == 5
    carved = run_pretrain(
        PretrainConfig.from_dict(
            {**TINY, "data": str(tiny_csv), "heldout_fraction": 0.25, "max_steps": 1, "out": str(tmp_path / "c")}
        ),
        show_progress=False,
    )
    meta = json.loads((carved.run_dir / "run.json").read_text())
    assert meta["eval_set"]["rows"] == meta["corpus"]["eval_rows"] == 3
    assert meta["eval_set"]["source_sha256"] == file_sha256(tiny_csv) and meta["eval_set"] != recorded
