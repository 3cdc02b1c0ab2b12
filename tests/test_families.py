"""Every encoder family of the anatomy map, through extraction, the forward stop and every fine-tune edit.

Each family is a tiny random model built in code (3 blocks, 32 wide) with MiniLM's WordPiece tokenizer (its ids fit
every vocabulary here); values are compared with transformers' own ``hidden_states`` on the same ids, one row at a
time and unpadded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from embstore import ExtractConfig, extract, open_store
from embstore.backbones.anatomy import (
    FAMILIES,
    attention,
    base_of,
    blocks,
    encoder_layers,
    family_of,
    find_blocks,
    layer_parameters,
)
from embstore.backbones.pruned import prune_heads
from embstore.backbones.registry import load_backbone
from embstore.errors import ConfigError
from embstore.extraction.forward import hidden_states
from heads.finetune.config import FinetuneConfig
from heads.finetune.run import prepare_encoder, run_finetune
from heads.finetune.surgery import count_parameters, freeze, parse_freeze, truncate

_IDS = dict(vocab_size=30522, pad_token_id=0)
_BERTISH = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64, **_IDS)
_DEBERTA_V2 = dict(relative_attention=True, norm_rel_ebd="layer_norm", position_buckets=32, max_relative_positions=-1)

# case -> (family in the map, config); every text encoder family of the map has at least one case
CASES: dict[str, tuple[str, dict]] = {
    "roberta": ("bert", dict(model_type="roberta", max_position_embeddings=514, **_BERTISH)),
    "xlm-roberta": ("bert", dict(model_type="xlm-roberta", max_position_embeddings=514, **_BERTISH)),
    "electra": ("electra", dict(model_type="electra", embedding_size=16, **_BERTISH)),
    "albert": ("albert", dict(model_type="albert", embedding_size=16, **_BERTISH)),
    "distilbert": ("distilbert", dict(model_type="distilbert", n_layers=3, dim=32, n_heads=2, hidden_dim=64, **_IDS)),
    "mpnet": ("mpnet", dict(model_type="mpnet", **_BERTISH)),
    "deberta": (
        "deberta",
        dict(model_type="deberta", relative_attention=True, pos_att_type=["c2p", "p2c"], **_BERTISH),
    ),
    # xlarge style: a conv after block 1, its own position projections
    "deberta-v2-conv": (
        "deberta-v2",
        dict(
            model_type="deberta-v2",
            pos_att_type=["c2p", "p2c"],
            conv_kernel_size=3,
            conv_act="gelu",
            share_att_key=False,
            **_DEBERTA_V2,
            **_BERTISH,
        ),
    ),
    "deberta-v3": (
        "deberta-v2",
        dict(model_type="deberta-v2", pos_att_type=["p2c", "c2p"], share_att_key=True, **_DEBERTA_V2, **_BERTISH),
    ),
    "modernbert": (
        "modernbert",
        dict(
            model_type="modernbert",
            local_attention=8,
            bos_token_id=101,
            cls_token_id=101,
            eos_token_id=102,
            sep_token_id=102,
            **_BERTISH,
        ),
    ),  # fmt: skip
    "t5": ("t5-encoder", dict(model_type="t5", num_layers=3, d_model=32, d_kv=16, num_heads=2, d_ff=64, **_IDS)),
    "umt5": ("umt5-encoder", dict(model_type="umt5", num_layers=3, d_model=32, d_kv=16, num_heads=2, d_ff=64, **_IDS)),
}
PRUNABLE = {"roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "deberta-v2-conv", "deberta-v3", "modernbert"}
REFUSED = {
    "albert": "one shared block for every layer",
    "deberta": "fuses q, k and v into in_proj",
    "t5": "relative position bias is made for every head by the first block",
    "umt5": "not mapped for head pruning",
}
TEXTS = [
    "the striker scored twice in the final minute of a long and tiring match",
    "stocks fell",
    "a new telescope images distant galaxies in infrared light",
    "parliament passed the budget",
    "the goalkeeper saved a penalty to win the cup after extra time and a shootout",
    "record profit",
    "researchers trained a neural network on protein structures",
    "elections were held across the country on sunday",
    "the tennis champion retired",
    "oil prices climbed for the third straight week as supply tightened",
    "engineers launched a satellite",
    "the prime minister met foreign leaders at the summit",
] * 2  # 24 rows: two batches of 16 and 8, sorted by length, padded
LABELS = ["sport", "business", "science", "world"] * 6


def model_path(tmp_path: Path, case: str) -> str:
    """``random:PATH`` of the case's config, written to ``tmp_path``."""
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(CASES[case][1]))
    return f"random:{path}"


