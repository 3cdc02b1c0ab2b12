"""``heads pretrain``: masked-LM pretraining of a BERT from random initialisation.

The loop is plain PyTorch plus accelerate, the session and training step ``heads finetune`` uses
(:mod:`heads.training`: sampler, schedule, gradient clipping, checkpoints and their identity). The MLM decoder runs
only on the selected positions (about 15% of the tokens), which saves most of the vocabulary projection. The run
directory holds::

    run.json            config, model config, tokenizer and corpus provenance, final figures
    pretrain_log.jsonl  per epoch: MLM loss and masked-token accuracy (train and held-out), perplexity, tokens/s
    loss_curve.png      those curves
    summary.md          the per-epoch table
    model/              Hugging Face directory: BertModel config + weights + tokenizer (``--model DIR/model``)
    checkpoint/         training state for --resume (the MLM and pair heads included), safetensors + JSON
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from heads.pretrain.config import PretrainConfig
from heads.pretrain.data import PretrainData, load_corpus
from heads.pretrain.masking import PretrainCollator, tokenize_corpus
from heads.pretrain.model import PretrainingModel, build_bert_config, evaluate_mlm, new_pretraining_model
from heads.pretrain.report import write_outputs
from heads.protocol.schedule import EpochSampler, steps_per_epoch
from heads.report.rundir import CHECKPOINT_DIR, MODEL_DIR
from heads.report.rundir import run_dir as default_run_dir
from heads.training.checkpoint import (
    fingerprint,
    load_training_state,
    read_checkpoint,
    save_training_state,
    write_state,
)
from heads.training.optim import param_groups
from heads.training.session import Session, start_session

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import BertConfig

__all__ = ["PretrainConfig", "PretrainResult", "run_pretrain"]

log = logging.getLogger(__name__)
STATE_FILE, TOKENIZER_DIR = "pretrain_state.json", "tokenizer"
# The clock of the --max-minutes budget (training seconds). A module attribute so a test can drive the
# budget with a fake clock instead of depending on how fast the machine is.
_clock = time.perf_counter


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    train_mlm_loss: float
    train_masked_accuracy: float
    heldout_mlm_loss: float
    heldout_masked_accuracy: float
    heldout_perplexity: float
    tokens_per_second: float
    history: list[dict[str, Any]]


@dataclass
class _Run:
    """One pretraining run's inputs and its state between batches (what a checkpoint holds)."""

    config: PretrainConfig
    run_dir: Path
    data: PretrainData
    bert_config: BertConfig
    fingerprint: str
    resumed: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_seen: int = 0
    reason: str = "epochs"
    """What stopped training: epochs, max_steps or max_minutes."""

    @property
    def ckpt(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR


@dataclass(frozen=True)
class _Loaders:
    train: DataLoader[Any]
    evaluation: DataLoader[Any]
    sampler: EpochSampler
    collator: PretrainCollator
    eval_collator: PretrainCollator


def _prepare(config: PretrainConfig) -> _Run:
    """The corpus and tokenizer (a resumed run's own), the BERT config, the fingerprint and the checkpoint state."""
    run_dir = default_run_dir(config.out, "pretrain")
    ckpt = run_dir / CHECKPOINT_DIR
    data = load_corpus(config, saved_tokenizer=ckpt / TOKENIZER_DIR if config.resume else None)
    tok = data.tokenizer
    bert_config = build_bert_config(config, vocab_size=len(tok), pad_id=int(tok.pad_token_id))
    fp = fingerprint(
        config.fingerprinted(), json.dumps(data.provenance.sources_sha256), data.provenance.tokenizer_sha256
    )
    resumed = read_checkpoint(ckpt, STATE_FILE, fp, config.fingerprinted()) if config.resume else None
    return _Run(config=config, run_dir=run_dir, data=data, bert_config=bert_config, fingerprint=fp, resumed=resumed)


def _loaders(config: PretrainConfig, data: PretrainData) -> _Loaders:
    """Training batches (both sentence orders with ``swap_augment``) in a seeded order, and held-out batches with
    fixed masks. Each loader draws from its own generator: a DataLoader iterator seeds itself from the global RNG
    otherwise, and the evaluation at a budget stop or the skipping loader of a resumed epoch would shift every
    later dropout mask."""
    tok = data.tokenizer
    ids: dict[str, Any] = {
        "cls_id": int(tok.cls_token_id),
        "sep_id": int(tok.sep_token_id),
        "pad_id": int(tok.pad_token_id),
        "mask_id": int(tok.mask_token_id),
        "vocab_size": len(tok),
        "max_length": config.max_length,
        "mask_prob": config.mask_prob,
        "whole_word": config.whole_word,
        "pair_objective": config.pair_objective,
    }
    train_corpus = tokenize_corpus(tok, data.train_texts, data.train_pairs, whole_word=config.whole_word)
    eval_corpus = tokenize_corpus(tok, data.eval_texts, data.eval_pairs, whole_word=config.whole_word)
    orders = (0, 1) if config.swap_augment else (0,)
    items = [(row, o) for o in orders for row in range(len(train_corpus))]
    collator = PretrainCollator(train_corpus, seed=config.source.seed, **ids)
    eval_collator = PretrainCollator(eval_corpus, seed=config.source.seed + 7_919, **ids)
    sampler = EpochSampler(len(items), config.source.seed)
    train: DataLoader[Any] = DataLoader(
        items,  # type: ignore[arg-type]
        batch_size=config.optim.batch_size,
        sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator(),
    )
    evaluation: DataLoader[Any] = DataLoader(
        [(r, 0) for r in range(len(eval_corpus))],  # type: ignore[arg-type]
        batch_size=config.optim.batch_size,
        collate_fn=eval_collator,
        generator=torch.Generator(),
    )
    return _Loaders(train, evaluation, sampler, collator, eval_collator)


def _out_of_time(acc: Accelerator, mine: bool) -> bool:
    """Whether any process has used up the time budget; every rank must stop at the same batch,
    or the others would wait forever in the next gradient all-reduce."""
    if acc.num_processes == 1:
        return mine
    flag = torch.tensor([1.0 if mine else 0.0], device=acc.device)
    return bool(acc.reduce(flag, "sum").item() > 0)


def _loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], pair_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss one training step minimises: MLM loss per masked token, plus the weighted pair loss; and the
    model's outputs (sums over the batch, for the epoch's figures)."""
    out = model(**batch)
    loss = out["mlm_loss"] / out["masked"].clamp(min=1)
    if "pair_loss" in out:
        loss = loss + pair_weight * out["pair_loss"]
    return loss, out


def _train_epoch(
    run: _Run, s: Session, loaders: _Loaders, epoch: int, skip: int, total: int, show_progress: bool
) -> dict[str, Any]:
    """Train one epoch (from batch ``skip`` of it, on resume) until its end, ``total`` optimizer steps or the time
    budget; the epoch's log entry (held-out figures included)."""
    from tqdm.auto import tqdm

    config = run.config
    budget = None if config.max_minutes is None else config.max_minutes * 60.0
    loaders.sampler.set_epoch(epoch)
    loaders.collator.set_epoch(epoch, skip)
    epoch_loader: Any = s.acc.skip_first_batches(s.train, skip) if skip else s.train
    epoch_loader.set_epoch(epoch)  # accelerate's loaders re-seed the sampler from their own counter, from 0 on resume
    sums = {"loss": 0.0, "masked": 0.0, "correct": 0.0, "pair": 0.0, "batches": 0.0, "tokens": 0.0}
    batches_done, epoch_done, t_epoch = skip, True, time.perf_counter()
    bar = tqdm(
        epoch_loader,
        total=len(s.train) - skip,
        desc=f"pretrain epoch {epoch}",
        leave=False,
        disable=not (show_progress and s.acc.is_local_main_process),
    )

    for batch in bar:
        t0 = _clock()
        out = s.step(functools.partial(_loss, batch=batch, pair_weight=config.pair_weight))
        n_tokens = int(batch["attention_mask"].sum())
        for key, value in (
            ("loss", out["mlm_loss"].detach()),
            ("masked", out["masked"]),
            ("correct", out["correct"]),
            ("pair", out.get("pair_correct", 0)),
            ("batches", 1),
            ("tokens", n_tokens),
        ):
            sums[key] += float(value)
        batches_done += 1
        run.train_seconds += _clock() - t0
        run.tokens_seen += n_tokens
        bar.set_postfix(
            loss=f"{sums['loss'] / max(sums['masked'], 1):.3f}",
            tok_s=f"{run.tokens_seen / max(run.train_seconds, 1e-9):.0f}",
        )
        if s.steps >= total and s.acc.sync_gradients:
            run.reason, epoch_done = "max_steps", batches_done >= len(s.train)
            break
        if budget is not None and _out_of_time(s.acc, run.train_seconds >= budget):
            run.reason, epoch_done = "max_minutes", batches_done >= len(s.train)
            break
    bar.close()
    rows = sums["batches"] * config.optim.batch_size
    return {
        "epoch": epoch,
        "steps": s.steps,
        "epoch_complete": epoch_done,
        "batches_done": batches_done,
        "train_mlm_loss": sums["loss"] / max(sums["masked"], 1),
        "train_masked_accuracy": sums["correct"] / max(sums["masked"], 1),
        "train_pair_accuracy": sums["pair"] / rows if config.pair_objective and rows else None,
        "tokens_per_second": sums["tokens"] / max(time.perf_counter() - t_epoch, 1e-9),
        "lr": float(s.sched.get_last_lr()[0]),
        "train_seconds": run.train_seconds,
        **evaluate_mlm(s.acc, s.model, s.loaders[0], loaders.eval_collator),
    }


