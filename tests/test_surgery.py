"""Model surgery on tiny random BERTs: freezing, truncation, head pruning, importance, save/reload."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from factories import TEXTS
from torch import nn
from transformers import BertConfig, BertModel

from embstore import ExtractConfig, extract, open_store
from embstore.backbones.anatomy import encoder_layers
from embstore.backbones.pruned import load_model, prune_heads, pruned_heads, save_model
from embstore.backbones.registry import load_backbone, minilm_path
from embstore.errors import ConfigError, LayerSpecError, ModelNotFoundError
from heads.finetune.surgery import (
    count_parameters,
    freeze,
    head_importance,
    heads_to_prune,
    parse_freeze,
    parse_prune_spec,
    truncate,
)

L, H, HIDDEN = 3, 4, 48
HEAD_DIM = HIDDEN // H


def tiny_bert(vocab_size: int = 100) -> BertModel:
    """3 layers x 4 heads x 48 wide, deterministic, eval mode (no dropout)."""
    config = BertConfig(
        num_hidden_layers=L, hidden_size=HIDDEN, num_attention_heads=H, intermediate_size=64, vocab_size=vocab_size
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(config).eval()


@pytest.fixture
def model() -> BertModel:
    return tiny_bert()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row, so masking goes through the pruned attention too
    return {"input_ids": torch.randint(1, 100, (3, 7), generator=gen), "attention_mask": mask}


def zero_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Silence heads in an unpruned model: zero the attention-output dense columns they feed."""
    with torch.no_grad():
        for layer, hs in heads.items():
            dense = encoder_layers(model)[layer - 1].attention.output.dense
            for h in hs:
                dense.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0


def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# --------------------------------------------------------------------------- architecture and freezing


def test_encoder_layers_accepts_wrappers_and_refuses_other_models(model):
    assert len(encoder_layers(model)) == L

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

    assert encoder_layers(Wrapper())[0] is model.encoder.layer[0]
    with pytest.raises(
        ConfigError,
        match=r"Model surgery does not know the 'Linear' family \(Linear\): the anatomy map "
        r"covers albert, bert, .*wav2vec2, .*whisper-encoder\. Use a model of one of these families",
    ):
        encoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("none", set()),
        ("embeddings", {0}),
        ("all", {0, 1, 2, 3}),
        ("all-but-last", {0, 1, 2}),
        ("0-2", {0, 1, 2}),
        ("embeddings,3", {0, 3}),
        ("-1", {3}),
        ("1, 3", {1, 3}),
    ],
)
def test_parse_freeze(spec, expected):
    assert parse_freeze(spec, L) == expected


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("0-8", LayerSpecError, r"'freeze' option must name layers in \[0, 3\].*got '0-8'"),
        ("-5", LayerSpecError, r"'freeze' option must name layers in \[0, 3\]"),
        ("top", LayerSpecError, r"Cannot read the 'freeze' value 'top'"),
        ("  ", ConfigError, r"'freeze' option is empty"),
    ],
)
def test_parse_freeze_errors(spec, error, match):
    with pytest.raises(error, match=match):
        parse_freeze(spec, L)


def test_freeze_embeddings_and_layers_keeps_pooler_trainable(model):
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    freeze(model, parse_freeze("0-1", L))
    frozen = sum(p.numel() for m in (model.embeddings, model.encoder.layer[0]) for p in m.parameters())
    assert count_parameters(model) == (total - frozen, total)
    assert all(p.requires_grad for p in model.pooler.parameters())
    assert all(p.requires_grad for p in model.encoder.layer[1].parameters())
    assert not any(p.requires_grad for p in model.embeddings.parameters())
    with pytest.raises(LayerSpecError, match=r"Cannot freeze layers \[4\].*\[0, 3\]"):
        freeze(model, {4})


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncate_equals_intermediate_hidden_state(model, inputs, k):
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states
    _, total = count_parameters(model)
    removed = sum(p.numel() for layer in model.encoder.layer[k:] for p in layer.parameters())
    truncate(model, k)
    assert len(model.encoder.layer) == model.config.num_hidden_layers == k
    assert count_parameters(model)[1] == total - removed
    torch.testing.assert_close(out(model, inputs), full[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "k, match",
    [
        (4, r"Cannot truncate to 4 layers.*pass k in \[1, 3\]"),
        (-1, r"Cannot truncate to -1 layers.*pass k in \[1, 3\]"),
        (0, r"0, embeddings only, is not supported.*pass k in \[1, 3\]"),
    ],
)
def test_truncate_out_of_range(model, k, match):
    with pytest.raises(LayerSpecError, match=match):
        truncate(model, k)
    assert len(model.encoder.layer) == L


# --------------------------------------------------------------------------- head pruning


def test_parse_prune_spec():
    assert parse_prune_spec("3:0,3;2:1; 3:1", L, H) == {2: [1], 3: [0, 1, 3]}
    assert parse_prune_spec("", L, H) == {}


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("4:0", LayerSpecError, r"names layer 4, but attention layers are \[1, 3\]"),
        ("0:0", LayerSpecError, r"names layer 0.*0 is the embeddings"),
        ("2:4", ConfigError, r"names head 4 of layer 2, but heads are \[0, 3\]"),
        ("2:0,1,2,3", ConfigError, r"^cannot remove all 4 heads of layer 2; keep at least one$"),
        ("2:0,1;2:2,3", ConfigError, r"cannot remove all 4 heads of layer 2"),
        ("2-0", ConfigError, r"Cannot read the prune spec '2-0'.*'11:0,3;10:5'"),
        ("x:1", ConfigError, r"Cannot read the prune spec 'x:1'"),
    ],
)
def test_parse_prune_spec_errors(spec, error, match):
    with pytest.raises(error, match=match):
        parse_prune_spec(spec, L, H)


