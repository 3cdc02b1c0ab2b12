"""``heads sweep`` / ``heads train``: many heads on many layer combinations, straight from a store.

A sweep sets up its rounds (:mod:`heads.probe.sweep_setup`), trains every configuration of every round
(:mod:`heads.probe.rounds`), writes one result row per configuration x seed x fold, and saves as ``best_head/``
the head of the summary's best row: the configuration with the highest mean validation macro-F1. The evaluation
split is scored once per configuration, for the report only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from embstore.config import reject_unknown_keys
from embstore.errors import Choice, ConfigError, Constraint, DataError, Interval, ListOf, Optional, validate_params
from embstore.store.reader import Store, open_store
from heads.evalset import EVAL_SET_KEY, eval_set, source_sha256
from heads.probe.card import HeadCard
from heads.probe.chunks import Comm
from heads.probe.config import TOKEN_HEADS, HeadConfig, parse_grid
from heads.probe.control import check_control
from heads.probe.features import FeatureBank, parse_memory
from heads.probe.mdl import FRACTIONS, Codelength, online_codelengths
from heads.probe.record import control_task_fields, merge_fields, result_row, sureness, uncertainty_meta, with_fields
from heads.probe.ridge import ALPHAS
from heads.probe.rounds import (
    Labels,
    Outcome,
    RoundRows,
    row_source,
    train_adamw,
    train_lbfgs,
    train_stacked,
    train_tokens,
)
from heads.probe.specs import COMBINE, COMBINES, Combo, expand, parse_combine, sized
from heads.probe.sweep_setup import (
    SweepSetup,
    check_budget,
    check_val_split,
    drop_duplicates,
    feature_bank,
    feature_groups,
    in_memory,
    linear_combos,
    plan_rounds,
    sweep_notes,
)
from heads.probe.word import TASKS, ExampleStore
from heads.protocol import split_roles
from heads.report import rundir
from heads.report.metrics import majority_accuracy
from heads.report.plots import DATA_PLOT, plot_data, profile_entry
from heads.report.results import RunWriter, aggregate, best_config

__all__ = ["SweepConfig", "SweepResult", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """One sweep (``heads train`` is a sweep of one configuration)."""

    store: str | None = None
    """Store path; None takes the most recent complete store in the cache."""
    layers: str = "all"
    """Layer spec: each single layer plus combinations over all of them."""
    combine: tuple[str, ...] = COMBINES
    """Which of single, concat, sum, mean, mix."""
    pooling: tuple[str, ...] | None = None
    """Stored poolings to use; None is every stored pooling."""
    heads: tuple[str, ...] = ("linear",)
    """Head kinds to train on every configuration."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Architecture and training hyper-parameters shared by the heads."""
    train_split: str = "train"
    eval_split: str | None = None
    """None: the store's 'test' split, else 'validation'."""
    holdout: float = 0.2
    """Only for a store with one split: the share carved (seeded, stratified) for evaluation."""
    val_split: str | None = None
    """A store split to make every choice on (epoch, C, configuration); None carves ``validation_fraction`` of the
    training rows (seeded, stratified, group-aware)."""
    seeds: int = 1
    """Repeat every configuration with seeds S..S+N-1, S the head's ``seed`` (default 0), reported as mean +- std.
    Seed S carves the rows a ``heads finetune --seed S`` of the same data carves."""
    folds: int | None = None
    """K-fold cross-validation on the training split instead of the evaluation split."""
    max_memory: str = "8GB"
    """Feature memory budget; above it linear probes stream row chunks from the store and the other heads read
    each configuration's layers when it trains."""
    out: str | None = None
    """Run directory; None: runs/<time>-<store>."""
    verify: bool = True
    """Check every row chunk read from the store against the checksum recorded when it was written."""
    ci: bool = True
    """How sure: bootstrap intervals of every score and paired tests of every configuration against the best."""
    control: str | None = None
    """A control store (e.g. ``embstore extract --random-weights SEED``): every configuration is trained on it too,
    on the same rows, and the gain over it is reported."""
    mdl: bool = False
    """The online codelength (MDL) of the training labels given each linear probe's features."""
    task: str = "sentence"
    """What one example is: 'sentence' (a store row), 'word' (a word, label: a stored word label), 'edge' (a word
    and its head), 'arc' (which word is a word's head), 'regression' (a numeric target: the store's labels, or a
    word-level one such as ``depth``); see docs/word-probing.md."""
    label: str | None = None
    """Word and edge tasks: the word label (upos, xpos, deprel, ...; ``depth``, ``distance`` for regression)."""
    control_task: bool = False
    """Also train every configuration on the control task (each word type a fixed random label; Hewitt & Liang
    2019) and report control accuracy and selectivity."""
    ranks: tuple[int, ...] = ()
    """Probe complexity: a rank-constrained linear probe (head ``rank``) at each of these ranks, one configuration
    each (Hewitt & Liang 2019: selectivity depends on the probe's complexity); () for none."""
    mlp_widths: tuple[int, ...] = ()
    """Probe complexity: every ``mlp`` head at each of these hidden widths (one hidden layer), one configuration
    each; () keeps ``hidden``."""
    alphas: tuple[float, ...] = ALPHAS
    """Regression: the ridge penalties tried (scikit-learn's alpha, on standardised features), chosen on
    validation."""
    keep_fold_models: bool = False
    """With ``folds``: keep the best configuration's head of every fold (``best_head/folds/fold-K``), score their
    averaged probabilities on the store's evaluation split (the fold ensemble, in run.json and summary.md), and let
    ``heads predict --run`` average them."""

    parameter_constraints: ClassVar[Mapping[str, Constraint]] = {
        "task": Choice(TASKS),
        "ranks": ListOf(Interval(int, 1, None), min_len=0, desc="a comma list of positive ranks"),
        "mlp_widths": ListOf(Interval(int, 1, None), min_len=0, desc="a comma list of positive widths"),
        "alphas": ListOf(
            Interval(float, 0, None, closed="neither"),
            desc="a comma list of positive ridge penalties",
            hint="Pass values such as 0.1,10,1000.",
        ),
        "combine": COMBINE,
        "heads": ListOf(HeadConfig.parameter_constraints["head"], min_len=0),
        "seeds": Interval(int, 1, None, desc="at least 1"),
        "folds": Optional(Interval(int, 2, None, desc="at least 2")),
        "holdout": Interval(float, 0, 1, closed="neither"),
    }
    """What each parameter accepts (:func:`embstore.errors.validate_params`); ``combine`` and ``heads`` are the
    tables of :mod:`heads.probe.specs` and :class:`HeadConfig`, which the CLI reads."""

    def __post_init__(self) -> None:
        validate_params(self)
        parse_memory(self.max_memory)
        if self.mdl and self.folds is not None:
            raise ConfigError(
                f"--mdl codes the labels of the whole training split and --folds {self.folds} cuts it into "
                "folds; run --mdl without --folds (a second sweep), or --folds without --mdl."
            )
        if self.control_task and self.regression:
            raise ConfigError(
                f"--control-task draws a random label per word type for classification; --task {self.task}"
                f"{' --label ' + self.label if self.label else ''} is a regression task: leave --control-task out."
            )
        if self.control_task and self.task == "sentence":
            raise ConfigError(
                "--control-task gives every word type a random label: it needs --task word, edge or arc (a store of "
                "word-level data); for a sentence task use --control STORE (a random-weights store)."
            )
        if self.task in ("word", "edge") and not self.label and not self.regression:
            raise ConfigError(f"--task {self.task} needs --label NAME: a stored word label such as upos, xpos, deprel.")
        if self.keep_fold_models and self.folds is None:
            raise ConfigError("--keep-fold-models keeps the heads of --folds K; pass --folds too, or drop it.")
        if self.mdl and not ("linear" in self.heads and self.head.solver == "lbfgs"):
            raise ConfigError(
                "--mdl codes the labels with the L-BFGS linear probes; add --head linear (with --solver lbfgs, "
                "the default)."
            )

    @property
    def regression(self) -> bool:
        """Whether the task is a regression: ``--task regression``, word ``depth``, edge ``distance``."""
        return self.task == "regression" or (self.task, self.label) in (("word", "depth"), ("edge", "distance"))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "head"}
        d.update({k: v for k, v in self.head.to_dict().items() if k != "head"})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepConfig":
        """Sweep keys and head hyper-parameters side by side (as in a YAML config)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"head"}
        head_keys = {f.name for f in dataclasses.fields(HeadConfig)} - {"head"}
        reject_unknown_keys(d, own | head_keys | {"head"}, "sweep")
        kw = {k: v for k, v in d.items() if k in own}
        for key in ("ranks", "mlp_widths"):
            if isinstance(kw.get(key), (str, int)):
                kw[key] = tuple(int(p) for p in str(kw[key]).split(",") if p.strip())
            elif kw.get(key) is not None:
                kw[key] = tuple(int(p) for p in kw[key])
        if isinstance(kw.get("alphas"), (str, int, float)):
            kw["alphas"] = parse_grid(kw["alphas"])
        elif kw.get("alphas") is not None:
            kw["alphas"] = tuple(float(a) for a in kw["alphas"])
        for key in ("combine", "pooling", "heads"):
            if isinstance(kw.get(key), str):
                kw[key] = tuple(p.strip() for p in kw[key].split(",") if p.strip())
            elif kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        if "head" in d:
            heads = d["head"].split(",") if isinstance(d["head"], str) else list(d["head"])
            kw["heads"] = tuple(h.strip() for h in heads if h.strip())
        kw["head"] = HeadConfig.from_dict({k: v for k, v in d.items() if k in head_keys})
        return cls(**kw)


@dataclass(frozen=True)
class SweepResult:
    run_dir: Path
    store: str
    rows: int
    best: dict[str, Any]
    """The best configuration (by validation macro-F1): layers, combine, pooling, head, val and test scores."""
    rank: int = 0
    """The torchrun rank that returned it (only rank 0 writes the run directory)."""
    tied: list[tuple[str, str, str, str]] = field(default_factory=list)
    """Configurations not significantly worse than the best (empty with --no-ci)."""


def _join_process_group() -> Any:
    """Under torchrun / accelerate launch: join the process group (gloo on CPU, nccl on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():  # 'cuda' is then this rank's own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist


def _progress(total: int, show: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="heads sweep",
        unit="config",
        disable=(not show) if show is not None else None,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _eval_record(store: Store, rnd: RoundRows) -> dict[str, Any]:
    return eval_set(
        source_sha256(store.provenance.sources, rnd.eval_split),
        store.row_ids(rnd.eval_split)[rnd.eval_rows],
    )


def _setup(config: SweepConfig, path: str) -> SweepSetup:
    """Open the store, name the split roles, expand the configurations and carve every round (nothing written)."""
    cfg = config.head
    base = open_store(path, verify=config.verify)
    store: Any = base
    if config.task in ("word", "edge"):
        store = ExampleStore.open(base, config.task, str(config.label), base.splits, config.train_split)
    if store.label_names is None:
        raise DataError(f"{path} was extracted without labels; re-extract with --label-col COLUMN.")
    names = store.label_names
    (tr_split, tr_rows), (ev_split, ev_rows) = split_roles(
        store, config.train_split, config.eval_split, config.holdout, cfg.seed, config.folds
    )
    if config.val_split is not None:
        check_val_split(store, config.val_split, tr_split, ev_split)
    y_all = store.labels(tr_split)
    y_train = y_all if tr_rows is None else y_all[tr_rows]
    absent = [names[c] for c in range(len(names)) if not (y_train == c).any()]
    if absent:
        raise DataError(
            f"Class {', '.join(map(repr, absent))} has no rows in the training split {tr_split!r}; a head cannot learn "
            f"it: re-split the data so every class is in training."
        )
    heads = config.heads + (("rank",) if config.ranks and "rank" not in config.heads else ())
    combos = expand(
        layers=config.layers,
        combine=parse_combine(config.combine),
        poolings=config.pooling or tuple(store.poolings),
        heads=heads,
        store_layers=store.layers,
        store_poolings=store.poolings,
        token_layers=store.token_layers,
        towers=store.towers,
        store_path=path,
    )
    combos = sized(combos, config.ranks, config.mlp_widths)
    combos, notes = drop_duplicates(combos, cfg.standardize)
    rounds = plan_rounds(
        store,
        seeds=config.seeds,
        folds=config.folds,
        validation_fraction=cfg.validation_fraction,
        val_split=config.val_split,
        train=(tr_split, tr_rows),
        evaluate=(ev_split, ev_rows),
        first_seed=cfg.seed,
        every_class=not isinstance(store, ExampleStore),
    )
    splits = list(dict.fromkeys([tr_split, ev_split] + ([config.val_split] if config.val_split else [])))
    labels = Labels({s: store.labels(s) for s in splits}, names)
    control = None
    if config.control_task and isinstance(store, ExampleStore):
        drawn = store.control_task_labels(tr_rows, tr_split, cfg.seed)
        control = Labels({s: drawn[s] for s in splits}, names)
        notes = notes + list(store.notes)
    elif isinstance(store, ExampleStore):
        notes = notes + list(store.notes)
    return SweepSetup(
        path,
        store,
        names,
        (tr_split, tr_rows),
        (ev_split, ev_rows),
        combos,
        notes,
        rounds,
        splits,
        parse_memory(config.max_memory),
        labels,
        control,
    )


def _train(
    setup: SweepSetup,
    bank: FeatureBank,
    cache_chunks: bool,
    cfg: HeadConfig,
    device: Any,
    comm: Comm,
    step: Callable[[int], None],
    done: Callable[[Outcome], None],
) -> list[Outcome]:
    """Every configuration of every round: L-BFGS probes of every round first, on every rank (their passes are
    collective), then what rank 0 trains alone. ``done`` sees each outcome as it finishes."""
    main = comm.rank == 0
    rounds, labels = setup.rounds, setup.labels
    lbfgs = linear_combos(setup, cfg)
    adamw = [c for c in setup.combos if c.head == "linear" and cfg.solver == "adamw"]
    tokens = [c for c in setup.combos if c.head in TOKEN_HEADS]
    stacked = [c for c in setup.combos if c not in lbfgs and c not in adamw and c not in tokens]
    outcomes: list[Outcome] = []

    def keep(found: Sequence[Outcome]) -> None:
        for o in found:
            done(o)
            outcomes.append(o)

    if lbfgs:
        keep(train_lbfgs(lbfgs, rounds, bank, labels, cfg, device, cache_chunks, comm))
        step(len(lbfgs) * len(rounds))
    for rnd in rounds if main else []:
        found = train_adamw(adamw, rnd, bank, labels, cfg) if adamw else []
        step(len(adamw))
        for combo in tokens:
            found.append(train_tokens(combo, rnd, bank, labels, cfg))
            step(1)
        keep(found)
    if main and stacked:  # every round at once: one stack per architecture and input shape
        keep(
            train_stacked(
                [(c, p) for p in rounds for c in stacked],
                bank,
                labels,
                cfg,
                device,
                lambda: step(1),
                budget=setup.budget,
            )
        )
    return outcomes


def _codelengths(
    setup: SweepSetup,
    bank: FeatureBank,
    outcomes: Sequence[Outcome],
    cfg: HeadConfig,
    device: Any,
    comm: Comm,
) -> dict[tuple[Combo, int], Codelength]:
    """--mdl: the online codelength of every L-BFGS probe configuration and seed, at its chosen C."""
    tr_split, tr_rows = setup.train
    rows = np.arange(setup.store.n_rows(tr_split)) if tr_rows is None else tr_rows
    rows = rows[~setup.store.augmented(tr_split)[rows]]
    combos = linear_combos(setup, cfg)
    chosen = {(o.combo, o.round.seed): float(o.hyper["C"]) for o in outcomes if "C" in o.hyper}
    y = setup.labels[tr_split]

    def source(row_sets: Sequence[np.ndarray], set_of: Sequence[int]) -> Any:
        return row_source(bank, combos, tr_split, row_sets, set_of, y, comm)

    return online_codelengths(
        combos,
        chosen,
        sorted({p.seed for p in setup.rounds}),
        bank,
        tr_split,
        rows,
        y,
        len(setup.names),
        cfg,
        device,
        comm,
        source,
    )


def _rows_record(store: Store, rounds: Sequence[RoundRows], folds: bool) -> dict[str, Any] | list[dict[str, Any]]:
    """The fit, validation and evaluation rows of the first seed's rounds as sorted source-row ids (copies count
    once), one object (a list of one per fold with ``folds``): the record ``heads finetune`` writes, so a sweep and a
    fine-tune of one file, seed and fraction can be checked to choose and score on the same rows."""

    def ids(split: str, rows: np.ndarray) -> list[int]:
        return np.unique(store.row_ids(split)[rows]).tolist()

    out = [
        {
            "fit": ids(p.train_split, p.fit_rows),
            "validation": ids(p.val_split, p.val_rows),
            "evaluation": ids(p.eval_split, p.eval_rows),
        }
        for p in rounds
    ]
    return out if folds else out[0]


def _meta(
    config: SweepConfig, setup: SweepSetup, groups: list[list[Combo]], comm: Comm, control: Store | None
) -> dict[str, Any]:
    """run.json of a sweep (rank 0)."""
    from embstore import __version__

    store, cfg, names = setup.store, config.head, setup.names
    (tr_split, tr_rows), (ev_split, ev_rows) = setup.train, setup.evaluate
    rounds = setup.rounds
    y_all = store.labels(tr_split)
    y_train = y_all if tr_rows is None else y_all[tr_rows]
    augmented = store.augmented(tr_split)
    groups_all = store.groups(tr_split)
    aug_train = augmented if tr_rows is None else augmented[tr_rows]
    y_eval_all = store.labels(ev_split)
    y_eval = y_eval_all if ev_rows is None else y_eval_all[ev_rows]
    first = rounds[0]
    validation = (
        f"split `{config.val_split}` ({len(first.val_rows)} rows)"
        if config.val_split
        else f"a seeded, stratified {cfg.validation_fraction:g} carve of the training sentences (each sentence "
        f"whole on one side){' of each fold' if config.folds else ''}, one per seed ({len(first.val_rows)} examples)"
        if isinstance(store, ExampleStore)
        else f"a seeded, {'group-disjoint' if groups_all is not None else 'stratified'} {cfg.validation_fraction:g} "
        f"carve of "
        f"the training rows{' of each fold' if config.folds else ''}, one per seed ({len(first.val_rows)} rows)"
    )
    held = np.unique(np.concatenate([p.eval_rows for p in rounds if p.seed == first.seed]))
    run_eval = eval_set(
        source_sha256(store.provenance.sources, first.eval_split), store.row_ids(first.eval_split)[held]
    )
    meta = {
        "kind": "sweep",
        "store": setup.path,
        "store_fingerprint": store.fingerprint,
        "model": store.provenance.model_name,
        "text": None if store.provenance.text is None else store.provenance.text.to_dict(),
        "compute_dtype": store.provenance.compute_dtype,
        "label_names": names,
        "train_split": tr_split,
        "eval_split": ev_split,
        "val_split": config.val_split,
        "validation": validation,
        "train_rows": int(len(y_train)),
        "eval_rows": int(len(held) if config.folds else len(y_eval)),
        "carved_eval": ev_rows is not None,
        # the baseline predicts the commonest class of the original rows (augmented copies skew the counts)
        "majority_accuracy": majority_accuracy(y_train[~aug_train], y_train[~aug_train] if config.folds else y_eval),
        "config": config.to_dict(),
        "augmented_rows": int(aug_train.sum()),
        "kept_apart": (
            f"groups of {store.provenance.group_col or 'the group column'}"
            if groups_all is not None
            else "augmented copies and their source rows"
            if aug_train.any()
            else None
        ),
        "configurations": len(setup.combos),
        "embstore": __version__,
        "feature_bytes": FeatureBank.bytes_needed(store, setup.combos, setup.splits),
        "features_preloaded": len(groups) == 1 and in_memory(setup, groups[0]),
        "feature_groups": len(groups),
        "streamed_configurations": sum(len(g) for g in groups if not in_memory(setup, g)),
        "solver": cfg.solver,
        "world_size": comm.world,
        EVAL_SET_KEY: run_eval,
        "rows": _rows_record(store, [p for p in rounds if p.seed == first.seed], config.folds is not None),
        "notes": setup.notes + sweep_notes(setup, groups, cfg, config.max_memory),
        # what the store's rows were cut to (heads report marks runs whose truncation differs)
        **(
            {"max_seconds": store.provenance.max_seconds}
            if store.provenance.audio_col
            else {"max_length": store.provenance.max_length}
        ),
    }
    if isinstance(store, ExampleStore):
        meta["task"] = {
            "task": config.task,
            "label": config.label,
            "word_pooling": sorted({c.pooling for c in setup.combos}),
            "examples": {s: store.n_rows(s) for s in setup.splits},
            "features": "the word's state" if config.task == "word" else "[h_dep, h_head, h_dep * h_head]",
            "groups": "sentences: every carve and fold keeps a sentence's words on one side",
        }
        if setup.control_labels is not None:
            meta["task"]["control_task"] = {
                "definition": "every word type (lower-cased form"
                + ("; for edges the pair of the dependent's and the head's types" if config.task == "edge" else "")
                + ") gets one label drawn, by a seeded hash of the type, from the empirical label distribution of "
                "the training examples; the same probes, carve and C grid are trained on it",
                "citation": "Hewitt & Liang (2019), Designing and Interpreting Probes with Control Tasks, EMNLP",
                "seed": config.head.seed,
                "types": len(set(store.examples[tr_split].types or [])),
            }
    if control is not None:
        meta["control"] = {
            "store": str(control.path),
            "store_fingerprint": control.fingerprint,
            "model": control.provenance.model_name,
            "random_weights": control.provenance.model.get("random_weights"),
        }
    return meta


def _keep_folds(run_dir: Path, setup: SweepSetup, outcomes: list[Outcome], combo: Combo, seed: int) -> dict[str, Any]:
    """Save the best configuration's head of every fold (seed ``seed``) under best_head/folds/fold-K and score their
    averaged probabilities on the store's evaluation split (one apart from the training split), as run.json's
    ``fold_ensemble``."""
    from heads.report.metrics import classification_metrics
    from heads.report.rundir import BEST_HEAD_DIR, FOLDS_DIR

    store, tr = setup.store, setup.train[0]
    mine = sorted(
        (o for o in outcomes if o.combo == combo and o.round.seed == seed and o.round.fold is not None),
        key=lambda o: int(o.round.fold or 0),
    )
    for o in mine:
        card = HeadCard.for_store(combo, store, setup.path, seed=seed, fold=o.round.fold)
        o.est.save(run_dir / BEST_HEAD_DIR / FOLDS_DIR / f"fold-{o.round.fold}", card=card)
    test = next((s for s in ("test", "validation") if s in store.splits and s != tr), None)
    if test is None:
        return {"note": f"{store.path} has no evaluation split apart from {tr!r}: the fold heads are kept, not scored"}
    bank = FeatureBank(store, [combo], [test], setup.budget)
    rows = np.flatnonzero(~store.augmented(test))
    X = bank.features(combo, test, rows)
    proba = np.mean([o.est.predict_proba(X) for o in mine], axis=0)
    y = store.labels(test)[rows]
    return {
        "configuration": "/".join(combo.key),
        "folds": [int(o.round.fold or 0) for o in mine],
        "split": test,
        "rows": int(len(rows)),
        "how": "the mean of the fold heads' class probabilities, then the most probable class",
        **classification_metrics(y, proba.argmax(1), setup.names),
    }


def data_profile(setup: SweepSetup) -> dict[str, Any]:
    """The training and evaluation rows of the store (data.png, run.json ``data``): class counts (augmented copies
    apart) and lengths (tokens after truncation, or seconds of audio)."""
    store, out = setup.store, {}
    (tr, tr_rows), (ev, ev_rows) = setup.train, setup.evaluate
    for name, split, rows in ((tr, tr, tr_rows), (ev if ev != tr else f"{ev} (carved)", ev, ev_rows)):
        rows = np.arange(store.n_rows(split)) if rows is None else rows
        durations = store.durations(split)
        lengths, unit = (
            (durations[rows], "seconds")
            if durations is not None
            else (
                store.n_tokens(split, store.towers[0])[rows],
                "tokens",
            )
        )
        y, aug = store.labels(split)[rows], store.augmented(split)[rows]
        n = len(setup.names)
        out[name] = profile_entry(np.bincount(y, minlength=n), lengths, unit, np.bincount(y[aug], minlength=n))
    return out


def run_sweep(config: SweepConfig, cache: Path | None = None, *, show_progress: bool | None = None) -> SweepResult:
    """Train every configuration x seed (x fold) and write the run directory (rank 0 under torchrun).

    ``show_progress``: a tqdm bar of configurations done / total / ETA (None: only on a terminal).
    """
    from embstore.store.catalog import cache_dir, latest_store
    from heads.probe.fitting import head_device

    t_start = time.perf_counter()
    if config.regression or config.task == "arc":  # probes of their own, scored by R² or attachment accuracy
        return _scored(config, config.store or latest_store(cache or cache_dir()))
    _join_process_group()
    comm = Comm()
    setup = _setup(config, config.store or latest_store(cache or cache_dir()))
    cfg = config.head
    control = None
    if config.control is not None:
        control = open_store(config.control, verify=config.verify)
        if isinstance(setup.store, ExampleStore):  # the random-weights store's words, as the task's examples
            control = ExampleStore.open(control, config.task, str(config.label), control.splits, config.train_split)
        check_control(setup.store, control, setup.splits, setup.combos)
    groups = feature_groups(setup, cfg)
    check_budget(setup, groups, cfg, config.max_memory)
    device = head_device(cfg)
    main = comm.rank == 0
    run_dir = rundir.run_dir(config.out, f"sweep-{Path(setup.path).stem[:40]}")
    writer = RunWriter(run_dir, _meta(config, setup, groups, comm, control)) if main else None

    bar = _progress(
        len(setup.combos) * len(setup.rounds) * (1 + (control is not None) + config.control_task),
        show_progress if main else False,
    )
    eval_ids = {id(p): _eval_record(setup.store, p)["id"] for p in setup.rounds}

    def write(o: Outcome) -> None:
        if writer is not None:
            writer.add(result_row(o, setup.store, cfg, eval_ids[id(o.round)]))

    timings = {"setup_s": time.perf_counter() - t_start, "train_s": 0.0, "mdl_s": 0.0, "control_s": 0.0}
    if setup.control_labels is not None:
        timings["control_task_s"] = 0.0
    task_controls: list[Outcome] = []
    outcomes: list[Outcome] = []
    codes: dict[tuple[Combo, int], Codelength] = {}
    for group in groups:  # each group's features read once, trained, then let go
        part = dataclasses.replace(setup, combos=group)
        t0 = time.perf_counter()
        bank, cache_chunks = feature_bank(part, cfg)
        found = _train(part, bank, cache_chunks, cfg, device, comm, bar.update, write)
        timings["train_s"] += time.perf_counter() - t0
        if setup.control_labels is not None:  # the control task: the same features, probes, rows and C grid
            t0 = time.perf_counter()
            ct = dataclasses.replace(part, labels=setup.control_labels)
            task_controls += _train(ct, bank, cache_chunks, cfg, device, comm, bar.update, lambda _o: None)
            timings["control_task_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if config.mdl and linear_combos(part, cfg):
            codes.update(_codelengths(part, bank, found, cfg, device, comm))
        timings["mdl_s"] += time.perf_counter() - t0
        outcomes += found
        del bank
    controls: list[Outcome] = []
    if control is not None:
        t0 = time.perf_counter()
        for group in groups:
            part = dataclasses.replace(setup, store=control, path=str(control.path), combos=group)
            c_bank, c_cache = feature_bank(part, cfg)
            controls += _train(part, c_bank, c_cache, cfg, device, comm, bar.update, lambda _o: None)
            del c_bank
        timings["control_s"] = time.perf_counter() - t0
    bar.close()
    if writer is None:  # another rank: rank 0 writes the run directory
        return SweepResult(run_dir=run_dir, store=setup.path, rows=len(outcomes), best={}, rank=comm.rank)
    return _finish(writer, setup, outcomes, controls, codes, config, t_start, timings, task_controls)


def _scored(config: SweepConfig, path: str) -> SweepResult:
    """A regression or arc sweep (:mod:`heads.probe.regression`, :mod:`heads.probe.arcs`)."""
    if config.control is not None:
        raise ConfigError(
            f"--control STORE is not supported with --task {config.task} yet; use it with the classification tasks."
        )
    if config.regression:
        from heads.probe.regression import run_regression

        run_dir, best, n = run_regression(config, path)
    else:
        from heads.probe.arcs import run_arcs

        run_dir, best, n = run_arcs(config, path)
    return SweepResult(run_dir=run_dir, store=path, rows=n, best=best)


def _finish(
    writer: RunWriter,
    setup: SweepSetup,
    outcomes: list[Outcome],
    controls: list[Outcome],
    codes: dict[tuple[Combo, int], Codelength],
    config: SweepConfig,
    t_start: float,
    timings: dict[str, float],
    task_controls: Sequence[Outcome] = (),
) -> SweepResult:
    """Sureness, control and MDL columns on every row, the rows in report order (configurations as planned, then
    seed and fold, however they were grouped to train), then the run's files and its best head."""
    store, names, path = setup.store, setup.names, setup.path
    combo_at = {c: i for i, c in enumerate(setup.combos)}
    round_at = {id(p): i for i, p in enumerate(setup.rounds)}
    order = sorted(range(len(outcomes)), key=lambda i: (combo_at[outcomes[i].combo], round_at[id(outcomes[i].round)]))
    outcomes, rows = [outcomes[i] for i in order], [writer.rows[i] for i in order]
    best_key = best_config(aggregate(rows)).key
    t0 = time.perf_counter()
    fields = sureness(outcomes, controls, codes, best_key, setup.labels, config.ci, config.head.seed)
    if setup.control_labels is not None:
        found = control_task_fields(
            outcomes, task_controls, setup.labels, setup.control_labels, config.ci, config.head.seed
        )
        fields.fields = [merge_fields(a, b) for a, b in zip(fields.fields, found)]
    timings["sureness_s"] = time.perf_counter() - t0
    writer.replace_rows([with_fields(row, f) for row, f in zip(rows, fields.fields)])
    if config.ci:
        writer.update_meta(uncertainty=uncertainty_meta(fields))
    if codes:
        writer.update_meta(
            mdl={
                "definition": "online code (Voita & Titov 2020), bits; blocks at "
                + ", ".join(f"{100 * f:g}%" for f in FRACTIONS)
                + " of the shuffled training rows",
                "rows": next(iter(codes.values())).rows,
                "heads": "linear (L-BFGS at the chosen C)",
                "blocks": {f"{'/'.join(c.key)} seed {s}": code.blocks for (c, s), code in codes.items()},
            }
        )
    ev_split = setup.evaluate[0]
    row_ids = {s: store.row_ids(s) for s in {o.round.eval_split for o in outcomes}}
    writer.write_predictions(
        [
            (
                row_ids[o.round.eval_split][o.round.eval_rows],
                setup.labels[o.round.eval_split][o.round.eval_rows],
                o.proba,
            )
            for o in outcomes
        ],
        names,
        [store.prediction_ids(o.round.eval_split, o.round.eval_rows) for o in outcomes]
        if isinstance(store, ExampleStore)
        else None,
    )
    writer.update_meta(data=data_profile(setup))
    summary = writer.finish(names, best_key=best_key)
    plot_data(writer.run_dir / DATA_PLOT, writer.meta["data"], names)
    best = summary["best"]
    key = (best["layers"], best["combine"], best["pooling"], best["head"])
    shown = next(r for r in writer.rows if r.config_key == key)  # the summary's best row (the first written)
    est = next(
        o.est for o in outcomes if o.combo.key == key and o.round.seed == shown.seed and o.round.fold == shown.fold
    )
    combo = next(c for c in setup.combos if c.key == key)
    card = HeadCard.for_store(combo, store, path, seed=shown.seed, fold=shown.fold)
    est.save(writer.run_dir / rundir.BEST_HEAD_DIR, card=card)
    if config.keep_fold_models:
        ensemble = _keep_folds(writer.run_dir, setup, outcomes, combo, shown.seed)
        writer.update_meta(fold_ensemble=ensemble)
        if "accuracy" in ensemble:  # summary.md was written before the fold heads were scored together
            from heads.report.rundir import SUMMARY_FILE
            from heads.report.summary import fold_ensemble_md

            with open(writer.run_dir / SUMMARY_FILE, "a", encoding="utf-8") as fh:
                fh.write("\n".join(fold_ensemble_md(ensemble, names)) + "\n")
    timings["total_s"] = time.perf_counter() - t_start
    writer.update_meta(timings={k: round(v, 4) for k, v in timings.items()})
    log.info(
        "sweep of %d runs in %.1fs; best %s (evaluation split %s)", len(outcomes), timings["total_s"], key, ev_split
    )
    result = {
        "layers": key[0],
        "combine": key[1],
        "pooling": key[2],
        "head": key[3],
        "f1_macro": best["f1_macro_mean"],
        "accuracy": best["accuracy_mean"],
        "val_f1_macro": best["val_f1_macro_mean"],
        "val_accuracy": best["val_accuracy_mean"],
        "f1_macro_lo": best.get("f1_macro_lo"),
        "f1_macro_hi": best.get("f1_macro_hi"),
    }
    return SweepResult(run_dir=writer.run_dir, store=path, rows=len(outcomes), best=result, tied=fields.tied)
