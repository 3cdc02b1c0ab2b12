"""The setup of a sweep: what it will train on which rows, and in which groups, decided (and checked) before
anything is trained or written.

:func:`plan_rounds` turns the evaluation protocol (:mod:`heads.protocol`) into one :class:`RoundRows` per seed
(x fold): the rows to fit on, the validation rows every choice is made on (the seeded, stratified, group-aware
carve of the training rows, or ``--val-split``) and the evaluation rows scored once for the report.
:func:`drop_duplicates` removes configurations that are the same model as another. :class:`SweepSetup` is all of it
for one store; :func:`feature_groups` cuts its configurations into groups whose features fit ``--max-memory`` (each
read once and trained in memory; a configuration that alone does not fit streams), :func:`check_budget` refuses a
budget below one row chunk of a streamed one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embstore.errors import ConfigError
from embstore.store.reader import Store
from heads.probe.config import POOLED_HEADS, HeadConfig
from heads.probe.features import FeatureBank, feature_width
from heads.probe.rounds import Labels, RoundRows
from heads.probe.solvers import PATH_PATIENCE
from heads.probe.specs import Combo
from heads.protocol import fold_rounds, validation_carve

__all__ = [
    "plan_rounds",
    "drop_duplicates",
    "check_val_split",
    "SweepSetup",
    "linear_combos",
    "feature_bank",
    "check_budget",
    "in_memory",
    "feature_groups",
    "sweep_notes",
    "memory_size",
]


def check_val_split(store: Store, val_split: str, train_split: str, eval_split: str) -> None:
    """``--val-split`` must name a store split that is neither the training nor the evaluation split."""
    if val_split not in store.splits:
        raise ConfigError(
            f"--val-split {val_split!r} is not in {store.path}; its splits are {', '.join(store.splits)}. "
            "Pass one of them, or leave --val-split out to carve validation rows from the training split."
        )
    if val_split == eval_split:
        raise ConfigError(
            f"--val-split {val_split!r} is also the evaluation split: every choice would be made on the "
            "rows the report scores. Pass another --val-split or --eval-split."
        )
    if val_split == train_split:
        raise ConfigError(
            f"--val-split {val_split!r} is the training split; pass another split, or leave --val-split "
            "out to carve validation rows from it."
        )


def plan_rounds(
    store: Store,
    *,
    seeds: int,
    folds: int | None,
    validation_fraction: float,
    val_split: str | None,
    train: tuple[str, np.ndarray | None],
    evaluate: tuple[str, np.ndarray | None],
    first_seed: int = 0,
    every_class: bool = True,
) -> list[RoundRows]:
    """One RoundRows per seed (``first_seed`` .. ``first_seed + seeds - 1``) x fold, in (seed, fold) order; raises
    ConfigError for a carve that cannot work.

    Every carve is drawn on source-row ids, grouped by the stored groups, with augmented copies following their
    source row (:func:`heads.protocol.validation_carve`): the rows ``heads finetune`` of the same data, seed and
    ``--validation-fraction`` validates on.

    Word and edge tasks (``every_class`` False) carve whole sentences (their stored groups) and do not refuse a carve
    whose rare labels cannot sit on both sides (a word label seen once in a treebank cannot): the carve keeps the
    sentences apart anyway and logs the classes missing from a side."""
    tr_split, tr_rows = train
    ev_split, ev_rows = evaluate
    y_all = store.labels(tr_split)
    augmented = store.augmented(tr_split)
    groups_all = store.groups(tr_split)
    ids_all = store.row_ids(tr_split)
    y_train = y_all if tr_rows is None else y_all[tr_rows]
    ids_train = ids_all if tr_rows is None else ids_all[tr_rows]
    g_train = None if groups_all is None else groups_all if tr_rows is None else groups_all[tr_rows]
    y_eval_all = store.labels(ev_split)
    y_eval = y_eval_all if ev_rows is None else y_eval_all[ev_rows]
    val_rows_split = None
    if val_split is not None:
        val_rows_split = np.flatnonzero(~store.augmented(val_split))
    rounds = []
    for seed in range(first_seed, first_seed + seeds):
        for rnd in fold_rounds(
            folds, y_train, tr_rows, tr_split, ev_split, ev_rows, y_eval, seed, g_train, augmented, ids_train
        ):
            base = np.arange(len(y_all)) if rnd.fit_rows is None else rnd.fit_rows
            if val_rows_split is not None and val_split is not None:
                fit, val, vsplit = base, val_rows_split, val_split
            else:
                where = f"the training split {tr_split!r}" + ("" if rnd.fold is None else f" (fold {rnd.fold})")
                fit_pos, val_pos = validation_carve(
                    y_all[base],
                    validation_fraction,
                    seed,
                    None if groups_all is None else groups_all[base],
                    what=where,
                    row_ids=ids_all[base],
                    augmented=augmented[base],
                    every_class=every_class,
                )
                fit, val, vsplit = base[fit_pos], base[val_pos], tr_split  # choices are made on original rows only
            eval_rows = np.arange(len(y_eval_all)) if rnd.eval_rows is None else np.sort(rnd.eval_rows)
            rounds.append(
                RoundRows(
                    seed=seed,
                    fold=rnd.fold,
                    train_split=tr_split,
                    fit_rows=np.sort(fit),
                    val_split=vsplit,
                    val_rows=np.sort(val),
                    eval_split=rnd.eval_split,
                    eval_rows=eval_rows,
                )
            )
    return rounds


def drop_duplicates(combos: Sequence[Combo], standardize: bool) -> tuple[list[Combo], list[str]]:
    """Configurations without the ones that are another's model, and a note for each kind dropped.

    For heads that standardise their inputs, the sum of k layers is k times their mean, and standardising removes
    the factor: ``sum`` and ``mean`` give the same model. The mean is trained; the sum is not.
    """
    seen = {c.key for c in combos}
    kept, dropped = [], []
    for c in dict.fromkeys(combos):  # also drops exact repeats (e.g. --head linear,mix both asking for mix)
        if (
            standardize
            and c.head in POOLED_HEADS
            and c.combine == "sum"
            and (c.layers_label, "mean", c.pooling, c.head) in seen
        ):
            dropped.append(c)
            continue
        kept.append(c)
    notes = []
    if dropped:
        which = ", ".join(sorted({f"{c.layers_label} {c.pooling} {c.head}" for c in dropped}))
        notes.append(
            f"combine sum was not trained where mean is ({which}): after standardisation the sum of the "
            "layers and their mean are the same inputs, so the mean row stands for both"
        )
    return kept, notes


def memory_size(n: int, up: bool = False) -> str:
    """Bytes as a --max-memory value: 512KB, 3.2MB, 1.5GB (rounded up with ``up``, so it is enough)."""
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{math.ceil(value * 10) / 10:g}{unit}" if up else f"{value:.1f}{unit}"
    return f"{n}B"


@dataclass
class SweepSetup:
    """What a sweep decided before training: the same for the store and its control."""

    path: str
    store: Store
    names: list[str]
    train: tuple[str, np.ndarray | None]
    evaluate: tuple[str, np.ndarray | None]
    combos: list[Combo]
    notes: list[str]
    rounds: list[RoundRows]
    splits: list[str]
    budget: int
    labels: Labels
    control_labels: Labels | None = None
    """``--control-task``: every split's control-task labels (the same rows, carve and probes train on them)."""


