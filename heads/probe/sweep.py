"""``heads sweep`` / ``heads train``: many heads on many layer combinations, straight from a store."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.config import reject_unknown_keys
from embstore.errors import ConfigError, DataError, StoreNotFoundError
from embstore.store import Store, open_store
from heads.probe.config import HeadConfig
from heads.probe.estimator import HeadClassifier
from heads.probe.features import FeatureBank, parse_memory
from heads.report.metrics import classification_metrics, majority_accuracy
from heads.probe.adamw import fit_linear_probes
from heads.report.results import ResultRow, RunWriter
from heads.probe.specs import COMBINES, Combo, expand, parse_combine
from heads.protocol import carve as _carve
from heads.protocol import carve_groups, split_roles

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
    seeds: int = 1
    """Repeat every configuration with seeds 0..N-1 (reported as mean +- std)."""
    folds: int | None = None
    """K-fold cross-validation on the training split instead of the evaluation split."""
    max_memory: str = "8GB"
    """Feature memory budget; above it each configuration's layers are read when it trains."""
    out: str | None = None
    """Run directory; None: runs/<time>-<store>."""

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


def _row(combo: Combo, est: HeadClassifier, metrics: dict[str, Any], seed: int, fold: int | None, store: Store, cfg: HeadConfig) -> ResultRow:
    history = list(getattr(est, "history_", []))
    seconds = float(getattr(est, "train_seconds_", 0.0))
    hp = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "device")}
    hp["head"] = combo.head
    params = sum(int(p.numel()) for p in est.module_.parameters())
    mix = getattr(est, "mix_weights_", None)
    return ResultRow(layers=combo.layers_label, combine=combo.combine, pooling=combo.pooling, head=combo.head, seed=seed,
                     accuracy=metrics["accuracy"], f1_macro=metrics["f1_macro"], train_seconds=seconds, hyperparameters=hp,
                     per_class=metrics["per_class"], confusion=metrics["confusion"], store_id=store.fingerprint, fold=fold,
                     best_epoch=getattr(est, "best_epoch_", None), trainable_params=params,
                     seconds_per_epoch=seconds / max(1, len(history)), history=history,
                     mix_weights=None if mix is None else [float(w) for w in mix])


def run_sweep(config: SweepConfig, cache: Path | None = None) -> SweepResult:
    """Train every configuration x seed (x fold) and write the run directory."""
    from embstore._version import __version__
    from embstore.extraction import cache_dir

    path = config.store or latest_store(cache or cache_dir())
    store = open_store(path)
    if store.label_names is None:
        raise DataError(f"{path} was extracted without labels; re-extract with --label-col COLUMN.")
    names = store.label_names
    n_classes = len(names)
    (tr_split, tr_rows), (ev_split, ev_rows) = split_roles(store, config.train_split, config.eval_split, config.holdout, config.head.seed)
    groups_all = carve_groups(store, tr_split)
    augmented = store.augmented(tr_split)
    y_all = store.labels(tr_split)
    y_train = y_all if tr_rows is None else y_all[tr_rows]
    absent = [names[c] for c in range(n_classes) if not (y_train == c).any()]
    if absent:
        raise DataError(f"Class {', '.join(map(repr, absent))} has no rows in the training split {tr_split!r}; a head cannot learn it: re-split the data so every class is in training.")
    y_eval_all = store.labels(ev_split)
    y_eval = y_eval_all if ev_rows is None else y_eval_all[ev_rows]
    combos = expand(layers=config.layers, combine=parse_combine(config.combine), poolings=config.pooling or tuple(store.poolings),
                    heads=config.heads, store_layers=store.layers, store_poolings=store.poolings, token_layers=store.token_layers,
                    towers=store.towers, store_path=path)
    bank = FeatureBank(store, combos, [tr_split, ev_split], parse_memory(config.max_memory))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.out) if config.out else Path("runs") / f"{stamp}-sweep-{Path(path).stem[:40]}"
    meta = {"kind": "sweep", "store": path, "store_fingerprint": store.fingerprint, "model": store.provenance.get("model", {}).get("name"),
            "label_names": names, "train_split": tr_split, "eval_split": ev_split,
            "train_rows": int(len(y_train)), "eval_rows": int(len(y_eval)), "carved_eval": ev_rows is not None,
            # the baseline predicts the commonest class of the original rows (augmented copies skew the counts)
            "majority_accuracy": majority_accuracy(y_train[~(augmented if tr_rows is None else augmented[tr_rows])], y_eval),
            "config": config.to_dict(),
            "augmented_rows": int(augmented.sum() if tr_rows is None else augmented[tr_rows].sum()),
            "kept_apart": None if groups_all is None else (
                f"groups of {store.provenance.get('group_col') or 'the group column'}" if store.groups(tr_split) is not None
                else "augmented copies and their source rows"),
            "configurations": len(combos), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "embstore": __version__, "feature_bytes": bank.needed, "features_preloaded": bank.preloaded}
    writer = RunWriter(run_dir, meta)
    kept: dict[tuple[str, str, str, str], HeadClassifier] = {}
    t0 = time.perf_counter()
    n_rows = 0
    for seed in range(config.seeds):
        cfg = config.head.replace(seed=seed)
        rounds = _rounds(config, y_train, tr_rows, tr_split, ev_split, ev_rows, y_eval, seed,
                         None if groups_all is None else groups_all if tr_rows is None else groups_all[tr_rows], augmented)
        for fold, (fit_rows, eval_rows, eval_split, y_ev) in enumerate(rounds):
            fold_id = fold if config.folds else None
            y_fit = y_all[fit_rows] if fit_rows is not None else y_all
            g_fit = None if groups_all is None else groups_all[fit_rows] if fit_rows is not None else groups_all
            fit_idx, val_idx = _carve(y_fit, cfg.validation_fraction, seed, g_fit)
            rows_fit = fit_idx if fit_rows is None else fit_rows[fit_idx]
            rows_val = val_idx if fit_rows is None else fit_rows[val_idx]
            rows_val = rows_val[~augmented[rows_val]]  # early stopping watches original rows only
            trained = _train_all(combos, bank, cfg, tr_split, rows_fit, rows_val, y_all, n_classes, bank.preloaded)
            for combo, est in trained:
                pred = est.predict(bank.features(combo, eval_split, eval_rows))
                row = _row(combo, est, classification_metrics(y_ev, pred, names), seed, fold_id, store, cfg.replace(head=combo.head))
                writer.add(row)
                n_rows += 1
                kept.setdefault(combo.key, est)
    writer.finish(names)
    rows = _rows_of(run_dir)
    best_key = _best_key(rows)
    best_combo = next(c for c in combos if c.key == best_key)
    extra = {"layers": list(best_combo.layers), "layers_label": best_combo.layers_label, "combine": best_combo.combine,
             "pooling": best_combo.pooling, "head": best_combo.head, "store": path, "store_id": store.fingerprint,
             "label_names": names, "model": store.provenance.get("model", {}), "max_length": store.provenance.get("max_length"),
             "pair_mode": store.provenance.get("pair_mode"), "text_pair_col": store.provenance.get("text_pair_col"),
             "towers": store.towers, "dtype": store.layout.dtype, "max_seconds": store.provenance.get("max_seconds")}
    kept[best_key].save(run_dir / "best_head", extra=extra)
    log.info("sweep of %d runs in %.1fs; best %s", n_rows, time.perf_counter() - t0, best_key)
    best = {"layers": best_key[0], "combine": best_key[1], "pooling": best_key[2], "head": best_key[3],
            "f1_macro": float(np.mean([r.f1_macro for r in rows if r.config_key == best_key])),
            "accuracy": float(np.mean([r.accuracy for r in rows if r.config_key == best_key]))}
    return SweepResult(run_dir=run_dir, store=path, rows=n_rows, best=best)


