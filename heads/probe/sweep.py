"""``heads sweep`` / ``heads train``: many heads on many layer combinations, straight from a store.

A sweep plans its rounds (:mod:`heads.probe.plan`), trains every configuration of every round
(:mod:`heads.probe.rounds`), writes one result row per configuration x seed x fold, and saves as ``best_head/``
the head of the summary's best row: the configuration with the highest mean validation macro-F1. The evaluation
split is scored once per configuration, for the report only.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.config import reject_unknown_keys
from embstore.errors import ConfigError, DataError, StoreNotFoundError
from embstore.store import Store, open_store
from heads.evalset import EVAL_SET_KEY, eval_set, source_sha256
from heads.probe.config import TOKEN_HEADS, HeadConfig
from heads.probe.features import FeatureBank, feature_width, parse_memory
from heads.probe.plan import check_val_split, drop_duplicates, plan_rounds
from heads.probe.rounds import Labels, Outcome, Plan, train_adamw, train_lbfgs, train_stacked, train_tokens
from heads.probe.specs import COMBINES, expand, parse_combine
from heads.protocol import carve_groups, split_roles
from heads.report.metrics import majority_accuracy
from heads.report.results import ResultRow, RunWriter

__all__ = ["SweepConfig", "SweepResult", "run_sweep", "latest_store"]

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
    """Repeat every configuration with seeds 0..N-1 (reported as mean +- std)."""
    folds: int | None = None
    """K-fold cross-validation on the training split instead of the evaluation split."""
    max_memory: str = "8GB"
    """Feature memory budget; above it linear probes stream row chunks from the store and the other heads read
    each configuration's layers when it trains."""
    out: str | None = None
    """Run directory; None: runs/<time>-<store>."""
    verify: bool = True
    """Check every row chunk read from the store against the checksum recorded when it was written."""

    def __post_init__(self) -> None:
        parse_combine(self.combine)
        parse_memory(self.max_memory)
        if self.seeds < 1:
            raise ConfigError(f"The 'seeds' option must be at least 1; got {self.seeds}.")
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"The 'folds' option must be at least 2; got {self.folds}.")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"The 'holdout' option must be a fraction in (0, 1); got {self.holdout}.")
        for h in self.heads:
            HeadConfig(head=h)  # validates the name with the list of heads

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


def latest_store(cache: Path) -> str:
    """The most recently finished complete store in ``cache``."""
    found: list[tuple[str, str]] = []
    if cache.is_dir():
        for p in cache.iterdir():
            if not p.name.endswith((".zarr", ".h5", ".hdf5")):
                continue
            try:
                with open_store(p, allow_incomplete=True) as s:
                    if s.complete:
                        found.append((str(s.meta.get("finished") or ""), str(p)))
            except Exception:  # an unreadable entry is not a candidate
                continue
    if not found:
        raise StoreNotFoundError(f"No complete store in {cache}; run 'embstore extract' first or pass --store PATH.")
    return max(found)[1]


def _size(n: int, up: bool = False) -> str:
    """Bytes as a --max-memory value: 512KB, 3.2MB, 1.5GB (rounded up with ``up``, so it is enough)."""
    import math

    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{math.ceil(value * 10) / 10:g}{unit}" if up else f"{value:.1f}{unit}"
    return f"{n}B"


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


def _row(o: Outcome, store: Store, cfg: HeadConfig, eval_id: str) -> ResultRow:
    est, combo, plan = o.est, o.combo, o.plan
    history = list(getattr(est, "history_", []))
    seconds = float(getattr(est, "train_seconds_", 0.0))
    hp = {k: v for k, v in cfg.replace(head=combo.head).to_dict().items() if k not in ("seed", "device")}
    hp.update(o.hyper)
    lbfgs = "C" in o.hyper
    mix = getattr(est, "mix_weights_", None)
    return ResultRow(layers=combo.layers_label, combine=combo.combine, pooling=combo.pooling, head=combo.head, seed=plan.seed,
                     accuracy=o.metrics["accuracy"], f1_macro=o.metrics["f1_macro"], train_seconds=seconds, hyperparameters=hp,
                     per_class=o.metrics["per_class"], confusion=o.metrics["confusion"], store_id=store.fingerprint,
                     fold=plan.fold, best_epoch=None if lbfgs else getattr(est, "best_epoch_", None),
                     trainable_params=sum(int(p.numel()) for p in est.module_.parameters()),
                     seconds_per_epoch=None if lbfgs else seconds / max(1, len(history)), history=history,
                     mix_weights=None if mix is None else [float(w) for w in mix],
                     val_accuracy=o.val.get("accuracy"), val_f1_macro=o.val.get("f1_macro"),
                     extra={**o.extra, "eval_set": eval_id})


