"""Every speech family of the anatomy map (wav2vec2/HuBERT/UniSpeech with a group-norm or a layer-norm front end,
WavLM, data2vec-audio, the conformer with relative and rotary positions, SEW, SEW-D, Whisper's encoder) as a tiny
random model built from a config in code: stored values at batch 8, clips of different lengths sharing batches,
equal transformers on one clip at a time, unpadded; frame counts are the model's own; the forward stop, freezing,
truncation, head pruning (or its refusal) and fine-tuning go through the map. No pretrained speech weights exist
here: every model is random."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from factories import write_clips

from embstore.backbones.anatomy import (
    FAMILIES,
    attention,
    base_of,
    blocks,
    encoder_layers,
    family_of,
    layer_parameters,
    top_modules,
)
from embstore.backbones.padding import exact_batches
from embstore.backbones.pruned import prune_heads
from embstore.backbones.registry import RANDOM_CONFIGS, load_backbone
from embstore.config import ExtractConfig
from embstore.errors import ConfigError, DataError
from embstore.extraction.forward import hidden_states
from embstore.extraction.run import extract
from embstore.store.reader import open_store
from heads.finetune.config import FinetuneConfig
from heads.finetune.run import prepare_encoder, run_finetune
from heads.finetune.surgery import count_parameters, freeze, parse_freeze, truncate

_TINY = {k: v for k, v in RANDOM_CONFIGS["hubert-tiny"].items() if k != "model_type"}
_GROUP = dict(_TINY, feat_extract_norm="group", do_stable_layer_norm=False, num_hidden_layers=3)
_LAYER = dict(_TINY, num_hidden_layers=3)  # layer-norm front end, pre-norm blocks (the final norm after them)
_WHISPER = dict(
    model_type="whisper",
    d_model=32,
    encoder_layers=3,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    num_mel_bins=16,
    max_source_positions=50,  # a 1-second window (2 log-mel frames of 160 samples per position)
    max_target_positions=16,
    vocab_size=100,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)

# case -> (family in the anatomy map, config)
CASES: dict[str, tuple[str, dict]] = {
    "wav2vec2-group": ("wav2vec2", dict(_GROUP, model_type="wav2vec2")),
    "wav2vec2-layer": ("wav2vec2", dict(_LAYER, model_type="wav2vec2")),
    "hubert-group": ("wav2vec2", dict(_GROUP, model_type="hubert")),
    "unispeech-group": ("wav2vec2", dict(_GROUP, model_type="unispeech")),
    "unispeech-sat-group": ("wav2vec2", dict(_GROUP, model_type="unispeech-sat")),
    "wavlm-group": ("wavlm", dict(_GROUP, model_type="wavlm")),
    "data2vec-audio": (
        "data2vec-audio",
        dict(
            _TINY,
            model_type="data2vec-audio",
            num_hidden_layers=3,
            do_stable_layer_norm=False,
            num_conv_pos_embeddings=5,
        ),
    ),  # fmt: skip
    "conformer-relative": (
        "wav2vec2-conformer",
        dict(_GROUP, model_type="wav2vec2-conformer", conv_depthwise_kernel_size=7),
    ),  # fmt: skip
    "conformer-rotary": (
        "wav2vec2-conformer",
        dict(_GROUP, model_type="wav2vec2-conformer", conv_depthwise_kernel_size=7, position_embeddings_type="rotary"),
    ),  # fmt: skip
    "sew": ("sew", dict(_GROUP, model_type="sew", squeeze_factor=2)),
    "sew-d": (
        "sew-d",
        {
            k: v
            for k, v in dict(_GROUP, model_type="sew-d", squeeze_factor=2).items()
            if k != "num_conv_pos_embedding_groups"
        },
    ),  # fmt: skip
    "whisper": ("whisper-encoder", _WHISPER),
}
REFUSED = {"wavlm-group": "gated relative position bias"}
"""Cases whose heads cannot be removed, with the reason the refusal names."""
LENGTHS = [4800, 5123, 6001, 6400, 7999, 8800, 9777, 10400, 5555, 7003, 8321, 6667]
"""Samples (16 kHz) of the clips: 12 different lengths, odd frame counts among them (SEW rounds its squeeze down)."""


def model_path(tmp_path: Path, case: str) -> str:
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(CASES[case][1]))
    return f"random:{path}"


def backbone(tmp_path: Path, case: str):
    return load_backbone(model_path(tmp_path, case))


def inputs_alone(bb, wave: np.ndarray) -> dict[str, torch.Tensor]:
    """The model inputs of one clip alone, unpadded, as transformers' feature extractor makes them."""
    name = bb.tokenizer.model_input_names[0]
    return {name: bb.tokenizer(wave, sampling_rate=16000, return_tensors="pt")[name]}


