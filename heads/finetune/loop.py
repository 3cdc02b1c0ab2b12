"""One fine-tuning round: fit a classifier on some training rows, early-stopped on a carve of them, and score the
round's evaluation rows with the best epoch's weights.

- :class:`RoundTrainer`: the round's :class:`~heads.training.session.Session` (the backbone at ``lr``, the new
  classifier at ``head_lr``), one epoch with a tqdm bar (running loss, examples/s), gathered predictions.
- :class:`EarlyStopping`: the best validation epoch and its weights, with two guards for small data sets.
- :func:`fit_round`: the round, checkpointed every epoch (``--resume`` continues after the last finished epoch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from embstore.backbones.pruned import prune_heads
from embstore.data.tables import SplitData
from embstore.errors import ConfigError
from embstore.extraction.textspec import TextSpec
from heads.finetune.audio import ClipBatches, Clips, balanced_rows, collate_clips
from heads.finetune.config import FinetuneConfig
from heads.finetune.data import FinetuneData, RoundRows, Rows, collate, round_rows
from heads.finetune.model import Classifier, SequenceClassifier, SpeechClassifier, importance_pruning, state_copy
from heads.finetune.scratch import ScratchClassifier
from heads.protocol import BestTracker, Round
from heads.protocol.schedule import EpochSampler
from heads.training.checkpoint import load_training_state, save_training_state, write_state
from heads.training.optim import param_groups
from heads.training.session import Session, start_session

__all__ = ["BEST_FILE", "STATE_FILE", "EarlyStopping", "RoundOutcome", "RoundSpec", "RoundTrainer", "fit_round"]

log = logging.getLogger(__name__)
STATE_FILE, BEST_FILE = "finetune_state.json", "best.safetensors"
"""A round's checkpoint directory holds the training state (:mod:`heads.training.checkpoint`), this JSON state
(epoch, steps, early stopping, history, fingerprint; ``row`` once a fold has finished) and the best epoch's weights."""


_OTHER_LOADERS = ("val", "eval", "fit", "test")
"""The loaders besides the training one, in the order the session prepares them ('test': a fold ensemble's)."""


