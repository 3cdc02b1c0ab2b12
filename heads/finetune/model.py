"""The model ``heads finetune`` trains: an encoder, a pooling of its last hidden state and a new classifier.

:class:`SequenceClassifier` (text) and :class:`SpeechClassifier` (speech) are the models; :func:`save_finetuned`
writes one as ``model/`` (the encoder as a Hugging
Face directory, so ``embstore extract --model`` reads it) plus ``model/classifier/`` (the head's weights and
settings), and :func:`load_finetuned` reads both back for ``heads predict``. :func:`importance_pruning` removes
the least important attention heads (Michel et al. 2019) after the first epoch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from embstore.backbones.pruned import prune_heads, save_model
from heads.finetune.surgery import head_importance, heads_to_prune
from heads.report.rundir import MODEL_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CLASSIFIER_DIR",
    "CLASSIFIER_META",
    "CLASSIFIER_WEIGHTS",
    "Classifier",
    "SequenceClassifier",
    "SpeechClassifier",
    "importance_pruning",
    "is_finetune_run",
    "load_finetuned",
    "save_finetuned",
    "state_copy",
]

log = logging.getLogger(__name__)
# In a subfolder of model/: load_model and load_backbone read every model/*.safetensors as encoder weights.
CLASSIFIER_DIR, CLASSIFIER_WEIGHTS, CLASSIFIER_META = "classifier", "classifier.safetensors", "classifier.json"


class Classifier(nn.Module):
    """An encoder and a new linear or MLP classifier on a pooling of its last hidden state; subclasses pool."""

    def __init__(
        self,
        encoder: nn.Module,
        n_classes: int,
        *,
        pooling: str = "cls",
        classifier: str = "linear",
        hidden: tuple[int, ...] = (2048,),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        width = int(getattr(encoder, "config").hidden_size)
        layers: list[nn.Module] = []
        if classifier == "mlp":
            for i, h in enumerate(hidden):
                if i:
                    layers.append(nn.Dropout(dropout))
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, n_classes))
        self.head = nn.Sequential(*layers)

    @property
    def base_model(self) -> nn.Module:
        """The encoder, where heads.finetune.surgery looks for its base."""
        return self.encoder


def _takes_type_ids(encoder: nn.Module) -> bool:
    """Whether ``encoder``'s forward has a ``token_type_ids`` parameter (as extraction decides it)."""
    import inspect

    return "token_type_ids" in inspect.signature(encoder.forward).parameters


class SequenceClassifier(Classifier):
    """Text: encoder + pooling ('cls', masked 'mean' or 'last' non-pad token) of the last hidden state + classifier."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids and mask -> (B, C) logits; token types (sentence pairs) only for an encoder that reads them
        (DistilBERT, ModernBERT and T5 do not); ``text_mask`` (B, T): the tokens 'mean' covers (``--pool-tokens
        text``; None: every non-pad token)."""
        kwargs = (
            {} if token_type_ids is None or not _takes_type_ids(self.encoder) else {"token_type_ids": token_type_ids}
        )
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # (B, T, H)
        if self.pooling == "last":  # the last non-pad token of each (right-padded) row: in a causal model it has
            # seen the whole text, and the padding after it changes nothing before it
            last = attention_mask.sum(1).clamp(min=1) - 1  # (B,)
            pooled = states[torch.arange(states.shape[0], device=states.device), last]
        elif self.pooling == "mean":
            covered = attention_mask if text_mask is None else text_mask
            mask = covered.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            pooled = states[:, 0]  # (B, H)
        return self.head(pooled)


