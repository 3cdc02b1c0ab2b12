"""Decoder LLMs as backbones, on the tiny random decoders (random:tiny-gpt2, tiny-llama, tiny-qwen2, tiny-neox):
last-token pooling and which tokens mean/max cover, equal to transformers run one row at a time; batch invariance;
the tokenizers' conventions; causal cls refused; templates and chat templates; the compute dtype on record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import TEXTS

from cli.embstore_cli import main
from embstore import ConfigError, ExtractConfig, extract, open_store
from embstore.backbones import bpe
from embstore.backbones.registry import load_backbone
from embstore.extraction.encode import tokenize
from embstore.extraction.textspec import TextSpec

DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-neox"]
LONGER = [(t + " and then " + TEXTS[(i + 5) % len(TEXTS)] * (i % 3)).strip() for i, t in enumerate(TEXTS)]


@pytest.fixture
def texts_csv(tmp_path: Path) -> Path:
    """24 rows of very different lengths (padding matters), 2 labels."""
    path = tmp_path / "texts.csv"
    texts = TEXTS + LONGER
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))]}).to_csv(path, index=False)
    return path


def _extract(data: Path, **kw):
    kw.setdefault("dtype", "float32")
    return open_store(extract(ExtractConfig.from_dict(dict(data=str(data), **kw)), show_progress=False).path)


def _texts(store, data: Path) -> list[str]:
    """The stored rows' texts, in stored order."""
    return pd.read_csv(data).text.astype(str).to_numpy()[store.row_ids("all")].tolist()


def _reference(model, ids: list[int], mask: np.ndarray) -> dict[str, np.ndarray]:
    """transformers on one unpadded row: (layers, hidden) per pooling, pooled by hand."""
    with torch.inference_mode():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = torch.stack([s[0] for s in states]).numpy()  # (layers, T, hidden)
    return {"last": h[:, -1], "mean": h[:, mask].mean(1), "max": h[:, mask].max(1), "cls": h[:, 0]}


def test_the_tokenizers_keep_their_families_conventions():
    gpt2, llama, qwen2, neox = (bpe.decoder_tokenizer(n) for n in ("gpt2", "llama", "qwen2", "neox"))
    assert llama("a model")["input_ids"][0] == llama.bos_token_id == 1 and llama.padding_side == "left"
    assert gpt2("a model")["input_ids"][0] != gpt2.bos_token_id and gpt2.padding_side == "right"
    assert gpt2.pad_token is None and llama.pad_token is None and neox.pad_token is None
    assert qwen2.pad_token == "<|endoftext|>" and qwen2.chat_template and qwen2.bos_token is None
    assert len(gpt2) == bpe.VOCAB_SIZE and "token_type_ids" not in gpt2.model_input_names
    # trained offline and deterministically: a fresh training gives the same tokenizer
    first = bpe.tokenizer_sha256("llama")
    bpe._trained.cache_clear()
    assert bpe.tokenizer_sha256("llama") == first


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("pool_tokens", ["text", "all"])
def test_every_pooling_equals_transformers_row_by_row(texts_csv, name, pool_tokens):
    """Padded batches of 5 (the tokenizers pad left or right, or have no pad token: embstore pads on the right with
    an attention mask) give each row's last token, mean and max as transformers on that row alone."""
    store = _extract(
        texts_csv, model=f"random:{name}", pooling=("last", "mean", "max"), pool_tokens=pool_tokens, batch_size=5
    )
    bb = load_backbone(f"random:{name}")
    assert store.provenance.text.pool_tokens == pool_tokens
    stored = {p: store.pooled("all", p).astype(np.float32) for p in ("last", "mean", "max")}  # (n, layers, hidden)
    for i, text in enumerate(_texts(store, texts_csv)):
        enc = bb.tokenizer(text, return_special_tokens_mask=True)
        ids = enc["input_ids"]
        mask = np.ones(len(ids), bool) if pool_tokens == "all" else np.array(enc["special_tokens_mask"]) == 0
        ref = _reference(bb.model, ids, mask)
        for p in ("last", "mean", "max"):
            np.testing.assert_allclose(stored[p][i], ref[p], atol=1e-5, rtol=1e-5, err_msg=f"{name} {p} row {i}")
    if name == "tiny-llama" and pool_tokens == "text":  # BOS is left out of the text tokens
        assert not np.allclose(stored["mean"][0], _reference(bb.model, ids, np.ones(len(ids), bool))["mean"])