def _rows_of(run_dir: Path) -> list[ResultRow]:
    from heads.report import read_run

    return read_run(run_dir)[1]


def _best_key(rows: list[ResultRow]) -> tuple[str, str, str, str]:
    keys = {r.config_key for r in rows}

    def score(k: tuple[str, str, str, str]) -> tuple[float, float, float]:
        rs = [r for r in rows if r.config_key == k]
        return (float(np.mean([r.f1_macro for r in rs])), float(np.mean([r.accuracy for r in rs])), -float(np.mean([r.train_seconds for r in rs])))

    return max(sorted(keys), key=score)


def _rounds(config: SweepConfig, y_train: np.ndarray, tr_rows: np.ndarray | None, tr_split: str, ev_split: str,
            ev_rows: np.ndarray | None, y_eval: np.ndarray, seed: int, groups: np.ndarray | None, augmented: np.ndarray
            ) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, str, np.ndarray]]:
    """(fit rows of the train split, eval rows, eval split, eval labels) per fold (one round without folds).

    With ``groups`` (aligned with the training rows) folds are group-disjoint; augmented rows
    only ever join the fitting side.
    """
    base = np.arange(len(y_train)) if tr_rows is None else tr_rows
    if not config.folds:
        yield (tr_rows, ev_rows, ev_split, y_eval)
        return
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(y_train)
    if counts[counts > 0].min() < config.folds:
        raise ConfigError(f"--folds {config.folds} needs at least {config.folds} training rows of every class; the rarest class has {counts[counts > 0].min()}.")
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < config.folds:
            raise ConfigError(f"--folds {config.folds} keeps groups apart but the training rows hold only {n_groups} groups; use --folds {n_groups} or fewer.")
        splits = StratifiedGroupKFold(config.folds, shuffle=True, random_state=seed).split(base, y_train, groups)
    else:
        splits = StratifiedKFold(config.folds, shuffle=True, random_state=seed).split(base, y_train)
    for fit, held in splits:
        held = held[~augmented[base[held]]]
        yield (base[fit], base[held], tr_split, y_train[held])


def _train_all(combos: list[Combo], bank: FeatureBank, cfg: HeadConfig, split: str, rows_fit: np.ndarray, rows_val: np.ndarray,
               y_all: np.ndarray, n_classes: int, batched: bool) -> list[tuple[Combo, HeadClassifier]]:
    """Fit every combo once; all pooled linear probes share one pass over the data when features are in memory."""
    y_fit, y_val = y_all[rows_fit], y_all[rows_val]
    out: list[tuple[Combo, HeadClassifier]] = []
    probes = [c for c in combos if c.head == "linear"] if batched else []
    if probes:
        ests = fit_linear_probes([bank.features(c, split, rows_fit) for c in probes], y_fit,
                                 [bank.features(c, split, rows_val) for c in probes], y_val, cfg.replace(head="linear"), n_classes=n_classes)
        out += list(zip(probes, ests))
    for combo in combos:
        if combo in probes:
            continue
        est = HeadClassifier(cfg.replace(head=combo.head))
        est.fit(bank.features(combo, split, rows_fit), y_fit, bank.features(combo, split, rows_val), y_val, n_classes=n_classes)
        out.append((combo, est))
    order = {c.key: i for i, c in enumerate(combos)}
    return sorted(out, key=lambda ce: order[ce[0].key])
