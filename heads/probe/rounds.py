"""How a sweep trains its configurations: one function per kind of head, all returning :class:`Outcome`.

* pooled linear heads, ``solver='lbfgs'``: :func:`heads.probe.solvers.fit_logistic_probes`, every configuration,
  seed, fold and every C of the grid together, C chosen on validation, streamed by row chunk when the features
  exceed the memory budget and split across torchrun ranks;
* pooled linear heads, ``solver='adamw'``: :func:`heads.probe.adamw.fit_linear_probes` (one batched pass);
* other dense and pair heads: :func:`heads.probe.ensemble.fit_stacked`, every configuration and seed of one
  architecture and input shape in one stacked model;
* token heads (rnn, gru, lstm): one ``HeadClassifier.fit`` each (packed sequences do not vmap).

Every outcome carries its validation scores (all choices were made there) and its evaluation scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from heads.probe.chunks import Comm, RowBlock, chunks_of
from heads.probe.config import HeadConfig
from heads.probe.ensemble import Member, bundle_key, fit_stacked, members_per_stack
from heads.probe.estimator import HeadClassifier
from heads.probe.features import FeatureBank, feature_width
from heads.probe.fitting import FittedHead
from heads.probe.modules import InputShape, LinearHead, as_inputs
from heads.probe.scoring import LogisticFit, probe_probabilities
from heads.probe.solvers import fit_logistic_probes
from heads.probe.specs import Combo
from heads.report.metrics import classification_metrics, metrics_from_confusion

__all__ = ["RoundRows", "Outcome", "train_lbfgs", "train_adamw", "train_stacked", "train_tokens", "row_source"]


@dataclass(frozen=True)
class RoundRows:
    """The rows of one round of a sweep: a seed (and fold), its fitting, validation and evaluation rows (absolute,
    sorted). :class:`heads.protocol.Round` is the round before its validation rows are carved."""

    seed: int
    fold: int | None
    train_split: str
    fit_rows: np.ndarray
    val_split: str
    val_rows: np.ndarray
    eval_split: str
    eval_rows: np.ndarray


@dataclass
class Outcome:
    """One trained head of one round, scored on validation and on the evaluation rows."""

    combo: Combo
    round: RoundRows
    est: HeadClassifier
    metrics: dict[str, Any]
    """classification_metrics on the evaluation rows."""
    proba: np.ndarray
    """(len(round.eval_rows), classes) float32 class probabilities of the evaluation rows, in their order."""
    val: dict[str, Any]
    """classification_metrics on the validation rows."""
    hyper: dict[str, Any] = field(default_factory=dict)
    """Choices made on validation (C for L-BFGS probes)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pred(self) -> np.ndarray:
        """(len(round.eval_rows),) int64 predicted labels of the evaluation rows (the most probable class)."""
        return self.proba.argmax(1).astype(np.int64)


class Labels:
    """Labels of the store splits a sweep reads (every rank holds them whole; they are small)."""

    def __init__(self, by_split: dict[str, np.ndarray], names: list[str]) -> None:
        self.by_split, self.names = by_split, names

    def __getitem__(self, split: str) -> np.ndarray:
        return self.by_split[split]


def row_source(
    bank: FeatureBank,
    combos: Sequence[Combo],
    split: str,
    round_rows: Sequence[np.ndarray],
    round_of: Sequence[int],
    y: np.ndarray,
    comm: Comm,
) -> Callable[[], Iterator[RowBlock]]:
    """Blocks of this rank's row chunks (chunk c goes to rank c % world) of the union of ``round_rows``, with their
    rows, every combo's features once, and each probe's rows (probe p belongs to round ``round_of[p]``)."""
    union = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in round_rows]))
    mine = [(c, r) for c, r in bank.chunks(split, union) if c % comm.world == comm.rank]
    n = bank.store.n_rows(split)
    member = np.zeros((len(round_rows), n), dtype=bool)
    for i, r in enumerate(round_rows):
        member[i, r] = True
    everyone = bool(member[:, union].all())  # one round, or rounds on the same rows: no masks
    probe_round = np.asarray(round_of, dtype=np.int64)

    def blocks() -> Iterator[RowBlock]:
        for c, r in mine:
            for rows, feats in bank.chunk_blocks(combos, split, c, r):
                yield rows, feats, y[rows], None if everyone else member[probe_round][:, rows]

    return blocks


def _linear_head(
    fit: LogisticFit,
    k: int,
    cfg: HeadConfig,
    n_classes: int,
    device: torch.device,
    seconds: float,
    history: list[dict[str, Any]],
) -> HeadClassifier:
    d = fit.weights.shape[1]
    module = LinearHead(d, n_classes)
    with torch.no_grad():
        module.linear.weight.copy_(torch.from_numpy(fit.weights[k].T))
        module.linear.bias.copy_(torch.from_numpy(fit.bias[k]))
        module.standardize.shift.copy_(torch.from_numpy(fit.mean))
        module.standardize.scale.copy_(torch.from_numpy(fit.scale))
    return HeadClassifier.from_fit(
        cfg, FittedHead(module.to(device), n_classes, InputShape("dense", ((d,),)), history, -1, seconds)
    )


