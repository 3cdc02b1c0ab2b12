"""``heads finetune``: train the backbone itself (optionally frozen, truncated or pruned) plus a small classifier.

The loop is plain PyTorch plus accelerate (``prepare``, ``accumulate``, ``backward``), as in accelerate's
``examples/nlp_example.py`` (:mod:`heads.finetune.loop`); the new classifier trains at its own ``head_lr``, far
above the backbone's ``lr``, so a small data set or a frozen backbone still moves it. Surgery comes from :mod:`embstore.surgery`; results go through :class:`RunWriter`
so a fine-tuning run reads back like a sweep. ``prune_fraction`` prunes *after the first epoch* (head importance
needs a classifier that has learnt something; an untrained head's gradients rank heads at random), then training
continues for the remaining epochs; early stopping only compares epochs after the pruning.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from embstore.surgery import (
    count_parameters,
    freeze,
    parse_freeze,
    parse_prune_spec,
    prune_heads,
    pruned_heads,
    save_model,
    truncate,
)
from heads.training.checkpoint import load_training_state, save_training_state
from heads.finetune.config import FinetuneConfig
from heads.finetune.data import Rows, collate, rounds, split_rows
from heads.finetune.loop import EarlyStopping, RoundTrainer, importance_pruning, state_copy
from heads.training.schedule import EpochSampler, fingerprint, read_checkpoint

__all__ = ["FinetuneConfig", "FinetuneResult", "SequenceClassifier", "run_finetune", "config_fingerprint"]

log = logging.getLogger(__name__)
CHECKPOINT_DIR, CHECKPOINT_FILE, BEST_FILE = "checkpoint", "finetune_state.json", "best.safetensors"
MODEL_DIR, CLASSIFIER_DIR = "model", "classifier"
# In a subfolder of model/: load_model and load_backbone read every model/*.safetensors as encoder weights.
CLASSIFIER_WEIGHTS, CLASSIFIER_META = "classifier.safetensors", "classifier.json"
_NOT_FINGERPRINTED = ("out", "resume", "epochs", "device")


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path
    accuracy: float
    f1_macro: float
    trainable_params: int
    total_params: int
    seconds_per_epoch: float
    accuracy_std: float = 0.0
    """Standard deviation over folds (0 without --folds)."""
    f1_macro_std: float = 0.0
    folds: int | None = None


class SequenceClassifier(nn.Module):
    """Encoder + pooling of the last hidden state + linear or MLP classifier."""

    def __init__(self, encoder: nn.Module, n_classes: int, *, pooling: str = "cls", classifier: str = "linear",
                 hidden: tuple[int, ...] = (2048,), dropout: float = 0.1) -> None:
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
        """The encoder, where embstore.surgery looks for a BERT-like base."""
        return self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and mask -> (B, C) logits."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, H)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            pooled = states[:, 0]  # (B, H)
        return self.head(pooled)


# --------------------------------------------------------------------------- checkpoint identity


def config_fingerprint(config: FinetuneConfig, weights_sha256: str, sources: list[dict[str, Any]] | None = None) -> str:
    """sha256 of the config (minus out/resume/epochs/device), the backbone's weights hash and, given the loaded
    data's provenance ``sources``, the data files' content (so a resumed run refuses an edited file)."""
    return fingerprint(_fingerprinted(config, sources), weights_sha256)


def _fingerprinted(config: FinetuneConfig, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    d = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    if sources is not None:
        d["data_content"] = config.source.fingerprinted(sources)["data"]
    return d


# --------------------------------------------------------------------------- training


@dataclass
class _Outcome:
    """What one training round (the whole run, or one fold) produced."""

    model: SequenceClassifier
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int | None
    epoch_seconds: list[float]
    train_seconds: float
    importance_pruned: dict[int, list[int]]
    is_main: bool


def _fit_round(config: FinetuneConfig, encoder: nn.Module, tokenizer: Any, n_classes: int, label_names: list[str],
               train: Any, fit_pool: np.ndarray, evaluation: Any, eval_rows: np.ndarray, ckpt: Path,
               identity: tuple[str, dict[str, Any]],
               weights_sha256: Any, resumed: dict[str, Any] | None, show_progress: bool = False) -> _Outcome:
    """Train a classifier on ``encoder`` over ``fit_pool`` rows (a validation share carved for early stopping),
    checkpointing to ``ckpt`` every epoch, and score ``eval_rows`` of ``evaluation`` with the best epoch's weights.

    Early stopping: :class:`heads.finetune.loop.EarlyStopping` (``patience``, ``min_epochs``)."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file, save_file

    from embstore.encode import tokenize
    from heads import HeadConfig
    from heads.protocol import make_split
    from heads.report.metrics import classification_metrics

    set_seed(config.source.seed)
    model = SequenceClassifier(encoder, n_classes, pooling=config.pooling, classifier=config.classifier,
                               hidden=config.classifier_hidden, dropout=config.dropout)
    split = make_split(train.labels[fit_pool], None, HeadConfig(patience=1, seed=config.source.seed,
                                                                validation_fraction=config.validation_fraction))
    fit_rows, val_rows = fit_pool[split.train_idx], fit_pool[split.val_idx if split.val_idx is not None else []]

    def rows(split_data: Any, idx: np.ndarray) -> Rows:
        texts = [split_data.texts[i] for i in idx]
        pairs = None if split_data.pairs is None else [split_data.pairs[i] for i in idx]
        enc = tokenize(tokenizer, texts, pairs, config.max_length)
        return Rows(enc.ids, enc.type_ids, split_data.labels[idx])

    fn = collate(int(tokenizer.pad_token_id or 0))
    train_rows = rows(train, fit_rows)
    sampler = EpochSampler(len(train_rows), config.source.seed)
    loaders: dict[str, DataLoader[Any]] = {
        "train": DataLoader(train_rows, batch_size=config.optim.batch_size, sampler=sampler, collate_fn=fn),
        "val": DataLoader(rows(train, val_rows), batch_size=config.optim.batch_size, collate_fn=fn),
        "eval": DataLoader(rows(evaluation, eval_rows), batch_size=config.optim.batch_size, collate_fn=fn)}

    importance_pruned: dict[int, list[int]] = {}
    epochs = config.optim.epochs

    def new_stopper() -> EarlyStopping:
        return EarlyStopping(config.patience, config.min_epochs, epochs)

    stopper = new_stopper()
    history: list[dict[str, Any]] = []
    start, done_steps = 1, 0
    if resumed is not None:
        importance_pruned = {int(k): v for k, v in resumed["importance_pruned"].items()}
        if importance_pruned:
            prune_heads(encoder, importance_pruned)
        done_steps = int(resumed["steps"])
    trainer = RoundTrainer(config, model, loaders, done_steps, show_progress)
    if resumed is not None:
        load_training_state(trainer.acc, ckpt, trainer.model, trainer.opt, trainer.sched)
        history, start = list(resumed["history"]), int(resumed["epoch"]) + 1
        stopper.load(resumed, load_file(str(ckpt / BEST_FILE)) if (ckpt / BEST_FILE).is_file() else None)
        log.info("resumed from epoch %d of %s", start - 1, ckpt)

    epoch_seconds: list[float] = []
    train_seconds = 0.0
    for epoch in range(start, epochs + 1):
        if stopper.stopped:
            break
        t0 = time.perf_counter()
        trainer.train.set_epoch(epoch)  # the prepared loader: accelerate re-seeds the sampler from its own counter
        loss = trainer.epoch(epoch)
        lr, head_lr = trainer.lr()
        if epoch == 1 and config.prune_fraction is not None:
            unwrapped = trainer.acc.unwrap_model(trainer.model)
            importance_pruned = importance_pruning(unwrapped, loaders["train"], config)
            trainer = RoundTrainer(config, unwrapped, loaders, trainer.steps, show_progress)  # new shapes: new optimizer
            stopper = new_stopper()  # the unpruned epoch's weights no longer fit
        y_val, p_val = trainer.predict(trainer.val) if len(val_rows) else (np.zeros(0), np.zeros(0))
        val = classification_metrics(y_val, p_val, label_names) if len(y_val) else {"accuracy": None, "f1_macro": None}
        seconds = time.perf_counter() - t0
        epoch_seconds.append(seconds)
        train_seconds += seconds
        one_class = EarlyStopping.one_class(y_val, p_val)
        history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": val["accuracy"],
                        "val_f1_macro": val["f1_macro"], "lr": lr, "head_lr": head_lr, "one_class": one_class})
        log.info("epoch %d: loss %.4f, val macro-F1 %s", epoch, loss, val["f1_macro"])
        stopper.update(epoch, val["f1_macro"], one_class, lambda: state_copy(trainer.acc.unwrap_model(trainer.model)))
        save_training_state(trainer.acc, ckpt, trainer.model, trainer.opt, trainer.sched)  # safetensors + JSON, no pickle
        main = trainer.acc.is_main_process  # ranks hold identical weights and scores; one writes
        if main and stopper.state is not None and stopper.best_epoch == epoch:
            save_file(stopper.state, str(ckpt / BEST_FILE))
        if main:
            (ckpt / CHECKPOINT_FILE).write_text(json.dumps({
                "epoch": epoch, "steps": trainer.steps, **stopper.to_dict(), "history": history,
                "fingerprint": identity[0], "weights_sha256": weights_sha256, "config": identity[1],
                "importance_pruned": {str(k): v for k, v in importance_pruned.items()}}, indent=2, default=str))
        trainer.acc.wait_for_everyone()

    final = trainer.acc.unwrap_model(trainer.model)
    if stopper.state is not None:
        final.load_state_dict(stopper.state)
    y_eval, p_eval = trainer.predict(trainer.eval)
    return _Outcome(model=final, metrics=classification_metrics(y_eval, p_eval, label_names), history=history,
                    best_epoch=stopper.best_epoch if stopper.best_epoch > 0 else None, epoch_seconds=epoch_seconds,
                    train_seconds=train_seconds, importance_pruned=importance_pruned,
                    is_main=trainer.acc.is_main_process)


