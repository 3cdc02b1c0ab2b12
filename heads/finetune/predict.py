"""``heads predict`` on a ``heads finetune`` run: its fine-tuned backbone and classifier on new texts or audio files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import ConfigError
from embstore.extraction.encode import length_order, make_batches, pad_batch, tokenize
from heads.finetune.model import CLASSIFIER_DIR, CLASSIFIER_META, CLASSIFIER_WEIGHTS, is_finetune_run, load_finetuned
from heads.finetune.scratch import ScratchClassifier, is_scratch_dir, load_scratch
from heads.report.rundir import MODEL_DIR

__all__ = [
    "is_finetune_run",
    "load_run_model",
    "fold_runs",
    "predict_finetuned",
    "predict_finetuned_audio",
    "predict_folds",
]


def fold_runs(run: str | Path) -> list[Path]:
    """The fold model directories of a ``heads finetune --folds K --keep-fold-models`` run, in fold order."""
    from heads.report.rundir import FOLDS_DIR

    found = [d for d in (Path(run) / FOLDS_DIR).glob("fold-*") if is_finetune_run(d)]
    return sorted(found, key=lambda d: int(d.name.split("-", 1)[1]))


def predict_folds(
    run: str | Path, lines: list[str], pairs: list[str] | None, device: str, audio: bool
) -> tuple[list[str], np.ndarray, list[str]]:
    """Labels, (n, classes) probabilities and label names of the fold ensemble: every fold model's probabilities
    averaged (each line a text, or an audio file path with ``audio``)."""
    folds = fold_runs(run)
    if not folds:
        raise ConfigError(
            f"{run} is a cross-validation run (heads finetune --folds) that kept no fold models; fine-tune with "
            "--keep-fold-models for a fold ensemble, or without --folds for one model."
        )
    probas: list[np.ndarray] = []
    names: list[str] = []
    for d in folds:
        if audio:
            _, proba, names = predict_finetuned_audio(d, lines, device=device)
        else:
            _, proba, names = predict_finetuned(d, lines, pairs, device=device)
        probas.append(proba)
    mean = np.mean(probas, axis=0).astype(np.float32)
    return [names[i] for i in mean.argmax(1)], mean, names


def load_run_model(run: str | Path, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """(classifier in eval mode, tokenizer or vocabulary, settings) of a fine-tune run: a pretrained backbone's
    (:func:`~heads.finetune.model.load_finetuned`) or a scratch: model's (:mod:`heads.finetune.scratch`)."""
    import json

    from safetensors.torch import load_file

    model_dir = Path(run) / MODEL_DIR
    if not is_scratch_dir(model_dir):
        return load_finetuned(run, device)
    meta: dict[str, Any] = json.loads((model_dir / CLASSIFIER_DIR / CLASSIFIER_META).read_text())
    encoder, vocab = load_scratch(model_dir, device)
    clf = ScratchClassifier(
        encoder,
        int(meta["n_classes"]),
        pooling=meta["pooling"],
        classifier=meta["classifier"],
        hidden=tuple(meta["classifier_hidden"]),
        dropout=float(meta["dropout"]),
    )
    clf.head.load_state_dict(load_file(str(model_dir / CLASSIFIER_DIR / CLASSIFIER_WEIGHTS)))
    return clf.eval().to(device), vocab, meta


def predict_finetuned(
    run: str | Path, texts: list[str], pairs: list[str] | None = None, device: str = "cpu", batch_size: int = 64
) -> tuple[list[str], np.ndarray, list[str]]:
    """Labels, (n, classes) probabilities and label names from a ``heads finetune`` run's model/."""
    import torch

    if not texts:
        raise ConfigError("No texts to label: give one text per line (TEXT<TAB>PAIR for sentence pairs).")
    clf, tokenizer, meta = load_run_model(run, device)
    from embstore.extraction.textspec import TextSpec

    text = TextSpec.from_dict(meta.get("text"))  # the prompt and pooled tokens it was trained with
    enc = tokenize(tokenizer, texts, pairs, int(meta["max_length"]), text)
    order = length_order(enc.lengths)
    proba = np.zeros((len(texts), int(meta["n_classes"])), dtype=np.float32)
    with torch.inference_mode():
        for start, stop in make_batches(enc.lengths[order], batch_size, 16384):
            rows = order[start:stop]
            batch = pad_batch(
                [enc.ids[i] for i in rows],
                None if enc.type_ids is None else [enc.type_ids[i] for i in rows],
                tokenizer.pad_token_id or 0,
            )
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            if enc.text_mask is not None:
                mask = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
                for j, i in enumerate(rows):
                    mask[j, : len(enc.text_mask[i])] = torch.from_numpy(np.asarray(enc.text_mask[i], dtype=bool))
                inputs["text_mask"] = mask
            logits = clf(**inputs)
            proba[rows] = torch.softmax(logits.float(), -1).cpu().numpy()
    names = list(meta["label_names"])
    return [names[i] for i in proba.argmax(1)], proba, names


def predict_finetuned_audio(
    run: str | Path, paths: list[str], device: str = "cpu", batch_size: int = 8, batch_seconds: float = 60.0
) -> tuple[list[str], np.ndarray, list[str]]:
    """Labels, (n, classes) probabilities and label names of audio files (each read whole, resampled to the model's
    rate), in batches of similar duration as in training; a missing or unreadable file is named before any work."""
    import torch

    from embstore.data.audio import bad_files_error, probe_files
    from embstore.data.tables import SplitData
    from heads.finetune.audio import ClipBatches, Clips, collate_clips

    if not paths:
        raise ConfigError("No audio files to label: give one file path per line.")
    info = probe_files(paths)
    if info.bad:
        raise bad_files_error(info, len(paths), "", "Fix the paths.")
    clf, fe, meta = load_finetuned(run, device)
    if meta.get("modality") != "audio":
        raise ConfigError(f"{run} fine-tuned a text model; give it texts, one per line, not audio files.")
    rate = int(fe.sampling_rate)
    n = len(paths)
    split = SplitData(
        name="predict",
        row_ids=np.arange(n),
        texts=[],
        pairs=None,
        labels=None,
        audio=list(paths),
        audio_frames=info.frames,
        audio_rates=info.rates,
    )
    clips = Clips(split, np.arange(n), np.zeros(n, dtype=np.int64), rate, seed=0)
    from embstore.backbones.registry import window_samples
    from embstore.data.audio import check_window

    check_window(
        list(paths),
        clips.lengths,
        window=window_samples(fe),
        rate=rate,
        split="predict",
        max_seconds=None,
        fix="Cut those files to the window, or leave them out.",
    )
    collate = collate_clips(fe)
    proba = np.zeros((n, int(meta["n_classes"])), dtype=np.float32)
    with torch.inference_mode():
        for keys in ClipBatches(clips.lengths, batch_size, max(1, int(batch_seconds * rate)), seed=0, shuffle=False):
            batch = collate([clips[k] for k in keys])
            batch.pop("labels")
            logits = clf(**{k: v.to(device) for k, v in batch.items()})
            proba[[i for i, _ in keys]] = torch.softmax(logits.float(), -1).cpu().numpy()
    names = list(meta["label_names"])
    return [names[i] for i in proba.argmax(1)], proba, names
