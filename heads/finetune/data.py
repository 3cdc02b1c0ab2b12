"""The rows a fine-tuning run trains and evaluates on: split roles, stratified folds, token batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embstore.errors import ConfigError
from heads.finetune.config import FinetuneConfig

__all__ = ["Round", "Rows", "collate", "rounds", "split_rows"]

log = logging.getLogger(__name__)


class Rows(torch.utils.data.Dataset[tuple[list[int], list[int] | None, int]]):
    """Token ids (and token types) with labels, one item per row."""

    def __init__(self, ids: list[list[int]], type_ids: list[list[int]] | None, labels: np.ndarray) -> None:
        self.ids, self.type_ids, self.labels = ids, type_ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int] | None, int]:
        return self.ids[i], None if self.type_ids is None else self.type_ids[i], int(self.labels[i])


def collate(pad_id: int) -> Any:
    """A DataLoader collate_fn: right-padded input_ids, attention_mask (token_type_ids) and labels."""
    from embstore.encode import pad_batch

    def fn(rows: list[tuple[list[int], list[int] | None, int]]) -> dict[str, torch.Tensor]:
        types = None if rows[0][1] is None else [r[1] or [] for r in rows]
        batch = {k: torch.from_numpy(v) for k, v in pad_batch([r[0] for r in rows], types, pad_id).items()}
        batch["labels"] = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return batch
    return fn


def split_rows(config: FinetuneConfig) -> tuple[Any, Any, np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(train split, eval split, train rows, eval rows, label_names, sources) as the sweep picks them.

    With ``folds`` a data set of one split is not carved: all its rows are cross-validated.
    """
    from heads.protocol import carve as _carve

    ds = config.source.load()
    if ds.label_names is None:
        raise ConfigError("Fine-tuning needs labels: pass --label-col NAME.")
    names = list(ds.splits)
    if config.train_split in ds.splits:
        ev = config.eval_split or next((s for s in ("test", "validation") if s in ds.splits), None)
        if config.folds is not None and (ev is None or ev not in ds.splits):
            ev = config.train_split  # cross-validation evaluates on held-out folds; no evaluation split needed
        if ev is None or ev not in ds.splits:
            raise ConfigError(f"The evaluation split {ev!r} is not in the data; its splits are {', '.join(names)}; "
                              "pass --eval-split NAME or --holdout 0.2.")
        tr, te = ds.splits[config.train_split], ds.splits[ev]
        rows_tr, rows_te = np.arange(len(tr.texts)), np.arange(len(te.texts))
    elif len(names) == 1 and config.eval_split is None:
        tr = te = ds.splits[names[0]]
        if config.folds is not None:
            rows_tr = rows_te = np.arange(len(tr.texts))
        else:
            rows_tr, rows_te = _carve(np.asarray(tr.labels), 0.2, config.source.seed)
            log.info("data has one split %r: carved %d rows for evaluation", names[0], len(rows_te))
    else:
        raise ConfigError(f"--train-split {config.train_split!r} is not in the data; its splits are {', '.join(names)}.")
    missing = sorted(set(range(len(ds.label_names))) - set(np.asarray(tr.labels)[rows_tr].tolist()))
    if missing:
        raise ConfigError(f"Classes {[ds.label_names[i] for i in missing]} have no training rows; every class needs "
                          "at least one (check --label-col, --limit or the split files).")
    return tr, te, rows_tr, rows_te, ds.label_names, {"sources": ds.sources}


@dataclass(frozen=True)
class Round:
    """One training round: fit on ``fit_rows`` of the train split, score ``eval_rows`` of ``eval_data``."""

    fold: int | None
    fit_rows: np.ndarray
    eval_data: Any
    eval_rows: np.ndarray


def rounds(config: FinetuneConfig, train: Any, rows_tr: np.ndarray, evaluation: Any, rows_te: np.ndarray) -> Iterator[Round]:
    """One round on the evaluation split, or ``folds`` stratified, seeded folds of the training rows
    (each row is held out exactly once; the evaluation split is then unused)."""
    if config.folds is None:
        yield Round(None, rows_tr, evaluation, rows_te)
        return
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(train.labels)[rows_tr]
    counts = np.bincount(y)
    if counts[counts > 0].min() < config.folds:
        raise ConfigError(f"--folds {config.folds} needs at least {config.folds} training rows of every class; the "
                          f"rarest class has {counts[counts > 0].min()}. Use fewer folds or more data.")
    for k, (fit, held) in enumerate(StratifiedKFold(config.folds, shuffle=True, random_state=config.source.seed).split(rows_tr, y)):
        yield Round(k, rows_tr[fit], train, rows_tr[held])