def _checkpoint(run: _Run, s: Session, entry: dict[str, Any]) -> None:
    """The training state after an epoch (or a stop within one): safetensors + JSON, no pickle (tied weights stored
    once); the main process also writes the JSON state, the tokenizer and the run directory's files."""
    save_training_state(s.acc, run.ckpt, s.model, s.opt, s.sched)
    if s.acc.is_main_process:
        write_state(
            run.ckpt / STATE_FILE,
            {
                "epoch": entry["epoch"],
                "epoch_done": entry["epoch_complete"],
                "batches_done": entry["batches_done"],
                "steps": s.steps,
                "train_seconds": run.train_seconds,
                "tokens": run.tokens_seen,
                "history": run.history,
                "fingerprint": run.fingerprint,
                "config": run.config.fingerprinted(),
            },
        )
        if not (run.ckpt / TOKENIZER_DIR).is_dir():
            run.data.tokenizer.save_pretrained(run.ckpt / TOKENIZER_DIR)
        write_outputs(run.run_dir, run.config, run.data, run.bert_config, run.history, final=None)
    s.acc.wait_for_everyone()


def _resume(run: _Run, s: Session, loaders: _Loaders) -> tuple[int, int]:
    """(first epoch, batches of it already trained): from the checkpoint, or epoch 1 after evaluating the untrained
    model (history's epoch 0)."""
    resumed = run.resumed
    if resumed is None:
        run.history.append(
            {"epoch": 0, "steps": 0, **evaluate_mlm(s.acc, s.model, s.loaders[0], loaders.eval_collator)}
        )
        log.info(
            "at initialisation: held-out MLM loss %.4f, masked accuracy %.4f",
            run.history[0]["heldout_mlm_loss"],
            run.history[0]["heldout_masked_accuracy"],
        )
        return 1, 0
    load_training_state(s.acc, run.ckpt, s.model, s.opt, s.sched)
    run.history = list(resumed["history"])
    run.train_seconds, run.tokens_seen = float(resumed["train_seconds"]), int(resumed["tokens"])
    epoch, skip = int(resumed["epoch"]), int(resumed["batches_done"])
    if resumed["epoch_done"]:
        epoch, skip = epoch + 1, 0
    log.info("resumed at epoch %d, step %d from %s", epoch, s.steps, run.ckpt)
    return epoch, skip


