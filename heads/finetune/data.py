"""The rows a fine-tuning run trains, chooses and is scored on, and the token batches it reads them in.

The evaluation protocol is :mod:`heads.protocol`'s, as for a sweep of a store of the same data: the evaluation
split (or a :func:`~heads.protocol.carve` of a one-split data set), ``--folds`` rounds
(:func:`~heads.protocol.fold_rounds`) and the early-stopping carve of each round's training rows
(:func:`~heads.protocol.make_split`), all seeded and group-disjoint when the rows have groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embstore.data.tables import SplitData
from embstore.errors import ConfigError
from heads.finetune.config import FinetuneConfig
from heads.protocol import Round, carve, fold_rounds, validation_carve

__all__ = ["FinetuneData", "RoundRows", "Rows", "collate", "early_stopping_carve", "load_rows", "round_rows", "rounds"]

log = logging.getLogger(__name__)
ONE_SPLIT_EVAL = 0.2
"""The share of a one-split data set carved for evaluation when there is no ``--holdout`` (as a sweep carves)."""


class Rows(torch.utils.data.Dataset[tuple[list[int], list[int] | None, int, np.ndarray | None]]):
    """Token ids (and token types) with labels, one item per row, and each row's text-token mask (``--pool-tokens
    text``: the tokens 'mean' covers; None: every token)."""

    def __init__(
        self,
        ids: list[list[int]],
        type_ids: list[list[int]] | None,
        labels: np.ndarray,
        text_mask: list[np.ndarray] | None = None,
    ) -> None:
        self.ids, self.type_ids, self.labels, self.text_mask = ids, type_ids, labels, text_mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int] | None, int, np.ndarray | None]:
        return (
            self.ids[i],
            None if self.type_ids is None else self.type_ids[i],
            int(self.labels[i]),
            None if self.text_mask is None else self.text_mask[i],
        )


Row = tuple[list[int], list[int] | None, int, np.ndarray | None]


def collate(pad_id: int) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
    """A DataLoader collate_fn: right-padded input_ids, attention_mask (token_type_ids, text_mask) and labels."""
    from embstore.extraction.encode import pad_batch

    def fn(rows: list[Row]) -> dict[str, torch.Tensor]:
        types = None if rows[0][1] is None else [r[1] or [] for r in rows]
        batch = {k: torch.from_numpy(v) for k, v in pad_batch([r[0] for r in rows], types, pad_id).items()}
        if rows[0][3] is not None:
            text = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
            for j, r in enumerate(rows):
                mask = torch.from_numpy(np.asarray(r[3], dtype=bool))
                text[j, : len(mask)] = mask
            batch["text_mask"] = text
        batch["labels"] = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return batch

    return fn


@dataclass(frozen=True)
class FinetuneData:
    """The loaded rows of one run: the training and evaluation splits (the same split when one was carved), the
    rows of each that the run uses, the label names and the source files' provenance."""

    train: SplitData
    evaluation: SplitData
    train_rows: np.ndarray
    eval_rows: np.ndarray
    label_names: list[str]
    sources: list[dict[str, Any]]
    skipped: dict[str, int]
    """Rows dropped while loading, by reason: 'unusable' (empty text with --skip-empty, or a missing, unreadable or
    empty audio file with --skip-bad) and, for speech, 'too_short' (clips shorter than the receptive field)."""

    def split(self, name: str) -> SplitData:
        """The split a :class:`~heads.protocol.Round` names."""
        return self.train if name == self.train.name else self.evaluation

    def labels(self, split: SplitData) -> np.ndarray:
        """(n,) int64 labels of ``split`` (every fine-tuning split has labels)."""
        return np.asarray(split.labels)


