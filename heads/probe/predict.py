"""``heads predict``: the backbone of the store plus a saved head, on new texts or audio files.

Everything about the store comes from the head's :class:`~heads.probe.card.HeadCard`; the store itself is not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embstore.backbones.registry import Placement, load_backbone
from embstore.errors import ConfigError, ModelNotFoundError
from embstore.extraction.encode import ChunkEncoder, ChunkJob, length_order, tokenize
from embstore.extraction.textspec import TextSpec
from heads.probe.card import HeadCard
from heads.probe.estimator import HeadClassifier
from heads.probe.features import FeatureBank
from heads.probe.modules import Ragged
from heads.probe.specs import Combo
from heads.report.rundir import BEST_HEAD_DIR

__all__ = ["load_head", "fold_heads", "head_card", "label_names", "predict_texts", "predict_audio", "head_modality"]


def load_head(run: str | None = None, head_dir: str | None = None) -> HeadClassifier:
    """The best head of a run directory, or a head directory, with its card (``est.card_``, see :func:`head_card`)."""
    if (run is None) == (head_dir is None):
        raise ConfigError("Pass exactly one of --run RUNDIR (its best head) or --head-dir DIR.")
    directory = Path(head_dir) if head_dir is not None else Path(str(run)) / BEST_HEAD_DIR
    if not (directory / "head.json").is_file():
        raise ConfigError(
            f"{directory} holds no saved head (head.json); pass a run directory written by 'heads sweep'/'heads train' "
            f"or a head directory."
        )
    est = HeadClassifier.load(directory)
    head_card(est)
    return est


def fold_heads(run: str | Path) -> list[HeadClassifier]:
    """The fold heads a sweep kept (``heads sweep --folds K --keep-fold-models``), in fold order; [] for none."""
    from heads.report.rundir import FOLDS_DIR

    root = Path(run) / BEST_HEAD_DIR / FOLDS_DIR
    dirs = sorted((d for d in root.glob("fold-*") if (d / "head.json").is_file()), key=lambda d: int(d.name[5:]))
    return [HeadClassifier.load(d) for d in dirs]


def head_card(est: HeadClassifier) -> HeadCard:
    """The card of a loaded head; ConfigError when it was saved without one (outside a sweep)."""
    card = getattr(est, "card_", None)
    if card is None:
        raise ConfigError(
            "This head was saved without its store's description; save it with 'heads sweep' or 'heads train'."
        )
    return card


def predict_texts(
    est: HeadClassifier,
    texts: list[str],
    pairs: list[str] | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    token_budget: int = 16384,
) -> tuple[list[str], np.ndarray]:
    """Labels and (n, classes) probabilities for new texts, encoded exactly as the store was."""
    card = head_card(est)
    if not texts:
        raise ConfigError("No texts to label: give one text per line (TEXT<TAB>PAIR for sentence pairs).")
    combo, towers = card.combo, list(card.towers)
    if card.needs_pairs and pairs is None:
        raise ConfigError("This head was trained on sentence pairs: give one 'TEXT<TAB>PAIR' per line.")
    if not card.needs_pairs:
        pairs = None
    backbone = _backbone(card, device)
    if backbone.modality != "text":
        raise ConfigError(f"This head was trained on audio ({backbone.name}); give audio file paths, one per line.")
    max_length = int(card.max_length or 256)
    tok = backbone.tokenizer
    # the store's template and pooled tokens (None: the text alone, every token pooled)
    spec = TextSpec.from_dict(None if card.text is None else card.text.to_dict())
    inputs = {
        t: tokenize(tok, texts if t != "b" else pairs or [], pairs if len(towers) == 1 else None, max_length, spec)
        for t in towers
    }
    lengths = np.sum([e.lengths for e in inputs.values()], axis=0)
    order = length_order(lengths)
    job = ChunkJob(
        split="predict",
        chunk=0,
        towers={t: e.rows(order) for t, e in inputs.items()},
    )
    token_layers = list(combo.layers) if combo.pooling == "tokens" else []
    poolings = [] if combo.pooling == "tokens" else [combo.pooling]
    encoder = ChunkEncoder(
        backbone.model,
        tok.pad_token_id or 0,
        layers=combo.layers,
        token_layers=token_layers,
        poolings=poolings or ["cls"],
        dtype=card.dtype,
        batch_size=batch_size,
        token_budget=token_budget,
        device=device,
    )
    arrays = encoder.encode(job, lambda tower, what, layer: f"{tower}/{what}/{layer}")
    lens = np.array([len(x) for x in job.towers[towers[0]][0]], dtype=np.int64)
    return _classify(est, combo, arrays, towers, order, lens)


def _backbone(card: HeadCard, device: str) -> Any:
    """The head's backbone, refused when its weights are not those the store was made with."""
    model_info = card.model
    # the compute dtype the store was made in (stores from before it was recorded computed in float32 on the CPU)
    backbone = load_backbone(
        str(model_info["name"]), device, placement=Placement(dtype=str(card.compute_dtype or "float32"))
    )
    if model_info.get("weights_sha256") and backbone.identity["weights_sha256"] != model_info["weights_sha256"]:
        raise ModelNotFoundError(
            f"The model {model_info['name']!r} found now has other weights than the store this head was trained on; "
            f"point --model at the original weights."
        )
    if card.precision == "int8-dynamic":  # the store was made with --quantize int8: encode the same way
        from embstore.backbones.quantize import check_quantize_device, quantize_int8

        check_quantize_device("int8", device)
        quantize_int8(backbone.model)
    return backbone