def own_frames(bb, wave: np.ndarray) -> int:
    """The clip's frames as the model itself counts them: the hidden states of the clip alone, or for Whisper (whose
    states always span the window) its own output lengths of the frames its feature extractor marks real."""
    if family_of(bb.model).window:
        mask = bb.tokenizer(wave, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
        return int(bb.model._get_feat_extract_output_lengths(mask["attention_mask"].sum(-1))[0])
    with torch.inference_mode():
        return int(bb.model(**inputs_alone(bb, wave), output_hidden_states=True).hidden_states[0].shape[1])


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    return write_clips(tmp_path / "clips", LENGTHS)


def test_every_speech_family_of_the_map_has_a_case():
    speech = {f.name for f in FAMILIES if f.modality == "audio"}
    assert speech == {family for family, _ in CASES.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_case_is_the_family_it_stands_for(tmp_path, case):
    bb = backbone(tmp_path, case)
    assert bb.modality == "audio" and family_of(bb.model).name == CASES[case][0]
    assert len(blocks(base_of(bb.model))) == bb.n_layers == 3
    if case == "whisper":  # the encoder alone: no decoder built
        assert type(bb.model).__name__ == "WhisperEncoder"
        assert not any("decoder" in n for n, _ in bb.model.named_parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_stored_values_equal_one_clip_at_a_time(tmp_path, clips, case):
    """Batches of 8 clips of different lengths (sorted by length, padded): every layer's stored mean and max, the
    frame counts and the per-frame states of the top layer equal transformers on each clip alone, within 1e-5 in
    float32. Whisper's are pooled over the clip's own frames of its window only."""
    model = model_path(tmp_path, case)
    cfg = dict(model=model, data=str(clips), audio_col="file", label_col="label", dtype="float32", batch_size=8)
    res = extract(ExtractConfig.from_dict(dict(cfg, pooling=("mean", "max"), tokens="0,-1")), show_progress=False)
    bb = load_backbone(model)
    with open_store(res.path) as store:
        assert store.provenance.batching == "exact"
        rows = store.row_ids("all")
        n_tokens = store.n_tokens("all")
        mean, mx = store.pooled("all", "mean"), store.pooled("all", "max")
        top = store.tokens("all", 3)
        for r, row in enumerate(rows):
            wave, _ = sf.read(clips.parent / "audio" / f"r{row}.wav", dtype="float32")
            assert n_tokens[r] == own_frames(bb, wave), (case, row)
            with torch.inference_mode():
                states = bb.model(**inputs_alone(bb, wave), output_hidden_states=True).hidden_states
            own = [s[0, : n_tokens[r]] for s in states]
            np.testing.assert_allclose(mean[r], torch.stack([s.mean(0) for s in own]).numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(mx[r], torch.stack([s.amax(0) for s in own]).numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(top[r], own[3].numpy(), atol=1e-5, rtol=0)
    assert len(set(n_tokens.tolist())) >= 8  # clips of different lengths shared the batches


@pytest.mark.parametrize("case", [c for c in CASES if c != "whisper"])
def test_padding_reaches_the_family_without_the_fix(tmp_path, case):
    """The padding-sensitive families need :func:`exact_batches`: without it the shorter clip of a padded batch
    differs from itself alone (the layer-norm wav2vec2 needs nothing, and equals itself alone either way)."""
    bb = backbone(tmp_path, case)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (6001, 10400)]
    values = torch.zeros(2, 10400)
    mask = torch.zeros(2, 10400, dtype=torch.long)
    for i, w in enumerate(waves):
        x = bb.tokenizer(w, sampling_rate=16000, return_tensors="pt")["input_values"][0]
        values[i, : len(x)], mask[i, : len(x)] = x, 1
    n = own_frames(bb, waves[0])
    with torch.inference_mode():
        alone = bb.model(**inputs_alone(bb, waves[0]), output_hidden_states=True).hidden_states[-1][0]
        plain = bb.model(input_values=values, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with exact_batches(bb.model):
            fixed = bb.model(input_values=values, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(fixed[0, :n], alone, atol=1e-5, rtol=0)
    gap = float((plain[0, :n] - alone).abs().max())
    assert (gap < 1e-5) if case == "wav2vec2-layer" else (gap > 1e-3), (case, gap)


@pytest.mark.parametrize("case", ["sew", "sew-d", "whisper", "wav2vec2-group"])
def test_frame_counts_are_the_models_own(tmp_path, case):
    """Backbone.frames (what masks, pools and counts n_tokens) equals the frames the model itself gives each clip,
    over lengths of every remainder: SEW's states run at half its conv frame rate, Whisper's at half its log-mel."""
    bb = backbone(tmp_path, case)
    lengths = [720, 1039, 1040, 1359, 3333, 4800, 4801, 5120, 5441, 7999, 15999]  # SEW needs 2 conv frames
    rng = np.random.default_rng(1)
    want = [own_frames(bb, rng.standard_normal(n).astype(np.float32)) for n in lengths]
    assert bb.frames(lengths).tolist() == want


@pytest.mark.parametrize("case", list(CASES))
def test_the_forward_stop_runs_only_the_blocks_needed(tmp_path, case):
    bb = backbone(tmp_path, case)
    inputs = inputs_alone(bb, np.random.default_rng(2).standard_normal(9000).astype(np.float32))
    with torch.inference_mode():
        full = bb.model(**inputs, output_hidden_states=True).hidden_states
    runs = [0]
    for block in blocks(base_of(bb.model)):
        block.register_forward_hook(lambda *_a: runs.__setitem__(0, runs[0] + 1))
    for last in range(len(full)):
        runs[0] = 0
        with torch.inference_mode():
            states = hidden_states(bb.model, inputs, last)
        assert runs[0] == last and len(states) == last + 1, (case, last, runs)
        assert all(torch.equal(s, full[i]) for i, s in enumerate(states)), (case, last)


@pytest.mark.parametrize("case", list(CASES))
def test_freeze_all_leaves_nothing_trainable_in_the_backbone(tmp_path, case):
    """The map places every parameter (the front end, its norm and projection, the position convs, the final norm,
    SEW's upsampling, a wav2vec2 adapter), so ``--freeze all`` freezes the whole backbone."""
    bb = backbone(tmp_path, case)
    base = base_of(bb.model)
    placed = {id(p) for p, _ in layer_parameters(base)}
    assert [n for n, p in base.named_parameters() if id(p) not in placed] == []
    encoder = prepare_encoder(FinetuneConfig.from_dict(dict(model="unused", freeze="all")), bb.model).model
    trainable, total = count_parameters(encoder)
    assert trainable == 0 and total > 0


# case -> the modules after the last block, which belong to layer L
TOP = {
    "wav2vec2-layer": ["encoder.layer_norm"],
    "conformer-relative": ["encoder.layer_norm"],
    "sew": ["encoder.upsample"],
    "sew-d": ["encoder.upsample"],
    "whisper": ["layer_norm"],
    "wav2vec2-group": [],  # post-norm: its encoder norm runs before the first block (layer 0)
    "data2vec-audio": [],
}


@pytest.mark.parametrize("case", list(TOP))
def test_a_freeze_range_names_the_final_norm_with_the_last_layer(tmp_path, case):
    model = backbone(tmp_path, case).model
    base = base_of(model)
    modules = dict(base.named_modules())
    assert [m for m in top_modules(base)] == [modules[name] for name in TOP[case]]
    params = [p for name in TOP[case] for p in modules[name].parameters()]
    for spec, frozen in [("0", False), ("0-2", False), ("3", True), ("2-3", True)]:
        model.requires_grad_(True)
        freeze(model, parse_freeze(spec, 3))
        assert all(p.requires_grad is not frozen for p in params), (case, spec)
    if not TOP[case]:
        model.requires_grad_(True)
        freeze(model, parse_freeze("0", 3))
        assert not modules["encoder.layer_norm"].weight.requires_grad


@pytest.mark.parametrize("case", list(CASES))
def test_truncation_keeps_the_stored_layer(tmp_path, case):
    """``--truncate 2`` leaves a model whose top state is the full model's layer 2 (Whisper keeps its final norm
    on top, which its hidden states include: its layer 2 normed)."""
    bb = backbone(tmp_path, case)
    inputs = inputs_alone(bb, np.random.default_rng(3).standard_normal(9000).astype(np.float32))
    model = copy.deepcopy(bb.model)
    truncate(model, 2)
    assert len(blocks(base_of(model))) == 2
    with torch.inference_mode():
        full = bb.model(**inputs, output_hidden_states=True).hidden_states
        cut = model(**inputs, output_hidden_states=True).hidden_states
        want = bb.model.layer_norm(full[2]) if case == "whisper" else full[2]
    assert len(cut) == 3
    torch.testing.assert_close(cut[-1], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c not in REFUSED])
def test_a_pruned_head_is_the_head_zeroed(tmp_path, case):
    """Removing head 0 of layer 2 and head 1 of layer 3 equals zeroing their columns of the output projection
    (the conformer's position projection and per-head position biases are cut with them)."""
    bb = backbone(tmp_path, case)
    inputs = inputs_alone(bb, np.random.default_rng(4).standard_normal(9000).astype(np.float32))
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


@pytest.mark.parametrize("case", list(REFUSED))
def test_prune_is_refused_with_the_reason(tmp_path, case):
    model = backbone(tmp_path, case).model
    with pytest.raises(ConfigError, match=rf"{REFUSED[case]}.*use --freeze or --truncate"):
        prune_heads(model, {2: [0]})


def test_whisper_reads_one_window_and_refuses_longer_clips(tmp_path):
    """The random Whisper's window is 1 s: a longer clip is refused in one line naming it and the fix, a
    --max-seconds over the window too; --max-seconds 1 cuts the clip to the window."""
    data = write_clips(tmp_path / "clips", [8000, 19200, 12000])
    cfg = dict(model=model_path(tmp_path, "whisper"), data=str(data), audio_col="file", label_col="label")
    with pytest.raises(DataError, match=r"1 clips of split 'all' are longer than the model's input window of 1 s.*"
                       r"r1\.wav \(1\.20 s\).*--max-seconds 1"):  # fmt: skip
        extract(ExtractConfig.from_dict(cfg), show_progress=False)
    with pytest.raises(ConfigError, match=r"--max-seconds 2 is longer than the model's input window of 1 s"):
        extract(ExtractConfig.from_dict(dict(cfg, max_seconds=2.0)), show_progress=False)
    res = extract(ExtractConfig.from_dict(dict(cfg, max_seconds=1.0, dtype="float32")), show_progress=False)
    with open_store(res.path) as store:
        assert sorted(store.n_tokens("all").tolist()) == [25, 38, 50]  # 8000, 12000 and 16000 samples


def test_a_full_whisper_checkpoint_loads_its_encoder_alone(tmp_path, clips):
    """A saved WhisperForConditionalGeneration loads as its WhisperEncoder with the checkpoint's encoder weights;
    the decoder's are never read."""
    from transformers import AutoConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = AutoConfig.for_model(**_WHISPER)
    torch.manual_seed(0)
    full = WhisperForConditionalGeneration(config)
    full.save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(tmp_path / "whisper")
    bb = load_backbone(str(tmp_path / "whisper"))
    assert type(bb.model).__name__ == "WhisperEncoder"
    want = full.model.encoder.state_dict()
    assert bb.model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in bb.model.state_dict().items())
    res = extract(
        ExtractConfig.from_dict(
            dict(model=str(tmp_path / "whisper"), data=str(clips), audio_col="file", label_col="label", layers="0-1")
        ),  # fmt: skip
        show_progress=False,
    )
    with open_store(res.path) as store:
        assert store.layers == [0, 1] and store.complete


def finetune(data: Path, out: Path, model: str, **kw: object):
    base = dict(model=model, data=str(data), audio_col="file", label_col="label", holdout=0.25, epochs=1,
                batch_size=4, validation_fraction=0.25, out=str(out))  # fmt: skip
    return run_finetune(FinetuneConfig.from_dict({**base, **kw}), show_progress=False)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[] if c in ("whisper", "sew") else [pytest.mark.slow]) for c in CASES]
)
def test_finetune_truncated_runs_and_reloads_through_extract(tmp_path, case):
    """``heads finetune --truncate 2 --freeze feature-encoder`` (and ``--prune-heads 2:0`` where the family
    prunes) runs, and ``embstore extract --model run/model`` reads the saved encoder: two layers."""
    data = write_clips(tmp_path / "clips", [4800 + 400 * i for i in range(16)])
    prune = {} if case in REFUSED else {"prune_heads": "2:0"}
    window = {"max_seconds": 1.0} if case == "whisper" else {}  # the training crop (20 s) within its 1-s window
    res = finetune(data, tmp_path / "run", model_path(tmp_path, case), truncate=2, **prune, **window)
    assert 0 < res.trainable_params < res.total_params
    model_dir = res.run_dir / "model"
    store = extract(
        ExtractConfig.from_dict(dict(model=str(model_dir), data=str(data), audio_col="file", label_col="label")),
        show_progress=False,
    )
    with open_store(store.path) as s:
        assert s.complete and s.layers == [0, 1, 2] and s.provenance.batching == "exact"
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved.get("embstore_pruned_heads") == (None if case in REFUSED else {"2": [0]})


@pytest.mark.parametrize("case", ["wav2vec2-layer", "hubert-group", "conformer-relative", "sew", "whisper"])
def test_finetuning_pools_the_stored_top_layer(tmp_path, clips, case):
    """The fine-tune classifies the mean of the very tensor the store calls layer L (before the final norm of a
    pre-norm encoder and the conformer, at SEW's squeezed rate, Whisper's normed top), batched as extraction batches
    them; in training, with every block dropped by layerdrop, it still has a top state (the input of the norm)."""
    from heads.finetune.audio import collate_clips
    from heads.finetune.model import SpeechClassifier

    model = model_path(tmp_path, case)
    cfg = dict(model=model, data=str(clips), audio_col="file", label_col="label", dtype="float32", batch_size=8)
    res = extract(ExtractConfig.from_dict(dict(cfg, pooling=("mean",), layers="3")), show_progress=False)
    bb = load_backbone(model)
    classifier = SpeechClassifier(bb.model, 2, pooling="mean")
    classifier.head = torch.nn.Identity()  # the pooled features themselves
    with open_store(res.path) as store:
        rows, stored = store.row_ids("all"), store.pooled("all", "mean", layers=[3])[:, 0]
    waves = [sf.read(clips.parent / "audio" / f"r{row}.wav", dtype="float32")[0] for row in rows]
    batch = collate_clips(bb.tokenizer)([(w, 0) for w in waves])
    batch.pop("labels")
    with torch.inference_mode():
        pooled = classifier.eval()(**batch).numpy()
    np.testing.assert_allclose(pooled, stored, atol=1e-5, rtol=0)
    # what follows the top state (the final norm, SEW's upsampling) is frozen: every trainable parameter gets a
    # gradient (several processes' DDP refuses unused ones); SpecAugment's mask embedding runs only when a mask is drawn
    prepare_encoder(FinetuneConfig.from_dict(dict(model="unused", freeze="none")), bb.model)
    if hasattr(bb.model.config, "layerdrop"):
        bb.model.config.layerdrop = 0.0
    classifier.train()(**batch).sum().backward()
    unused = [n for n, p in bb.model.named_parameters() if p.requires_grad and p.grad is None]
    assert [n for n in unused if n != "masked_spec_embed"] == []
    if hasattr(bb.model.config, "layerdrop"):
        bb.model.config.layerdrop = 1.0
        assert classifier.train()(**batch).shape == pooled.shape