@pytest.mark.parametrize("name", DECODERS)
def test_batch_16_equals_batch_1_at_float32(tmp_path, texts_csv, name):
    kw = dict(model=f"random:{name}", pooling=("last", "mean", "max"))
    one = _extract(texts_csv, batch_size=1, out=str(tmp_path / "one"), **kw)
    sixteen = _extract(texts_csv, batch_size=16, out=str(tmp_path / "sixteen"), **kw)
    assert one.fingerprint == sixteen.fingerprint  # batching is not in the id: it changes values only by rounding
    for p in ("last", "mean", "max"):
        assert np.abs(one.pooled("all", p) - sixteen.pooled("all", p)).max() <= 1e-5


@pytest.mark.parametrize("name", DECODERS)
def test_the_tokenizers_padding_side_changes_nothing(tmp_path, texts_csv, name):
    bb = load_backbone(f"random:{name}")
    flipped = tmp_path / "flipped"
    bb.model.save_pretrained(flipped)
    bb.tokenizer.padding_side = "right" if bb.tokenizer.padding_side == "left" else "left"
    bb.tokenizer.save_pretrained(flipped)
    kw = dict(pooling=("last", "mean", "max"), batch_size=5)
    a, b = _extract(texts_csv, model=f"random:{name}", **kw), _extract(texts_csv, model=str(flipped), **kw)
    for p in ("last", "mean", "max"):
        np.testing.assert_array_equal(a.pooled("all", p), b.pooled("all", p))


@pytest.mark.parametrize("name", DECODERS)
def test_causal_defaults_and_cls_refused(texts_csv, name):
    store = _extract(texts_csv, model=f"random:{name}", layers="0-1")
    assert store.poolings == ["last", "mean"] and store.provenance.causal is True
    assert store.provenance.top_layer.startswith("the last block") is False  # after the final norm
    with pytest.raises(
        ConfigError, match=r"--pooling cls reads position 0, which in a causal model .* pass --pooling last"
    ):
        _extract(texts_csv, model=f"random:{name}", pooling=("cls", "mean"))


def test_causal_cls_is_one_line_and_exit_2(texts_csv):
    res = CliRunner().invoke(
        main, ["extract", "--model", "random:tiny-llama", "--data", str(texts_csv), "--pooling", "cls"]
    )
    assert res.exit_code == 2 and "error: --pooling cls reads position 0" in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1


def test_encoder_text_tokens_leave_out_cls_and_sep(texts_csv):
    all_ = _extract(texts_csv, model="random:tiny-bert", pooling=("mean",))
    text = _extract(texts_csv, model="random:tiny-bert", pooling=("mean",), pool_tokens="text")
    assert all_.provenance.text.pool_tokens == "all" and text.fingerprint != all_.fingerprint
    bb = load_backbone("random:tiny-bert")
    row = _texts(text, texts_csv)[0]
    ids = bb.tokenizer(row)["input_ids"]
    inner = np.zeros(len(ids), bool)
    inner[1:-1] = True  # [CLS] ... [SEP]
    ref = _reference(bb.model, ids, inner)
    np.testing.assert_allclose(text.pooled("all", "mean")[0], ref["mean"], atol=1e-5)
    np.testing.assert_allclose(
        all_.pooled("all", "mean")[0], _reference(bb.model, ids, inner | True)["mean"], atol=1e-5
    )


TEMPLATE = "Review: {text}\nSentiment:"


def test_a_template_is_pooled_around_its_text_and_in_the_id(texts_csv):
    plain = _extract(texts_csv, model="random:tiny-qwen2", pooling=("last", "mean"))
    store = _extract(texts_csv, model="random:tiny-qwen2", pooling=("last", "mean"), template=TEMPLATE, batch_size=5)
    assert store.fingerprint != plain.fingerprint
    assert store.provenance.text.template == TEMPLATE and store.provenance.text.prompt == TEMPLATE
    bb = load_backbone("random:tiny-qwen2")
    enc = tokenize(bb.tokenizer, _texts(store, texts_csv), None, 128, TextSpec(template=TEMPLATE, pool_tokens="text"))
    for i, text in enumerate(_texts(store, texts_csv)):
        ids, mask = enc.ids[i], enc.text_mask[i]
        assert bb.tokenizer.decode(np.array(ids)[mask]).strip() == text  # the text's tokens, no template tokens
        assert bb.tokenizer.decode(ids).endswith("\nSentiment:")
        assert ids == bb.tokenizer(TEMPLATE.format(text=text))["input_ids"]
        ref = _reference(bb.model, ids, mask)
        np.testing.assert_allclose(store.pooled("all", "last")[i], ref["last"], atol=1e-5)
        np.testing.assert_allclose(store.pooled("all", "mean")[i], ref["mean"], atol=1e-5)


