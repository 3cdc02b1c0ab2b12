"""``heads pretrain``: masked-LM pretraining of a BERT from random initialisation.

The loop is plain PyTorch plus accelerate (``prepare``, ``accumulate``, ``backward``), like
:mod:`heads.finetune.run`, with which it shares the sampler, schedule and checkpoint identity
(:mod:`heads.training.schedule`). The MLM decoder runs only on the selected positions (about 15% of the
tokens), which saves most of the vocabulary projection. The run directory holds::

    run.json            config, model config, tokenizer and corpus provenance, final figures
    pretrain_log.jsonl  per epoch: MLM loss and masked-token accuracy (train and held-out), perplexity, tokens/s
    loss_curve.png      those curves
    summary.md          the per-epoch table
    model/              Hugging Face directory: BertModel config + weights + tokenizer (``--model DIR/model``)
    checkpoint/         training state for --resume (the MLM and pair heads included), safetensors + JSON (heads.training.checkpoint)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from heads.training.checkpoint import load_training_state, save_training_state
from heads.pretrain.masking import PretrainCollator, tokenize_corpus
from heads.pretrain.config import PretrainConfig
from heads.pretrain.data import PretrainData, build_bert_config, load_corpus
from heads.pretrain.report import write_outputs
from heads.training.schedule import EpochSampler, adamw, fingerprint, make_scheduler, read_checkpoint

__all__ = ["PretrainConfig", "PretrainResult", "evaluate_mlm", "run_pretrain"]

log = logging.getLogger(__name__)
CHECKPOINT_DIR, STATE_FILE, MODEL_DIR, TOKENIZER_DIR = "checkpoint", "pretrain_state.json", "model", "tokenizer"
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


class PretrainingModel(nn.Module):
    """BertForPreTraining whose forward returns loss terms, scoring the MLM decoder only where labels are set."""

    def __init__(self, net: Any, pair_objective: str | None) -> None:
        super().__init__()
        self.net, self.pair_objective = net, pair_objective

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                labels: torch.Tensor, pair_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sums over the batch: mlm_loss (sum over masked tokens), masked, correct; pair_loss/pair_correct (means/counts)."""
        out = self.net.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        states, pooled = out[0], out[1]  # (B, T, H), (B, H)
        selected = labels != -100  # (B, T)
        logits = self.net.cls.predictions(states[selected])  # (N, V) on the N selected positions only
        target = labels[selected]
        result = {"mlm_loss": nn.functional.cross_entropy(logits.float(), target, reduction="sum"),
                  "masked": selected.sum(), "correct": (logits.argmax(-1) == target).sum()}
        if self.pair_objective is not None and pair_labels is not None:
            pair_logits = self.net.cls.seq_relationship(pooled)  # (B, 2)
            result["pair_loss"] = nn.functional.cross_entropy(pair_logits.float(), pair_labels)
            result["pair_correct"] = (pair_logits.argmax(-1) == pair_labels).sum()
        return result


def evaluate_mlm(acc: Any, model: nn.Module, loader: Any, collator: PretrainCollator) -> dict[str, float | None]:
    """Held-out MLM loss (per masked token), masked-token accuracy, perplexity and pair accuracy, with fixed masks."""
    collator.set_epoch(0)  # the same masks at every evaluation
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # mlm loss sum, masked, correct, pair correct, rows
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            totals += torch.tensor([float(out["mlm_loss"]), float(out["masked"]), float(out["correct"]),
                                    float(out.get("pair_correct", 0)), float(batch["input_ids"].shape[0])],
                                   dtype=torch.float64)
    totals = acc.reduce(totals.to(acc.device), "sum").cpu()
    model.train()
    loss = float(totals[0] / totals[1]) if totals[1] else math.nan
    pair = float(totals[3] / totals[4]) if collator.pair_objective is not None and totals[4] else None
    return {"heldout_mlm_loss": loss, "heldout_masked_accuracy": float(totals[2] / totals[1]) if totals[1] else math.nan,
            "heldout_perplexity": math.exp(min(loss, 700.0)) if not math.isnan(loss) else math.nan, "heldout_pair_accuracy": pair}