def backbone(tmp_path: Path, case: str):
    return load_backbone(model_path(tmp_path, case))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "rows.csv"
    pd.DataFrame({"text": TEXTS, "label": LABELS}).to_csv(path, index=False)
    return path


def reference(model, tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, ...]]:
    """transformers' hidden_states of each text alone, unpadded: [row] -> (L + 1 of (T, H))."""
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=512, return_tensors="pt")["input_ids"]
            states = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
            out.append(tuple(s[0] for s in states))
    return out


def test_every_text_encoder_family_of_the_map_has_a_case():
    encoders = {f.name for f in FAMILIES if f.modality == "text" and not f.causal}
    assert encoders == {family for family, _ in CASES.values()}
    assert set(CASES) == PRUNABLE | set(REFUSED)


@pytest.mark.parametrize("case", list(CASES))
def test_a_case_is_the_family_it_stands_for(tmp_path, case):
    bb = backbone(tmp_path, case)
    family = family_of(bb.model)
    assert family is not None and family.name == CASES[case][0]
    assert len(find_blocks(bb.model)) == bb.n_layers == 3


@pytest.mark.parametrize("layers", ["all", "0-1"])
@pytest.mark.parametrize("case", list(CASES))
def test_stored_values_equal_transformers_one_row_at_a_time(tmp_path, data, case, layers):
    """Batches of 16, padded, sorted by length, stopping below the top with '0-1': every stored pooling of every
    layer equals transformers' hidden_states of the row alone (DeBERTa-v2's layer 1 is after its conv)."""
    model = model_path(tmp_path, case)
    kw = dict(model=model, data=str(data), layers=layers, pooling=("cls", "mean", "max"), dtype="float32")
    store = open_store(extract(ExtractConfig.from_dict(dict(kw, batch_size=16)), show_progress=False).path)
    bb = load_backbone(model)
    ref = reference(bb.model, bb.tokenizer, TEXTS)
    rows = store.row_ids("all")
    for j, layer in enumerate(store.layers):
        want = {
            "cls": np.stack([ref[r][layer][0].numpy() for r in rows]),
            "mean": np.stack([ref[r][layer].mean(0).numpy() for r in rows]),
            "max": np.stack([ref[r][layer].amax(0).numpy() for r in rows]),
        }
        for pooling, expected in want.items():
            got = store.pooled("all", pooling, layers=[layer])[:, 0]
            np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4, err_msg=f"{case} {pooling} {layer}")
    assert store.layers == ([0, 1] if layers == "0-1" else [0, 1, 2, 3])


@pytest.mark.parametrize("case", list(CASES))
def test_the_forward_stop_runs_only_the_blocks_needed(tmp_path, case):
    """Counted by hooks on every block of the block list (ALBERT's one block runs once per layer): stopping after
    layer k runs k blocks, and the states are the very tensors of a full forward."""
    bb = backbone(tmp_path, case)
    model = bb.model
    inputs = dict(bb.tokenizer(TEXTS[:3], padding=True, return_tensors="pt", return_token_type_ids=False))
    with torch.inference_mode():
        full = model(**inputs, output_hidden_states=True).hidden_states
    runs = [0]
    for block in blocks(base_of(model)):
        block.register_forward_hook(lambda *_a: runs.__setitem__(0, runs[0] + 1))
    for last in range(len(full)):
        runs[0] = 0
        with torch.inference_mode():
            states = hidden_states(model, inputs, last)
        assert runs[0] == last, (case, last, runs)
        assert len(states) == last + 1
        for i, state in enumerate(states):
            assert torch.equal(state, full[i]), (case, last, i)


