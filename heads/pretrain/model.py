"""The model ``heads pretrain`` trains: a BERT config from defaults, a file and flags; BERT's pretraining heads
scored only where they are asked; and the held-out masked-LM figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from embstore.errors import ConfigError
from heads.pretrain.config import PretrainConfig
from heads.pretrain.masking import PretrainCollator

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import BertConfig, BertForPreTraining

__all__ = ["DEFAULT_ARCHITECTURE", "PretrainingModel", "build_bert_config", "evaluate_mlm", "new_pretraining_model"]

DEFAULT_ARCHITECTURE = {
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}
"""Without --config/--model-config: a small BERT, 4 layers of 256 with 4 heads (intermediate 4 x hidden)."""


def _read_model_config(spec: str) -> dict[str, Any]:
    candidates = [Path(spec), Path("configs/models") / f"{spec}.yaml", Path("configs/models") / f"{spec}.json"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ConfigError(
            f"The model config {spec!r} is neither a file nor configs/models/{spec}.yaml; pass a BERT "
            "config YAML/JSON (num_hidden_layers, hidden_size, ...) or use --layers/--hidden/--heads."
        )
    import yaml

    text = path.read_text()
    values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of BERT config fields; got {type(values).__name__}.")
    if values.get("model_type", "bert") != "bert":
        raise ConfigError(
            f"{path} has model_type {values['model_type']!r}; heads pretrain builds BERT models (model_type: bert)."
        )
    return {k: v for k, v in values.items() if k != "model_type"}


def build_bert_config(config: PretrainConfig, *, vocab_size: int, pad_id: int) -> BertConfig:
    """BertConfig: defaults < ``model_config`` file < the layers/hidden/heads/intermediate/max_positions options.

    ``vocab_size`` is the tokenizer's; a file's vocab_size is replaced by it.
    """
    from transformers import BertConfig

    fields: dict[str, Any] = dict(DEFAULT_ARCHITECTURE)
    if config.model_config is not None:
        fields.update(_read_model_config(config.model_config))
    flags = {
        "num_hidden_layers": config.layers,
        "hidden_size": config.hidden,
        "num_attention_heads": config.heads,
        "intermediate_size": config.intermediate,
        "max_position_embeddings": config.max_positions,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    if config.intermediate is None and (config.hidden is not None or "intermediate_size" not in fields):
        fields["intermediate_size"] = 4 * int(fields["hidden_size"])
    if int(fields["hidden_size"]) % int(fields["num_attention_heads"]):
        raise ConfigError(
            f"hidden size {fields['hidden_size']} is not a multiple of {fields['num_attention_heads']} "
            "attention heads; pick e.g. --hidden 256 --heads 4."
        )
    if int(fields["max_position_embeddings"]) < config.max_length:
        raise ConfigError(
            f"max_position_embeddings {fields['max_position_embeddings']} is shorter than max_length "
            f"{config.max_length}: the model could not embed the last positions. Raise --max-positions "
            f"to at least {config.max_length} or lower --max-length."
        )
    fields.update(vocab_size=vocab_size, pad_token_id=pad_id, type_vocab_size=2)
    return BertConfig(**fields)


class PretrainingModel(nn.Module):
    """BertForPreTraining whose forward returns loss terms, scoring the MLM decoder only where labels are set."""

    def __init__(self, net: BertForPreTraining, pair_objective: str | None) -> None:
        super().__init__()
        self.net, self.pair_objective = net, pair_objective

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        labels: torch.Tensor,
        pair_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sums over the batch: mlm_loss (sum over masked tokens), masked, correct; pair_loss/pair_correct
        (means/counts)."""
        out = self.net.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        states, pooled = out[0], out[1]  # (B, T, H), (B, H)
        selected = labels != -100  # (B, T)
        logits = self.net.cls.predictions(states[selected])  # (N, V) on the N selected positions only
        target = labels[selected]
        result = {
            "mlm_loss": nn.functional.cross_entropy(logits.float(), target, reduction="sum"),
            "masked": selected.sum(),
            "correct": (logits.argmax(-1) == target).sum(),
        }
        if self.pair_objective is not None and pair_labels is not None:
            pair_logits = self.net.cls.seq_relationship(pooled)  # (B, 2)
            result["pair_loss"] = nn.functional.cross_entropy(pair_logits.float(), pair_labels)
            result["pair_correct"] = (pair_logits.argmax(-1) == pair_labels).sum()
        return result


def evaluate_mlm(
    acc: Accelerator, model: nn.Module, loader: DataLoader[Any], collator: PretrainCollator
) -> dict[str, float | None]:
    """Held-out MLM loss (per masked token), masked-token accuracy, perplexity and pair accuracy, with fixed masks."""
    collator.set_epoch(0)  # the same masks at every evaluation
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # mlm loss sum, masked, correct, pair correct, rows
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            totals += torch.tensor(
                [
                    float(out["mlm_loss"]),
                    float(out["masked"]),
                    float(out["correct"]),
                    float(out.get("pair_correct", 0)),
                    float(batch["input_ids"].shape[0]),
                ],
                dtype=torch.float64,
            )
    totals = acc.reduce(totals.to(acc.device), "sum").cpu()
    model.train()
    loss = float(totals[0] / totals[1]) if totals[1] else math.nan
    pair = float(totals[3] / totals[4]) if collator.pair_objective is not None and totals[4] else None
    return {
        "heldout_mlm_loss": loss,
        "heldout_masked_accuracy": float(totals[2] / totals[1]) if totals[1] else math.nan,
        "heldout_perplexity": math.exp(min(loss, 700.0)) if not math.isnan(loss) else math.nan,
        "heldout_pair_accuracy": pair,
    }


def new_pretraining_model(config: PretrainConfig, bert_config: BertConfig) -> PretrainingModel:
    """A randomly initialised BertForPreTraining (seeded by the caller) in a :class:`PretrainingModel`. Without a
    pair objective the pooler and the next-sentence head are kept (AutoModel loads the pooler) but not trained."""
    from transformers import BertForPreTraining

    net = BertForPreTraining(bert_config)
    if config.pair_objective is None:
        if net.bert.pooler is not None:
            net.bert.pooler.requires_grad_(False)
        net.cls.seq_relationship.requires_grad_(False)
    return PretrainingModel(net, config.pair_objective)