def train_lbfgs(
    combos: Sequence[Combo],
    rounds: Sequence[RoundRows],
    bank: FeatureBank,
    labels: Labels,
    cfg: HeadConfig,
    device: torch.device,
    cache: bool,
    comm: Comm,
) -> list[Outcome]:
    """Every pooled linear probe of every round (combo x seed x fold) at every C of the grid, in one solve (every
    combo's features read once per pass), C chosen on each round's validation rows."""
    t0 = time.perf_counter()
    n_classes, names = len(labels.names), labels.names
    r0 = rounds[0]
    probes = [(ci, pi) for pi in range(len(rounds)) for ci in range(len(combos))]
    feature_of, round_of = [ci for ci, _ in probes], [pi for _, pi in probes]
    widths = [feature_width(c, bank.store.hidden) for c in combos]

    def source(split: str, rows: Sequence[np.ndarray]) -> Callable[[], Iterator[RowBlock]]:
        return row_source(bank, combos, split, rows, round_of, labels[split], comm)

    fits = fit_logistic_probes(
        chunks_of(source(r0.train_split, [p.fit_rows for p in rounds])),
        widths,
        n_classes,
        cfg.c_grid,
        feature_of=feature_of,
        val_source=chunks_of(source(r0.val_split, [p.val_rows for p in rounds])),
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        class_weight=cfg.class_weight,
        device=device,
        cache=cache,
        comm=comm,
        standardize=cfg.standardize,
    )
    seconds = (time.perf_counter() - t0) / max(1, len(probes))
    probas = probe_probabilities(
        [f.at(f.chosen) for f in fits],
        source(r0.eval_split, [p.eval_rows for p in rounds]),
        [rounds[pi].eval_rows for _, pi in probes],
        feature_of,
        comm=comm,
    )
    y_eval = labels[r0.eval_split]
    out = []
    for (ci, pi), fit, proba in zip(probes, fits, probas):
        k = fit.chosen
        history = [_c_step(fit, j, c, names) for j, c in enumerate(cfg.c_grid)]
        est = _linear_head(fit, k, cfg.replace(seed=rounds[pi].seed), n_classes, device, seconds, history)
        val = metrics_from_confusion(fit.val_confusion[k], names) if fit.val_confusion is not None else {}
        metrics = classification_metrics(y_eval[rounds[pi].eval_rows], proba.argmax(1), names)
        out.append(
            Outcome(
                combos[ci],
                rounds[pi],
                est,
                metrics,
                proba,
                val,
                hyper={"C": float(cfg.c_grid[k])},
                extra={"iterations": int(fit.iterations[k]), "converged": bool(fit.converged[k])},
            )
        )
    return out


def _c_step(fit: LogisticFit, j: int, c: float, names: list[str]) -> dict[str, Any]:
    """One C of a probe's path as its history records it (a C past the end of the path: ``solved`` False)."""
    solved = fit.solved is None or bool(fit.solved[j])
    vm = metrics_from_confusion(fit.val_confusion[j], names) if fit.val_confusion is not None and solved else None
    return {
        "C": float(c),
        "solved": solved,
        "train_loss": float(fit.train_loss[j]) if solved else None,
        "iterations": int(fit.iterations[j]),
        "converged": bool(fit.converged[j]),
        "solved_to_tol": bool(fit.refined[j]) if fit.refined is not None else True,
        "val_accuracy": None if vm is None else vm["accuracy"],
        "val_f1_macro": None if vm is None else vm["f1_macro"],
        "val_log_loss": None if fit.val_loss is None or not solved else float(fit.val_loss[j]),
    }


def _score(
    est: HeadClassifier, bank: FeatureBank, combo: Combo, split: str, rows: np.ndarray, y: np.ndarray, names: list[str]
) -> dict[str, Any]:
    return classification_metrics(y[rows], est.predict(bank.features(combo, split, rows)), names)