class RoundTrainer:
    """The accelerate objects for one model shape; rebuilt after pruning changes parameter shapes."""

    def __init__(
        self,
        config: FinetuneConfig,
        model: nn.Module,
        loaders: dict[str, DataLoader[Any]],
        done_steps: int = 0,
        show_progress: bool = False,
    ) -> None:
        optim = config.optim
        groups = param_groups(model, optim.lr, optim.weight_decay, head_prefix="head.", head_lr=config.head_lr)
        if not groups:
            raise ConfigError(
                "Every parameter is frozen (freeze covers all layers and there is nothing to train); "
                "freeze fewer layers, e.g. 'all-but-last'."
            )
        self.head_group = next(i for i, g in enumerate(groups) if g["head"])
        self.session: Session = start_session(
            model,
            groups,
            optim,
            device=config.device,
            train=loaders["train"],
            loaders=[loaders[k] for k in _OTHER_LOADERS if k in loaders],
            gamma=config.gamma,
            done_steps=done_steps,
        )
        prepared = dict(zip([k for k in _OTHER_LOADERS if k in loaders], self.session.loaders))
        self.val, self.eval, self.fit = prepared["val"], prepared["eval"], prepared["fit"]
        self.test: DataLoader[Any] | None = prepared.get("test")
        """The evaluation split's rows for a fold ensemble (``keep_fold_models``), else None."""
        self.show_progress = show_progress
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    @property
    def steps(self) -> int:
        return self.session.steps

    def epoch(
        self, epoch: int, every: int | None = None, evaluate: Callable[[], None] | None = None
    ) -> tuple[float, float]:
        """One pass over the training rows (a tqdm bar with the running loss and examples/s): (the mean loss, the
        running accuracy of the epoch's batches, in training mode, as Keras reports it). ``evaluate()`` is called
        after every ``every``-th optimizer step (``--eval-steps``), the model back in training mode after it."""
        from tqdm.auto import tqdm

        s = self.session
        s.model.train()
        s.train.set_epoch(epoch)  # type: ignore[attr-defined]  # accelerate's loader re-seeds the sampler from its own counter
        losses: list[float] = []
        rows, loss_sum, t0 = 0, 0.0, time.perf_counter()
        right, seen = 0, 0
        bar = tqdm(
            s.train,
            desc=f"finetune epoch {epoch} ({self.trainable:,} trainable)",
            leave=False,
            disable=not (self.show_progress and s.acc.is_local_main_process),
        )
        for batch in bar:
            labels = batch.pop("labels")

            def loss_of(
                model: nn.Module, batch: dict[str, torch.Tensor] = batch, labels: torch.Tensor = labels
            ) -> tuple[torch.Tensor, tuple[float, int]]:
                logits = model(**batch)
                loss = nn.functional.cross_entropy(logits, labels)
                return loss, (float(loss.detach()), int((logits.detach().argmax(-1) == labels).sum()))

            before = s.steps
            loss_value, hits = s.step(loss_of)
            losses.append(loss_value)
            right, seen = right + hits, seen + int(labels.shape[0])
            loss_sum += losses[-1]  # a running sum: the bar's mean costs O(1) per step, not O(steps)
            if every is not None and evaluate is not None and s.steps > before and s.steps % every == 0:
                evaluate()
                s.model.train()
            rows += int(labels.shape[0]) * s.acc.num_processes
            bar.set_postfix(
                loss=f"{loss_sum / len(losses):.4f}", ex_s=f"{rows / max(time.perf_counter() - t0, 1e-9):.1f}"
            )
        bar.close()
        return (float(np.mean(losses)) if losses else float("nan")), right / max(1, seen)

    def predict(self, loader: DataLoader[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_pred) over a prepared loader, gathered across processes."""
        y, proba = self.probabilities(loader)
        return y, proba.argmax(-1)

    def probabilities(self, loader: DataLoader[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(y_true (n,), class probabilities (n, C) float32) over a prepared loader, gathered across processes."""
        s = self.session
        s.model.eval()
        ys, ps = [], []
        with torch.no_grad():
            for batch in loader:
                labels = batch.pop("labels")
                proba = torch.softmax(s.model(**batch).float(), -1)
                proba, labels = s.acc.gather_for_metrics((proba, labels))
                ys.append(labels.cpu().numpy())
                ps.append(proba.cpu().numpy())
        return np.concatenate(ys), np.concatenate(ps).astype(np.float32)

    def lr(self) -> tuple[float | None, float]:
        """(backbone lr, classifier lr) after the last step; the backbone's is None when all of it is frozen."""
        last = self.session.sched.get_last_lr()
        return (float(last[0]) if self.head_group > 0 else None), float(last[self.head_group])


class EarlyStopping:
    """Early stopping on validation macro-F1 (the best epoch and its weights are kept), with two guards so a
    small data set does not stop before the classifier has learnt anything:

    - it never stops before ``min_epochs``;
    - epochs whose validation predictions are all one class, before any epoch's were not, neither count
      against the patience nor become the best epoch (the classifier has not moved yet); the last epoch
      always counts, so a run that never moves still ends with weights.
    """

    def __init__(self, patience: int, min_epochs: int, last_epoch: int) -> None:
        self.tracker = BestTracker(patience)
        self.min_epochs, self.last_epoch, self.moved = min_epochs, last_epoch, False

    @staticmethod
    def one_class(y_val: np.ndarray, p_val: np.ndarray) -> bool:
        """Whether every validation row got the same prediction although the rows hold several classes."""
        return len(y_val) > 0 and len(np.unique(p_val)) == 1 and len(np.unique(y_val)) > 1

    def update(self, epoch: int, f1: float | None, one_class: bool, snapshot: Callable[[], Any]) -> None:
        """Record one epoch; ``snapshot()`` is called only for a new best."""
        if one_class and not self.moved and epoch < self.last_epoch:
            log.info("epoch %d: every validation row is predicted as one class; not counted for early stopping", epoch)
            return
        self.moved = self.moved or not one_class
        self.tracker.update(epoch, f1, snapshot)
        if epoch < self.min_epochs:
            self.tracker.stopped = False

    @property
    def stopped(self) -> bool:
        return bool(self.tracker.stopped)

    @property
    def best_epoch(self) -> int:
        return int(self.tracker.best_epoch)

    @property
    def state(self) -> Any:
        """The best epoch's weights (None without validation rows or patience)."""
        return self.tracker.state

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the same decisions."""
        t = self.tracker
        return {
            "best_f1": t.best_f1,
            "best_epoch": t.best_epoch,
            "bad": t.bad,
            "stopped": t.stopped,
            "moved": self.moved,
        }

    def load(self, d: Mapping[str, Any], state: dict[str, torch.Tensor] | None) -> None:
        """Restore from a checkpoint's :meth:`to_dict` and the best weights (or None)."""
        t = self.tracker
        t.best_f1, t.best_epoch, t.bad, t.stopped = d["best_f1"], d["best_epoch"], d["bad"], bool(d["stopped"])
        t.state, self.moved = state, bool(d.get("moved", True))


# --------------------------------------------------------------------------- one round


@dataclass(frozen=True)
class RoundSpec:
    """What every round of one run shares."""

    config: FinetuneConfig
    tokenizer: Any
    """The backbone's tokenizer (text) or feature extractor (speech)."""
    data: FinetuneData
    fingerprint: str
    """The checkpoint fingerprint of this run (:func:`heads.finetune.run.config_fingerprint`)."""
    fingerprinted: dict[str, Any]
    """The config it hashes, stored with the checkpoint so a refusal can name the differing options."""
    weights_sha256: str | None
    show_progress: bool = False
    min_train_samples: int = 0
    """Speech: training batches are padded to at least this many samples (what SpecAugment's time masks need)."""
    text: TextSpec | None = None
    """Text: the prompt and pooled tokens (:class:`embstore.extraction.textspec.TextSpec`); None: the text alone."""


@dataclass
class RoundOutcome:
    """What one training round (the whole run, or one fold) produced."""

    model: Classifier
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int | None
    epoch_seconds: list[float]
    train_seconds: float
    importance_pruned: dict[int, list[int]]
    is_main: bool
    step_evaluations: list[dict[str, Any]] = field(default_factory=list)
    """--eval-steps: the validation scores every N optimizer steps."""
    split_reports: dict[str, Any] = field(default_factory=dict)
    """--split-reports: classification_metrics of the fitting, validation and evaluation rows."""
    test_proba: np.ndarray | None = None
    """--keep-fold-models: (evaluation rows, classes) probabilities of this fold's model on the evaluation split."""
    predictions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """(row ids in the data file, true labels, (n, classes) probabilities) of the evaluation rows, in one order."""


@dataclass
class _Progress:
    """The state of a round between epochs: what a checkpoint holds."""

    trainer: RoundTrainer
    stopper: EarlyStopping
    history: list[dict[str, Any]]
    importance_pruned: dict[int, list[int]]
    start: int
    """The first epoch still to train."""
    step_evaluations: list[dict[str, Any]] = field(default_factory=list)


def _loaders(spec: RoundSpec, rnd: Round) -> tuple[dict[str, DataLoader[Any]], int]:
    """Loaders of the round's fitting, validation (the early-stopping carve) and evaluation rows (token batches, or
    clip batches by duration for speech); and the number of validation rows."""
    from embstore.extraction.encode import tokenize

    config, data = spec.config, spec.data
    rr = round_rows(data, rnd, config.validation_fraction, config.source.seed)
    evaluation = data.split(rr.eval_split)
    if config.audio:
        return _clip_loaders(spec, rr), len(rr.validation)

    def rows(split: SplitData, idx: np.ndarray) -> Rows:
        texts = [split.texts[i] for i in idx]
        pairs = None if split.pairs is None else [split.pairs[i] for i in idx]
        enc = tokenize(spec.tokenizer, texts, pairs, config.max_length, spec.text)
        return Rows(enc.ids, enc.type_ids, data.labels(split)[idx], enc.text_mask)

    fn = collate(int(spec.tokenizer.pad_token_id or 0))
    train_rows = rows(data.train, rr.fit)
    batch = config.optim.batch_size
    return {
        "train": DataLoader(
            train_rows, batch_size=batch, sampler=EpochSampler(len(train_rows), config.source.seed), collate_fn=fn
        ),
        "val": DataLoader(rows(data.train, rr.validation), batch_size=batch, collate_fn=fn),
        "eval": DataLoader(rows(evaluation, rr.evaluation), batch_size=batch, collate_fn=fn),
        "fit": DataLoader(train_rows, batch_size=batch, collate_fn=fn),  # in order: the fitting rows' report
        **(
            {"test": DataLoader(rows(data.evaluation, data.eval_rows), batch_size=batch, collate_fn=fn)}
            if _ensembled(spec)
            else {}
        ),
    }, len(rr.validation)


def _ensembled(spec: RoundSpec) -> bool:
    """Whether each fold also scores the evaluation split for the fold ensemble: --keep-fold-models with --folds and
    an evaluation split apart from the training rows."""
    c, d = spec.config, spec.data
    return c.keep_fold_models and c.folds is not None and d.evaluation.name != d.train.name


def _clip_loaders(spec: RoundSpec, rr: RoundRows) -> dict[str, DataLoader[Any]]:
    """Speech loaders: training clips augmented and cut per epoch, validation and evaluation clips whole; batches of
    at most ``batch_size`` clips and ``batch_seconds`` of padded audio (:mod:`heads.finetune.audio`)."""
    config, data, fe = spec.config, spec.data, spec.tokenizer
    rate, seed = int(fe.sampling_rate), config.source.seed
    budget = max(1, int(config.batch_seconds * rate))
    max_samples = None if config.max_seconds is None else int(round(config.max_seconds * rate))

    def loader(split: SplitData, rows: np.ndarray, train: bool) -> DataLoader[Any]:
        copies = None
        if train and config.balance == "oversample":  # the fitting rows, then the copies that balance them
            rows, copies = balanced_rows(rows, data.labels(split)[rows], len(data.label_names))
        clips = Clips(
            split,
            rows,
            data.labels(split)[rows],
            rate,
            seed=seed,
            max_samples=max_samples if train else None,
            augment=config.augment_spec if train else None,
            copies=copies,
        )
        batches = ClipBatches(clips.seen_lengths(), config.optim.batch_size, budget, seed=seed, shuffle=train)
        return DataLoader(
            clips, batch_sampler=batches, collate_fn=collate_clips(fe, spec.min_train_samples if train else 0)
        )

    return {
        "train": loader(data.train, rr.fit, True),
        "val": loader(data.train, rr.validation, False),
        "eval": loader(data.split(rr.eval_split), rr.evaluation, False),
        "fit": loader(data.train, rr.fit, False),  # whole original clips: the fitting rows' report
        **({"test": loader(data.evaluation, data.eval_rows, False)} if _ensembled(spec) else {}),
    }


def _start(
    spec: RoundSpec, model: Classifier, loaders: dict[str, DataLoader[Any]], ckpt: Path, resumed: dict[str, Any] | None
) -> _Progress:
    """A new round, or one continued from ``resumed`` (the JSON state in ``ckpt``): the heads pruned by importance
    before the checkpoint are pruned again before the optimizer is built, then every state is restored."""
    from safetensors.torch import load_file

    config = spec.config
    stopper = EarlyStopping(config.patience, config.min_epochs, config.optim.epochs)
    if resumed is None:
        return _Progress(RoundTrainer(config, model, loaders, 0, spec.show_progress), stopper, [], {}, 1)
    pruned = {int(k): v for k, v in resumed["importance_pruned"].items()}
    if pruned:
        prune_heads(model.encoder, pruned)
    trainer = RoundTrainer(config, model, loaders, int(resumed["steps"]), spec.show_progress)
    s = trainer.session
    load_training_state(s.acc, ckpt, s.model, s.opt, s.sched)
    stopper.load(resumed, load_file(str(ckpt / BEST_FILE)) if (ckpt / BEST_FILE).is_file() else None)
    log.info("resumed from epoch %d of %s", int(resumed["epoch"]), ckpt)
    return _Progress(
        trainer,
        stopper,
        list(resumed["history"]),
        pruned,
        int(resumed["epoch"]) + 1,
        list(resumed.get("step_evaluations") or []),
    )


def _validate(trainer: RoundTrainer, n_val: int, label_names: list[str]) -> tuple[dict[str, Any], bool]:
    """Validation accuracy, macro-F1 and loss (None without validation rows) and whether every prediction is one
    class."""
    if not n_val:
        return {"accuracy": None, "f1_macro": None, "loss": None}, False
    y_val, proba = trainer.probabilities(trainer.val)
    p_val = proba.argmax(-1)
    return _report(y_val, proba, label_names), EarlyStopping.one_class(y_val, p_val)


def _report(y: np.ndarray, proba: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """classification_metrics of the most probable classes, and the mean cross-entropy ``loss``."""
    from heads.report.metrics import classification_metrics

    metrics = classification_metrics(y, proba.argmax(-1), label_names)
    picked = proba[np.arange(len(y)), y] if len(y) else np.zeros(0)
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean()) if len(y) else None
    return metrics


def _checkpoint(spec: RoundSpec, p: _Progress, epoch: int, ckpt: Path) -> None:
    """The round's state after ``epoch``: safetensors + JSON, no pickle; the main process writes the shared files."""
    from safetensors.torch import save_file

    s = p.trainer.session
    save_training_state(s.acc, ckpt, s.model, s.opt, s.sched)
    if s.acc.is_main_process:  # ranks hold identical weights and scores; one writes
        if p.stopper.state is not None and p.stopper.best_epoch == epoch:
            save_file(p.stopper.state, str(ckpt / BEST_FILE))
        write_state(
            ckpt / STATE_FILE,
            {
                "epoch": epoch,
                "steps": s.steps,
                **p.stopper.to_dict(),
                "history": p.history,
                "fingerprint": spec.fingerprint,
                "weights_sha256": spec.weights_sha256,
                "config": spec.fingerprinted,
                "importance_pruned": {str(k): v for k, v in p.importance_pruned.items()},
                "step_evaluations": p.step_evaluations,
            },
        )
    s.acc.wait_for_everyone()


def _prune_after_first_epoch(spec: RoundSpec, p: _Progress, loaders: dict[str, DataLoader[Any]]) -> None:
    """``prune_fraction``: remove the least important heads, then train on with a new optimizer (new shapes) and a
    new early stopping (the unpruned epoch's weights no longer fit)."""
    config = spec.config
    model = p.trainer.session.unwrapped()
    if not isinstance(model, Classifier):
        raise TypeError(f"expected a Classifier, got {type(model).__name__}")
    p.importance_pruned = importance_pruning(
        model, loaders["train"], config.prune_batches, config.prune_fraction or 0.0, config.min_heads_per_layer
    )
    p.trainer = RoundTrainer(config, model, loaders, p.trainer.steps, spec.show_progress)
    p.stopper = EarlyStopping(config.patience, config.min_epochs, config.optim.epochs)


def fit_round(
    spec: RoundSpec, encoder: nn.Module, rnd: Round, ckpt: Path, resumed: dict[str, Any] | None
) -> RoundOutcome:
    """Train a classifier on ``encoder`` over the round's fitting rows (a validation share carved for early
    stopping: :class:`EarlyStopping`), checkpointing to ``ckpt`` every epoch, and score the round's evaluation
    rows with the best epoch's weights. ``resumed``: the checkpoint's JSON state, to continue after its epoch."""
    from accelerate.utils import set_seed

    config, names = spec.config, spec.data.label_names
    set_seed(config.source.seed)
    cls = ScratchClassifier if config.scratch else SpeechClassifier if config.audio else SequenceClassifier
    model = cls(
        encoder,
        len(names),
        pooling=config.pooling_,
        classifier=config.classifier,
        hidden=config.classifier_hidden,
        dropout=config.dropout,
    )
    loaders, n_val = _loaders(spec, rnd)
    p = _start(spec, model, loaders, ckpt, resumed)
    epoch_seconds: list[float] = []
    for epoch in range(p.start, config.optim.epochs + 1):
        if p.stopper.stopped:
            break
        t0 = time.perf_counter()

        def at_step(epoch: int = epoch) -> None:
            scored, _ = _validate(p.trainer, n_val, names)
            p.step_evaluations.append(
                {
                    "step": p.trainer.steps,
                    "epoch": epoch,
                    "val_loss": scored["loss"],
                    "val_accuracy": scored["accuracy"],
                    "val_f1_macro": scored["f1_macro"],
                }
            )
            log.info("step %d: val loss %s, val accuracy %s", p.trainer.steps, scored["loss"], scored["accuracy"])

        loss, train_acc = p.trainer.epoch(epoch, config.eval_steps, at_step if n_val else None)
        lr, head_lr = p.trainer.lr()
        if epoch == 1 and config.prune_fraction is not None:
            _prune_after_first_epoch(spec, p, loaders)
        val, one_class = _validate(p.trainer, n_val, names)
        epoch_seconds.append(time.perf_counter() - t0)
        p.history.append(
            {
                "epoch": epoch,
                "train_loss": loss,
                "train_accuracy": train_acc,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "val_f1_macro": val["f1_macro"],
                "lr": lr,
                "head_lr": head_lr,
                "one_class": one_class,
            }
        )
        log.info(
            "epoch %d: train loss %.4f, train accuracy %.4f, val loss %s, val accuracy %s, val macro-F1 %s",
            epoch,
            loss,
            train_acc,
            val["loss"],
            val["accuracy"],
            val["f1_macro"],
        )
        p.stopper.update(epoch, val["f1_macro"], one_class, lambda: state_copy(p.trainer.session.unwrapped()))
        _checkpoint(spec, p, epoch, ckpt)

    final = p.trainer.session.unwrapped()
    if p.stopper.state is not None:
        final.load_state_dict(p.stopper.state)
    y_eval, proba_eval = p.trainer.probabilities(p.trainer.eval)
    metrics = _report(y_eval, proba_eval, names)
    rr = round_rows(spec.data, rnd, config.validation_fraction, config.source.seed)
    order = _loader_order(loaders["eval"], len(rr.evaluation))
    eval_ids = np.asarray(spec.data.split(rr.eval_split).row_ids)[rr.evaluation][order]
    if not isinstance(final, Classifier):
        raise TypeError(f"expected a Classifier, got {type(final).__name__}")
    reports: dict[str, Any] = {}
    if config.split_reports:  # the same weights on every split
        reports["fit"] = _report(*p.trainer.probabilities(p.trainer.fit), names)
        if n_val:
            reports["validation"] = _validate(p.trainer, n_val, names)[0]
        reports["evaluation"] = metrics
    test_proba = None if p.trainer.test is None else p.trainer.probabilities(p.trainer.test)[1]
    return RoundOutcome(
        model=final,
        metrics=metrics,
        history=p.history,
        best_epoch=p.stopper.best_epoch if p.stopper.best_epoch > 0 else None,
        epoch_seconds=epoch_seconds,
        train_seconds=float(sum(epoch_seconds)),
        importance_pruned=p.importance_pruned,
        is_main=p.trainer.session.acc.is_main_process,
        step_evaluations=p.step_evaluations,
        split_reports=reports,
        test_proba=test_proba,
        predictions=(eval_ids, y_eval, proba_eval),
    )


def _loader_order(loader: DataLoader[Any], n: int) -> np.ndarray:
    """The order in which an unshuffled evaluation loader yields its ``n`` rows: as they are for token batches,
    by the batches of similar duration for speech (:class:`~heads.finetune.audio.ClipBatches`)."""
    if isinstance(loader.batch_sampler, ClipBatches):
        return np.asarray([i for batch in loader.batch_sampler for i, _ in batch], dtype=np.int64)
    return np.arange(n)
