"""Run directories of the tasks whose examples are not classified into a fixed set of classes: regression (scored by
R² and mean squared error) and dependency arcs (scored by attachment accuracy over each word's candidates).

The files are those of every run (:mod:`heads.report.rundir`): ``run.json``, ``results.jsonl`` (one
:class:`ScoredRow` per configuration x seed), ``results.csv``, ``summary.md``, ``metric_per_layer.png`` and
``predictions.npz``. How sure, as for the sentence and word tasks:

* every score has a 95% percentile bootstrap interval over the evaluation rows, one seeded set of resamples shared by
  every configuration (so every difference is paired);
* the best configuration is chosen on validation (R², or attachment accuracy); every other one is compared with it
  on the evaluation rows: regression by a paired bootstrap of the squared-error difference (two-sided p: twice the
  share of resamples on the far side of 0), arcs by the exact McNemar test on correctness; Holm-corrected;
* arcs with a control task: control attachment accuracy and selectivity with paired intervals.

``heads report`` merges classification runs; these runs are read by people and by pandas (results.csv).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heads.report.rundir import CSV_FILE, PREDICTIONS_FILE, ROWS_FILE, RUN_FILE, SUMMARY_FILE
from heads.report.table import ConfigKey
from heads.report.uncertainty import N_RESAMPLES, holm, mcnemar_p, percentile_interval, resample_counts

__all__ = ["ScoredRun", "ScoredRow", "assess_scored", "write_scored_run", "METRICS"]

METRICS = {"regression": ("r2", "R²"), "attachment": ("uas", "attachment accuracy")}
"""kind -> (row field of the headline metric, its name in the summary)."""
ALPHA = 0.05
PLOT = "metric_per_layer.png"


@dataclass
class ScoredRun:
    """One configuration x seed: its predictions of the evaluation rows and how it was chosen."""

    key: ConfigKey
    seed: int
    rows: np.ndarray
    """(n,) evaluation example positions, sorted."""
    y: np.ndarray
    """(n,) the target (regression) or the gold head (arcs: position in the sentence, -1 for the root)."""
    pred: np.ndarray
    """(n,) the prediction, or the predicted head."""
    val_score: float
    """The validation score every choice was made on (R², or attachment accuracy)."""
    val_mse: float | None = None
    hyper: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    params: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    """More ids of the rows for predictions.npz (sentence_id, word_id, ...)."""
    control_pred: np.ndarray | None = None
    """Arcs with --control-task: the control probe's predicted heads of the same rows."""
    control_y: np.ndarray | None = None
    """... and the control task's gold heads."""
    val_control: float | None = None


@dataclass(frozen=True)
class ScoredRow:
    """One line of results.jsonl of a regression or arc run."""

    layers: str
    combine: str
    pooling: str
    head: str
    seed: int
    metric: str
    """'r2' or 'uas'."""
    value: float
    """The headline metric on the evaluation rows."""
    value_lo: float | None
    value_hi: float | None
    val_value: float
    mse: float | None = None
    mse_lo: float | None = None
    mse_hi: float | None = None
    val_mse: float | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    trainable_params: int = 0
    eval_rows: int = 0
    is_best: bool = False
    p_vs_best: float | None = None
    p_vs_best_holm: float | None = None
    diff_lo: float | None = None
    """Paired 95% interval of (this configuration's metric - the best's) on the evaluation rows."""
    diff_hi: float | None = None
    vs_best: str | None = None
    control_task_accuracy: float | None = None
    control_task_accuracy_lo: float | None = None
    control_task_accuracy_hi: float | None = None
    selectivity: float | None = None
    selectivity_lo: float | None = None
    selectivity_hi: float | None = None
    val_selectivity: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> ConfigKey:
        return (self.layers, self.combine, self.pooling, self.head)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = percentile_interval(values)
    return float(lo), float(hi)


