"""``heads predict`` on a ``heads finetune`` run: its fine-tuned backbone and classifier on new texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embstore.encode import length_order, make_batches, pad_batch, tokenize
from embstore.errors import ConfigError
from heads.finetune.model import is_finetune_run, load_finetuned

__all__ = ["is_finetune_run", "predict_finetuned"]


def predict_finetuned(run: str | Path, texts: list[str], pairs: list[str] | None = None, device: str = "cpu",
                      batch_size: int = 64) -> tuple[list[str], np.ndarray, list[str]]:
    """Labels, (n, classes) probabilities and label names from a ``heads finetune`` run's model/."""
    import torch

    if not texts:
        raise ConfigError("No texts to label: give one text per line (TEXT<TAB>PAIR for sentence pairs).")
    clf, tokenizer, meta = load_finetuned(run, device)
    enc = tokenize(tokenizer, texts, pairs, int(meta["max_length"]))
    order = length_order(enc.lengths)
    proba = np.zeros((len(texts), int(meta["n_classes"])), dtype=np.float32)
    with torch.inference_mode():
        for start, stop in make_batches(enc.lengths[order], batch_size, 16384):
            rows = order[start:stop]
            batch = pad_batch([enc.ids[i] for i in rows], None if enc.type_ids is None else [enc.type_ids[i] for i in rows],
                              tokenizer.pad_token_id or 0)
            logits = clf(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()})
            proba[rows] = torch.softmax(logits.float(), -1).cpu().numpy()
    names = list(meta["label_names"])
    return [names[i] for i in proba.argmax(1)], proba, names
