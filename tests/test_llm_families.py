"""The decoder families of the anatomy map, built tiny from configs in code: the forward stop runs only the blocks
asked for, every state equals transformers' ``output_hidden_states`` (the top one after the final norm), and each
layer is pooled as it is produced, without asking the model for all of its states."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModel

from embstore.backbones.anatomy import family_of, find_blocks, is_causal, state_norm
from embstore.extraction.forward import BatchForward, hidden_states

BASE = dict(
    num_hidden_layers=3,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    vocab_size=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
FAMILIES = {
    "gpt2": {},
    "gpt_neox": {},
    "llama": dict(num_key_value_heads=1),
    "mistral": dict(num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(num_key_value_heads=1),
    "qwen3": dict(num_key_value_heads=1, head_dim=16),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "gemma2": dict(num_key_value_heads=1, head_dim=16),
    "gemma3_text": dict(num_key_value_heads=1, head_dim=16),
    "phi": {},
    "phi3": dict(num_key_value_heads=2),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "falcon": {},
    "bloom": dict(n_layer=3, n_head=2),
    "gptj": dict(rotary_dim=8),
}
IDS = torch.tensor([[5, 9, 30, 7, 2, 11, 40], [4, 8, 12, 0, 0, 0, 0]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])


def _model(model_type: str, **over):
    torch.manual_seed(0)
    return AutoModel.from_config(
        AutoConfig.for_model(model_type, **{**BASE, **FAMILIES.get(model_type, {}), **over})
    ).eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_the_forward_stops_early_with_transformers_states(model_type):
    model = _model(model_type)
    assert family_of(model) is not None and is_causal(model)
    assert state_norm(model) is not None  # the top state is after the final norm
    blocks = find_blocks(model)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    with torch.inference_mode():
        full = model(**inputs, output_hidden_states=True).hidden_states
        for last in range(len(blocks) + 1):
            calls[:] = [0] * len(blocks)
            states = hidden_states(model, inputs, last)
            assert len(states) == last + 1
            assert all(torch.equal(h, full[i]) for i, h in enumerate(states)), (model_type, last)
            assert calls == [1] * last + [0] * (len(blocks) - last), (model_type, last, calls)  # 0-1 runs 1 block


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_each_layer_is_pooled_as_it_is_produced(model_type):
    """The extraction never asks for ``output_hidden_states`` (which keeps every layer): hooks pool each state, and
    its last token equals the full forward's at each row's last real position."""
    model = _model(model_type)
    asked: list[object] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: asked.append(kw.get("output_hidden_states")), with_kwargs=True)
    fwd = BatchForward(
        model, layers=[0, 2, 3], token_layers=[], poolings=["last", "mean"], dtype="float32", device="cpu"
    )
    launched = fwd.launch({"input_ids": IDS, "attention_mask": MASK}, MASK.sum(1).numpy())
    assert asked == [None] and launched.bad(["last", "mean"], [0, 2, 3], []) is None
    pooled, _ = launched.result(["last", "mean"], [])
    with torch.inference_mode():
        full = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    for k, layer in enumerate([0, 2, 3]):
        for row, n in enumerate(MASK.sum(1).tolist()):
            torch.testing.assert_close(
                torch.from_numpy(pooled["last"][k, row]), full[layer][row, n - 1], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                torch.from_numpy(pooled["mean"][k, row]), full[layer][row, :n].mean(0), atol=1e-5, rtol=1e-5
            )


def test_an_unknown_family_still_runs_and_says_it_cannot_stop_early(caplog):
    from embstore.backbones import anatomy

    model = _model("biogpt", num_hidden_layers=3)
    assert family_of(model) is None
    anatomy._unknown_logged.discard("biogpt")
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    with caplog.at_level(logging.WARNING, logger="embstore.backbones.anatomy"), torch.inference_mode():
        states = hidden_states(model, inputs, 1)
        full = model(**inputs, output_hidden_states=True).hidden_states
    assert [r.getMessage() for r in caplog.records if "cannot stop early" in r.getMessage()] == [
        "biogpt: the anatomy map does not know this family, so it cannot stop early: the forward runs every block and "
        "keeps every layer's states until they are pooled"
    ]
    assert all(torch.equal(h, full[i]) for i, h in enumerate(states))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_padded_batch_equals_each_row_alone_at_float32(model_type):
    """Every family of the map, not only the four tiny decoders: a batch of 16 rows of many lengths, padded on the
    right by embstore (explicit attention mask, no position ids), pools to what the model gives each row run alone,
    unpadded, within 1e-5 at float32, for every layer and for last, mean and max."""
    model = _model(model_type)
    gen = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(1, 12, (16,), generator=gen)]
    rows = [torch.randint(3, 500, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros((16, width), dtype=torch.long)
    mask = torch.zeros((16, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    layers, poolings = [0, 1, 2, 3], ["last", "mean", "max"]
    fwd = BatchForward(model, layers=layers, token_layers=[], poolings=poolings, dtype="float32", device="cpu")
    pooled, _ = fwd.launch({"input_ids": ids, "attention_mask": mask}, mask.sum(1).numpy()).result(poolings, [])
    with torch.inference_mode():
        for i, r in enumerate(rows):
            one = torch.ones((1, len(r)), dtype=torch.long)
            states = model(input_ids=r[None], attention_mask=one, output_hidden_states=True).hidden_states
            for k, layer in enumerate(layers):
                h = states[layer][0]
                want = {"last": h[-1], "mean": h.mean(0), "max": h.amax(0)}
                for p in poolings:
                    torch.testing.assert_close(
                        torch.from_numpy(pooled[p][k, i]), want[p], atol=1e-5, rtol=1e-5, msg=f"{model_type} {p} {i}"
                    )