class SpeechClassifier(Classifier):
    """Speech: encoder + mean of the top layer's frames + classifier. The top layer is the tensor a store of the same
    model calls layer L (transformers' ``hidden_states[-1]``: before the final norm of the pre-norm encoders and the
    conformer, at SEW's squeezed rate, after Whisper's final norm), so a probe on the store's top layer and the
    fine-tune classify the same features (and ``--truncate K`` classifies from the store's layer K). The mean is
    masked by each clip's own frame count, and the batch runs with the padding kept out of every clip
    (:func:`embstore.backbones.padding.exact_batches`), so a clip's logits do not depend on its batch."""

    def forward(
        self,
        lengths: torch.Tensor,
        input_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,) lengths in the model's input units, and the (B, S) waveforms (with their (B, S) mask) or Whisper's
        (B, mels, frames) log-mel features -> (B, C) logits."""
        from embstore.backbones.anatomy import state_frames, top_state_module
        from embstore.backbones.padding import exact_batches

        given = {"input_values": input_values, "input_features": input_features, "attention_mask": attention_mask}
        inputs = {k: v for k, v in given.items() if v is not None}
        top: list[torch.Tensor] = []
        module = top_state_module(self.encoder)  # the top state is its input (a final norm, SEW's upsampling)
        hook = None if module is None else module.register_forward_pre_hook(lambda _m, args: top.append(args[0]))
        try:
            with exact_batches(self.encoder):
                out = self.encoder(**inputs).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()
        states = top[0] if top else out  # (B, F, H)
        frames = state_frames(self.encoder, lengths.cpu()).to(states.device)  # (B,)
        mask = (torch.arange(states.shape[1], device=states.device)[None] < frames[:, None]).unsqueeze(-1)  # (B, F, 1)
        mask = mask.to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled)


def save_finetuned(
    model: Classifier, tokenizer: PreTrainedTokenizerBase, run_dir: Path, settings: Mapping[str, Any]
) -> Path:
    """``run_dir``/model (the encoder as a Hugging Face directory, with its tokenizer or feature extractor) and
    model/classifier (the head's weights and ``settings``: label_names, pooling, classifier, classifier_hidden,
    dropout, n_classes, max_length, modality)."""
    from safetensors.torch import save_file

    model_dir = save_model(model.encoder, tokenizer, run_dir / MODEL_DIR)
    out_dir = model_dir / CLASSIFIER_DIR
    out_dir.mkdir(exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(out_dir / CLASSIFIER_WEIGHTS),
    )
    (out_dir / CLASSIFIER_META).write_text(json.dumps(dict(settings), indent=2))
    return model_dir


def is_finetune_run(run: str | Path) -> bool:
    """Whether ``run`` is a ``heads finetune`` run directory with a model to predict with."""
    return (Path(run) / MODEL_DIR / CLASSIFIER_DIR / CLASSIFIER_META).is_file()


def load_finetuned(run: str | Path, device: str) -> tuple[Classifier, Any, dict[str, Any]]:
    """(classifier in eval mode on ``device``, tokenizer or feature extractor, settings) of a run written by
    :func:`save_finetuned`."""
    from safetensors.torch import load_file

    from embstore.backbones.registry import load_backbone

    model_dir = Path(run) / MODEL_DIR
    meta: dict[str, Any] = json.loads((model_dir / CLASSIFIER_DIR / CLASSIFIER_META).read_text())
    backbone = load_backbone(str(model_dir), device)
    cls = SpeechClassifier if meta.get("modality", "text") == "audio" else SequenceClassifier
    clf = cls(
        backbone.model,
        int(meta["n_classes"]),
        pooling=meta["pooling"],
        classifier=meta["classifier"],
        hidden=tuple(meta["classifier_hidden"]),
        dropout=float(meta["dropout"]),
    )
    clf.head.load_state_dict(load_file(str(model_dir / CLASSIFIER_DIR / CLASSIFIER_WEIGHTS)))
    return clf.eval().to(device), backbone.tokenizer, meta


def importance_pruning(
    model: Classifier, loader: DataLoader[Any], batches: int, fraction: float, min_heads_per_layer: int
) -> dict[int, list[int]]:
    """Prune ``fraction`` of the least important heads (importance on ``batches`` training batches, at least
    ``min_heads_per_layer`` kept per layer); returns what was removed, {layer 1..L: [heads]}."""

    def loss_fn(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        device = next(m.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()}
        labels = inputs.pop("labels")
        return nn.functional.cross_entropy(m(**inputs), labels)

    sample = [b for _, b in zip(range(batches), loader)]
    importance = head_importance(model, sample, loss_fn)  # (L, H)
    plan = heads_to_prune(importance, fraction, min_heads_per_layer)
    prune_heads(model.encoder, plan)
    log.info("pruned heads after epoch 1 by importance: %s", plan)
    return plan


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (the best epoch's, kept for restoring)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