def _boot(kind: str, y: np.ndarray, preds: np.ndarray, seed: int, n_resamples: int) -> dict[str, np.ndarray]:
    """Per resample and model: the headline metric (and mse), (models, R) each."""
    n = len(y)
    out: dict[str, list[np.ndarray]] = {"value": [], "mse": []}
    s = [int(seed), zlib.crc32(np.ascontiguousarray(y, dtype=np.float64).tobytes()), 31]
    if kind == "regression":
        se = ((preds - y[None, :]) ** 2).astype(np.float64)  # (models, n)
        for counts in resample_counts(n, n_resamples, s):
            c = counts.astype(np.float64)
            sse = c @ se.T  # (b, models)
            sy, syy = c @ y, c @ (y * y)
            sst = np.maximum(syy - sy * sy / n, 1e-300)
            out["value"].append((1.0 - sse / sst[:, None]).T)
            out["mse"].append((sse / n).T)
    else:
        correct = (preds == y[None, :]).astype(np.float64)
        for counts in resample_counts(n, n_resamples, s):
            out["value"].append((counts.astype(np.float64) @ correct.T / n).T)
    return {k: np.concatenate(v, axis=1) for k, v in out.items() if v}


def _score(kind: str, y: np.ndarray, pred: np.ndarray) -> tuple[float, float | None]:
    if kind == "regression":
        sse = float(np.sum((pred - y) ** 2))
        sst = float(np.sum((y - y.mean()) ** 2))
        return 1.0 - sse / max(sst, 1e-300), sse / max(1, len(y))
    return float(np.mean(pred == y)), None


def assess_scored(
    kind: str, runs: Sequence[ScoredRun], *, seed: int = 0, ci: bool = True, n_resamples: int = N_RESAMPLES
) -> tuple[list[ScoredRow], ConfigKey, list[ConfigKey]]:
    """(one row per run, the best configuration (highest mean validation score), the configurations tied with it)."""
    metric = METRICS[kind][0]
    by_key: dict[ConfigKey, list[int]] = {}
    for i, r in enumerate(runs):
        by_key.setdefault(r.key, []).append(i)
    best = max(by_key, key=lambda k: (np.mean([runs[i].val_score for i in by_key[k]]), -list(by_key).index(k)))
    rows: list[dict[str, Any]] = []
    for r in runs:
        value, mse = _score(kind, r.y, r.pred)
        d: dict[str, Any] = dict(
            layers=r.key[0],
            combine=r.key[1],
            pooling=r.key[2],
            head=r.key[3],
            seed=r.seed,
            metric=metric,
            value=value,
            value_lo=None,
            value_hi=None,
            val_value=r.val_score,
            mse=mse,
            val_mse=r.val_mse,
            hyperparameters=dict(r.hyper),
            train_seconds=r.seconds,
            trainable_params=r.params,
            eval_rows=len(r.rows),
            is_best=r.key == best,
            history=r.history,
        )
        if r.control_pred is not None and r.control_y is not None:
            ctrl = float(np.mean(r.control_pred == r.control_y))
            d.update(control_task_accuracy=ctrl, selectivity=value - ctrl)
            if r.val_control is not None:
                d["val_selectivity"] = r.val_score - r.val_control
        rows.append(d)
    tied: list[ConfigKey] = []
    same_rows = all(np.array_equal(r.rows, runs[0].rows) for r in runs)
    if ci and runs and same_rows:
        y = runs[0].y.astype(np.float64)
        preds = np.stack([r.pred for r in runs]).astype(np.float64)
        boot = _boot(kind, y, preds, seed, n_resamples)
        for i, d in enumerate(rows):
            d["value_lo"], d["value_hi"] = _interval(boot["value"][i])
            if "mse" in boot:
                d["mse_lo"], d["mse_hi"] = _interval(boot["mse"][i])
        controlled = [i for i, r in enumerate(runs) if r.control_pred is not None and r.control_y is not None]
        for i in controlled:
            r = runs[i]
            both = np.stack([r.pred == r.y, r.control_pred == r.control_y]).astype(np.float64)  # type: ignore[operator]
            b = np.concatenate(
                [
                    (c.astype(np.float64) @ both.T / len(r.y)).T
                    for c in resample_counts(len(r.y), n_resamples, [seed, 37])
                ],
                axis=1,
            )
            rows[i]["control_task_accuracy_lo"], rows[i]["control_task_accuracy_hi"] = _interval(b[1])
            rows[i]["selectivity_lo"], rows[i]["selectivity_hi"] = _interval(b[0] - b[1])
        s0 = min(runs[i].seed for i in by_key[best])
        bi = next(i for i in by_key[best] if runs[i].seed == s0)
        others = [k for k in by_key if k != best]
        raw, firsts = [], {}
        for k in others:
            oi = next(i for i in by_key[k] if runs[i].seed == min(runs[j].seed for j in by_key[k]))
            firsts[k] = oi
            diff = boot["value"][oi] - boot["value"][bi]
            if kind == "regression":  # the paired bootstrap of the squared-error difference
                se_diff = boot["mse"][oi] - boot["mse"][bi]
                p = float(min(1.0, 2.0 * min(np.mean(se_diff <= 0), np.mean(se_diff >= 0))))
                p = max(p, 1.0 / n_resamples)
            else:
                p = mcnemar_p(runs[bi].pred == runs[bi].y, runs[oi].pred == runs[oi].y)[0]
            raw.append(p)
            lo, hi = _interval(diff)
            for i in by_key[k]:
                rows[i].update(p_vs_best=p, diff_lo=lo, diff_hi=hi)
        for k, adjusted in zip(others, holm(raw)):
            oi = firsts[k]
            better = rows[oi]["value"] > rows[bi]["value"]
            verdict = "tied" if adjusted >= ALPHA else ("better" if better else "worse")
            if verdict == "tied":
                tied.append(k)
            for i in by_key[k]:
                rows[i].update(p_vs_best_holm=float(adjusted), vs_best=verdict)
        for i in by_key[best]:
            rows[i]["vs_best"] = "best"
    return [ScoredRow(**d) for d in rows], best, tied