def _out_of_time(acc: Any, mine: bool) -> bool:
    """Whether any process has used up the time budget; every rank must stop at the same batch,
    or the others would wait forever in the next gradient all-reduce."""
    if acc.num_processes == 1:
        return mine
    flag = torch.tensor([1.0 if mine else 0.0], device=acc.device)
    return bool(acc.reduce(flag, "sum").item() > 0)


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:  # no decay on biases and LayerNorm weights, as in BERT
            (no_decay if p.ndim < 2 else decay).append(p)
    return adamw([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr)


def run_pretrain(config: PretrainConfig, *, show_progress: bool = True) -> PretrainResult:
    """Pretrain a BERT with masked-LM (and an optional pair objective) and write the run directory.

    Returns the final training and held-out figures and the path of the Hugging Face ``model/`` directory.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import BertForPreTraining

    run_dir = Path(config.out or Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-pretrain")
    ckpt = run_dir / CHECKPOINT_DIR
    data: PretrainData = load_corpus(config, saved_tokenizer=ckpt / TOKENIZER_DIR if config.resume else None)
    tok = data.tokenizer
    bert_config = build_bert_config(config, vocab_size=len(tok), pad_id=int(tok.pad_token_id))
    fp = fingerprint(config.fingerprinted(), json.dumps(data.provenance["sources_sha256"]), data.provenance["tokenizer_sha256"])
    resumed = read_checkpoint(ckpt, STATE_FILE, fp, config.fingerprinted()) if config.resume else None

    set_seed(config.source.seed)
    net = BertForPreTraining(bert_config)
    if config.pair_objective is None:  # untrained parts are kept (AutoModel loads the pooler) but not updated
        if net.bert.pooler is not None:
            net.bert.pooler.requires_grad_(False)
        net.cls.seq_relationship.requires_grad_(False)
    model = PretrainingModel(net, config.pair_objective)

    ids: dict[str, Any] = {
        "cls_id": int(tok.cls_token_id), "sep_id": int(tok.sep_token_id), "pad_id": int(tok.pad_token_id),
        "mask_id": int(tok.mask_token_id), "vocab_size": len(tok), "max_length": config.max_length,
        "mask_prob": config.mask_prob, "whole_word": config.whole_word, "pair_objective": config.pair_objective}
    train_corpus = tokenize_corpus(tok, data.train_texts, data.train_pairs, whole_word=config.whole_word)
    eval_corpus = tokenize_corpus(tok, data.eval_texts, data.eval_pairs, whole_word=config.whole_word)
    orders = (0, 1) if config.swap_augment else (0,)
    items = [(row, o) for o in orders for row in range(len(train_corpus))]
    collator = PretrainCollator(train_corpus, seed=config.source.seed, **ids)
    eval_collator = PretrainCollator(eval_corpus, seed=config.source.seed + 7_919, **ids)
    sampler = EpochSampler(len(items), config.source.seed)
    train_loader: DataLoader[Any] = DataLoader(items, batch_size=config.optim.batch_size, sampler=sampler,  # type: ignore[arg-type]
                                               collate_fn=collator, generator=torch.Generator())
    eval_loader: DataLoader[Any] = DataLoader([(r, 0) for r in range(len(eval_corpus))],  # type: ignore[arg-type]
                                              batch_size=config.optim.batch_size, collate_fn=eval_collator,
                                              generator=torch.Generator())
    # Each loader has its own generator: a DataLoader iterator seeds itself from the global RNG otherwise, and the
    # evaluation at a budget stop or the skipping loader of a resumed epoch would shift every later dropout mask.

    cpu = config.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=config.optim.mixed_precision, gradient_accumulation_steps=config.optim.grad_accum, cpu=cpu)
    per_epoch = math.ceil(len(train_loader) / config.optim.grad_accum)
    total = config.max_steps or per_epoch * config.optim.epochs
    epochs = math.ceil(total / per_epoch) if config.max_steps else config.optim.epochs
    done_steps = int(resumed["steps"]) if resumed else 0
    opt = _optimizer(model, config.optim.lr, config.optim.weight_decay)
    sched = make_scheduler(opt, config.optim.schedule, warmup=int(config.optim.warmup_ratio * total), total=total)
    model, opt, loader, sched, eval_loader = acc.prepare(model, opt, train_loader, sched, eval_loader)

    history: list[dict[str, Any]] = []
    start_epoch, skip, train_seconds, tokens_seen = 1, 0, 0.0, 0
    if resumed is not None:
        load_training_state(acc, ckpt, model, opt, sched)
        history = list(resumed["history"])
        start_epoch, skip = int(resumed["epoch"]), int(resumed["batches_done"])
        train_seconds, tokens_seen = float(resumed["train_seconds"]), int(resumed["tokens"])
        if resumed["epoch_done"]:
            start_epoch, skip = start_epoch + 1, 0
        log.info("resumed at epoch %d, step %d from %s", start_epoch, done_steps, ckpt)
    else:
        history.append({"epoch": 0, "steps": 0, **evaluate_mlm(acc, model, eval_loader, eval_collator)})
        log.info("at initialisation: held-out MLM loss %.4f, masked accuracy %.4f",
                 history[0]["heldout_mlm_loss"], history[0]["heldout_masked_accuracy"])

    steps = done_steps
    budget = None if config.max_minutes is None else config.max_minutes * 60.0
    reason = "epochs"
    for epoch in range(start_epoch, epochs + 1):
        if steps >= total or (budget is not None and train_seconds >= budget):
            break
        sampler.set_epoch(epoch)
        collator.set_epoch(epoch, skip)
        epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(epoch)  # accelerate's loaders re-seed the sampler from their own counter, from 0 on resume
        sums = {"loss": 0.0, "masked": 0.0, "correct": 0.0, "pair": 0.0, "batches": 0.0, "tokens": 0.0}
        batches_done, epoch_done, t_epoch = skip, True, time.perf_counter()
        bar = tqdm(epoch_loader, total=len(loader) - skip, desc=f"pretrain epoch {epoch}", leave=False,
                   disable=not (show_progress and acc.is_local_main_process))
        for batch in bar:
            t0 = _clock()
            with acc.accumulate(model):
                out = model(**batch)
                masked = out["masked"].clamp(min=1)
                loss = out["mlm_loss"] / masked
                if "pair_loss" in out:
                    loss = loss + config.pair_weight * out["pair_loss"]
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                if acc.sync_gradients:
                    steps += 1
            n_tokens = int(batch["attention_mask"].sum())
            sums["loss"] += float(out["mlm_loss"].detach())
            sums["masked"] += float(out["masked"])
            sums["correct"] += float(out["correct"])
            sums["pair"] += float(out["pair_correct"]) if "pair_correct" in out else 0.0
            sums["batches"] += 1
            sums["tokens"] += n_tokens
            batches_done += 1
            train_seconds += _clock() - t0
            tokens_seen += n_tokens
            bar.set_postfix(loss=f"{sums['loss'] / max(sums['masked'], 1):.3f}",
                            tok_s=f"{tokens_seen / max(train_seconds, 1e-9):.0f}")
            if steps >= total and acc.sync_gradients:
                reason, epoch_done = "max_steps", batches_done >= len(loader)
                break
            if budget is not None and _out_of_time(acc, train_seconds >= budget):
                reason, epoch_done = "max_minutes", batches_done >= len(loader)
                break
        bar.close()
        skip = 0
        rows = sums["batches"] * config.optim.batch_size
        entry = {"epoch": epoch, "steps": steps, "epoch_complete": epoch_done,
                 "train_mlm_loss": sums["loss"] / max(sums["masked"], 1),
                 "train_masked_accuracy": sums["correct"] / max(sums["masked"], 1),
                 "train_pair_accuracy": sums["pair"] / rows if config.pair_objective and rows else None,
                 "tokens_per_second": sums["tokens"] / max(time.perf_counter() - t_epoch, 1e-9),
                 "lr": float(sched.get_last_lr()[0]), "train_seconds": train_seconds,
                 **evaluate_mlm(acc, model, eval_loader, eval_collator)}
        history.append(entry)
        log.info("epoch %d (step %d): MLM loss %.4f, masked acc %.4f, held-out ppl %.2f, %.0f tokens/s", epoch, steps,
                 entry["train_mlm_loss"], entry["train_masked_accuracy"], entry["heldout_perplexity"],
                 entry["tokens_per_second"])
        save_training_state(acc, ckpt, model, opt, sched)  # safetensors + JSON, no pickle (tied weights stored once)
        if acc.is_main_process:
            (ckpt / STATE_FILE).write_text(json.dumps({
                "epoch": epoch, "epoch_done": epoch_done, "batches_done": batches_done, "steps": steps,
                "train_seconds": train_seconds, "tokens": tokens_seen, "history": history, "fingerprint": fp,
                "config": config.fingerprinted()}, indent=2, default=str))
            if not (ckpt / TOKENIZER_DIR).is_dir():
                tok.save_pretrained(ckpt / TOKENIZER_DIR)
            write_outputs(run_dir, config, data, bert_config, history, final=None)
        acc.wait_for_everyone()
        if reason != "epochs":
            break

    if len(history) == 1 and resumed is None:
        log.warning("no training step was run (max_steps/max_minutes reached before the first batch)")
    final_net = acc.unwrap_model(model).net
    last = history[-1]
    tps = tokens_seen / train_seconds if train_seconds else 0.0
    result = PretrainResult(
        run_dir=run_dir, model_dir=run_dir / MODEL_DIR, steps=steps,
        train_mlm_loss=float(last.get("train_mlm_loss") or math.nan),
        train_masked_accuracy=float(last.get("train_masked_accuracy") or math.nan),
        heldout_mlm_loss=float(last["heldout_mlm_loss"]), heldout_masked_accuracy=float(last["heldout_masked_accuracy"]),
        heldout_perplexity=float(last["heldout_perplexity"]), tokens_per_second=tps, history=history)
    if acc.is_main_process:
        from transformers.utils import logging as hf_logging

        from embstore.surgery import save_model

        hf_logging.disable_progress_bar()
        save_model(final_net.bert, tok, run_dir / MODEL_DIR)  # the bare BertModel: AutoModel loads it as is
        write_outputs(run_dir, config, data, bert_config, history, final={
            "steps": steps, "stopped_by": reason, "train_seconds": train_seconds, "tokens": tokens_seen,
            "tokens_per_second": tps, "model_dir": str(run_dir / MODEL_DIR), "fingerprint": fp,
            "parameters": sum(p.numel() for p in final_net.bert.parameters())})
    acc.wait_for_everyone()
    return result
