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
from heads.report.metrics import averages, mean_std

__all__ = [
    "ResultRow",
    "ConfigStats",
    "ConfigKey",
    "aggregate",
    "best_config",
    "most_selective",
    "selection_rule",
    "pm",
    "CONFIG_INTERVAL_KEY",
]

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
    # -- how sure (heads sweep; None when not computed, e.g. --no-ci) ------------------------------------------
    accuracy_lo: float | None = None
    """95% percentile bootstrap interval of ``accuracy`` over this run's evaluation rows."""
    accuracy_hi: float | None = None
    f1_macro_lo: float | None = None
    f1_macro_hi: float | None = None
    is_best: bool | None = None
    """A run of the configuration chosen on validation."""
    p_vs_best: float | None = None
    """Exact McNemar p of this configuration against the best on the evaluation rows (seed 0; folds pooled); the
    same on every run of the configuration, None for the best's own runs."""
    p_vs_best_holm: float | None = None
    """``p_vs_best`` Holm-corrected over every configuration compared with the best."""
    f1_macro_diff_lo: float | None = None
    """Paired-bootstrap 95% interval of (this configuration's macro-F1 - the best's), seed 0, folds pooled."""
    f1_macro_diff_hi: float | None = None
    tied_with_best: bool | None = None
    """Not significantly different from the best: ``p_vs_best_holm >= 0.05``."""
    vs_best: str | None = None
    """'best', 'tied', 'worse', or 'better' (significantly more rows right than the best on the evaluation rows:
    the choice made on validation did not carry over to them)."""
    control_accuracy: float | None = None
    """The same configuration, seed and fold trained on the control store (``--control``), same rows."""
    control_f1_macro: float | None = None
    gain_f1_macro: float | None = None
    """``f1_macro - control_f1_macro``, with its paired-bootstrap 95% interval below."""
    gain_f1_macro_lo: float | None = None
    gain_f1_macro_hi: float | None = None
    mdl_bits: float | None = None
    """Online codelength of the training labels given the features, bits (``--mdl``; linear probes)."""
    compression: float | None = None
    """``n log2 K / mdl_bits``: how many times shorter than the uniform code."""
    # -- control task (``--control-task``, word and edge tasks; Hewitt & Liang 2019) ---------------------------
    control_task_accuracy: float | None = None
    """The same configuration, seed and fold trained on the control task's labels (each word type a fixed random
    label), scored on the same rows against those labels: the *control accuracy*."""
    control_task_accuracy_lo: float | None = None
    control_task_accuracy_hi: float | None = None
    selectivity: float | None = None
    """``accuracy - control_task_accuracy``, with its paired-bootstrap 95% interval below."""
    selectivity_lo: float | None = None
    selectivity_hi: float | None = None
    val_selectivity: float | None = None
    """The same difference on the validation rows (what "most selective" is chosen on)."""

    @property
    def f1_weighted(self) -> float | None:
        """Support-weighted F1 on the evaluation split, from ``per_class`` (None for a row without one)."""
        return averages(self.per_class, "weighted")["f1"] if self.per_class else None

    @property
    def precision_weighted(self) -> float | None:
        return averages(self.per_class, "weighted")["precision"] if self.per_class else None

    @property
    def recall_weighted(self) -> float | None:
        return averages(self.per_class, "weighted")["recall"] if self.per_class else None

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
    accuracy_lo: float | None = None
    """95% interval of the configuration's mean accuracy: over all its evaluation rows (folds pooled), the
    metric averaged over seeds on every resample."""
    accuracy_hi: float | None = None
    f1_lo: float | None = None
    f1_hi: float | None = None
    is_best: bool = False
    p_vs_best: float | None = None
    p_vs_best_holm: float | None = None
    f1_diff_lo: float | None = None
    f1_diff_hi: float | None = None
    tied_with_best: bool | None = None
    vs_best: str | None = None
    control_accuracy_mean: float | None = None
    control_f1_mean: float | None = None
    gain_f1_mean: float | None = None
    gain_f1_lo: float | None = None
    gain_f1_hi: float | None = None
    mdl_bits: float | None = None
    """Mean over the configuration's runs."""
    compression: float | None = None
    control_task_accuracy_mean: float | None = None
    control_task_lo: float | None = None
    control_task_hi: float | None = None
    selectivity_mean: float | None = None
    selectivity_lo: float | None = None
    """95% interval of the configuration's mean selectivity (folds pooled, seeds averaged on every resample)."""
    selectivity_hi: float | None = None
    val_selectivity_mean: float | None = None
    f1_weighted_mean: float | None = None
    """Mean over runs of the support-weighted F1 on the evaluation split (None unless every run has a per-class
    table)."""

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
        return {
            "layers": layers,
            "combine": combine,
            "pooling": pooling,
            "head": head,
            "n": self.n,
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "f1_macro_mean": self.f1_mean,
            "f1_macro_std": self.f1_std,
            "val_accuracy_mean": self.val_accuracy_mean,
            "val_f1_macro_mean": self.val_f1_mean,
            "val_f1_macro_std": self.val_f1_std,
            "train_seconds": self.train_seconds,
            "trainable_params": self.trainable_params,
            "seconds_per_epoch": self.seconds_per_epoch,
            "accuracy_lo": self.accuracy_lo,
            "accuracy_hi": self.accuracy_hi,
            "f1_macro_lo": self.f1_lo,
            "f1_macro_hi": self.f1_hi,
            "is_best": self.is_best,
            "p_vs_best": self.p_vs_best,
            "p_vs_best_holm": self.p_vs_best_holm,
            "f1_macro_diff_lo": self.f1_diff_lo,
            "f1_macro_diff_hi": self.f1_diff_hi,
            "tied_with_best": self.tied_with_best,
            "vs_best": self.vs_best,
            "control_accuracy_mean": self.control_accuracy_mean,
            "control_f1_macro_mean": self.control_f1_mean,
            "gain_f1_macro_mean": self.gain_f1_mean,
            "gain_f1_macro_lo": self.gain_f1_lo,
            "gain_f1_macro_hi": self.gain_f1_hi,
            "mdl_bits": self.mdl_bits,
            "compression": self.compression,
            "control_task_accuracy_mean": self.control_task_accuracy_mean,
            "control_task_accuracy_lo": self.control_task_lo,
            "control_task_accuracy_hi": self.control_task_hi,
            "selectivity_mean": self.selectivity_mean,
            "selectivity_lo": self.selectivity_lo,
            "selectivity_hi": self.selectivity_hi,
            "val_selectivity_mean": self.val_selectivity_mean,
            "f1_weighted_mean": self.f1_weighted_mean,
        }

    @property
    def has_selectivity(self) -> bool:
        return self.selectivity_mean is not None

    @property
    def has_interval(self) -> bool:
        return self.f1_lo is not None and self.f1_hi is not None


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
        weighted = [r.f1_weighted for r in group]
        stats.append(
            ConfigStats(
                key,
                len(group),
                acc_m,
                acc_s,
                f1_m,
                f1_s,
                mean_std([r.train_seconds for r in group])[0],
                params,
                mean_std(spe)[0] if spe else None,
                group[0],
                val_accuracy_mean=vacc,
                val_f1_mean=vf1[0],
                val_f1_std=vf1[1],
                f1_weighted_mean=_mean_of(weighted),
                **_sureness(group),
            )
        )

    def order(s: ConfigStats) -> tuple[int, str, str, int, str, str]:
        layers, combine, pooling, head = s.key
        if s.is_single:
            return (0, pooling, head, _layer_index(layers) or 0, "", "")
        return (1, layers, combine, 0, pooling, head)

    return sorted(stats, key=order)