def _evaluate(
    est: HeadClassifier, bank: FeatureBank, combo: Combo, rnd: RoundRows, labels: Labels
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics and (rows, classes) probabilities of the evaluation rows (scored once, for the report)."""
    proba = est.predict_proba(bank.features(combo, rnd.eval_split, rnd.eval_rows))
    return classification_metrics(labels[rnd.eval_split][rnd.eval_rows], proba.argmax(1), labels.names), proba


def train_adamw(
    probes: Sequence[Combo], rnd: RoundRows, bank: FeatureBank, labels: Labels, cfg: HeadConfig
) -> list[Outcome]:
    """Every pooled linear probe of one round by minibatch AdamW in one batched pass, early-stopped on validation."""
    from heads.probe.adamw import fit_linear_probes

    y_tr, y_va = labels[rnd.train_split], labels[rnd.val_split]
    ests = fit_linear_probes(
        [bank.features(c, rnd.train_split, rnd.fit_rows) for c in probes],
        y_tr[rnd.fit_rows],
        [bank.features(c, rnd.val_split, rnd.val_rows) for c in probes],
        y_va[rnd.val_rows],
        cfg.replace(head="linear", seed=rnd.seed),
        n_classes=len(labels.names),
    )
    return [
        Outcome(
            c,
            rnd,
            e,
            *_evaluate(e, bank, c, rnd, labels),
            _score(e, bank, c, rnd.val_split, rnd.val_rows, y_va, labels.names),
        )
        for c, e in zip(probes, ests)
    ]


def head_config(cfg: HeadConfig, combo: Combo) -> HeadConfig:
    """The head configuration ``combo`` trains: its head kind and, for a pair head of ``--combine sum``, the fixed sum
    of each tower's layers."""
    return combo.config(cfg)


def train_stacked(
    jobs: Sequence[tuple[Combo, RoundRows]],
    bank: FeatureBank,
    labels: Labels,
    cfg: HeadConfig,
    device: torch.device,
    on_done: Callable[[], None],
    budget: int | None = None,
) -> list[Outcome]:
    """Dense and pair heads (not linear probes, not token heads) of every round: one stack per architecture and
    input shape, every configuration's features moved to the device once. A stack whose float32 features exceed
    ``budget`` is cut into stacks of fewer configurations (each configuration's features still move once)."""
    names = labels.names
    by_bundle: dict[Any, list[tuple[Combo, RoundRows]]] = {}
    shapes: dict[Combo, InputShape] = {}
    for combo, rnd in jobs:
        if combo not in shapes:
            shapes[combo] = as_inputs(bank.features(combo, rnd.train_split, rnd.fit_rows[:1]), combo.head).shape
        by_bundle.setdefault((bundle_key(combo.config(cfg), shapes[combo]), combo.size), []).append((combo, rnd))
    pieces: list[list[tuple[Combo, RoundRows]]] = []
    for bundle in by_bundle.values():
        combos = list(dict.fromkeys(c for c, _ in bundle))
        rows = bank.store.n_rows(bundle[0][1].train_split) + (
            0 if bundle[0][1].val_split == bundle[0][1].train_split else bank.store.n_rows(bundle[0][1].val_split)
        )
        per_combo = 4 * rows * sum(int(np.prod(s)) for s in shapes[combos[0]].shapes)
        size = len(combos) if budget is None else max(1, budget // max(1, per_combo))
        for start in range(0, len(combos), size):
            part = set(combos[start : start + size])
            pieces.append([(c, p) for c, p in bundle if c in part])
    out: list[Outcome] = []
    for bundle in pieces:
        combos = list(dict.fromkeys(c for c, _ in bundle))
        rnd0 = bundle[0][1]
        head_cfg = combos[0].config(cfg)
        train_inputs = [as_inputs(bank.features(c, rnd0.train_split), c.head) for c in combos]
        same = rnd0.val_split == rnd0.train_split
        val_inputs = train_inputs if same else [as_inputs(bank.features(c, rnd0.val_split), c.head) for c in combos]
        members = [Member(combos.index(c), p.seed, p.fit_rows, p.val_rows) for c, p in bundle]
        ests = fit_stacked(
            head_cfg,
            train_inputs,
            val_inputs,
            members,
            labels[rnd0.train_split],
            labels[rnd0.val_split],
            len(names),
            device,
            on_done=lambda _i: on_done(),
            stack_size=members_per_stack(head_cfg, train_inputs[0].shape, len(names), device),
        )
        for (combo, rnd), est in zip(bundle, ests):
            out.append(
                Outcome(
                    combo,
                    rnd,
                    est,
                    *_evaluate(est, bank, combo, rnd, labels),
                    _score(est, bank, combo, rnd.val_split, rnd.val_rows, labels[rnd.val_split], names),
                )
            )
    return out


def train_tokens(combo: Combo, rnd: RoundRows, bank: FeatureBank, labels: Labels, cfg: HeadConfig) -> Outcome:
    """One recurrent head over per-token states, early-stopped on validation."""
    y_tr, y_va = labels[rnd.train_split], labels[rnd.val_split]
    est = HeadClassifier(cfg.replace(head=combo.head, seed=rnd.seed))
    est.fit(
        bank.features(combo, rnd.train_split, rnd.fit_rows),
        y_tr[rnd.fit_rows],
        bank.features(combo, rnd.val_split, rnd.val_rows),
        y_va[rnd.val_rows],
        n_classes=len(labels.names),
    )
    return Outcome(
        combo,
        rnd,
        est,
        *_evaluate(est, bank, combo, rnd, labels),
        _score(est, bank, combo, rnd.val_split, rnd.val_rows, y_va, labels.names),
    )