def test_pruned_model_equals_zeroed_heads_and_loses_exact_parameters(model, inputs):
    heads = {1: [0, 2], 3: [3]}
    reference = copy.deepcopy(model)
    zero_heads(reference, heads)
    total = count_parameters(model)[1]
    prune_heads(model, heads)
    torch.testing.assert_close(out(model, inputs), out(reference, inputs), atol=1e-5, rtol=0)
    per_head = 3 * HEAD_DIM * HIDDEN + 3 * HEAD_DIM + HEAD_DIM * HIDDEN
    assert count_parameters(model)[1] == total - 3 * per_head
    attn = model.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size, attn.query.out_features) == (2, 24, 24)
    assert model.encoder.layer[0].attention.output.dense.in_features == 24
    assert model.config.embstore_pruned_heads == {"1": [0, 2], "3": [3]}


def test_pruning_twice_accumulates_original_indices(model, inputs):
    reference = copy.deepcopy(model)
    prune_heads(model, {2: [1]})
    prune_heads(model, {2: [3, 1], 1: [0]})  # head 1 is already gone: skipped
    assert pruned_heads(model) == {1: [0], 2: [1, 3]}
    assert model.config.embstore_pruned_heads == {"1": [0], "2": [1, 3]}
    assert model.encoder.layer[1].attention.self.num_attention_heads == 2
    zero_heads(reference, {1: [0], 2: [1, 3]})  # original indices, not positions after the first cut
    torch.testing.assert_close(out(model, inputs), out(reference, inputs), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"cannot remove all 4 heads of layer 2; keep at least one"):
        prune_heads(model, {2: [0, 2]})
    with pytest.raises(LayerSpecError, match=r"Cannot prune heads of layer 5: attention layers are \[1, 3\]"):
        prune_heads(model, {5: [0]})
    assert pruned_heads(model) == {1: [0], 2: [1, 3]}  # refused calls change nothing


# --------------------------------------------------------------------------- head importance


class MeanPoolClassifier(nn.Module):
    """Tiny BERT + linear classifier on the attention-masked mean of the last layer."""

    def __init__(self, bert: BertModel, n_classes: int = 3) -> None:
        super().__init__()
        self.bert = bert
        torch.manual_seed(2)
        self.classifier = nn.Linear(bert.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, hidden)
        mask = attention_mask[..., None].float()
        return self.classifier((states * mask).sum(1) / mask.sum(1))  # (B, classes)


def ce_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return nn.functional.cross_entropy(logits, batch["labels"])


