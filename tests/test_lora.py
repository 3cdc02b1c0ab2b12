"""heads finetune --lora (peft) on random:tiny-bert and random:hubert-tiny: only the adapters and the classifier train,
every other weight stays bit-identical, the merged model/ gives the adapter model's logits, and bad input is one line
with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import separable_csv, write_tones
from safetensors.torch import load_file

from cli.heads_cli import main as heads_main
from embstore.backbones.anatomy import base_of, projections
from embstore.backbones.registry import load_backbone
from embstore.errors import ConfigError
from heads.finetune.config import FinetuneConfig
from heads.finetune.model import CLASSIFIER_DIR, CLASSIFIER_WEIGHTS, SequenceClassifier, load_finetuned
from heads.finetune.run import run_finetune
from heads.report.results import read_run

HEAD = 32 * 3 + 3  # the linear classifier on the 32-wide tiny-bert, 3 classes


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
        epochs=2,
        patience=0,
        batch_size=8,
        lora=4,
        out=str(out),
    )
    base.update(kw)
    return FinetuneConfig.from_dict(base)


def adapter_size(model: torch.nn.Module, r: int, layers: set[int]) -> int:
    """Parameters of rank-r adapters on the anatomy map's projections of ``layers``: r x (in + out) each."""
    total = 0
    for p in projections(base_of(model)):
        if p.layers & layers:
            w = p.module.weight
            total += r * (w.shape[0] + w.shape[1])
    return total