def _finish(run: _Run, s: Session) -> PretrainResult:
    """The result; the main process saves the bare BertModel as model/ and the final run directory files."""
    last = run.history[-1]
    tps = run.tokens_seen / run.train_seconds if run.train_seconds else 0.0
    result = PretrainResult(
        run_dir=run.run_dir,
        model_dir=run.run_dir / MODEL_DIR,
        steps=s.steps,
        train_mlm_loss=float(last.get("train_mlm_loss") or math.nan),
        train_masked_accuracy=float(last.get("train_masked_accuracy") or math.nan),
        heldout_mlm_loss=float(last["heldout_mlm_loss"]),
        heldout_masked_accuracy=float(last["heldout_masked_accuracy"]),
        heldout_perplexity=float(last["heldout_perplexity"]),
        tokens_per_second=tps,
        history=run.history,
    )
    if s.acc.is_main_process:
        from transformers.utils import logging as hf_logging

        from embstore.backbones.pruned import save_model

        model = s.unwrapped()
        if not isinstance(model, PretrainingModel):
            raise TypeError(f"expected a PretrainingModel, got {type(model).__name__}")
        bert = model.net.bert
        hf_logging.disable_progress_bar()
        save_model(bert, run.data.tokenizer, run.run_dir / MODEL_DIR)  # the bare BertModel: AutoModel loads it as is
        write_outputs(
            run.run_dir,
            run.config,
            run.data,
            run.bert_config,
            run.history,
            final={
                "steps": s.steps,
                "stopped_by": run.reason,
                "train_seconds": run.train_seconds,
                "tokens": run.tokens_seen,
                "tokens_per_second": tps,
                "model_dir": str(run.run_dir / MODEL_DIR),
                "fingerprint": run.fingerprint,
                "parameters": sum(p.numel() for p in bert.parameters()),
            },
        )
    s.acc.wait_for_everyone()
    return result