@pytest.mark.parametrize("case", list(CASES))
def test_freeze_all_leaves_nothing_trainable_in_the_backbone(tmp_path, case):
    bb = backbone(tmp_path, case)
    base = base_of(bb.model)
    placed = {id(p) for p, _ in layer_parameters(base)}
    unplaced = [name for name, p in base.named_parameters() if id(p) not in placed]
    assert all(name.startswith("pooler.") for name in unplaced), unplaced  # the map places every other parameter
    config = FinetuneConfig.from_dict(dict(model="unused", freeze="all"))
    encoder = prepare_encoder(config, bb.model).model
    trainable, total = count_parameters(encoder)
    assert trainable == 0 and total > 0


# case -> a part that every block uses (or ALBERT's block, which every layer runs)
SHARED = {
    "albert": "encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight",
    "mpnet": "encoder.relative_attention_bias.weight",
    "deberta": "encoder.rel_embeddings.weight",
    "deberta-v2-conv": "encoder.LayerNorm.weight",
    "deberta-v3": "encoder.rel_embeddings.weight",
    "t5": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
}


@pytest.mark.parametrize("case", list(SHARED))
def test_a_layer_range_freezes_what_every_layer_uses_only_with_every_layer(tmp_path, case):
    model = backbone(tmp_path, case).model
    params = dict(model.named_parameters())
    for spec, frozen in [("0-1", False), ("0-2", False), ("all-but-last", False), ("1-3", True), ("all", True)]:
        model.requires_grad_(True)
        freeze(model, parse_freeze(spec, 3))
        assert params[SHARED[case]].requires_grad is not frozen, spec
    if case == "deberta-v2-conv":  # the conv after block 1 belongs to layer 1
        model.requires_grad_(True)
        freeze(model, parse_freeze("0-1", 3))
        assert not params["encoder.conv.conv.weight"].requires_grad
        assert params["encoder.layer.1.attention.self.query_proj.weight"].requires_grad


