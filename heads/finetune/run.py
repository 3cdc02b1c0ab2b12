"""``heads finetune``: train the backbone itself (optionally frozen, truncated or pruned) plus a small classifier.

The loop is plain PyTorch plus accelerate (:mod:`heads.finetune.loop` over :mod:`heads.training`); the new
classifier trains at its own ``head_lr``, far above the backbone's ``lr``, so a small data set or a frozen backbone
still moves it. Surgery comes from :mod:`heads.finetune.surgery` (and :mod:`embstore.backbones.pruned`); results go
through :class:`RunWriter` so a fine-tuning
run reads back like a sweep. ``prune_fraction`` prunes *after the first epoch* (head importance needs a classifier
that has learnt something; an untrained head's gradients rank heads at random), then training continues for the
remaining epochs; early stopping only compares epochs after the pruning.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from embstore.backbones.anatomy import idle_modules
from embstore.backbones.pruned import prune_heads, pruned_heads
from embstore.data.tables import SplitData
from embstore.errors import ConfigError
from embstore.extraction.textspec import TextSpec
from heads.finetune.config import FinetuneConfig
from heads.finetune.data import FinetuneData, load_rows, round_rows, rounds
from heads.finetune.loop import STATE_FILE, RoundOutcome, RoundSpec, fit_round
from heads.finetune.lora import ADAPTER_DIR, add_adapters, merged, save_adapter
from heads.finetune.model import save_finetuned
from heads.finetune.scratch import scratch_backbone
from heads.finetune.surgery import (
    check_prunable,
    count_parameters,
    freeze,
    freeze_feature_encoder,
    parse_freeze,
    parse_prune_spec,
    split_feature_encoder,
    truncate,
)
from heads.protocol import Round
from heads.report.plots import DATA_PLOT, plot_data, profile_entry
from heads.report.rundir import CHECKPOINT_DIR, FOLDS_DIR
from heads.report.rundir import run_dir as default_run_dir
from heads.report.table import ResultRow
from heads.training.checkpoint import fingerprint, read_checkpoint, write_state

if TYPE_CHECKING:
    from embstore.backbones.registry import Backbone

__all__ = ["FinetuneConfig", "FinetuneResult", "run_finetune", "config_fingerprint"]

log = logging.getLogger(__name__)
_NOT_FINGERPRINTED = ("out", "resume", "epochs", "device")
TEST_PROBA_FILE = "test_proba.npy"
"""--keep-fold-models: a fold model's (evaluation rows, classes) probabilities, beside its model/."""


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


def config_fingerprint(config: FinetuneConfig, weights_sha256: str, sources: list[dict[str, Any]] | None = None) -> str:
    """sha256 of the config (minus out/resume/epochs/device), the backbone's weights hash and, given the loaded
    data's provenance ``sources``, the data files' content (so a resumed run refuses an edited file)."""
    return fingerprint(_fingerprinted(config, sources), weights_sha256)