CONFIG_INTERVAL_KEY = "config_interval"
"""``ResultRow.extra`` key of the configuration-level intervals (the same on every run of a configuration):
``accuracy_lo/hi``, ``f1_macro_lo/hi``, ``gain_f1_macro_lo/hi`` over all its evaluation rows and seeds."""


def _mean_of(values: list[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(sum(known) / len(known)) if known and len(known) == len(values) else None


def _sureness(group: list[ResultRow]) -> dict[str, Any]:
    """A configuration's intervals, paired test, control and MDL from its rows: the configuration-level intervals
    recorded with the rows (a run on its own is its configuration), the paired test (the same on every run), and
    means over runs of the control scores and codelengths."""
    first = group[0]
    shared = dict(first.extra.get(CONFIG_INTERVAL_KEY) or {})

    def interval(name: str) -> float | None:
        if name in shared:
            return None if shared[name] is None else float(shared[name])
        value = getattr(first, name)
        return value if len(group) == 1 else None

    return {
        "accuracy_lo": interval("accuracy_lo"),
        "accuracy_hi": interval("accuracy_hi"),
        "f1_lo": interval("f1_macro_lo"),
        "f1_hi": interval("f1_macro_hi"),
        "is_best": bool(first.is_best),
        "p_vs_best": first.p_vs_best,
        "p_vs_best_holm": first.p_vs_best_holm,
        "f1_diff_lo": first.f1_macro_diff_lo,
        "f1_diff_hi": first.f1_macro_diff_hi,
        "tied_with_best": first.tied_with_best,
        "vs_best": first.vs_best,
        "control_accuracy_mean": _mean_of([r.control_accuracy for r in group]),
        "control_f1_mean": _mean_of([r.control_f1_macro for r in group]),
        "gain_f1_mean": _mean_of([r.gain_f1_macro for r in group]),
        "gain_f1_lo": interval("gain_f1_macro_lo"),
        "gain_f1_hi": interval("gain_f1_macro_hi"),
        "mdl_bits": _mean_of([r.mdl_bits for r in group]),
        "compression": _mean_of([r.compression for r in group]),
        "control_task_accuracy_mean": _mean_of([r.control_task_accuracy for r in group]),
        "control_task_lo": interval("control_task_accuracy_lo"),
        "control_task_hi": interval("control_task_accuracy_hi"),
        "selectivity_mean": _mean_of([r.selectivity for r in group]),
        "selectivity_lo": interval("selectivity_lo"),
        "selectivity_hi": interval("selectivity_hi"),
        "val_selectivity_mean": _mean_of([r.val_selectivity for r in group]),
    }


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


def most_selective(stats: list[ConfigStats]) -> ConfigStats | None:
    """The configuration with the highest mean validation selectivity (ties: higher validation accuracy, then fewer
    trainable parameters), or None without a control task."""
    found = [s for s in stats if s.val_selectivity_mean is not None]
    if not found:
        return None
    params = lambda s: float(s.trainable_params) if s.trainable_params is not None else float("inf")  # noqa: E731
    return min(
        found, key=lambda s: (-float(s.val_selectivity_mean or 0.0), -float(s.val_accuracy_mean or 0.0), params(s))
    )


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