def linear_combos(setup: SweepSetup, cfg: HeadConfig) -> list[Combo]:
    return [c for c in setup.combos if c.head == "linear" and c.pooling != "tokens" and cfg.solver == "lbfgs"]


def feature_bank(setup: SweepSetup, cfg: HeadConfig) -> tuple[FeatureBank, bool]:
    """The feature bank of a group of configurations, and whether the solver keeps standardised chunks on the device
    (they fit next to the bank)."""
    bank = FeatureBank(setup.store, setup.combos, setup.splits, setup.budget)
    cache_chunks = bank.preloaded and bank.needed + _cache_bytes(setup, linear_combos(setup, cfg)) <= setup.budget
    return bank, cache_chunks


def check_budget(setup: SweepSetup, groups: list[list[Combo]], cfg: HeadConfig, max_memory: str) -> None:
    """Refuse a budget below one row chunk of a configuration that is streamed (before anything is written)."""
    worst: tuple[int, str] | None = None
    for group in groups:
        part = dataclasses.replace(setup, combos=group)
        lbfgs = linear_combos(part, cfg)
        if not lbfgs or in_memory(setup, group):
            continue
        bank = FeatureBank(setup.store, group, setup.splits, 0)  # nothing is read with a budget of 0
        widths = sum(feature_width(c, setup.store.hidden) for c in lbfgs)
        work = 12 * len(lbfgs) * len(cfg.c_grid) * len(setup.names)  # the solver's logits, log-probabilities, gradients
        found = max((bank.chunk_bytes(s, widths, work), s) for s in setup.splits)
        worst = found if worst is None or found > worst else worst
    if worst is not None and worst[0] > setup.budget:
        need, split = worst
        raise ConfigError(
            f"--max-memory {max_memory} is below one row chunk of {setup.path} ({memory_size(need)}: "
            f"{setup.store.layout.splits[split].chunk_rows} rows of split {split!r} in the layers and poolings "
            f"a streamed linear probe needs, and its features); raise --max-memory to at least "
            f"{memory_size(need, up=True)}."
        )