def test_albert_truncates_to_k_passes_of_its_shared_block(tmp_path):
    bb = backbone(tmp_path, "albert")
    inputs = dict(bb.tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        full = bb.model(**inputs, output_hidden_states=True).hidden_states
    model = copy.deepcopy(bb.model)
    truncate(model, 2)
    assert model.config.num_hidden_layers == 2 and len(blocks(model)) == 1
    with torch.inference_mode():
        assert torch.equal(model(**inputs).last_hidden_state, full[2])


def test_albert_with_two_groups_truncates_where_the_runs_survive(tmp_path):
    path = tmp_path / "albert2.json"
    path.write_text(json.dumps(dict(CASES["albert"][1], num_hidden_layers=6, num_hidden_groups=2)))
    bb = load_backbone(f"random:{path}")
    assert [encoder_layers(bb.model).index(b) for b in encoder_layers(bb.model)] == [0, 0, 0, 3, 3, 3]
    inputs = dict(bb.tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        full = bb.model(**inputs, output_hidden_states=True).hidden_states
    for k, groups in [(3, 1), (2, 1)]:
        model = copy.deepcopy(bb.model)
        truncate(model, k)
        assert model.config.num_hidden_groups == groups
        with torch.inference_mode():
            assert torch.equal(model(**inputs).last_hidden_state, full[k])
    with pytest.raises(ConfigError, match=r"Cannot truncate this albert model to 4 layers: its 2 shared blocks"):
        truncate(copy.deepcopy(bb.model), 4)


@pytest.mark.parametrize("case", sorted(PRUNABLE))
def test_a_pruned_head_is_the_head_zeroed(tmp_path, case):
    """Removing head 0 of layer 2 changes nothing but that head: the output equals the model whose output
    projection ignores it (MPNet's shared position bias is cut to the kept heads, DeBERTa-v2's position
    projections with q and k), and the parameters shrink."""
    bb = backbone(tmp_path, case)
    inputs = dict(bb.tokenizer(TEXTS[:3], padding=True, return_tensors="pt", return_token_type_ids=False))
    pruned, zeroed = copy.deepcopy(bb.model), copy.deepcopy(bb.model)
    prune_heads(pruned, {2: [0], 3: [1]})
    for layer, head in [(2, 0), (3, 1)]:
        att = attention(encoder_layers(zeroed)[layer - 1], base_of(zeroed))
        with torch.no_grad():
            att.out.weight[:, head * att.head_dim : (head + 1) * att.head_dim] = 0
    with torch.inference_mode():
        got, want = pruned(**inputs).last_hidden_state, zeroed(**inputs).last_hidden_state
        unpruned = bb.model(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, unpruned, atol=1e-4)
    assert count_parameters(pruned)[1] < count_parameters(bb.model)[1]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_prune_is_refused_with_the_reason(tmp_path, case):
    model = backbone(tmp_path, case).model
    with pytest.raises(ConfigError, match=rf"Cannot remove attention heads from a {CASES[case][0]} model: .*"
                       rf"{REFUSED[case]}.*use --freeze or --truncate"):  # fmt: skip
        prune_heads(model, {2: [0]})
    config = FinetuneConfig.from_dict(dict(model="unused", prune_fraction=0.5, epochs=2))
    with pytest.raises(ConfigError, match=REFUSED[case]):  # before any training
        prepare_encoder(config, model)


def finetune(data: Path, out: Path, model: str, **kw: object):
    base = dict(model=model, data=str(data), label_col="label", holdout=0.25, epochs=1, batch_size=8, out=str(out))
    return run_finetune(FinetuneConfig.from_dict({**base, **kw}), show_progress=False)


def extract_cli(model: str, data: Path, out: Path) -> str:
    from cli.embstore_cli import main

    res = CliRunner().invoke(
        main, ["extract", "-q", "--model", model, "--data", str(data), "--label-col", "label", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_finetune_truncated_and_pruned_reloads_through_extract(tmp_path, data, case):
    """``heads finetune --truncate 1`` (and ``--prune-heads 1:0`` where the family prunes) writes run/model, which
    ``embstore extract --model run/model`` reads: one layer, the pruned head gone, the values of the saved model."""
    prune = {"prune_heads": "1:0"} if case in PRUNABLE else {}
    # 18 training rows of 4 classes: the default 0.1 carve (2 rows) cannot hold every class and is refused
    res = finetune(data, tmp_path / "run", model_path(tmp_path, case), truncate=1, validation_fraction=0.25, **prune)
    model_dir = res.run_dir / "model"
    store = open_store(extract_cli(str(model_dir), data, tmp_path / "s.zarr"))
    assert store.complete and store.layers == [0, 1]
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved.get("embstore_pruned_heads") == ({"1": [0]} if prune else None)
    reloaded = load_backbone(str(model_dir))
    assert reloaded.n_layers == 1 and family_of(reloaded.model).name == CASES[case][0]
    ref = reference(reloaded.model, reloaded.tokenizer, TEXTS)
    rows = store.row_ids("all")
    want = np.stack([ref[r][1].mean(0).numpy() for r in rows])
    np.testing.assert_allclose(store.pooled("all", "mean", layers=[1])[:, 0], want, atol=2e-3)  # float16 store


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_finetune_with_no_options_runs(tmp_path, case):
    """On 48 rows of 4 classes every default holds: the 0.25 holdout leaves 36, whose 0.1 carve (4) holds each class."""
    data = tmp_path / "rows48.csv"
    texts = TEXTS + [f"{t} again" for t in TEXTS]
    pd.DataFrame({"text": texts, "label": LABELS * 2}).to_csv(data, index=False)
    res = finetune(data, tmp_path / "run", model_path(tmp_path, case))
    assert (res.run_dir / "model" / "config.json").is_file()
    assert 0 < res.trainable_params <= res.total_params
    assert 0.0 <= res.accuracy <= 1.0


def test_an_exception_in_the_forward_is_one_line_naming_the_model_and_the_batch(tmp_path, data, monkeypatch):
    """The second batch fails (as a model bug would): exit 2, one line naming the model, the rows and the shape,
    and the store left behind is not complete (readers and ``heads sweep``'s latest store pass it by)."""
    import embstore.extraction.forward as forward
    from cli.embstore_cli import main
    from embstore.errors import StoreIncompleteError
    from embstore.store.catalog import latest_store

    calls = []
    original = forward.run_states  # what the hot loop calls

    def failing(model, inputs, wanted, on_state):
        calls.append(inputs["input_ids"].shape)
        if len(calls) == 2:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 64x32)\nsecond line")
        return original(model, inputs, wanted, on_state)

    monkeypatch.setattr(forward, "run_states", failing)
    model = model_path(tmp_path, "distilbert")
    out = tmp_path / "cache" / "failing.zarr"
    res = CliRunner().invoke(
        main,
        ["extract", "-q", "--model", model, "--data", str(data), "--label-col", "label", "--batch-size", "16"]
        + ["--out", str(out)],
    )
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    width = calls[1][1]
    assert (
        f"error: {model} failed in its forward on rows 16-23 of row chunk 0 of split 'all' (a batch of 8 rows x "
        f"{width} tokens): RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x32 and 64x32). Nothing of that "
        "row chunk was stored and the store is not complete" in res.stderr
    )
    assert "second line" not in res.stderr and "Traceback" not in res.output
    assert not open_store(out, allow_incomplete=True).complete
    with pytest.raises(StoreIncompleteError):
        open_store(out)
    with pytest.raises(Exception, match="No complete store"):
        latest_store(tmp_path / "cache")


@pytest.mark.parametrize("checkpoint", ["T5ForConditionalGeneration", "T5Model"])
def test_a_full_t5_checkpoint_loads_its_encoder_alone(tmp_path, data, checkpoint):
    """A T5 directory with a decoder (as the Hub has them) extracts through its encoder: T5EncoderModel, with the
    checkpoint's encoder weights, and no decoder built."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from embstore.backbones.registry import minilm_path

    cfg = dict(CASES["t5"][1])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(1)
    full = getattr(transformers, checkpoint)(config).eval()
    full.save_pretrained(tmp_path / "t5")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "t5")
    bb = load_backbone(str(tmp_path / "t5"))
    assert type(bb.model).__name__ == "T5EncoderModel" and not hasattr(bb.model, "decoder")
    ids = bb.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = full.get_encoder()(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
        got = bb.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    store = open_store(extract_cli(str(tmp_path / "t5"), data, tmp_path / "s.zarr"))
    assert store.complete and store.layers == [0, 1, 2, 3]


def test_an_encoder_decoder_without_an_encoder_class_keeps_get_encoder(tmp_path, data):
    """BART has no BartEncoderModel: the model is built whole and its encoder kept; the map does not know it, so
    it extracts with the whole encoder run."""
    path = tmp_path / "bart.json"
    path.write_text(
        json.dumps(
            dict(model_type="bart", d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                 **_IDS)
        )
    )  # fmt: skip
    bb = load_backbone(f"random:{path}")
    assert type(bb.model).__name__ == "BartEncoder"
    store = open_store(extract_cli(f"random:{path}", data, tmp_path / "s.zarr"))
    assert store.complete and store.layers == [0, 1, 2]