def run_pretrain(config: PretrainConfig, *, show_progress: bool = True) -> PretrainResult:
    """Pretrain a BERT with masked-LM (and an optional pair objective) and write the run directory.

    Returns the final training and held-out figures and the path of the Hugging Face ``model/`` directory.
    """
    from accelerate.utils import set_seed

    from embstore.device import resolve_device

    resolve_device(config.device)  # an unusable --device fails before the corpus is read and a tokenizer trained
    run = _prepare(config)
    set_seed(config.source.seed)
    model = new_pretraining_model(config, run.bert_config)
    loaders = _loaders(config, run.data)
    per_epoch = steps_per_epoch(len(loaders.train), config.optim.grad_accum)
    total = config.max_steps or per_epoch * config.optim.epochs
    epochs = math.ceil(total / per_epoch) if config.max_steps else config.optim.epochs
    s = start_session(
        model,
        param_groups(model, config.optim.lr, config.optim.weight_decay),
        config.optim,
        device=config.device,
        train=loaders.train,
        loaders=[loaders.evaluation],
        total_steps=total,
        done_steps=int(run.resumed["steps"]) if run.resumed else 0,
    )
    start, skip = _resume(run, s, loaders)
    budget = None if config.max_minutes is None else config.max_minutes * 60.0
    for epoch in range(start, epochs + 1):
        if s.steps >= total or (budget is not None and run.train_seconds >= budget):
            break
        entry = _train_epoch(run, s, loaders, epoch, skip, total, show_progress)
        skip = 0
        run.history.append({k: v for k, v in entry.items() if k != "batches_done"})
        log.info(
            "epoch %d (step %d): MLM loss %.4f, masked acc %.4f, held-out ppl %.2f, %.0f tokens/s",
            epoch,
            s.steps,
            entry["train_mlm_loss"],
            entry["train_masked_accuracy"],
            entry["heldout_perplexity"],
            entry["tokens_per_second"],
        )
        _checkpoint(run, s, entry)
        if run.reason != "epochs":
            break
    if len(run.history) == 1 and run.resumed is None:
        log.warning("no training step was run (max_steps/max_minutes reached before the first batch)")
    return _finish(run, s)