def _f(v: float | None, sign: bool = False) -> str:
    return "" if v is None else (f"{v:+.4f}" if sign else f"{v:.4f}")


def _ci(lo: float | None, hi: float | None, sign: bool = False) -> str:
    return "" if lo is None or hi is None else f"{_f(lo, sign)} to {_f(hi, sign)}"


def _summary(meta: dict[str, Any], kind: str, rows: list[ScoredRow], best: ConfigKey, tied: list[ConfigKey]) -> str:
    metric, name = METRICS[kind]
    first: dict[ConfigKey, ScoredRow] = {}
    for r in rows:
        first.setdefault(r.key, r)
    b = first[best]
    lines = [f"# Heads run {meta.get('name', '')}".rstrip(), "", "## Answer", ""]
    lines.append(
        f"**{' / '.join(best)}** is the best configuration, chosen on validation {name} ({b.val_value:.4f}): test "
        f"{name} {b.value:.4f}"
        + (f" (95% CI {_ci(b.value_lo, b.value_hi)})" if b.value_lo is not None else "")
        + (
            f", mean squared error {b.mse:.4f}" + (f" ({_ci(b.mse_lo, b.mse_hi)})" if b.mse_lo is not None else "")
            if b.mse is not None
            else ""
        )
        + "."
    )
    compared = [r for r in first.values() if r.p_vs_best_holm is not None]
    test = "a paired bootstrap of the squared-error difference" if kind == "regression" else "the exact McNemar test"
    if tied:
        lines += [
            "",
            f"{len(tied)} configuration(s) are statistically indistinguishable from it ({test} on the "
            f"{b.eval_rows} test rows, Holm-corrected over the {len(compared)} compared, p ≥ {ALPHA:g}): "
            + ", ".join(f"{' / '.join(k)} ({first[k].value:.4f})" for k in tied)
            + ". Treat them as ties.",
        ]
    elif compared:
        lines += [
            "",
            f"Every other configuration differs from it significantly ({test}, Holm-corrected, p < {ALPHA:g}).",
        ]
    task = meta.get("task") or {}
    lines += ["", "## Run", "", f"- store: `{meta.get('store')}` (fingerprint `{meta.get('store_fingerprint')}`)"]
    lines.append(f"- model: `{meta.get('model')}`")
    lines.append(
        f"- task: {task.get('task')} (target `{task.get('label') or 'the store labels'}`"
        + (f", word pooling {', '.join(task['word_pooling'])}" if task.get("word_pooling") else "")
        + f"); {task.get('definition', '')}"
    )
    lines.append(f"- probe: {task.get('probe', '')}")
    lines.append(
        "- control task: "
        + (
            f"{task['control_task']['definition']} ({task['control_task']['citation']})"
            if task.get("control_task")
            else "none"
        )
    )
    for note in meta.get("notes") or []:
        lines.append(f"- {note}")
    lines.append(
        f"- training split `{meta.get('train_split')}` ({meta.get('train_rows')} examples), evaluation split "
        f"`{meta.get('eval_split')}` ({meta.get('eval_rows')} examples); validation: {meta.get('validation')}"
    )
    lines.append(
        "- intervals: 95% percentile bootstrap over the evaluation rows, "
        f"{N_RESAMPLES} resamples shared by every configuration (paired); test against the best: {test}, Holm"
    )
    header = ["layers", "combine", "pooling", "head", "chosen", f"val {name}", f"test {name} (95% CI)"]
    if kind == "regression":
        header.append("test MSE (95% CI)")
    with_ctrl = any(r.selectivity is not None for r in first.values())
    if with_ctrl:
        header += ["control accuracy (95% CI)", "selectivity (95% CI)"]
    header += ["p vs best (Holm)", ""]
    table = []
    for k, r in first.items():
        chosen = ", ".join(f"{h}={v:g}" if isinstance(v, float) else f"{h}={v}" for h, v in r.hyperparameters.items())
        cells = [*k, chosen, _f(r.val_value), f"{r.value:.4f} ({_ci(r.value_lo, r.value_hi)})"]
        if kind == "regression":
            cells.append(f"{_f(r.mse)} ({_ci(r.mse_lo, r.mse_hi)})")
        if with_ctrl:
            cells += [
                f"{_f(r.control_task_accuracy)} ({_ci(r.control_task_accuracy_lo, r.control_task_accuracy_hi)})",
                f"{_f(r.selectivity, True)} ({_ci(r.selectivity_lo, r.selectivity_hi, True)})",
            ]
        cells += ["" if r.p_vs_best_holm is None else f"{r.p_vs_best_holm:.2g}", r.vs_best or ""]
        table.append([f"**{c}**" if c and k == best else c for c in cells])
    lines += ["", "## Configs", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in table]
    if with_ctrl:
        sel = [r for r in first.values() if r.val_selectivity is not None]
        if sel:
            top = max(sel, key=lambda r: r.val_selectivity or 0.0)
            lines += [
                "",
                f"- most accurate (the best): **{' / '.join(best)}**, selectivity {_f(b.selectivity, True)}",
                f"- most selective (highest validation selectivity): **{' / '.join(top.key)}**, test selectivity "
                f"{_f(top.selectivity, True)} ({_ci(top.selectivity_lo, top.selectivity_hi, True)}), test {name} "
                f"{top.value:.4f}",
            ]
    lines += ["", "## Plots", "", f"- [{PLOT}]({PLOT})", ""]
    return "\n".join(lines)