def test_a_long_text_is_cut_inside_the_template():
    bb = load_backbone("random:tiny-gpt2")
    long = " ".join(TEXTS)
    enc = tokenize(bb.tokenizer, [long, "short"], None, 24, TextSpec(template=TEMPLATE, pool_tokens="text"))
    assert len(enc.ids[0]) <= 24 and bool(enc.truncated[0]) and not bool(enc.truncated[1])
    assert bb.tokenizer.decode(enc.ids[0]).startswith("Review: the striker")
    assert bb.tokenizer.decode(enc.ids[0]).endswith("\nSentiment:")  # last still reads the template's last token
    with pytest.raises(ConfigError, match="leaves no room for the text"):
        tokenize(bb.tokenizer, [long], None, 4, TextSpec(template=TEMPLATE))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(template="Review: {review}"), r"may name only \{text\} and \{text_pair\}"),
        (dict(template="Review:"), r"has no \{text\}"),
        (dict(template="{text}", chat_template=True), "not both"),
        (dict(system="Be brief."), "--system is the system turn of --chat-template"),
    ],
)
def test_bad_templates_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        ExtractConfig.from_dict(dict(model="random:tiny-qwen2", **kw))


def test_pairs_need_text_pair_in_the_template(pair_csv):
    with pytest.raises(ConfigError, match=r"must place \{text_pair\} too"):
        ExtractConfig.from_dict(dict(data=str(pair_csv), text_col="s1", text_pair_col="s2", template="{text}"))
    store = _extract(
        pair_csv, model="random:tiny-gpt2", text_col="s1", text_pair_col="s2", template="{text}\nQ: {text_pair}"
    )
    assert store.provenance.text.prompt == "{text}\nQ: {text_pair}"


def test_plain_pairs_on_a_decoder_get_no_token_type_ids(pair_csv):
    """GPT-2's forward takes token_type_ids (and would add their embeddings), but its tokenizer never feeds them:
    neither does embstore, so a pair's states are transformers' on the pair's ids alone."""
    store = _extract(pair_csv, model="random:tiny-gpt2", text_col="s1", text_pair_col="s2", pooling=("last",))
    bb = load_backbone("random:tiny-gpt2")
    table = pd.read_csv(pair_csv).iloc[store.row_ids("all")]
    for i, (a, b) in enumerate(zip(table.s1, table.s2)):
        ids = bb.tokenizer(a, b)["input_ids"]
        np.testing.assert_allclose(
            store.pooled("all", "last")[i], _reference(bb.model, ids, np.ones(len(ids), bool))["last"], atol=1e-5
        )


def test_the_chat_template_renders_as_transformers_does(texts_csv):
    store = _extract(texts_csv, model="random:tiny-qwen2", chat_template=True, system="Be brief.", batch_size=5)
    other = _extract(texts_csv, model="random:tiny-qwen2", chat_template=True)
    assert store.fingerprint != other.fingerprint  # the system turn is in the id
    prompt = store.provenance.text.prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")
    bb = load_backbone("random:tiny-qwen2")
    for i, text in enumerate(_texts(store, texts_csv)[:6]):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        ids = bb.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        ref = _reference(bb.model, ids, np.ones(len(ids), bool))
        np.testing.assert_allclose(store.pooled("all", "last")[i], ref["last"], atol=1e-5)  # where the answer begins


def test_chat_template_on_a_tokenizer_without_one_is_refused(texts_csv):
    with pytest.raises(ConfigError, match="this tokenizer .* has none; pass --template"):
        _extract(texts_csv, model="random:tiny-llama", chat_template=True)