def _save_model_dir(final: SequenceClassifier, tokenizer: Any, run_dir: Path, config: FinetuneConfig,
                    label_names: list[str]) -> None:
    """model/ (the encoder as a Hugging Face directory) and model/classifier/ (head weights and settings)."""
    from safetensors.torch import save_file

    out_dir = save_model(final.encoder, tokenizer, run_dir / MODEL_DIR) / CLASSIFIER_DIR
    out_dir.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in final.head.state_dict().items()},
              str(out_dir / CLASSIFIER_WEIGHTS))
    (out_dir / CLASSIFIER_META).write_text(json.dumps({
        "label_names": label_names, "pooling": config.pooling, "classifier": config.classifier,
        "classifier_hidden": list(config.classifier_hidden), "dropout": config.dropout,
        "n_classes": len(label_names), "max_length": config.max_length}, indent=2))


def run_finetune(config: FinetuneConfig, *, show_progress: bool = True) -> FinetuneResult:
    """Fine-tune ``config.model`` on the data and write a run directory (results, summary, model/).

    With ``folds`` K, K models are trained from the same starting backbone on stratified folds of the
    training rows, each scored on its held-out fold: one result row per fold (reported as mean +- std),
    checkpoints under checkpoint/fold-K, and no model/ (train without --folds for a model to keep).
    Returns the (mean) evaluation accuracy and macro-F1, trainable/total parameters and seconds per epoch.
    ``show_progress``: a tqdm bar per epoch with the running loss and examples/s.

    run.json records ``eval_set``, the id of the scored rows (:mod:`heads.evalset`): the evaluation split's
    rows, or with ``folds`` every training row (the union of the held-out folds).
    """
    import copy

    from embstore.models import load_backbone
    from heads.evalset import EVAL_SET_KEY, eval_set, source_sha256
    from heads.report import ResultRow, RunWriter
    from heads.report.metrics import majority_accuracy

    run_dir = Path(config.out or Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-finetune")
    tr, te, rows_tr, rows_te, label_names, sources = split_rows(config)
    backbone = load_backbone(config.model, "cpu")
    weights_sha = backbone.identity.get("weights_sha256")
    fp = config_fingerprint(config, str(weights_sha or ""), sources["sources"])
    fp_config = _fingerprinted(config, sources["sources"])

    # Surgery in a fixed order: truncate, named heads, freeze (each validates against the current shape).
    encoder = backbone.model
    encoder.requires_grad_(True)
    if config.truncate is not None:
        truncate(encoder, config.truncate)
    n_layers = int(encoder.config.num_hidden_layers)
    if config.prune_heads:
        prune_heads(encoder, parse_prune_spec(config.prune_heads, n_layers, int(encoder.config.num_attention_heads)))
    if config.freeze:
        freeze(encoder, parse_freeze(config.freeze, n_layers))
    if getattr(encoder, "pooler", None) is not None:  # unused by cls/mean pooling of the last hidden state
        encoder.pooler.requires_grad_(False)
    spec_pruned = pruned_heads(encoder)

    plan = list(rounds(config, tr, rows_tr, te, rows_te))
    result_rows: list[ResultRow] = []
    outcome: _Outcome | None = None
    for rnd in plan:
        ckpt = run_dir / CHECKPOINT_DIR / ("" if rnd.fold is None else f"fold-{rnd.fold}")
        resumed = read_checkpoint(ckpt, CHECKPOINT_FILE, fp, fp_config) if config.resume else None
        if resumed is not None and resumed.get("row") is not None:  # a fold that finished before the interruption
            result_rows.append(ResultRow.from_dict(resumed["row"]))
            log.info("fold %s finished before; its result is reused", rnd.fold)
            continue
        start_encoder = encoder if len(plan) == 1 else copy.deepcopy(encoder)  # every fold starts from the backbone
        outcome = _fit_round(config, start_encoder, backbone.tokenizer, len(label_names), label_names, tr,
                             rnd.fit_rows, rnd.eval_data, rnd.eval_rows, ckpt, (fp, fp_config), weights_sha, resumed,
                             show_progress)
        metrics = outcome.metrics
        trainable, total = count_parameters(outcome.model)
        row = ResultRow(
            layers=str(n_layers), combine="finetune", pooling=config.pooling, head=config.classifier, seed=config.source.seed,
            fold=rnd.fold, accuracy=metrics["accuracy"], f1_macro=metrics["f1_macro"],
            train_seconds=outcome.train_seconds, hyperparameters=config.to_dict(), per_class=metrics["per_class"],
            confusion=metrics["confusion"], store_id="", best_epoch=outcome.best_epoch, trainable_params=trainable,
            seconds_per_epoch=float(np.mean(outcome.epoch_seconds)) if outcome.epoch_seconds else 0.0,
            history=outcome.history,
            extra={"total_params": total, "freeze": config.freeze, "truncate": config.truncate,
                   "eval_rows": int(len(rnd.eval_rows)),
                   "pruned_heads": {"spec": {str(k): v for k, v in spec_pruned.items()},
                                    "importance": {str(k): v for k, v in outcome.importance_pruned.items()},
                                    "importance_after_epoch": 1 if config.prune_fraction is not None else None,
                                    "all": {str(k): v for k, v in pruned_heads(outcome.model.encoder).items()}}})
        result_rows.append(row)
        if rnd.fold is not None and outcome.is_main:  # mark the fold done, so --resume skips it
            state = json.loads((ckpt / CHECKPOINT_FILE).read_text())
            (ckpt / CHECKPOINT_FILE).write_text(json.dumps({**state, "row": row.to_dict()}, indent=2, default=str))
            log.info("fold %d: accuracy %.4f, macro-F1 %.4f", rnd.fold, row.accuracy, row.f1_macro)

    acc_mean, acc_std = float(np.mean([r.accuracy for r in result_rows])), float(np.std([r.accuracy for r in result_rows]))
    f1_mean, f1_std = float(np.mean([r.f1_macro for r in result_rows])), float(np.std([r.f1_macro for r in result_rows]))
    trainable_p = int(result_rows[-1].trainable_params or 0)
    total_p = int(result_rows[-1].extra["total_params"])
    spe = float(np.mean([r.seconds_per_epoch or 0.0 for r in result_rows]))
    result = FinetuneResult(run_dir=run_dir, accuracy=acc_mean, f1_macro=f1_mean, trainable_params=trainable_p,
                            total_params=total_p, seconds_per_epoch=spe, accuracy_std=acc_std, f1_macro_std=f1_std,
                            folds=config.folds)
    if outcome is not None and not outcome.is_main:  # rank 0 writes the run directory
        return result
    if config.folds is None and outcome is not None:
        _save_model_dir(outcome.model, backbone.tokenizer, run_dir, config, label_names)

    y_train = tr.labels[rows_tr]
    meta = {"kind": "finetune", "model": backbone.identity, "label_names": label_names,
            "train_rows": int(len(rows_tr)), "eval_rows": int(len(rows_te)),
            "majority_accuracy": majority_accuracy(y_train, te.labels[rows_te]), "config": config.to_dict(),
            "fingerprint": fp, **sources}
    scored_split, scored = (te, te.row_ids[rows_te]) if config.folds is None else (tr, tr.row_ids[rows_tr])
    meta[EVAL_SET_KEY] = eval_set(source_sha256(sources["sources"], scored_split.name), scored)
    if config.folds is not None:
        meta["folds"] = {"k": config.folds, "seed": config.source.seed, "stratified": True,
                         "accuracy_mean": acc_mean, "accuracy_std": acc_std, "f1_macro_mean": f1_mean,
                         "f1_macro_std": f1_std, "eval": "each fold's held-out training rows"}
        meta["majority_accuracy"] = majority_accuracy(y_train, y_train)
    writer = RunWriter(run_dir, meta)
    for row in result_rows:
        writer.add(row)
    writer.finish(label_names)
    return result
