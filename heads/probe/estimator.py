"""``HeadClassifier``: a scikit-learn-like estimator over the head modules, with its training loop and save/load.

Features stay in memory as given (float16 from the store); each minibatch is gathered, converted to float32 and
moved to the device once, so a large X is never copied whole.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from embstore.errors import ConfigError, EmbstoreError
from heads.probe.card import HeadCard
from heads.probe.config import TOKEN_HEADS, HeadConfig
from heads.probe.fitting import (
    FittedHead,
    check_labels,
    class_weights,
    epoch_batches,
    epoch_schedule,
    head_device,
    resolve_n_classes,
)
from heads.probe.modules import Inputs, InputShape, Ragged, as_inputs, build_module, fit_input_stats
from heads.protocol import BestTracker, make_split, scores
from heads.protocol.optim import adamw

__all__ = ["HeadClassifier", "NotFittedError", "HeadNotFoundError", "Ragged"]

log = logging.getLogger(__name__)
WEIGHTS_FILE, META_FILE = "head.safetensors", "head.json"


class NotFittedError(EmbstoreError, ValueError):
    """predict/predict_proba/save was called before fit."""


class HeadNotFoundError(EmbstoreError, FileNotFoundError):
    """HeadClassifier.load was given a directory without head.json / head.safetensors."""


def _logits(module: nn.Module, inputs: Inputs, idx: np.ndarray, batch_size: int) -> torch.Tensor:
    """Eval-mode logits of rows ``idx``, (len(idx), C) float32 on CPU."""
    device = next(module.parameters()).device
    module.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            out.append(module(*inputs.batch(idx[start : start + batch_size], device)).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


class HeadClassifier:
    """A head trained on stored features, used like a scikit-learn classifier.

    ``HeadClassifier(HeadConfig(head="mix"), epochs=5).fit(X, y).predict(X_test)``. X is (n, dim) or
    (n, layers, hidden) float arrays, a pair (Xa, Xb), or ragged token states, depending on the head.
    """

    # Learned state, set by fit, load or from_fit (all through _set_fitted); absent before.
    module_: nn.Module
    n_classes_: int
    input_shape_: InputShape
    history_: list[dict[str, Any]]
    best_epoch_: int
    train_seconds_: float
    mix_weights_: np.ndarray
    mix_scale_: float
    card_: HeadCard | None
    """Set by :meth:`load`: the saved head's description, or None when it was saved without one."""

    def __init__(self, config: HeadConfig | None = None, **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(HeadConfig().to_dict()))
        if unknown:
            raise ConfigError(f"Unknown HeadClassifier options {unknown}; valid ones are the HeadConfig fields.")
        self.config = (config or HeadConfig()).replace(**overrides)

    def __repr__(self) -> str:
        return f"HeadClassifier(head={self.config.head!r})"

    # -- training ------------------------------------------------------------------------------------------
    def fit(
        self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, n_classes: int | None = None
    ) -> "HeadClassifier":
        """Train on X (see the class docstring) and y (n,) int class indices; returns self.

        Validation for early stopping is X_val/y_val, or a seeded stratified carve of X when patience > 0.
        """
        cfg, t0 = self.config, time.perf_counter()
        train = as_inputs(X, cfg.head)
        y = check_labels(y, len(train))
        val = None
        if X_val is not None:
            val = as_inputs(X_val, cfg.head)
            self._check_shape(val, train.shape, "X_val")
            y_val = check_labels(y_val, len(val), "y_val")
        elif y_val is not None:
            raise ConfigError("y_val was given without X_val; pass both or neither.")
        n_classes = resolve_n_classes(y, y_val, n_classes)
        split = make_split(y, y_val, validation_fraction=cfg.validation_fraction, seed=cfg.seed, patience=cfg.patience)
        val = train if split.val_is_train else val
        device = head_device(cfg)

        torch.manual_seed(cfg.seed)
        module = build_module(cfg, train.shape, n_classes)
        if cfg.standardize:
            fit_input_stats(module, train, split.train_idx)
        module = module.to(device)
        opt = adamw([{"params": list(module.parameters()), "weight_decay": cfg.weight_decay}], cfg.lr)
        sched = epoch_schedule(opt, cfg.schedule, cfg.epochs, cfg.gamma)
        weight = class_weights(y[split.train_idx], n_classes, cfg.class_weight)
        loss_fn = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))
        gen = torch.Generator().manual_seed(cfg.seed)
        tracker, history = BestTracker(cfg.patience, cfg.report_epoch), []
        for epoch in range(cfg.epochs):
            lr = float(opt.param_groups[0]["lr"])
            module.train()
            total = torch.zeros((), device=device)  # summed on device: no sync per batch
            for idx in epoch_batches(split.train_idx, cfg.batch_size, gen):
                loss = loss_fn(module(*train.batch(idx, device)), torch.from_numpy(y[idx]).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            sched.step()
            acc = f1 = None
            if val is not None and split.val_idx is not None and split.y_val is not None:
                pred = _logits(module, val, split.val_idx, self._eval_batch()).argmax(1).numpy()
                acc, f1 = scores(split.y_val[split.val_idx], pred)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(total) / len(split.train_idx),
                    "val_accuracy": acc,
                    "val_f1_macro": f1,
                    "lr": lr,
                }
            )
            log.debug("%r epoch %d: %s", self, epoch, history[-1])
            if tracker.update(epoch, f1, lambda: copy.deepcopy(module.state_dict())):
                break
        if tracker.state is not None:
            module.load_state_dict(tracker.state)
        return self._set_fitted(
            FittedHead(module, n_classes, train.shape, history, tracker.best_epoch, time.perf_counter() - t0)
        )

    @classmethod
    def from_fit(cls, config: HeadConfig, fit: FittedHead) -> "HeadClassifier":
        """A fitted head of ``config`` holding what a trainer returned (the batched, stacked and L-BFGS trainers of
        :mod:`heads.probe` train many heads at once and end here)."""
        return cls(config)._set_fitted(fit)

    def _set_fitted(self, fit: FittedHead) -> "HeadClassifier":
        """Take ``fit`` as this head's learned state: its module (in eval mode), classes, input shape, history, best
        epoch and training seconds, and for a 'mix' head the learnt layer weights; returns self."""
        self.module_ = fit.module.eval()
        self.n_classes_, self.input_shape_, self.history_ = fit.n_classes, fit.input_shape, fit.history
        self.best_epoch_, self.train_seconds_ = fit.best_epoch, fit.train_seconds
        mix = getattr(fit.module, "mix", None)
        if self.config.head == "mix" and mix is not None:
            self.mix_weights_ = mix.mix_weights()
            self.mix_scale_ = float(mix.gamma.detach().cpu())
        return self

    # -- inference -----------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError(f"This {self!r} is not fitted yet; call fit(X, y) first.")

    def _check_shape(self, inputs: Inputs, expected: InputShape, name: str = "X") -> None:
        if inputs.shape != expected:
            raise ConfigError(
                f"{name} must match the features the {self!r} was fitted on: {expected.describe()}; "
                f"got {inputs.shape.describe()}. Use features of the same layers and pooling."
            )

    def _eval_batch(self) -> int:
        # Tokens pad per batch, so keep their batches at the training size; dense rows are cheap.
        return self.config.batch_size if self.config.head in TOKEN_HEADS else max(self.config.batch_size, 1024)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, C) float32."""
        self._check_fitted()
        inputs = as_inputs(X, self.config.head)
        self._check_shape(inputs, self.input_shape_)
        logits = _logits(self.module_, inputs, np.arange(len(inputs)), self._eval_batch())
        if len(inputs) == 0:
            return np.zeros((0, self.n_classes_), dtype=np.float32)
        return torch.softmax(logits, dim=1).numpy().astype(np.float32, copy=False)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class per row, (n,) int64."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path, card: HeadCard | None = None) -> Path:
        """Write head.safetensors (weights) and head.json (config, shapes, history, ``card``) into ``directory``."""
        self._check_fitted()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}, str(path / WEIGHTS_FILE)
        )
        meta = {
            "config": self.config.to_dict(),
            "n_classes": self.n_classes_,
            "input_shape": self.input_shape_.to_dict(),
            "best_epoch": self.best_epoch_,
            "train_seconds": self.train_seconds_,
            "history": self.history_,
            "mix_weights": self.mix_weights_.tolist() if hasattr(self, "mix_weights_") else None,
            "mix_scale": getattr(self, "mix_scale_", None),
            "extra": {} if card is None else card.to_dict(),  # the card's key since before it was typed
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=1))
        return path

    @staticmethod
    def read_card(directory: str | Path) -> HeadCard | None:
        """The card given to :meth:`save`, without loading the weights; None when it was saved without one."""
        return HeadCard.from_saved(_read_meta(Path(directory)).get("extra") or {})

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> "HeadClassifier":
        """Rebuild a head written by :meth:`save`; ``device`` overrides the saved one. Sets ``card_``."""
        path = Path(directory)
        meta = _read_meta(path)
        cfg = HeadConfig.from_dict(meta["config"])
        if device is not None:
            cfg = cfg.replace(device=device)
        est = cls(cfg)
        shape = InputShape.from_dict(meta["input_shape"])
        with torch.random.fork_rng(devices=[]):  # building draws an init we overwrite; leave the caller's RNG be
            module = build_module(cfg, shape, int(meta["n_classes"]))
        _load_weights(module, load_file(str(path / WEIGHTS_FILE)), path)
        est._set_fitted(
            FittedHead(
                module.to(head_device(cfg)),
                int(meta["n_classes"]),
                shape,
                list(meta["history"]),
                int(meta["best_epoch"]),
                float(meta["train_seconds"]),
            )
        )
        est.card_ = HeadCard.from_saved(meta.get("extra") or {})
        return est


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load saved weights; heads saved before every head standardised its inputs lack only the statistics,
    which stay the identity (as those heads were trained)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.split(".")[0].startswith("standardize")]
    if missing or unexpected:
        raise HeadNotFoundError(
            f"{path / WEIGHTS_FILE} does not match its head.json (missing {missing[:3]}, unexpected "
            f"{list(unexpected)[:3]}); save the head again with this version."
        )


def _read_meta(path: Path) -> dict[str, Any]:
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise HeadNotFoundError(
            f"{path} holds no saved head ({META_FILE} + {WEIGHTS_FILE}); pass a directory "
            "written by HeadClassifier.save."
        )
    meta: dict[str, Any] = json.loads((path / META_FILE).read_text())
    return meta