def load_rows(config: FinetuneConfig) -> FinetuneData:
    """Read the data and pick the training and evaluation rows as a sweep of its store would.

    A data set of one split is carved (group-disjoint when it has groups) for evaluation; with ``folds`` it is
    not carved: all its rows are cross-validated.
    """
    ds = config.source.load()
    if ds.label_names is None:
        raise ConfigError("Fine-tuning needs labels: pass --label-col NAME.")
    names = list(ds.splits)
    if config.train_split in ds.splits:
        ev = config.eval_split or next((s for s in ("test", "validation") if s in ds.splits), None)
        if config.folds is not None and (ev is None or ev not in ds.splits):
            ev = config.train_split  # cross-validation evaluates on held-out folds; no evaluation split needed
        if ev is None or ev not in ds.splits:
            raise ConfigError(
                f"The evaluation split {ev!r} is not in the data; its splits are {', '.join(names)}; "
                "pass --eval-split NAME or --holdout 0.2."
            )
        tr, te = ds.splits[config.train_split], ds.splits[ev]
        rows_tr, rows_te = np.arange(len(tr)), np.arange(len(te))
    elif len(names) == 1 and config.eval_split is None:
        tr = te = ds.splits[names[0]]
        if config.folds is not None:
            rows_tr = rows_te = np.arange(len(tr))
        else:
            # as --holdout carves a file (every_class=False: see heads.protocol.roles.split_roles)
            rows_tr, rows_te = carve(
                np.asarray(tr.labels),
                ONE_SPLIT_EVAL,
                config.source.seed,
                groups=tr.groups,
                row_ids=tr.row_ids,
                every_class=False,
            )
            log.info("data has one split %r: carved %d rows for evaluation", names[0], len(rows_te))
    else:
        raise ConfigError(
            f"--train-split {config.train_split!r} is not in the data; its splits are {', '.join(names)}."
        )
    missing = sorted(set(range(len(ds.label_names))) - set(np.asarray(tr.labels)[rows_tr].tolist()))
    if missing:
        raise ConfigError(
            f"Classes {[ds.label_names[i] for i in missing]} have no training rows; every class needs "
            "at least one (check --label-col, --limit or the split files)."
        )
    return FinetuneData(
        train=tr,
        evaluation=te,
        train_rows=rows_tr,
        eval_rows=rows_te,
        label_names=ds.label_names,
        sources=ds.sources,
        skipped={"unusable": int(sum(ds.skipped_empty.values()))},
    )


def rounds(folds: int | None, data: FinetuneData, seed: int) -> list[Round]:
    """One round on the evaluation rows, or ``folds`` seeded, stratified folds of the training rows (each row held
    out once, group-disjoint when the rows have groups; the evaluation split is then unused)."""
    y_train = data.labels(data.train)[data.train_rows]
    groups = None if data.train.groups is None else data.train.groups[data.train_rows]
    y_eval = data.labels(data.evaluation)[data.eval_rows]
    no_copies = np.zeros(len(data.train), dtype=bool)  # fine-tuning data has no augmented copies
    return list(
        fold_rounds(
            folds,
            y_train,
            data.train_rows,
            data.train.name,
            data.evaluation.name,
            data.eval_rows,
            y_eval,
            seed,
            groups,
            no_copies,
            data.train.row_ids[data.train_rows],
        )
    )


def early_stopping_carve(
    data: FinetuneData, fit_pool: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training split that early stopping watches: the sweep's validation carve
    (:func:`~heads.protocol.validation_carve`) of ``fraction`` of ``fit_pool`` on its source-row ids (stratified, or
    group-disjoint when the rows have groups), so a sweep of the same data, seed and fraction chooses on the same
    rows. A carve that cannot hold every class is refused, naming --validation-fraction."""
    groups = None if data.train.groups is None else data.train.groups[fit_pool]
    fit, val = validation_carve(
        data.labels(data.train)[fit_pool],
        fraction,
        seed,
        groups,
        what=f"the training split {data.train.name!r}",
        row_ids=data.train.row_ids[fit_pool],
        fix="raise --validation-fraction",
    )
    return fit_pool[fit], fit_pool[val]


@dataclass(frozen=True)
class RoundRows:
    """The rows one round fits on, validates on (early stopping) and scores: positions in their splits."""

    fit: np.ndarray
    """Rows of the training split the model is fitted on."""
    validation: np.ndarray
    """Rows of the training split early stopping watches (the carve of the round's training rows)."""
    eval_split: str
    evaluation: np.ndarray
    """Rows of ``eval_split`` the round is scored on."""

    def ids(self, data: FinetuneData) -> dict[str, list[int]]:
        """{fit, validation, evaluation}: each row's 0-based position in the data file it was read from (what
        run.json records, so disjointness can be checked from outside)."""
        train_ids, eval_ids = np.asarray(data.train.row_ids), np.asarray(data.split(self.eval_split).row_ids)
        return {
            "fit": train_ids[self.fit].tolist(),
            "validation": train_ids[self.validation].tolist(),
            "evaluation": eval_ids[self.evaluation].tolist(),
        }


def round_rows(data: FinetuneData, rnd: Round, fraction: float, seed: int) -> RoundRows:
    """The fitting, validation and evaluation rows of one round: its training rows (all of ``data.train_rows``
    without folds) carved by :func:`early_stopping_carve`, and its evaluation rows."""
    fit_pool = data.train_rows if rnd.fit_rows is None else rnd.fit_rows
    fit, val = early_stopping_carve(data, fit_pool, fraction, seed)
    evaluation = data.eval_rows if rnd.eval_rows is None else rnd.eval_rows
    return RoundRows(fit=fit, validation=val, eval_split=rnd.eval_split, evaluation=np.asarray(evaluation))