def batches(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [dict(inputs, labels=torch.tensor([0, 1, 2])), dict(inputs, labels=torch.tensor([2, 2, 0]))]


def test_head_importance_shape_zeroed_head_and_hooks_removed(model, inputs):
    zero_heads(model, {2: [1]})
    clf = MeanPoolClassifier(model).train()
    importance = head_importance(clf, batches(inputs), ce_loss)
    assert importance.shape == (L, H) and torch.isfinite(importance).all() and (importance >= 0).all()
    assert importance[1, 1] == 0 and (importance[1, [0, 2, 3]] > 0).all()
    torch.testing.assert_close(importance.norm(dim=1), torch.ones(L))
    assert clf.training  # mode restored
    assert all(not layer.attention.output.dense._forward_pre_hooks for layer in encoder_layers(clf))
    assert all(p.grad is None for p in clf.parameters())


def test_head_importance_after_pruning_uses_original_indices(model, inputs):
    prune_heads(model, {3: [0, 2]})
    importance = head_importance(MeanPoolClassifier(model), batches(inputs), ce_loss)
    assert torch.isnan(importance[2, [0, 2]]).all() and torch.isfinite(importance[2, [1, 3]]).all()
    plan = heads_to_prune(importance, 0.9)
    assert all(h not in (0, 2) for h in plan.get(3, []))  # never re-picks a removed head
    assert sum(map(len, plan.values())) == 3 + 3 + 1  # asks for 9 of the 10 present; one stays per layer
    prune_heads(model, plan)  # original indices: applies on top of the first cut
    assert pruned_heads(model)[3] == sorted({0, 2, *plan[3]})
    assert [layer.attention.self.num_attention_heads for layer in encoder_layers(model)] == [1, 1, 1]


def test_heads_to_prune_fraction_and_minimum():
    importance = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.05, 0.06, 0.07, 0.5], [0.7, 0.6, 0.3, 0.4]])
    assert heads_to_prune(importance, 0.25) == {2: [0, 1, 2]}  # 3 of 12, globally lowest
    assert heads_to_prune(importance, 0.4) == {1: [0], 2: [0, 1, 2]}  # int(4.8) = 4
    # 6: layer 2 has reached one head, so its 0.5 head survives while layer 3's 0.3 goes
    assert heads_to_prune(importance, 0.5) == {1: [0, 1], 2: [0, 1, 2], 3: [2]}
    most = heads_to_prune(importance, 0.9)  # asks for 10 but every layer keeps one: 9
    assert [len(most[layer]) for layer in (1, 2, 3)] == [3, 3, 3]
    strict = heads_to_prune(importance, 0.75, min_heads_per_layer=2)
    assert all(H - len(hs) >= 2 for hs in strict.values()) and sum(map(len, strict.values())) == 6
    assert heads_to_prune(importance, 0.0) == {}
    with pytest.raises(ConfigError, match=r"fraction must be in \[0, 1\); got 1.5"):
        heads_to_prune(importance, 1.5)
    with pytest.raises(ConfigError, match=r"min_heads_per_layer must be at least 1; got 0"):
        heads_to_prune(importance, 0.2, min_heads_per_layer=0)


# --------------------------------------------------------------------------- save and reload


def test_save_and_reload_pruned_truncated_model(model, inputs, tmp_path):
    prune_heads(model, {1: [1], 3: [0, 3]})
    prune_heads(model, {1: [2]})
    truncate(model, 2)
    save_model(model, None, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["embstore_pruned_heads"] == {"1": [1, 2]}
    reloaded = load_model(tmp_path / "m")
    assert pruned_heads(reloaded) == {1: [1, 2]} and not reloaded.training
    torch.testing.assert_close(out(reloaded, inputs), out(model, inputs), atol=0, rtol=0)
    with pytest.raises(ModelNotFoundError, match=r"is not a saved model directory.*save_model"):
        load_model(tmp_path / "missing")


def test_save_and_reload_classifier_wrapper(inputs, tmp_path):
    from transformers import BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = BertForSequenceClassification(tiny_bert().config).eval()
    prune_heads(clf, {2: [0]})
    save_model(clf, None, tmp_path / "clf")
    reloaded = load_model(tmp_path / "clf")
    assert type(reloaded) is BertForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, clf(**inputs).logits, atol=0, rtol=0)


@pytest.mark.slow
def test_load_backbone_and_extract_from_a_pruned_directory(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_bert(vocab_size=len(tokenizer))
    prune_heads(model, {1: [0, 1], 2: [3]})
    truncate(model, 2)
    directory = save_model(model, tokenizer, tmp_path / "pruned")
    backbone = load_backbone(str(directory))
    assert backbone.n_layers == 2 and backbone.identity["config"]["embstore_pruned_heads"] == {"1": [0, 1], "2": [3]}
    enc = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    torch.testing.assert_close(out(backbone.model, dict(enc)), out(model, dict(enc)), atol=0, rtol=0)

    data = tmp_path / "tiny.csv"
    pd.DataFrame({"text": TEXTS[:6], "label": ["a", "b"] * 3}).to_csv(data, index=False)
    res = extract(
        ExtractConfig.from_dict(
            dict(model=str(directory), data=str(data), label_col="label", out=str(tmp_path / "s.zarr"))
        ),
        show_progress=False,
    )
    store = open_store(res.path)
    assert store.layers == [0, 1, 2] and store.pooled("all", "mean").shape == (6, 3, HIDDEN)