def _fingerprinted(config: FinetuneConfig, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    d = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    if sources is not None:
        d["data_content"] = config.source.fingerprinted(sources)["data"]
    return d


@dataclass(frozen=True)
class _Encoder:
    """The backbone after surgery, and what the result rows report about it."""

    model: nn.Module
    n_layers: int
    spec_pruned: dict[int, list[int]]
    adapted: list[str] = dataclasses.field(default_factory=list)
    """The modules holding LoRA adapters (none without --lora)."""


def prepare_encoder(config: FinetuneConfig, encoder: nn.Module) -> _Encoder:
    """Surgery in a fixed order: truncate, named heads, freeze (each validates against the current shape), then the
    LoRA adapters on the blocks left trainable (:mod:`heads.finetune.lora`) and gradient checkpointing."""
    encoder.requires_grad_(True)
    if config.truncate is not None:
        truncate(encoder, config.truncate)
    n_layers = int(getattr(encoder, "config").num_hidden_layers)
    if config.prune_heads:
        prune_heads(
            encoder, parse_prune_spec(config.prune_heads, n_layers, int(getattr(encoder, "config").num_attention_heads))
        )
    if config.prune_fraction is not None:  # refused now, not after the first epoch
        check_prunable(encoder)
    conv, rest = split_feature_encoder(config.freeze_)
    if conv:  # a text model is refused here, naming the word
        freeze_feature_encoder(encoder)
    frozen = parse_freeze(rest, n_layers)
    freeze(encoder, frozen)
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:  # unused by cls/mean pooling of the last hidden state
        pooler.requires_grad_(False)
    for module in idle_modules(encoder):  # no loss on the top stored state reaches them (a speech final norm)
        module.requires_grad_(False)
    adapted = add_adapters(encoder, config, frozen) if config.lora is not None else []
    if config.gradient_checkpointing:
        checkpointing(encoder)
    return _Encoder(encoder, n_layers, pruned_heads(encoder), adapted)


def checkpointing(encoder: nn.Module) -> None:
    """Turn on the backbone's gradient checkpointing (non-reentrant: frozen embeddings or LoRA need no input
    gradients); a model without it is refused naming its class."""
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(encoder).__name__} does not support gradient checkpointing; drop --gradient-checkpointing."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5's name
        getattr(encoder, "activation_checkpointing_enable")(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers 4
        getattr(encoder, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs=kwargs)


def _result_row(config: FinetuneConfig, rnd: Round, outcome: RoundOutcome, encoder: _Encoder) -> ResultRow:
    metrics = outcome.metrics
    trainable, total = count_parameters(outcome.model)
    # the validation scores of the epoch whose weights were kept (the last one without early stopping's choice),
    # so heads report ranks a fine-tune beside a sweep on the rows both chose on
    kept = outcome.best_epoch or (outcome.history[-1]["epoch"] if outcome.history else None)
    chosen = next((h for h in outcome.history if h["epoch"] == kept), {})
    eval_rows = 0 if rnd.eval_rows is None else len(rnd.eval_rows)
    return ResultRow(
        layers=str(encoder.n_layers),
        combine="finetune",
        pooling=config.pooling_,
        head=config.classifier,
        seed=config.source.seed,
        fold=rnd.fold,
        accuracy=metrics["accuracy"],
        f1_macro=metrics["f1_macro"],
        train_seconds=outcome.train_seconds,
        hyperparameters=config.to_dict(),
        per_class=metrics["per_class"],
        confusion=metrics["confusion"],
        store_id="",
        best_epoch=outcome.best_epoch,
        trainable_params=trainable,
        seconds_per_epoch=float(np.mean(outcome.epoch_seconds)) if outcome.epoch_seconds else 0.0,
        history=outcome.history,
        val_accuracy=chosen.get("val_accuracy"),
        val_f1_macro=chosen.get("val_f1_macro"),
        extra={
            **({"step_evaluations": outcome.step_evaluations} if outcome.step_evaluations else {}),
            **({"split_reports": outcome.split_reports} if outcome.split_reports else {}),
            "total_params": total,
            "lora": _lora_record(config, encoder),
            "freeze": config.freeze_,
            "truncate": config.truncate,
            "eval_rows": int(eval_rows),
            "pruned_heads": {
                "spec": {str(k): v for k, v in encoder.spec_pruned.items()},
                "importance": {str(k): v for k, v in outcome.importance_pruned.items()},
                "importance_after_epoch": 1 if config.prune_fraction is not None else None,
                "all": {} if config.scratch else {str(k): v for k, v in pruned_heads(outcome.model.encoder).items()},
            },
        },
    )


def _settings(
    config: FinetuneConfig, data: FinetuneData, modality: str, text: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a saved model's classifier/ records besides its weights (:func:`heads.finetune.model.save_finetuned`);
    ``text`` the template and pooled tokens of a decoder's text spec."""
    return {
        "label_names": data.label_names,
        "pooling": config.pooling_,
        "classifier": config.classifier,
        "classifier_hidden": list(config.classifier_hidden),
        "dropout": config.dropout,
        "n_classes": len(data.label_names),
        "max_length": config.max_length,
        "modality": modality,
        **({"text": text} if text is not None else {}),
    }


def _lora_record(config: FinetuneConfig, encoder: _Encoder) -> dict[str, Any] | None:
    """What run.json and the result rows say about the adapters (None without --lora)."""
    if config.lora is None:
        return None
    return {
        "r": config.lora,
        "alpha": config.lora_alpha_,
        "dropout": config.lora_dropout,
        "targets": config.lora_targets or "anatomy map: attention and MLP projections",
        "modules": len(encoder.adapted),
    }


def _run_rounds(
    spec: RoundSpec, encoder: _Encoder, plan: list[Round], run_dir: Path, modality: str = "text"
) -> tuple[list[ResultRow], RoundOutcome | None, dict[int, np.ndarray], list[Any]]:
    """Every round's result row (a fold that finished before a resume is read back, not trained again), the last
    trained round's outcome, with --keep-fold-models each fold's probabilities on the evaluation split (its model
    saved in FOLDS_DIR/fold-K), and the trained rounds' evaluation predictions (fewer than the rows after a resume
    that skipped finished folds: then none are written)."""
    config = spec.config
    rows: list[ResultRow] = []
    outcome: RoundOutcome | None = None
    test_probas: dict[int, np.ndarray] = {}
    predictions: list[Any] = []
    for rnd in plan:
        ckpt = run_dir / CHECKPOINT_DIR / ("" if rnd.fold is None else f"fold-{rnd.fold}")
        resumed = read_checkpoint(ckpt, STATE_FILE, spec.fingerprint, spec.fingerprinted) if config.resume else None
        if resumed is not None and resumed.get("row") is not None:  # a fold that finished before the interruption
            rows.append(ResultRow.from_dict(resumed["row"]))
            log.info("fold %s finished before; its result is reused", rnd.fold)
            continue
        start = encoder.model if len(plan) == 1 else copy.deepcopy(encoder.model)  # every fold starts from the backbone
        outcome = fit_round(spec, start, rnd, ckpt, resumed)
        if outcome.predictions is not None:
            predictions.append(outcome.predictions)
        row = _result_row(config, rnd, outcome, encoder)
        rows.append(row)
        if rnd.fold is not None and outcome.is_main and config.keep_fold_models:
            fold_dir = run_dir / FOLDS_DIR / f"fold-{rnd.fold}"
            save_finetuned(outcome.model, spec.tokenizer, fold_dir, _settings(config, spec.data, modality))
            if outcome.test_proba is not None:
                np.save(fold_dir / TEST_PROBA_FILE, outcome.test_proba)
        if rnd.fold is not None and outcome.is_main:  # mark the fold done, so --resume skips it
            write_state(ckpt / STATE_FILE, {**json.loads((ckpt / STATE_FILE).read_text()), "row": row.to_dict()})
            log.info("fold %d: accuracy %.4f, macro-F1 %.4f", rnd.fold, row.accuracy, row.f1_macro)
    if config.keep_fold_models:  # every fold's probabilities, also of folds finished before a resume
        for rnd in plan:
            f = run_dir / FOLDS_DIR / f"fold-{rnd.fold}" / TEST_PROBA_FILE
            if rnd.fold is not None and f.is_file():
                test_probas[rnd.fold] = np.load(f)
    return rows, outcome, test_probas, predictions


def fold_ensemble(data: FinetuneData, probas: dict[int, np.ndarray]) -> dict[str, Any]:
    """The fold models' averaged probabilities scored on the evaluation split: classification_metrics, the folds
    averaged and the rows scored (what run.json's ``fold_ensemble`` records)."""
    from heads.report.metrics import classification_metrics

    mean = np.mean([probas[k] for k in sorted(probas)], axis=0)
    y = data.labels(data.evaluation)[data.eval_rows]
    return {
        "folds": sorted(probas),
        "split": data.evaluation.name,
        "rows": int(len(y)),
        "how": "the mean of the fold models' class probabilities, then the most probable class",
        **classification_metrics(y, mean.argmax(1), data.label_names),
    }


def _summary(rows: list[ResultRow], run_dir: Path, folds: int | None) -> FinetuneResult:
    """Mean (and standard deviation over folds) of the rows' scores, parameters and seconds per epoch."""
    acc, f1 = [r.accuracy for r in rows], [r.f1_macro for r in rows]
    return FinetuneResult(
        run_dir=run_dir,
        accuracy=float(np.mean(acc)),
        f1_macro=float(np.mean(f1)),
        trainable_params=int(rows[-1].trainable_params or 0),
        total_params=int(rows[-1].extra["total_params"]),
        seconds_per_epoch=float(np.mean([r.seconds_per_epoch or 0.0 for r in rows])),
        accuracy_std=float(np.std(acc)),
        f1_macro_std=float(np.std(f1)),
        folds=folds,
    )


def _run_meta(
    config: FinetuneConfig, data: FinetuneData, backbone: Backbone, fp: str, result: FinetuneResult, plan: list[Round]
) -> dict[str, Any]:
    """run.json: the model, labels, rows, majority baseline, config, fingerprint, sources and the evaluation set id
    (:mod:`heads.evalset`): the evaluation rows, or with ``folds`` every training row (the held-out folds' union).

    ``rows`` holds each round's fit, validation (early stopping) and evaluation rows as positions in their data
    files, one object (a list of one per fold with ``folds``), so disjointness can be checked from outside."""
    from heads.evalset import EVAL_SET_KEY, eval_set, source_sha256
    from heads.report.metrics import majority_accuracy

    tr, te = data.train, data.evaluation
    y_train = data.labels(tr)[data.train_rows]
    meta = {
        "kind": "finetune",
        "parameters": {"trainable": result.trainable_params, "total": result.total_params},
        "model": backbone.identity,
        "label_names": data.label_names,
        "train_rows": int(len(data.train_rows)),
        "eval_rows": int(len(data.eval_rows)),
        "majority_accuracy": majority_accuracy(y_train, data.labels(te)[data.eval_rows]),
        "config": config.to_dict(),
        "fingerprint": fp,
        "sources": data.sources,
        "modality": backbone.modality,
        "skipped_rows": dict(data.skipped),
        "max_length": config.max_length,
    }
    ids = [round_rows(data, rnd, config.validation_fraction, config.source.seed).ids(data) for rnd in plan]
    meta["rows"] = ids if config.folds is not None else ids[0]
    scored_split, scored = (
        (te, te.row_ids[data.eval_rows]) if config.folds is None else (tr, tr.row_ids[data.train_rows])
    )
    meta[EVAL_SET_KEY] = eval_set(source_sha256(data.sources, scored_split.name), scored)
    if config.folds is not None:
        meta["folds"] = {
            "k": config.folds,
            "seed": config.source.seed,
            "stratified": True,
            "accuracy_mean": result.accuracy,
            "accuracy_std": result.accuracy_std,
            "f1_macro_mean": result.f1_macro,
            "f1_macro_std": result.f1_macro_std,
            "eval": "each fold's held-out training rows",
        }
        meta["majority_accuracy"] = majority_accuracy(y_train, y_train)
    return meta


def _text_spec(config: FinetuneConfig, backbone: Any) -> TextSpec | None:
    """The text spec of a pretrained text backbone (its prompt checked against the tokenizer and the columns now);
    None for speech and scratch: models."""
    from embstore.backbones.anatomy import is_causal

    if config.scratch or backbone.modality != "text":
        return None
    text = config.text_spec(is_causal(backbone.model))
    text.check_columns(config.source.text_pair_col is not None, towers=False)
    text.prompt(backbone.tokenizer)
    return text


def causal_config(config: FinetuneConfig, model: nn.Module) -> FinetuneConfig:
    """``config`` for a causal model (decoder LLMs): pooling 'last' unless given; 'cls' (position 0 has seen only
    itself) and head pruning (grouped-query attention shares key/value heads) are refused in one line. An encoder's
    config is returned as it is."""
    from embstore.backbones.anatomy import is_causal

    if not is_causal(model):
        return config
    if config.pooling == "cls":
        raise ConfigError(
            f"--pooling cls reads position 0, which in a causal model ({config.model}) has seen only itself: pass "
            "--pooling last (the default for causal models, the last non-pad token) or --pooling mean."
        )
    if config.prune_heads or config.prune_fraction is not None:
        flag = "--prune-heads" if config.prune_heads else "--prune-fraction"
        raise ConfigError(
            f"{flag} is not supported on a causal model ({config.model}): grouped-query attention shares each "
            "key/value head among several query heads, so a head cannot be removed alone; drop it (--truncate and "
            "--freeze work by block)."
        )
    return config if config.pooling is not None else dataclasses.replace(config, pooling="last")


def _check_modality(config: FinetuneConfig, backbone: Backbone) -> None:
    """A text table for a speech model, or audio for a text model, is refused naming the model type."""
    kind = str(backbone.identity.get("config", {}).get("model_type", type(backbone.model).__name__))
    if backbone.modality == "audio" and not config.audio:
        raise ConfigError(
            f"{config.model} is a speech model ({kind}): it reads audio, not text; pass --audio-col COLUMN "
            "with a table of audio file paths instead of --text-col."
        )
    if backbone.modality == "text" and config.audio:
        raise ConfigError(
            f"{config.model} is a text model ({kind}): --audio-col needs a speech model (HuBERT, wav2vec2, "
            "WavLM: e.g. random:hubert-tiny or a local model directory); pass --text-col for a text model."
        )


def usable_clips(
    data: FinetuneData, backbone: Backbone, skip_bad: bool, max_seconds: float | None = None
) -> FinetuneData:
    """``data`` without clips shorter than the model's receptive field (refused naming them, or dropped and counted
    with ``skip_bad``); for a fixed-window model (Whisper), ``max_seconds`` and every clip within its window (or
    refused in one line)."""
    from embstore.data.audio import check_window, min_samples, usable_rows

    rate, minimum = backbone.sampling_rate, min_samples(backbone.frames)

    def usable(split: SplitData, rows: np.ndarray) -> np.ndarray:
        lengths = split.clip_lengths(rate)  # (split rows,) samples, read once
        kept = usable_rows(
            split.audio or [], lengths, rows, minimum=minimum, rate=rate, split=split.name, skip_bad=skip_bad
        )
        # Whisper reads one window; validation and evaluation read clips whole, so every clip must fit in it
        check_window(
            [(split.audio or [])[i] for i in kept],
            lengths[kept],
            window=backbone.window_samples,
            rate=rate,
            split=split.name,
            max_seconds=max_seconds,
            fix="heads finetune validates and evaluates on whole clips: cut those files to the window, or remove them.",
        )
        return kept

    train_rows, eval_rows = usable(data.train, data.train_rows), usable(data.evaluation, data.eval_rows)
    dropped = {(data.train.name, int(i)) for i in np.setdiff1d(data.train_rows, train_rows)}
    dropped |= {(data.evaluation.name, int(i)) for i in np.setdiff1d(data.eval_rows, eval_rows)}
    skipped = {**data.skipped, "too_short": len(dropped)}
    return dataclasses.replace(data, train_rows=train_rows, eval_rows=eval_rows, skipped=skipped)


def _spec_augment_samples(backbone: Backbone) -> int:
    """The narrowest training batch, in samples, whose frames hold one SpecAugment time mask (0 for text models and
    speech models without it): transformers refuses a batch with fewer frames than ``mask_time_length``."""
    cfg = backbone.model.config
    if (
        backbone.modality != "audio"
        or not getattr(cfg, "apply_spec_augment", False)
        or not getattr(cfg, "mask_time_prob", 0.0) > 0
    ):
        return 0
    from embstore.data.audio import min_samples

    return min_samples(backbone.frames, int(getattr(cfg, "mask_time_length", 1)))


def run_finetune(config: FinetuneConfig, *, show_progress: bool = True) -> FinetuneResult:
    """Fine-tune ``config.model`` on the data and write a run directory (results, summary, model/).

    With ``folds`` K, K models are trained from the same starting backbone on stratified folds of the
    training rows, each scored on its held-out fold: one result row per fold (reported as mean +- std),
    checkpoints under checkpoint/fold-K, and no model/ (train without --folds for a model to keep).
    Returns the (mean) evaluation accuracy and macro-F1, trainable/total parameters and seconds per epoch.
    ``show_progress``: a tqdm bar per epoch with the running loss and examples/s.
    """
    from embstore.backbones.registry import load_backbone
    from embstore.device import resolve_device
    from heads.report import RunWriter

    resolve_device(config.device)  # an unusable --device fails before the data and model are loaded
    run_dir = default_run_dir(config.out, "finetune")
    if config.scratch:  # the vocabulary and the model come from the training rows, never the evaluation rows
        data = load_rows(config)
        backbone: Any = scratch_backbone(config, (data.train.texts[i] for i in data.train_rows))
    else:
        backbone = load_backbone(config.model, "cpu")
        _check_modality(config, backbone)
        config = causal_config(config, backbone.model)
        data = load_rows(config)
    if backbone.modality == "audio":
        data = usable_clips(data, backbone, config.source.skip_bad, config.max_seconds)
    weights_sha = backbone.identity.get("weights_sha256")
    spec = RoundSpec(
        config=config,
        tokenizer=backbone.tokenizer,
        data=data,
        fingerprint=config_fingerprint(config, str(weights_sha or ""), data.sources),
        fingerprinted=_fingerprinted(config, data.sources),
        weights_sha256=weights_sha,
        show_progress=show_progress,
        min_train_samples=_spec_augment_samples(backbone),
        text=_text_spec(config, backbone),
    )
    encoder = (
        _Encoder(backbone.model, config.rnn_layers, {}) if config.scratch else prepare_encoder(config, backbone.model)
    )
    plan = rounds(config.folds, data, config.source.seed)
    rows, outcome, test_probas, predictions = _run_rounds(spec, encoder, plan, run_dir, backbone.modality)
    result = _summary(rows, run_dir, config.folds)
    if outcome is not None and not outcome.is_main:  # rank 0 writes the run directory
        return result
    if config.folds is None and outcome is not None:
        text = spec.text.record(backbone.tokenizer) if spec.text is not None else None
        if encoder.adapted:  # the small adapter, and a plain backbone with it merged for model/
            save_adapter(outcome.model.encoder, run_dir / ADAPTER_DIR, config.model, encoder.adapted)
        save_finetuned(
            merged(outcome.model) if encoder.adapted else outcome.model,
            backbone.tokenizer,
            run_dir,
            _settings(config, data, backbone.modality, text),
        )
    meta = _run_meta(config, data, backbone, spec.fingerprint, result, plan)
    if spec.text is not None:
        meta["text"] = spec.text.record(backbone.tokenizer)
    if test_probas:
        meta["fold_ensemble"] = fold_ensemble(data, test_probas)
    elif config.keep_fold_models:
        meta["fold_ensemble"] = {
            "note": "the data has no evaluation split apart from the training rows (pass --split test=FILE or "
            "--holdout), so the fold models were kept but not scored together"
        }
    meta["data"] = data_profile(data, backbone, config, plan[0])
    writer = RunWriter(run_dir, meta)
    for row in rows:
        writer.add(row)
    if predictions and len(predictions) == len(rows):  # per-row predictions, as a sweep writes them
        writer.write_predictions([(ids, y, proba) for ids, y, proba in predictions], data.label_names)
    writer.finish(data.label_names)
    plot_data(run_dir / DATA_PLOT, meta["data"], data.label_names)
    return result


def data_profile(data: FinetuneData, backbone: Backbone, config: FinetuneConfig, first: Round) -> dict[str, Any]:
    """Per split the run reads (training rows, evaluation rows): rows, class counts and each row's length (tokens
    after truncation for text, seconds for speech): what data.png draws and run.json records. With --balance, also
    what one epoch of the first round trains on: its fitting rows and the augmented copies that balance them."""
    max_length = config.max_length
    out: dict[str, Any] = {}
    parts = [("train", data.train, data.train_rows), (data.evaluation.name, data.evaluation, data.eval_rows)]
    if data.evaluation is data.train and np.array_equal(data.train_rows, data.eval_rows):
        parts = parts[:1]
    for name, split, rows in parts:
        if split.audio is not None:
            lengths = split.clip_lengths(backbone.sampling_rate)[rows] / backbone.sampling_rate
            unit = "seconds"
        else:
            from embstore.extraction.encode import tokenize

            texts = [split.texts[i] for i in rows]
            pairs = None if split.pairs is None else [split.pairs[i] for i in rows]
            lengths = np.asarray(tokenize(backbone.tokenizer, texts, pairs, max_length).lengths, dtype=np.float64)
            unit = "tokens"
        counts = np.bincount(data.labels(split)[rows], minlength=len(data.label_names))
        out[name] = profile_entry(counts, lengths, unit)
    if config.balance == "oversample":
        from heads.finetune.audio import balanced_rows

        fit = round_rows(data, first, config.validation_fraction, config.source.seed).fit
        rows, copies = balanced_rows(fit, data.labels(data.train)[fit], len(data.label_names))
        y = data.labels(data.train)[rows]
        n = len(data.label_names)
        lengths = data.train.clip_lengths(backbone.sampling_rate)[rows] / backbone.sampling_rate
        out["fitting rows per epoch"] = profile_entry(
            np.bincount(y, minlength=n), lengths, "seconds", np.bincount(y[copies > 0], minlength=n)
        )
    return out