def _classify(
    est: HeadClassifier,
    combo: Combo,
    arrays: dict[str, np.ndarray],
    towers: list[str],
    order: np.ndarray,
    token_lengths: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """Labels and probabilities from encoded arrays (rows in ``order``), back in input order."""
    inverse = np.argsort(order)
    if combo.pooling == "tokens":
        values = arrays[f"{towers[0]}/tokens/{combo.layers[0]}"]
        ragged = Ragged(values, np.concatenate([[0], np.cumsum(token_lengths)]).astype(np.int64))
        X: Any = ragged.take(inverse)
    else:
        blocks = [arrays[f"{t}/{combo.pooling}/None"].transpose(1, 0, 2)[inverse] for t in towers]  # (n, k, hidden)
        shaped = [FeatureBank._shape(combo, b, None) for b in blocks]
        X = tuple(shaped) if combo.head == "pair" else shaped[0]
    proba = est.predict_proba(X)
    names = label_names(est, proba.shape[1])
    return [names[i] for i in proba.argmax(1)], proba


def label_names(est: HeadClassifier, n_classes: int) -> list[str]:
    """The names of the head's outputs: its card's label names, else the class indices."""
    names = head_card(est).label_names
    return [str(n) for n in names] if names else [str(i) for i in range(n_classes)]


def head_modality(est: HeadClassifier) -> str:
    """'audio' when the head was trained on a speech model's store, else 'text'."""
    return head_card(est).modality


def predict_audio(
    est: HeadClassifier, paths: list[str], device: str = "cpu", batch_size: int = 64, batch_seconds: float = 60.0
) -> tuple[list[str], np.ndarray]:
    """Labels and (n, classes) probabilities for audio files, loaded and encoded as the store's were."""
    from embstore.data.audio import (
        bad_files_error,
        clip_lengths,
        cropped_lengths,
        min_samples,
        probe_files,
        usable_rows,
    )
    from embstore.extraction.speech import AUDIO_TOWER, AudioChunkEncoder, AudioItem

    card = head_card(est)
    if not paths:
        raise ConfigError("No audio files to label: give one file path per line.")
    combo = card.combo
    backbone = _backbone(card, device)
    info = probe_files(paths)
    if info.bad:
        raise bad_files_error(info, len(paths), "", "Fix the paths.")
    rate = backbone.sampling_rate
    max_samples = None if card.max_seconds is None else int(round(float(card.max_seconds) * rate))
    whole = clip_lengths(info.frames, info.rates, rate)
    usable_rows(
        paths,
        whole,
        np.arange(len(paths)),
        minimum=min_samples(backbone.frames),
        rate=rate,
        split="predict",
        skip_bad=False,
    )
    samples = [int(n) for n in cropped_lengths(whole, max_samples)]
    items = [AudioItem(path=p, samples=n) for p, n in zip(paths, samples)]
    order = length_order(np.array(samples))
    job = ChunkJob(split="predict", chunk=0, towers={AUDIO_TOWER: [items[i] for i in order]})
    token_layers = list(combo.layers) if combo.pooling == "tokens" else []
    poolings = [] if combo.pooling == "tokens" else [combo.pooling]
    encoder = AudioChunkEncoder(
        backbone.model,
        backbone.tokenizer,
        backbone.frames,
        max_samples=max_samples,
        batch_seconds=batch_seconds,
        layers=combo.layers,
        token_layers=token_layers,
        poolings=poolings or ["mean"],
        dtype=card.dtype,
        batch_size=batch_size,
        token_budget=0,
        device=device,
    )
    arrays = encoder.encode(job, lambda tower, what, layer: f"{tower}/{what}/{layer}")
    return _classify(est, combo, arrays, [AUDIO_TOWER], order, backbone.frames(np.array(samples)[order]))
