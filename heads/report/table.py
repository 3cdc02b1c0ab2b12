"""The results data model: one :class:`ResultRow` per trained head, :class:`ConfigStats` per configuration.

Everything that reads or draws results (run directories, summaries, plots, merged reports) builds on this
module, and it imports none of them, so there is no import cycle between results and plots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from embstore.errors import DataError
from heads.report.metrics import mean_std

__all__ = ["ResultRow", "ConfigStats", "ConfigKey", "aggregate", "best_config", "selection_rule", "pm"]

ConfigKey = tuple[str, str, str, str]


@dataclass(frozen=True)
class ResultRow:
    """One trained head: one config x seed (x fold), scored on the evaluation split (and on validation)."""

    layers: str
    """Layer spec as written by the user: ``9-12``, ``12`` or ``3,6``."""
    combine: str
    """How the layers were combined: single, concat, sum, mean, mix, tokens, pair, finetune..."""
    pooling: str
    head: str
    seed: int
    accuracy: float
    """On the evaluation split (or the held-out fold): for reporting, never for choosing."""
    f1_macro: float
    train_seconds: float
    hyperparameters: dict[str, Any]
    per_class: dict[str, dict[str, float]]
    """{label: {precision, recall, f1, support}} on the evaluation split."""
    confusion: list[list[int]]
    """Rows: true label index, columns: predicted."""
    store_id: str
    """Fingerprint of the store the features came from."""
    fold: int | None = None
    best_epoch: int | None = None
    trainable_params: int | None = None
    seconds_per_epoch: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per epoch: epoch, train_loss, val_accuracy, val_f1_macro, lr (L-BFGS probes: per C of the grid)."""
    mix_weights: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    val_accuracy: float | None = None
    """On the validation rows every choice was made on (None for runs that record none)."""
    val_f1_macro: float | None = None

    @property
    def config_key(self) -> ConfigKey:
        """(layers, combine, pooling, head): rows sharing it are seeds/folds of one config."""
        return (self.layers, self.combine, self.pooling, self.head)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultRow:
        """Inverse of :meth:`to_dict`; unknown keys are kept in ``extra`` so newer runs still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        if unknown:
            known["extra"] = {**known.get("extra", {}), **unknown}
        return cls(**known)


@dataclass(frozen=True)
class ConfigStats:
    """One config aggregated over its seeds/folds."""

    key: ConfigKey
    n: int
    accuracy_mean: float
    accuracy_std: float
    f1_mean: float
    f1_std: float
    train_seconds: float
    """Mean over runs."""
    trainable_params: int | None
    seconds_per_epoch: float | None
    first: ResultRow
    """The first row written for this config: its per-class table, confusion and history are shown (and its
    head is the one a sweep saves)."""
    val_accuracy_mean: float | None = None
    """None unless every run of the config has validation scores."""
    val_f1_mean: float | None = None
    val_f1_std: float | None = None

    @property
    def is_single(self) -> bool:
        """True for one layer on its own (plotted per layer)."""
        return self.key[1] == "single" and _layer_index(self.key[0]) is not None

    @property
    def has_validation(self) -> bool:
        return self.val_f1_mean is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the first row)."""
        layers, combine, pooling, head = self.key
        return {"layers": layers, "combine": combine, "pooling": pooling, "head": head, "n": self.n,
                "accuracy_mean": self.accuracy_mean, "accuracy_std": self.accuracy_std,
                "f1_macro_mean": self.f1_mean, "f1_macro_std": self.f1_std,
                "val_accuracy_mean": self.val_accuracy_mean, "val_f1_macro_mean": self.val_f1_mean,
                "val_f1_macro_std": self.val_f1_std, "train_seconds": self.train_seconds,
                "trainable_params": self.trainable_params, "seconds_per_epoch": self.seconds_per_epoch}


def _layer_index(layers: str) -> int | None:
    try:
        return int(layers)
    except ValueError:
        return None


def aggregate(rows: Iterable[ResultRow]) -> list[ConfigStats]:
    """Group rows by config_key; display order: single layers (per pooling, head, in layer order), then combinations."""
    groups: dict[ConfigKey, list[ResultRow]] = {}
    for row in rows:
        groups.setdefault(row.config_key, []).append(row)
    stats = []
    for key, group in groups.items():
        acc_m, acc_s = mean_std([r.accuracy for r in group])
        f1_m, f1_s = mean_std([r.f1_macro for r in group])
        spe = [r.seconds_per_epoch for r in group if r.seconds_per_epoch is not None]
        params = next((r.trainable_params for r in group if r.trainable_params is not None), None)
        val = all(r.val_f1_macro is not None and r.val_accuracy is not None for r in group)
        vf1 = mean_std([float(r.val_f1_macro or 0.0) for r in group]) if val else (None, None)
        vacc = mean_std([float(r.val_accuracy or 0.0) for r in group])[0] if val else None
        stats.append(ConfigStats(key, len(group), acc_m, acc_s, f1_m, f1_s, mean_std([r.train_seconds for r in group])[0],
                                 params, mean_std(spe)[0] if spe else None, group[0],
                                 val_accuracy_mean=vacc, val_f1_mean=vf1[0], val_f1_std=vf1[1]))

    def order(s: ConfigStats) -> tuple[int, str, str, int, str, str]:
        layers, combine, pooling, head = s.key
        if s.is_single:
            return (0, pooling, head, _layer_index(layers) or 0, "", "")
        return (1, layers, combine, 0, pooling, head)

    return sorted(stats, key=order)


def selection_rule(stats: list[ConfigStats]) -> str:
    """'validation' when every config has validation scores (the best is chosen on them), else 'evaluation'."""
    return "validation" if stats and all(s.has_validation for s in stats) else "evaluation"


def rank(s: ConfigStats, rule: str) -> tuple[float, float, float]:
    """Sort key, best first: higher macro-F1 (validation or evaluation per ``rule``), then accuracy, then fewer
    trainable parameters (never seconds: a choice must not depend on machine load)."""
    params = float(s.trainable_params) if s.trainable_params is not None else float("inf")
    if rule == "validation":
        return (-float(s.val_f1_mean or 0.0), -float(s.val_accuracy_mean or 0.0), params)
    return (-s.f1_mean, -s.accuracy_mean, params)


def best_config(stats: list[ConfigStats]) -> ConfigStats:
    """Highest mean validation macro-F1 (evaluation macro-F1 for runs without validation scores); ties: higher
    accuracy, then fewer trainable parameters, then display order."""
    if not stats:
        raise DataError("No result rows to choose a best config from; train at least one head first.")
    rule = selection_rule(stats)
    return min(stats, key=lambda s: rank(s, rule))


def pm(mean: float, std: float, n: int) -> str:
    """``0.8123 ± 0.0040`` over several runs; ``0.8123`` for one (a std of one run says nothing)."""
    return f"{mean:.4f}" if n <= 1 else f"{mean:.4f} ± {std:.4f}"