def _plot(path: Path, kind: str, rows: list[ScoredRow]) -> bool:
    from heads.report.plots import new_figure

    first: dict[ConfigKey, ScoredRow] = {}
    for r in rows:
        first.setdefault(r.key, r)
    singles = [r for r in first.values() if r.combine == "single" and r.layers.isdigit()]
    if not singles:
        return False
    with_sel = any(r.selectivity is not None for r in singles)
    fig, axes = new_figure(11 if with_sel else 7, 4.2, ncols=2 if with_sel else 1)
    lines: dict[tuple[str, str], list[ScoredRow]] = {}
    for r in singles:
        lines.setdefault((r.pooling, r.head), []).append(r)
    name = METRICS[kind][1]
    for (pooling, head), group in lines.items():
        group.sort(key=lambda r: int(r.layers))
        xs = [int(r.layers) for r in group]
        drawn = axes[0].plot(xs, [r.value for r in group], marker="o", label=f"{pooling} / {head}")
        color = drawn[0].get_color()
        if all(r.value_lo is not None for r in group):
            axes[0].fill_between(xs, [r.value_lo for r in group], [r.value_hi for r in group], color=color, alpha=0.15)
        if with_sel:
            axes[0].plot(xs, [r.control_task_accuracy or 0.0 for r in group], "--x", color=color, alpha=0.7)
            axes[1].plot(
                xs, [r.selectivity or 0.0 for r in group], marker="o", color=color, label=f"{pooling} / {head}"
            )
            if all(r.selectivity_lo is not None for r in group):
                axes[1].fill_between(
                    xs, [r.selectivity_lo for r in group], [r.selectivity_hi for r in group], color=color, alpha=0.15
                )
    axes[0].set(xlabel="layer", ylabel=f"test {name} (band: 95% CI)", title=f"{name} per layer")
    if with_sel:
        axes[1].set(xlabel="layer", ylabel="selectivity (band: 95% CI)", title="Selectivity = accuracy - control")
        axes[1].axhline(0.0, color="gray", linewidth=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return True


def write_scored_run(
    run_dir: Path, meta: dict[str, Any], kind: str, runs: Sequence[ScoredRun], *, seed: int = 0, ci: bool = True
) -> tuple[list[ScoredRow], ConfigKey, list[ConfigKey]]:
    """Write the run directory of a regression or arc sweep; (rows, best, tied)."""
    from datetime import datetime, timezone

    from embstore import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, best, tied = assess_scored(kind, runs, seed=seed, ci=ci)
    meta = {
        "name": run_dir.name,
        "format_version": 1,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "best": list(best),
        "tied": [list(k) for k in tied],
    }
    (run_dir / RUN_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    with open(run_dir / ROWS_FILE, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r.to_dict(), default=str) + "\n")
    columns = [f.name for f in dataclasses.fields(ScoredRow) if f.name not in ("hyperparameters", "history")]
    with open(run_dir / CSV_FILE, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        hp = sorted({k for r in rows for k in r.hyperparameters})
        w.writerow(columns + [f"hp_{k}" for k in hp])
        for r in rows:
            w.writerow(
                ["" if getattr(r, c) is None else getattr(r, c) for c in columns]
                + [r.hyperparameters.get(k, "") for k in hp]
            )
    arrays: dict[str, Any] = {
        "run": np.concatenate([np.full(len(r.rows), i, np.int64) for i, r in enumerate(runs)]) if runs else np.zeros(0),
        "y_true": np.concatenate([r.y for r in runs]) if runs else np.zeros(0),
        "y_pred": np.concatenate([r.pred for r in runs]) if runs else np.zeros(0),
    }
    names = list(runs[0].ids) if runs else []
    for n in names:
        arrays[n] = np.concatenate([np.asarray(r.ids[n], dtype=np.int64) for r in runs])
    np.savez(run_dir / PREDICTIONS_FILE, **arrays)
    drawn = _plot(run_dir / PLOT, kind, rows)
    text = _summary(meta, kind, rows, best, tied)
    if not drawn:
        text = text.replace(f"- [{PLOT}]({PLOT})", f"- {PLOT}: skipped (no single-layer configs)")
    (run_dir / SUMMARY_FILE).write_text(text)
    return rows, best, tied