def _progress(total: int, show: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="heads sweep", unit="config", disable=(not show) if show is not None else None,
                file=sys.stderr, dynamic_ncols=True)


def _eval_record(store: Store, plan: Plan) -> dict[str, Any]:
    return eval_set(source_sha256(store.provenance.get("sources", []), plan.eval_split),
                    store.row_ids(plan.eval_split)[plan.eval_rows])


def run_sweep(config: SweepConfig, cache: Path | None = None, *, show_progress: bool | None = None) -> SweepResult:
    """Train every configuration x seed (x fold) and write the run directory (rank 0 under torchrun).

    ``show_progress``: a tqdm bar of configurations done / total / ETA (None: only on a terminal).
    """
    from embstore._version import __version__
    from embstore.extraction import cache_dir
    from heads.probe.fitting import head_device as resolve_device
    from heads.probe.solvers import Comm

    _join_process_group()
    comm = Comm()
    path = config.store or latest_store(cache or cache_dir())
    store = open_store(path, verify=config.verify)
    if store.label_names is None:
        raise DataError(f"{path} was extracted without labels; re-extract with --label-col COLUMN.")
    names = store.label_names
    cfg = config.head
    (tr_split, tr_rows), (ev_split, ev_rows) = split_roles(store, config.train_split, config.eval_split, config.holdout, cfg.seed)
    if config.val_split is not None:
        check_val_split(store, config.val_split, tr_split, ev_split)
    y_all = store.labels(tr_split)
    y_train = y_all if tr_rows is None else y_all[tr_rows]
    absent = [names[c] for c in range(len(names)) if not (y_train == c).any()]
    if absent:
        raise DataError(f"Class {', '.join(map(repr, absent))} has no rows in the training split {tr_split!r}; a head cannot learn it: re-split the data so every class is in training.")
    combos = expand(layers=config.layers, combine=parse_combine(config.combine), poolings=config.pooling or tuple(store.poolings),
                    heads=config.heads, store_layers=store.layers, store_poolings=store.poolings, token_layers=store.token_layers,
                    towers=store.towers, store_path=path)
    combos, notes = drop_duplicates(combos, cfg.standardize)
    plans = plan_rounds(store, seeds=config.seeds, folds=config.folds, validation_fraction=cfg.validation_fraction,
                        val_split=config.val_split, train=(tr_split, tr_rows), evaluate=(ev_split, ev_rows))
    splits = [tr_split, ev_split] + ([config.val_split] if config.val_split else [])
    budget = parse_memory(config.max_memory)
    bank = FeatureBank(store, combos, splits, budget)
    lbfgs = [c for c in combos if c.head == "linear" and c.pooling != "tokens" and cfg.solver == "lbfgs"]
    widths = sum(feature_width(c, store.hidden) for c in lbfgs)
    if lbfgs and not bank.preloaded:
        work = 12 * len(lbfgs) * len(cfg.c_grid) * len(names)  # the solver's logits, log-probabilities, gradients
        need, worst = max((bank.chunk_bytes(s, widths, work), s) for s in splits)
        if need > budget:
            raise ConfigError(f"--max-memory {config.max_memory} is below one row chunk of {path} ({_size(need)}: "
                              f"{store.layout.splits[worst].chunk_rows} rows of split {worst!r} in the layers and poolings the "
                              f"linear probes need, and their features); raise --max-memory to at least {_size(need, up=True)}.")
    # standardised float32 chunks stay on the device when they fit next to the bank
    cache_chunks = bank.preloaded and bank.needed + 4 * widths * sum(len(p.fit_rows) for p in plans) <= budget
    device = resolve_device(cfg)
    labels = Labels({s: store.labels(s) for s in dict.fromkeys(splits)}, names)

    main = comm.rank == 0
    run_dir = Path(config.out) if config.out else Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-sweep-{Path(path).stem[:40]}"
    augmented = store.augmented(tr_split)
    groups_all = carve_groups(store, tr_split)
    aug_train = augmented if tr_rows is None else augmented[tr_rows]
    y_eval_all = store.labels(ev_split)
    y_eval = y_eval_all if ev_rows is None else y_eval_all[ev_rows]
    first = plans[0]
    validation = (f"split `{config.val_split}` ({len(first.val_rows)} rows)" if config.val_split else
                  f"a seeded, stratified{', group-aware' if groups_all is not None else ''} {cfg.validation_fraction:g} carve of "
                  f"the training rows{' of each fold' if config.folds else ''}, one per seed ({len(first.val_rows)} rows)")
    held = np.unique(np.concatenate([p.eval_rows for p in plans if p.seed == 0]))
    run_eval = eval_set(source_sha256(store.provenance.get("sources", []), first.eval_split), store.row_ids(first.eval_split)[held])
    meta = {"kind": "sweep", "store": path, "store_fingerprint": store.fingerprint, "model": store.provenance.get("model", {}).get("name"),
            "label_names": names, "train_split": tr_split, "eval_split": ev_split, "val_split": config.val_split,
            "validation": validation, "train_rows": int(len(y_train)), "eval_rows": int(len(held) if config.folds else len(y_eval)),
            "carved_eval": ev_rows is not None,
            # the baseline predicts the commonest class of the original rows (augmented copies skew the counts)
            "majority_accuracy": majority_accuracy(y_train[~aug_train], y_train[~aug_train] if config.folds else y_eval),
            "config": config.to_dict(), "augmented_rows": int(aug_train.sum()),
            "kept_apart": None if groups_all is None else (
                f"groups of {store.provenance.get('group_col') or 'the group column'}" if store.groups(tr_split) is not None
                else "augmented copies and their source rows"),
            "configurations": len(combos), "embstore": __version__, "feature_bytes": bank.needed,
            "features_preloaded": bank.preloaded, "solver": cfg.solver, "world_size": comm.world,
            EVAL_SET_KEY: run_eval, "notes": notes}
    writer = RunWriter(run_dir, meta) if main else None

    t0 = time.perf_counter()
    bar = _progress(len(combos) * len(plans), show_progress if main else False)
    outcomes: list[Outcome] = []
    adamw = [c for c in combos if c.head == "linear" and cfg.solver == "adamw"]
    tokens = [c for c in combos if c.head in TOKEN_HEADS]
    stacked = [c for c in combos if c not in lbfgs and c not in adamw and c not in tokens]
    eval_ids = {id(p): _eval_record(store, p)["id"] for p in plans}
    # L-BFGS probes of every round first, on every rank (their passes are collective), then what rank 0 trains alone
    if lbfgs:
        for o in train_lbfgs(lbfgs, plans, bank, labels, cfg, device, cache_chunks, comm):
            if writer is not None:
                writer.add(_row(o, store, cfg, eval_ids[id(o.plan)]))
            outcomes.append(o)
        bar.update(len(lbfgs) * len(plans))
    for plan in plans if main else []:
        done = train_adamw(adamw, plan, bank, labels, cfg) if adamw else []
        bar.update(len(adamw))
        for combo in tokens:
            done.append(train_tokens(combo, plan, bank, labels, cfg))
            bar.update(1)
        for o in done:
            if writer is not None:
                writer.add(_row(o, store, cfg, eval_ids[id(o.plan)]))
        outcomes += done
    if main and stacked:  # every round at once: one stack per architecture and input shape
        for o in train_stacked([(c, p) for p in plans for c in stacked], bank, labels, cfg, device, lambda: bar.update(1),
                               budget=budget):
            if writer is not None:
                writer.add(_row(o, store, cfg, eval_ids[id(o.plan)]))
            outcomes.append(o)
    bar.close()
    if writer is None:  # another rank: rank 0 writes the run directory
        return SweepResult(run_dir=run_dir, store=path, rows=len(outcomes), best={}, rank=comm.rank)
    summary = writer.finish(names)
    best = summary["best"]
    key = (best["layers"], best["combine"], best["pooling"], best["head"])
    shown = next(r for r in writer.rows if r.config_key == key)  # the summary's best row (the first written)
    est = next(o.est for o in outcomes if o.combo.key == key and o.plan.seed == shown.seed and o.plan.fold == shown.fold)
    combo = next(c for c in combos if c.key == key)
    extra = {"layers": list(combo.layers), "layers_label": combo.layers_label, "combine": combo.combine,
             "pooling": combo.pooling, "head": combo.head, "store": path, "store_id": store.fingerprint,
             "label_names": names, "model": store.provenance.get("model", {}), "max_length": store.provenance.get("max_length"),
             "pair_mode": store.provenance.get("pair_mode"), "text_pair_col": store.provenance.get("text_pair_col"),
             "towers": store.towers, "dtype": store.layout.dtype, "max_seconds": store.provenance.get("max_seconds"),
             "precision": store.provenance.get("precision"),
             "seed": shown.seed, "fold": shown.fold, "chosen_on": "validation macro-F1"}
    est.save(run_dir / "best_head", extra=extra)
    log.info("sweep of %d runs in %.1fs; best %s", len(outcomes), time.perf_counter() - t0, key)
    result = {"layers": key[0], "combine": key[1], "pooling": key[2], "head": key[3], "f1_macro": best["f1_macro_mean"],
              "accuracy": best["accuracy_mean"], "val_f1_macro": best["val_f1_macro_mean"], "val_accuracy": best["val_accuracy_mean"]}
    return SweepResult(run_dir=run_dir, store=path, rows=len(outcomes), best=result)
