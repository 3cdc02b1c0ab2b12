"""``heads predict`` on a ``heads finetune`` run: its fine-tuned backbone and classifier on new texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embstore.encode import length_order, tokenize
from embstore.errors import ConfigError
from embstore.models import load_backbone

__all__ = ["is_finetune_run", "predict_finetuned"]


def is_finetune_run(run: str | Path) -> bool:
    return (Path(run) / "model" / "classifier" / "classifier.json").is_file()


def predict_finetuned(run: str | Path, texts: list[str], pairs: list[str] | None = None, device: str = "cpu",
                      batch_size: int = 64) -> tuple[list[str], np.ndarray, list[str]]:
    """Labels, (n, classes) probabilities and label names from a ``heads finetune`` run's model/."""
    import json

    import torch
    from safetensors.torch import load_file

    from embstore.encode import make_batches, pad_batch
    from heads.finetune.run import SequenceClassifier

    if not texts:
        raise ConfigError("No texts to label: give one text per line (TEXT<TAB>PAIR for sentence pairs).")
    model_dir = Path(run) / "model"
    meta = json.loads((model_dir / "classifier" / "classifier.json").read_text())
    backbone = load_backbone(str(model_dir), device)
    clf = SequenceClassifier(backbone.model, int(meta["n_classes"]), pooling=meta["pooling"], classifier=meta["classifier"],
                             hidden=tuple(meta["classifier_hidden"]), dropout=float(meta["dropout"]))
    clf.head.load_state_dict(load_file(str(model_dir / "classifier" / "classifier.safetensors")))
    clf.eval().to(device)
    enc = tokenize(backbone.tokenizer, texts, pairs, int(meta["max_length"]))
    order = length_order(enc.lengths)
    proba = np.zeros((len(texts), int(meta["n_classes"])), dtype=np.float32)
    with torch.inference_mode():
        for start, stop in make_batches(enc.lengths[order], batch_size, 16384):
            rows = order[start:stop]
            batch = pad_batch([enc.ids[i] for i in rows], None if enc.type_ids is None else [enc.type_ids[i] for i in rows],
                              backbone.tokenizer.pad_token_id or 0)
            logits = clf(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()})
            proba[rows] = torch.softmax(logits.float(), -1).cpu().numpy()
    names = list(meta["label_names"])
    return [names[i] for i in proba.argmax(1)], proba, names