def in_memory(setup: SweepSetup, combos: list[Combo]) -> bool:
    """Whether the features of ``combos`` are held in memory (else streamed from the store)."""
    return FeatureBank.bytes_needed(setup.store, combos, setup.splits) <= setup.budget


def _cache_bytes(setup: SweepSetup, lbfgs: Sequence[Combo]) -> int:
    """The solver's standardised float32 copy of the linear probes' training features (one per round)."""
    return 4 * sum(feature_width(c, setup.store.hidden) for c in lbfgs) * sum(len(p.fit_rows) for p in setup.rounds)


def feature_groups(setup: SweepSetup, cfg: HeadConfig) -> list[list[Combo]]:
    """The configurations in groups whose features (and the solver's float32 copy of them) fit --max-memory: each
    group is read from the store once and trained in memory. A configuration that alone does not fit is a group of
    its own, streamed from the store row chunk by row chunk. Configurations are packed in order of pooling and
    layers, so a group shares what it reads."""
    order = sorted(setup.combos, key=lambda c: (c.pooling, c.layers, c.combine, c.head))
    groups: list[list[Combo]] = []
    current: list[Combo] = []

    def cost(combos: list[Combo]) -> int:
        part = dataclasses.replace(setup, combos=combos)
        return FeatureBank.bytes_needed(setup.store, combos, setup.splits) + _cache_bytes(
            part, linear_combos(part, cfg)
        )

    for combo in order:
        if current and cost(current + [combo]) > setup.budget:
            groups.append(current)
            current = []
        current.append(combo)
    if current:
        groups.append(current)
    return [[c for c in setup.combos if c in set(g)] for g in groups]  # each group in report order


def sweep_notes(setup: SweepSetup, groups: list[list[Combo]], cfg: HeadConfig, max_memory: str) -> list[str]:
    """What summary.md says about how the linear probes chose C and how the features were read."""
    notes = []
    if linear_combos(setup, cfg) and len(cfg.c_grid) > 1:
        notes.append(
            f"linear probes: the C grid ({', '.join(f'{c:g}' for c in cfg.c_grid)}) is solved from the smallest C "
            f"up, each C starting from the previous one's solution; a configuration's path stops once its "
            f"validation macro-F1 has fallen at {PATH_PATIENCE} consecutive Cs; only the chosen C is solved to "
            f"--tol {cfg.tol:g}"
        )
    if len(groups) > 1:
        streamed = sum(len(g) for g in groups if not in_memory(setup, g))
        notes.append(
            f"features over --max-memory {max_memory}: {len(setup.combos)} configurations in {len(groups)} groups, "
            "each read from the store once and trained in memory"
            + (f"; {streamed} that alone did not fit were streamed row chunk by row chunk" if streamed else "")
        )
    return notes
