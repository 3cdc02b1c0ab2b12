"""``heads finetune``: train the backbone itself (optionally frozen, truncated or pruned) plus a small classifier.

The loop is plain PyTorch plus accelerate (``prepare``, ``accumulate``, ``backward``), as in accelerate's
``examples/nlp_example.py``. Surgery comes from :mod:`embstore.surgery`; results go through :class:`RunWriter`
so a fine-tuning run reads back like a sweep. ``prune_fraction`` prunes *after the first epoch* (head importance
needs a classifier that has learnt something; an untrained head's gradients rank heads at random), then training
continues for the remaining epochs; early stopping only compares epochs after the pruning.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from embstore.errors import ConfigError
from embstore.surgery import (
    count_parameters,
    freeze,
    head_importance,
    heads_to_prune,
    parse_freeze,
    parse_prune_spec,
    prune_heads,
    pruned_heads,
    save_model,
    truncate,
)
from heads.finetune_config import FinetuneConfig

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


# --------------------------------------------------------------------------- data


class _Rows(torch.utils.data.Dataset[tuple[list[int], list[int] | None, int]]):
    def __init__(self, ids: list[list[int]], type_ids: list[list[int]] | None, labels: np.ndarray) -> None:
        self.ids, self.type_ids, self.labels = ids, type_ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int] | None, int]:
        return self.ids[i], None if self.type_ids is None else self.type_ids[i], int(self.labels[i])


class _EpochSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch), so a resumed run sees the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def _collate(pad_id: int) -> Any:
    from embstore.encode import pad_batch

    def collate(rows: list[tuple[list[int], list[int] | None, int]]) -> dict[str, torch.Tensor]:
        types = None if rows[0][1] is None else [r[1] or [] for r in rows]
        batch = {k: torch.from_numpy(v) for k, v in pad_batch([r[0] for r in rows], types, pad_id).items()}
        batch["labels"] = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return batch
    return collate


def _split_rows(config: FinetuneConfig) -> tuple[Any, Any, np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(train split, eval split, train rows, eval rows, label_names, sources) as the sweep picks them."""
    from embstore.data import load_dataset
    from heads.sweep import _carve

    ds = load_dataset(data=config.data, splits=config.splits, holdout=config.holdout, seed=config.seed,
                      text_col=config.text_col, text_pair_col=config.text_pair_col, label_col=config.label_col,
                      limit=config.limit, skip_empty=config.skip_empty)
    if ds.label_names is None:
        raise ConfigError("Fine-tuning needs labels: pass --label-col NAME.")
    names = list(ds.splits)
    if config.train_split in ds.splits:
        ev = config.eval_split or next((s for s in ("test", "validation") if s in ds.splits), None)
        if ev is None or ev not in ds.splits:
            raise ConfigError(f"The evaluation split {ev!r} is not in the data; its splits are {', '.join(names)}; "
                              "pass --eval-split NAME or --holdout 0.2.")
        tr, te = ds.splits[config.train_split], ds.splits[ev]
        rows_tr, rows_te = np.arange(len(tr.texts)), np.arange(len(te.texts))
    elif len(names) == 1 and config.eval_split is None:
        tr = te = ds.splits[names[0]]
        rows_tr, rows_te = _carve(np.asarray(tr.labels), 0.2, config.seed)
        log.info("data has one split %r: carved %d rows for evaluation", names[0], len(rows_te))
    else:
        raise ConfigError(f"--train-split {config.train_split!r} is not in the data; its splits are {', '.join(names)}.")
    missing = sorted(set(range(len(ds.label_names))) - set(np.asarray(tr.labels)[rows_tr].tolist()))
    if missing:
        raise ConfigError(f"Classes {[ds.label_names[i] for i in missing]} have no training rows; every class needs "
                          "at least one (check --label-col, --limit or the split files).")
    return tr, te, rows_tr, rows_te, ds.label_names, {"sources": ds.sources}


# --------------------------------------------------------------------------- checkpoint identity


def config_fingerprint(config: FinetuneConfig, weights_sha256: str) -> str:
    """sha256 of the config (minus out/resume/epochs/device) and the backbone's weights hash."""
    d = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps([d, weights_sha256], sort_keys=True, default=str).encode()).hexdigest()