def test_lora_trains_only_the_adapters_and_the_classifier(sep_csv, tmp_path):
    """--lora 4 --freeze 0-1: adapters on the projections of layer 2 only; run.json counts them and the head as
    trainable, and every weight outside the adapted projections is bit-identical in the merged model."""
    res = run_finetune(cfg(sep_csv, tmp_path / "run", freeze="0-1"), show_progress=False)
    before = load_backbone("random:tiny-bert").model
    assert res.trainable_params == adapter_size(before, 4, {2}) + HEAD == 1792 + HEAD
    meta, (row,) = read_run(res.run_dir)
    assert meta["parameters"] == {"trainable": res.trainable_params, "total": res.total_params}
    assert row.extra["lora"] == {
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "targets": "anatomy map: attention and MLP projections",
        "modules": 6,
    }
    adapted = json.loads((res.run_dir / "adapter" / "adapted_modules.json").read_text())
    assert adapted == [f"encoder.layer.1.{p.name}" for p in projections(base_of(before))[:6]]
    after = load_backbone(str(res.run_dir / "model")).model.state_dict()
    start = before.state_dict()
    assert start.keys() == after.keys()  # merged: the plain architecture, no LoRA layers left
    changed = {f"{name}.weight" for name in adapted}
    for k in start:
        if k in changed:
            assert not torch.equal(start[k], after[k]), k  # the adapter moved and was merged in
        else:
            assert torch.equal(start[k], after[k]), k
    adapter = load_file(str(res.run_dir / "adapter" / "adapter_model.safetensors"))
    assert sum(v.numel() for v in adapter.values()) == 1792
    assert json.loads((res.run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_merged_model_gives_the_adapter_models_logits(sep_csv, tmp_path):
    """The adapter in RUN/adapter, loaded by peft onto the backbone, with the run's classifier, gives the merged
    model/'s logits within 1e-5; and heads predict reads model/ unchanged."""
    from peft import PeftModel

    res = run_finetune(cfg(sep_csv, tmp_path / "run", lora=8, lora_alpha=32, epochs=3), show_progress=False)
    merged, tokenizer, meta = load_finetuned(res.run_dir, "cpu")
    peft_model = PeftModel.from_pretrained(load_backbone("random:tiny-bert").model, str(res.run_dir / "adapter"))
    with_adapter = SequenceClassifier(peft_model.get_base_model(), 3, pooling=meta["pooling"])
    with_adapter.head.load_state_dict(load_file(str(res.run_dir / "model" / CLASSIFIER_DIR / CLASSIFIER_WEIGHTS)))
    with_adapter.eval()
    texts = pd.read_csv(sep_csv).text.tolist()[:16]
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        a = with_adapter(batch["input_ids"], batch["attention_mask"])
        b = merged(batch["input_ids"], batch["attention_mask"])
        base = SequenceClassifier(load_backbone("random:tiny-bert").model, 3, pooling=meta["pooling"])
        base.head.load_state_dict(with_adapter.head.state_dict())
        c = base.eval()(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-3  # the adapters changed the logits: the comparison is not of two bare models
    out = CliRunner().invoke(heads_main, ["predict", "--run", str(res.run_dir)], input="apple mango\nred blue\n")
    assert out.exit_code == 0, out.output
    assert len(out.stdout.strip().splitlines()) == 2


def test_gradient_checkpointing_trains_the_same_model(sep_csv, tmp_path):
    """--gradient-checkpointing recomputes activations; the trained weights are those of the run without it."""
    plain = run_finetune(cfg(sep_csv, tmp_path / "a", lora=None, epochs=1), show_progress=False)
    ckpt = run_finetune(
        cfg(sep_csv, tmp_path / "b", lora=None, epochs=1, gradient_checkpointing=True), show_progress=False
    )
    a = load_file(str(plain.run_dir / "model" / "model.safetensors"))
    b = load_file(str(ckpt.run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    moved = load_backbone("random:tiny-bert").model.state_dict()
    assert not torch.equal(
        moved["encoder.layer.0.attention.self.query.weight"], a["encoder.layer.0.attention.self.query.weight"]
    )
    assert plain.accuracy == ckpt.accuracy


def test_lora_on_a_speech_model(tmp_path):
    """random:hubert-tiny --lora 2: the feature encoder stays frozen (its default), adapters on both blocks'
    projections, and the merged model/ loads as a plain HuBERT."""
    table = write_tones(tmp_path / "tones", per_class=2, speakers=3, seconds=0.3, seed=1)
    config = FinetuneConfig.from_dict(
        dict(
            model="random:hubert-tiny",
            data=str(table),
            audio_col="file",
            label_col="label",
            group_col="speaker",
            holdout=0.25,
            validation_fraction=0.3,
            epochs=1,
            batch_size=4,
            lr=3e-3,
            lora=2,
            out=str(tmp_path / "run"),
        )
    )
    res = run_finetune(config, show_progress=False)
    model = load_backbone("random:hubert-tiny").model
    n_classes = len(pd.read_csv(table).label.unique())
    assert res.trainable_params == adapter_size(model, 2, {1, 2}) + 32 * n_classes + n_classes
    after = load_backbone(str(res.run_dir / "model")).model.state_dict()
    assert after.keys() == model.state_dict().keys()
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items() if k.startswith("feature_extractor."))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora", "4", "--prune-heads", "2:0"], "--lora cannot be combined with --prune-heads"),
        (["--lora", "4", "--prune-fraction", "0.3"], "--lora cannot be combined with --prune-fraction"),
        (
            ["--lora", "4", "--lora-targets", "query,q_proj"],
            r"--lora-targets q_proj names no module of this bert model's blocks; its blocks' linear layers are "
            r"attention\.self\.query, attention\.self\.key, .*output\.dense",
        ),
        (["--lora", "0"], r"The --lora option must be a positive rank\. Got 0 instead\. Use e\.g\. --lora 8\."),
        (["--lora-alpha", "8"], "--lora-alpha sets up LoRA adapters; pass --lora R with it"),
        (["--lora", "4", "--freeze", "all"], "leaves no block for --lora adapters"),
    ],
)
def test_bad_lora_input_is_one_line_and_writes_nothing(sep_csv, tmp_path, flags, message):
    out = tmp_path / "run"
    args = ["finetune", "--model", "random:tiny-bert", "--data", str(sep_csv), "--holdout", "0.25"]
    args += ["--text-col", "text", "--label-col", "label", "--out", str(out)]
    result = CliRunner().invoke(heads_main, [*args, "--epochs", "2", *flags])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_lora_targets_choose_the_modules(sep_csv, tmp_path):
    """--lora-targets query,value adapts only those: r x (32 + 32) each, on both layers."""
    res = run_finetune(cfg(sep_csv, tmp_path / "run", lora_targets="query,value", epochs=1), show_progress=False)
    assert res.trainable_params == 4 * 4 * (32 + 32) + HEAD
    with pytest.raises(ConfigError, match="names no module"):
        run_finetune(cfg(sep_csv, tmp_path / "bad", lora_targets="nothing_here"), show_progress=False)


def test_lora_defaults_to_the_adapter_learning_rate():
    """--lora without --lr trains the adapters at LORA_LR; a given --lr holds; a full fine-tune keeps 5e-5."""
    from heads.finetune.config import LORA_LR

    assert FinetuneConfig.from_dict({"data": "x.csv", "lora": 8}).optim.lr == LORA_LR == 5e-4
    assert FinetuneConfig.from_dict({"data": "x.csv", "lora": 8, "lr": 1e-4}).optim.lr == 1e-4
    assert FinetuneConfig.from_dict({"data": "x.csv"}).optim.lr == 5e-5
