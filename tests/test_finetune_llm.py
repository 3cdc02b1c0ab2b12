"""heads finetune on the tiny random decoders (random:tiny-gpt2, tiny-llama, tiny-qwen2): last-token pooling learns a
task decided by the last word, batch size changes no logit, freeze and truncate by block, cls and pruning refused."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from embstore import ExtractConfig, extract, open_store
from embstore.backbones.anatomy import layer_blocks
from embstore.backbones.registry import load_backbone
from embstore.errors import ConfigError
from heads.finetune.config import FinetuneConfig
from heads.finetune.model import SequenceClassifier
from heads.finetune.run import run_finetune

DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-qwen2"]
FILLER = "the a some red blue green tree house river stone cloud".split()


@pytest.fixture
def last_word_csv(tmp_path: Path) -> Path:
    """120 rows of 2-7 filler words then 'yes' or 'no': only the last word decides the label."""
    rng = random.Random(0)
    rows = []
    for i in range(120):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 7))]
        rows.append((" ".join([*words, "yes" if i % 2 else "no"]), "yes" if i % 2 else "no"))
    path = tmp_path / "last.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


def cfg(data: Path, out: Path, model: str, **kw: object) -> FinetuneConfig:
    base = dict(
        model=f"random:{model}",
        data=str(data),
        label_col="label",
        holdout=0.25,
        lr=3e-3,
        head_lr=1e-2,
        epochs=6,
        min_epochs=6,
        patience=0,
        batch_size=16,
        out=str(out),
    )
    base.update(kw)
    return FinetuneConfig.from_dict(base)


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODERS)
def test_last_token_pooling_learns_the_last_word(last_word_csv, tmp_path, name):
    res = run_finetune(cfg(last_word_csv, tmp_path / "run", name), show_progress=False)
    assert res.accuracy >= 0.9


@pytest.mark.parametrize("name", DECODERS)
def test_batch_size_changes_no_logit(name):
    backbone = load_backbone(f"random:{name}")
    torch.manual_seed(0)
    clf = SequenceClassifier(backbone.model, 2, pooling="last").eval()
    texts = ["a b", "the red tree by the river and the stone", "yes", "some green cloud no"]
    encoded = [backbone.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    with torch.no_grad():
        together = clf(ids, mask)
        alone = torch.cat([clf(torch.tensor([e]), torch.ones(1, len(e), dtype=torch.long)) for e in encoded])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_freeze_leaves_the_right_blocks_trainable(last_word_csv, tmp_path, name):
    from heads.finetune.run import prepare_encoder

    config = cfg(last_word_csv, tmp_path / "run", name, freeze="0-1")
    backbone = load_backbone(config.model)
    prepare_encoder(config, backbone.model)
    blocks = layer_blocks(backbone.model)
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[-1].parameters())
    emb = backbone.model.get_input_embeddings()
    assert not emb.weight.requires_grad


@pytest.mark.parametrize("name", DECODERS)
def test_truncate_reloads_through_extract(last_word_csv, tmp_path, name):
    res = run_finetune(
        cfg(last_word_csv, tmp_path / "run", name, truncate=1, epochs=1, min_epochs=1), show_progress=False
    )
    store = open_store(
        extract(
            ExtractConfig.from_dict(dict(data=str(last_word_csv), model=str(res.run_dir / "model"), dtype="float32")),
            show_progress=False,
        ).path
    )
    assert store.layers == [0, 1]  # embeddings + the one kept block
    assert store.poolings == ["last", "mean"]


@pytest.mark.parametrize("kw", [dict(pooling="cls"), dict(prune_heads="1:0")])
def test_cls_and_pruning_are_refused_on_a_causal_model(last_word_csv, tmp_path, kw):
    match = "--pooling cls reads position 0" if "pooling" in kw else "grouped-query attention shares"
    with pytest.raises(ConfigError, match=match):
        run_finetune(cfg(last_word_csv, tmp_path / "run", "tiny-llama", **kw), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_lora_on_a_decoder_trains(last_word_csv, tmp_path):
    res = run_finetune(
        cfg(last_word_csv, tmp_path / "run", "tiny-qwen2", lora=4, lr=1e-2, epochs=2, min_epochs=2),
        show_progress=False,
    )
    assert res.trainable_params < res.total_params
    assert (res.run_dir / "model" / "config.json").is_file()


def test_template_and_pool_tokens_are_recorded_and_predict_uses_them(last_word_csv, tmp_path):
    import json

    from heads.finetune.predict import predict_finetuned

    template = "Review: {text}\nAnswer:"
    res = run_finetune(
        cfg(last_word_csv, tmp_path / "run", "tiny-gpt2", template=template, pooling="mean", epochs=1, min_epochs=1),
        show_progress=False,
    )
    meta = json.loads((res.run_dir / "run.json").read_text())
    assert meta["text"]["template"] == template and meta["text"]["pool_tokens"] == "text"
    assert meta["text"]["prompt"] == template
    saved = json.loads((res.run_dir / "model" / "classifier" / "classifier.json").read_text())
    assert saved["text"]["template"] == template and saved["pooling"] == "mean"
    # heads predict wraps the text in the same prompt and pools the same tokens: its probabilities are the model's
    from embstore.extraction.encode import tokenize
    from embstore.extraction.textspec import TextSpec
    from heads.finetune.predict import load_run_model

    clf, tokenizer, _ = load_run_model(res.run_dir, "cpu")
    enc = tokenize(tokenizer, ["red tree yes"], None, 512, TextSpec(template=template, pool_tokens="text"))
    ids = torch.tensor(enc.ids)
    with torch.no_grad():
        ref = torch.softmax(
            clf(ids, torch.ones_like(ids), text_mask=torch.from_numpy(enc.text_mask[0])[None]), -1
        ).numpy()
    _, proba, _ = predict_finetuned(res.run_dir, ["red tree yes"])
    assert abs(proba - ref).max() < 1e-5


def test_text_pool_tokens_cover_only_the_text(last_word_csv):
    backbone = load_backbone("random:tiny-llama")
    clf = SequenceClassifier(backbone.model, 2, pooling="mean").eval()
    from embstore.extraction.encode import tokenize
    from embstore.extraction.textspec import TextSpec

    enc = tokenize(
        backbone.tokenizer, ["red tree yes"], None, 512, TextSpec(template="Q: {text} A:", pool_tokens="text")
    )
    ids = torch.tensor(enc.ids)
    text = torch.from_numpy(enc.text_mask[0])[None]
    assert 0 < int(text.sum()) < ids.shape[1]
    with torch.no_grad():
        states = backbone.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        want = clf.head(states[0, text[0]].mean(0, keepdim=True))
        got = clf(ids, torch.ones_like(ids), text_mask=text)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_cli_takes_the_template_flags(last_word_csv, tmp_path):
    import json

    from click.testing import CliRunner

    from cli.heads_cli import main

    out = tmp_path / "run"
    args = ["finetune", "--model", "random:tiny-qwen2", "--data", str(last_word_csv), "--label-col", "label"]
    args += ["--holdout", "0.25", "--epochs", "1", "--template", "Text: {text}\\nLabel:", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["text"]["template"] == "Text: {text}\nLabel:"
    refused = CliRunner().invoke(main, [*args[:-2], "--pooling", "cls", "--out", str(tmp_path / "r2")])
    assert refused.exit_code == 2 and "--pooling cls reads position 0" in refused.output