def _read_checkpoint(ckpt: Path, fingerprint: str, config: FinetuneConfig) -> dict[str, Any] | None:
    path = ckpt / CHECKPOINT_FILE
    if not path.is_file():
        log.info("resume: no checkpoint in %s, starting from scratch", ckpt)
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    if state["fingerprint"] != fingerprint:
        old = state.get("config", {})
        new = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) or ["model weights"]
        raise ConfigError(
            f"The checkpoint in {ckpt} was made with another configuration or model (checkpoint fingerprint "
            f"{state['fingerprint'][:12]}, this run {fingerprint[:12]}; differing: {', '.join(diff)}). "
            "Rerun with the checkpoint's options, without --resume, or with a new --out.")
    return state


# --------------------------------------------------------------------------- training


def _lr_lambda(config: FinetuneConfig, total: int, warmup: int, per_epoch: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return float(config.gamma ** ((step - warmup) / max(1, per_epoch)))
    return factor


class _Trainer:
    """The accelerate objects for one model shape; rebuilt after pruning changes parameter shapes."""

    def __init__(self, config: FinetuneConfig, model: SequenceClassifier, loaders: dict[str, DataLoader[Any]],
                 done_steps: int = 0) -> None:
        from accelerate import Accelerator
        from transformers import get_scheduler

        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                               cpu=cpu)
        per_epoch = math.ceil(len(loaders["train"]) / config.grad_accum)
        total = per_epoch * config.epochs
        warmup = int(config.warmup_ratio * total)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("Every parameter is frozen (freeze covers all layers and there is nothing to train); "
                              "freeze fewer layers, e.g. 'all-but-last'.")
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched: torch.optim.lr_scheduler.LRScheduler
        if config.schedule == "exponential":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, total, warmup, per_epoch))
        else:
            sched = get_scheduler(config.schedule, opt, num_warmup_steps=warmup, num_training_steps=total)
        with warnings.catch_warnings():  # fast-forward after a rebuild: no optimizer step is due
            warnings.simplefilter("ignore")
            for _ in range(done_steps):
                sched.step()
        self.steps = done_steps
        self.model, self.opt, self.train, self.sched, self.val, self.eval = self.acc.prepare(
            model, opt, loaders["train"], sched, loaders["val"], loaders["eval"])

    def epoch(self) -> float:
        """One pass over the training rows; returns the mean loss."""
        self.model.train()
        losses = []
        for batch in self.train:
            with self.acc.accumulate(self.model):
                labels = batch.pop("labels")
                loss = nn.functional.cross_entropy(self.model(**batch), labels)
                self.acc.backward(loss)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
                if self.acc.sync_gradients:
                    self.steps += 1
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")

    def predict(self, loader: Any) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_pred) over a prepared loader, gathered across processes."""
        self.model.eval()
        ys, ps = [], []
        with torch.no_grad():
            for batch in loader:
                labels = batch.pop("labels")
                pred = self.model(**batch).argmax(-1)
                pred, labels = self.acc.gather_for_metrics((pred, labels))
                ys.append(labels.cpu().numpy())
                ps.append(pred.cpu().numpy())
        return np.concatenate(ys), np.concatenate(ps)

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])


def _importance_pruning(model: SequenceClassifier, loader: DataLoader[Any], config: FinetuneConfig) -> dict[int, list[int]]:
    """Prune the least important heads (importance on ``prune_batches`` training batches); returns what was removed."""
    def loss_fn(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        device = next(m.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()}
        labels = inputs.pop("labels")
        return nn.functional.cross_entropy(m(**inputs), labels)

    batches = [b for _, b in zip(range(config.prune_batches), loader)]
    importance = head_importance(model, batches, loss_fn)  # (L, H)
    plan = heads_to_prune(importance, config.prune_fraction or 0.0, config.min_heads_per_layer)
    prune_heads(model.encoder, plan)
    log.info("pruned heads after epoch 1 by importance: %s", plan)
    return plan


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``config.model`` on the data and write a run directory (results, summary, model/).

    Returns the evaluation accuracy and macro-F1, trainable/total parameters and seconds per epoch.
    """
    from accelerate.utils import set_seed
    from safetensors.torch import load_file, save_file

    from embstore.encode import tokenize
    from embstore.models import load_backbone
    from heads.config import HeadConfig
    from heads.estimator import BestTracker, make_split
    from heads.metrics import classification_metrics, majority_accuracy
    from heads.results import ResultRow, RunWriter

    run_dir = Path(config.out or Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-finetune")
    ckpt = run_dir / CHECKPOINT_DIR
    tr, te, rows_tr, rows_te, label_names, sources = _split_rows(config)
    backbone = load_backbone(config.model, "cpu")
    fingerprint = config_fingerprint(config, str(backbone.identity.get("weights_sha256", "")))
    resumed = _read_checkpoint(ckpt, fingerprint, config) if config.resume else None

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

    set_seed(config.seed)
    model = SequenceClassifier(encoder, len(label_names), pooling=config.pooling, classifier=config.classifier,
                               hidden=config.classifier_hidden, dropout=config.dropout)
    split = make_split(tr.labels[rows_tr], None, HeadConfig(patience=1, seed=config.seed,
                                                            validation_fraction=config.validation_fraction))
    fit_rows, val_rows = rows_tr[split.train_idx], rows_tr[split.val_idx if split.val_idx is not None else []]

    def rows(split_data: Any, idx: np.ndarray) -> _Rows:
        texts = [split_data.texts[i] for i in idx]
        pairs = None if split_data.pairs is None else [split_data.pairs[i] for i in idx]
        enc = tokenize(backbone.tokenizer, texts, pairs, config.max_length)
        return _Rows(enc.ids, enc.type_ids, split_data.labels[idx])

    collate = _collate(int(backbone.tokenizer.pad_token_id or 0))
    train_rows = rows(tr, fit_rows)
    sampler = _EpochSampler(len(train_rows), config.seed)
    loaders: dict[str, DataLoader[Any]] = {
        "train": DataLoader(train_rows, batch_size=config.batch_size, sampler=sampler,
                            collate_fn=collate),
        "val": DataLoader(rows(tr, val_rows), batch_size=config.batch_size, collate_fn=collate),
        "eval": DataLoader(rows(te, rows_te), batch_size=config.batch_size, collate_fn=collate)}

    importance_pruned: dict[int, list[int]] = {}
    tracker = BestTracker(config.patience)
    history: list[dict[str, Any]] = []
    start = 1
    done_steps = 0
    if resumed is not None:
        importance_pruned = {int(k): v for k, v in resumed["importance_pruned"].items()}
        if importance_pruned:
            prune_heads(encoder, importance_pruned)
        done_steps = int(resumed["steps"])
    trainer = _Trainer(config, model, loaders, done_steps)
    if resumed is not None:
        trainer.acc.load_state(str(ckpt))
        history, start = list(resumed["history"]), int(resumed["epoch"]) + 1
        tracker.best_f1, tracker.best_epoch, tracker.bad = resumed["best_f1"], resumed["best_epoch"], resumed["bad"]
        tracker.stopped = bool(resumed["stopped"])
        if (ckpt / BEST_FILE).is_file():
            tracker.state = load_file(str(ckpt / BEST_FILE))
        log.info("resumed from epoch %d of %s", start - 1, ckpt)

    epoch_seconds: list[float] = []
    train_seconds = 0.0
    for epoch in range(start, config.epochs + 1):
        if tracker.stopped:
            break
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        loss = trainer.epoch()
        lr = trainer.lr()
        if epoch == 1 and config.prune_fraction is not None:
            unwrapped = trainer.acc.unwrap_model(trainer.model)
            importance_pruned = _importance_pruning(unwrapped, loaders["train"], config)
            trainer = _Trainer(config, unwrapped, loaders, trainer.steps)  # new shapes: new optimizer
            tracker = BestTracker(config.patience)  # the unpruned epoch's weights no longer fit
        y_val, p_val = trainer.predict(trainer.val) if len(val_rows) else (np.zeros(0), np.zeros(0))
        val = classification_metrics(y_val, p_val, label_names) if len(y_val) else {"accuracy": None, "f1_macro": None}
        seconds = time.perf_counter() - t0
        epoch_seconds.append(seconds)
        train_seconds += seconds
        history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": val["accuracy"],
                        "val_f1_macro": val["f1_macro"], "lr": lr})
        log.info("epoch %d: loss %.4f, val macro-F1 %s", epoch, loss, val["f1_macro"])
        tracker.update(epoch, val["f1_macro"], lambda: _state(trainer.acc.unwrap_model(trainer.model)))
        trainer.acc.save_state(str(ckpt))
        main = trainer.acc.is_main_process  # ranks hold identical weights and scores; one writes
        if main and tracker.state is not None and tracker.best_epoch == epoch:
            save_file(tracker.state, str(ckpt / BEST_FILE))
        if main:
            (ckpt / CHECKPOINT_FILE).write_text(json.dumps({
                "epoch": epoch, "steps": trainer.steps, "best_f1": tracker.best_f1, "best_epoch": tracker.best_epoch,
                "bad": tracker.bad, "stopped": tracker.stopped, "history": history, "fingerprint": fingerprint,
                "weights_sha256": backbone.identity.get("weights_sha256"),
                "config": {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED},
                "importance_pruned": {str(k): v for k, v in importance_pruned.items()}}, indent=2, default=str))
        trainer.acc.wait_for_everyone()

    final = trainer.acc.unwrap_model(trainer.model)
    if tracker.state is not None:
        final.load_state_dict(tracker.state)
    y_eval, p_eval = trainer.predict(trainer.eval)
    metrics = classification_metrics(y_eval, p_eval, label_names)
    trainable, total = count_parameters(final)
    spe = float(np.mean(epoch_seconds)) if epoch_seconds else 0.0
    if not trainer.acc.is_main_process:  # rank 0 writes the run directory
        return FinetuneResult(run_dir=run_dir, accuracy=metrics["accuracy"], f1_macro=metrics["f1_macro"],
                              trainable_params=trainable, total_params=total, seconds_per_epoch=spe)

    out_dir = save_model(final.encoder, backbone.tokenizer, run_dir / MODEL_DIR) / CLASSIFIER_DIR
    out_dir.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in final.head.state_dict().items()},
              str(out_dir / CLASSIFIER_WEIGHTS))
    (out_dir / CLASSIFIER_META).write_text(json.dumps({
        "label_names": label_names, "pooling": config.pooling, "classifier": config.classifier,
        "classifier_hidden": list(config.classifier_hidden), "dropout": config.dropout,
        "n_classes": len(label_names), "max_length": config.max_length}, indent=2))

    y_train = tr.labels[rows_tr]
    meta = {"kind": "finetune", "model": backbone.identity, "label_names": label_names,
            "train_rows": int(len(rows_tr)), "eval_rows": int(len(rows_te)),
            "majority_accuracy": majority_accuracy(y_train, te.labels[rows_te]), "config": config.to_dict(),
            "fingerprint": fingerprint, **sources}
    writer = RunWriter(run_dir, meta)
    writer.add(ResultRow(
        layers=str(n_layers), combine="finetune", pooling=config.pooling, head=config.classifier, seed=config.seed,
        accuracy=metrics["accuracy"], f1_macro=metrics["f1_macro"], train_seconds=train_seconds,
        hyperparameters=config.to_dict(), per_class=metrics["per_class"], confusion=metrics["confusion"], store_id="",
        best_epoch=tracker.best_epoch if tracker.best_epoch > 0 else None, trainable_params=trainable,
        seconds_per_epoch=spe, history=history,
        extra={"total_params": total, "freeze": config.freeze, "truncate": config.truncate,
               "pruned_heads": {"spec": {str(k): v for k, v in spec_pruned.items()},
                                "importance": {str(k): v for k, v in importance_pruned.items()},
                                "importance_after_epoch": 1 if config.prune_fraction is not None else None,
                                "all": {str(k): v for k, v in pruned_heads(final.encoder).items()}}}))
    writer.finish(label_names)
    return FinetuneResult(run_dir=run_dir, accuracy=metrics["accuracy"], f1_macro=metrics["f1_macro"],
                          trainable_params=trainable, total_params=total, seconds_per_epoch=spe)
