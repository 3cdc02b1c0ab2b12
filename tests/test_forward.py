"""The device side of the hot loop: the forward stops at the last layer asked for, with the very
states of a full ``output_hidden_states`` forward; one masked reduction pools every layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import TEXTS

from embstore import ExtractConfig, extract, open_store
from embstore.backbones.anatomy import find_blocks as layer_modules
from embstore.backbones.registry import RANDOM_CONFIGS, load_backbone
from embstore.extraction.forward import hidden_states, pool_layers


def _count_calls(model) -> list[int]:
    calls = [0] * len(layer_modules(model))
    for i, layer in enumerate(layer_modules(model)):
        layer.register_forward_hook(lambda *_a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    return calls


def _speech(model_type: str, **over):
    from transformers import AutoConfig, AutoModel

    kw = {k: v for k, v in RANDOM_CONFIGS["hubert-tiny"].items() if k != "model_type"}
    kw.update(over, num_hidden_layers=3)
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **kw)).eval()


def _text_inputs(tokenizer) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(["a short one", "a rather longer sentence about the markets"], padding=True, return_tensors="pt")
    )


def _audio_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8000, generator=g)
    mask = torch.ones(2, 8000, dtype=torch.long)
    x[1, 5000:] = 0
    mask[1, 5000:] = 0
    return {"input_values": x, "attention_mask": mask}


MODELS = {
    "tiny-bert": lambda: (lambda bb: (bb.model, _text_inputs(bb.tokenizer)))(load_backbone("random:tiny-bert")),
    "hubert-stable": lambda: (load_backbone("random:hubert-tiny").model, _audio_inputs()),
    "hubert-group-norm": lambda: (
        _speech("hubert", feat_extract_norm="group", do_stable_layer_norm=False),
        _audio_inputs(),
    ),
    "wav2vec2": lambda: (_speech("wav2vec2"), _audio_inputs()),
    "wavlm": lambda: (_speech("wavlm"), _audio_inputs()),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_stops_at_the_last_layer_with_the_full_forwards_states(name):
    model, inputs = MODELS[name]()
    with torch.inference_mode():
        full = model(**inputs, output_hidden_states=True).hidden_states
    n = len(layer_modules(model))
    assert len(full) == n + 1
    calls = _count_calls(model)
    hooks = [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layer_modules(model)]
    for last in range(n + 1):
        calls[:] = [0] * n
        with torch.inference_mode():
            states = hidden_states(model, inputs, last)
        assert len(states) == last + 1
        for i, h in enumerate(states):
            assert torch.equal(h, full[i]), (name, last, i)
        # layers above the last one asked for never run (at the top the whole model runs, as before)
        assert calls == [1] * last + [0] * (n - last), (last, calls)
    assert hooks == [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layer_modules(model)]


@pytest.mark.slow
def test_minilm_stops_early_with_the_full_forwards_states():
    bb = load_backbone("minilm")
    inputs = _text_inputs(bb.tokenizer)
    with torch.inference_mode():
        full = bb.model(**inputs, output_hidden_states=True).hidden_states
        for last in (0, 1, 4):
            assert all(torch.equal(h, full[i]) for i, h in enumerate(hidden_states(bb.model, inputs, last)))


def test_one_masked_reduction_equals_pooling_layer_by_layer():
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(5, 9, 16, generator=g) for _ in range(4)]
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    layers = [3, 0, 2]
    out = pool_layers(hidden, layers, ["cls", "mean", "max"], mask)
    assert out.shape == (3, 3, 5, 16)
    weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(1).float()
    for k, i in enumerate(layers):
        assert torch.equal(out[0, k], hidden[i][:, 0])
        assert torch.equal(out[1, k], torch.bmm(weights, hidden[i]).squeeze(1))  # bit for bit
        for b, n in enumerate(lengths.tolist()):
            assert torch.equal(out[2, k, b], hidden[i][b, :n].amax(0))


@pytest.mark.parametrize("layers, tokens", [("0", None), ("0-1", "1"), ("1", "0")])
def test_a_store_of_low_layers_equals_the_full_store(tiny_csv, layers, tokens):
    """Stopping early changes nothing stored: same bytes as the matching layers of a full run."""
    kw = dict(model="random:tiny-bert", data=str(tiny_csv), pooling=("cls", "mean", "max"), batch_size=5, chunk_rows=8)
    full = open_store(extract(ExtractConfig.from_dict(dict(**kw, tokens="all")), show_progress=False).path)
    part = open_store(
        extract(ExtractConfig.from_dict(dict(**kw, layers=layers, tokens=tokens)), show_progress=False).path
    )
    assert part.path != full.path
    np.testing.assert_array_equal(part.row_ids("all"), full.row_ids("all"))
    for p in ("cls", "mean", "max"):
        np.testing.assert_array_equal(part.pooled("all", p), full.pooled("all", p, layers=part.layers))
    for layer in part.token_layers:  # token layers need not be among the pooled ones ('--layers 0 --tokens 1')
        np.testing.assert_array_equal(part.tokens("all", layer).values, full.tokens("all", layer).values)
        np.testing.assert_array_equal(part.tokens("all", layer).offsets, full.tokens("all", layer).offsets)


def test_batches_read_back_through_a_reused_ring_of_host_buffers_are_intact(tiny_csv):
    """The CUDA protocol on the CPU: each batch lands in one of two reused host buffers and is read
    only after the next one was launched; nothing is overwritten before it is read."""
    from embstore.extraction.encode import ChunkEncoder, ChunkJob, tokenize
    from embstore.extraction.forward import _HostRing

    bb = load_backbone("random:tiny-bert")
    enc = tokenize(bb.tokenizer, [t * (1 + i % 3) for i, t in enumerate(TEXTS)], None, 64)
    job = ChunkJob(split="x", chunk=0, towers={"t": (enc.ids, None, None)})
    kw = dict(
        layers=[0, 2],
        token_layers=[1],
        poolings=["cls", "mean", "max"],
        dtype="float16",
        batch_size=2,
        token_budget=10_000,
        device="cpu",
    )
    plain = ChunkEncoder(bb.model, 0, **kw).encode(job, lambda t, w, layer: f"{w}{layer}")
    ringed = ChunkEncoder(bb.model, 0, **kw)
    ringed.forward.ring = _HostRing()
    out = ringed.encode(job, lambda t, w, layer: f"{w}{layer}")
    assert ringed.forward.ring.next == 0 and all(b for b in ringed.forward.ring.buffers)  # 6 batches, 2 slots
    assert out.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(out[name], plain[name])