def test_the_cli_reads_escapes_in_a_template(texts_csv):
    res = CliRunner().invoke(
        main, ["extract", "--model", "random:tiny-gpt2", "--data", str(texts_csv), "-q", "--template", r"R: {text}\nS:"]
    )
    assert res.exit_code == 0, res.output
    assert open_store(res.stdout.strip().splitlines()[-1]).provenance.text.template == "R: {text}\nS:"


def test_a_bf16_checkpoint_is_cast_up_on_the_cpu_and_the_dtype_is_on_record(tmp_path, texts_csv):
    bb = load_backbone("random:tiny-llama")
    saved = tmp_path / "bf16"
    bb.model.to(torch.bfloat16).save_pretrained(saved)
    bb.tokenizer.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    auto = _extract(texts_csv, model=str(saved), pooling=("last",))
    assert auto.provenance.compute_dtype == "float32" and auto.provenance.precision == "float32"
    bf16 = _extract(texts_csv, model=str(saved), pooling=("last",), compute_dtype="bfloat16")
    assert bf16.provenance.compute_dtype == "bfloat16" and bf16.fingerprint != auto.fingerprint
    diff = np.abs(bf16.pooled("all", "last") - auto.pooled("all", "last"))
    assert 0 < diff.max() < 0.5  # bf16 compute changes values (by its rounding), and the id says so


def test_bfloat16_storage_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="zarr 3 has no bfloat16 data type"):
        ExtractConfig(dtype="bfloat16")  # type: ignore[arg-type]


def test_plan_prints_the_peak_memory(texts_csv):
    res = CliRunner().invoke(main, ["plan", "--model", "random:tiny-llama", "--data", str(texts_csv)])
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if line.startswith("memory"))
    assert "at peak, estimated: weights" in line and "one batch inside a block" in line


def test_the_llm_sentiment_config_runs(tmp_path):
    """configs/extract-llm-sentiment.yaml as shipped (the flags only cut it to 60 rows and write to tmp_path): the
    causal defaults, the template on record and in the summary a sweep writes."""
    config = Path(__file__).resolve().parents[1] / "configs" / "extract-llm-sentiment.yaml"
    res = CliRunner().invoke(
        main, ["extract", "-q", "--config", str(config), "--limit", "60", "--holdout", "0.3", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    store = open_store(res.stdout.strip().splitlines()[-1])
    assert store.poolings == ["last", "mean"] and store.provenance.causal is True
    assert store.provenance.text.template == "Tweet: {text}\nSentiment:" and store.provenance.text.pool_tokens == "text"
    assert store.provenance.compute_dtype == "float32" and store.layout.dtype == "float16"


def test_heads_predict_puts_new_texts_into_the_stores_template(tmp_path, texts_csv):
    """The head's card carries the store's template, pooled tokens and compute dtype, and heads predict encodes new
    texts with them: the probabilities equal the head on the stored features. Without the template the same texts
    give other features (so the check can fail)."""
    from cli.heads_cli import main as heads_main
    from heads.probe.features import FeatureBank
    from heads.probe.predict import load_head, predict_texts
    from heads.probe.specs import Combo

    store = _extract(texts_csv, model="random:tiny-qwen2", template=TEMPLATE, holdout=0.25, label_col="label")
    out = tmp_path / "run"
    res = CliRunner().invoke(
        heads_main, ["sweep", "--store", store.path, "--layers", "2", "--pooling", "mean", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    est = load_head(str(out))
    card = est.card_
    assert card is not None and card.text is not None
    assert (card.text.template, card.text.pool_tokens, card.compute_dtype) == (TEMPLATE, "text", "float32")
    texts = pd.read_csv(texts_csv).text.astype(str).to_numpy()[store.row_ids("test")].tolist()
    _, proba = predict_texts(est, texts)
    combo = Combo((2,), "single", "mean", "linear")
    features = FeatureBank(store, [combo], ["test"], 1 << 30).features(combo, "test", np.arange(len(texts)))
    np.testing.assert_allclose(proba, est.predict_proba(features), atol=1e-4)
    plain = _extract(texts_csv, model="random:tiny-qwen2", holdout=0.25, label_col="label")
    other = FeatureBank(plain, [combo], ["test"], 1 << 30).features(combo, "test", np.arange(len(texts)))
    assert np.abs(other - features).max() > 1e-3
