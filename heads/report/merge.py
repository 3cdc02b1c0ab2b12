"""``heads report``: several run directories (sweeps, trains, fine-tunes) in one table and plot.

Runs are put side by side only when they were scored on the same rows: every run records
``run.json["eval_set"]`` (:mod:`heads.evalset`), and runs with different ids, or without one (runs made before
the id existed), are refused unless ``allow_mixed``; then the runs scored on other rows are marked. Runs whose
inputs were truncated differently (``max_length`` tokens, or ``max_seconds`` of audio, as each run recorded it)
are merged and marked: their scores are on the same rows but not on the same text.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from embstore.errors import ConfigError, DataError, OutputNotWritableError
from heads.evalset import EVAL_SET_KEY
from heads.report.compare import Compared, RunInput, compare, seconds_per_row
from heads.report.plots import plot_report
from heads.report.results import read_run
from heads.report.summary import md_table
from heads.report.table import ConfigStats, aggregate, pm, rank, selection_rule

__all__ = ["write_report", "eval_set_id", "check_comparable", "truncation", "REPORT_COLUMNS"]

REPORT_COLUMNS = [
    "run",
    "store_id",
    "eval_set",
    "truncation",
    "layers",
    "combine",
    "pooling",
    "head",
    "n",
    "accuracy_mean",
    "accuracy_std",
    "f1_macro_mean",
    "f1_macro_std",
    "f1_weighted_mean",
    "val_accuracy_mean",
    "val_f1_macro_mean",
    "trainable_params",
    "seconds_per_epoch",
    "train_seconds",
    # how sure, as each run recorded it (its best and its paired tests are within the run)
    "accuracy_lo",
    "accuracy_hi",
    "f1_macro_lo",
    "f1_macro_hi",
    "is_best",
    "p_vs_best",
    "p_vs_best_holm",
    "f1_macro_diff_lo",
    "f1_macro_diff_hi",
    "tied_with_best",
    "vs_best",
    "control_accuracy_mean",
    "control_f1_macro_mean",
    "gain_f1_macro_mean",
    "gain_f1_macro_lo",
    "gain_f1_macro_hi",
    "mdl_bits",
    "compression",
    # the paired comparison across runs (heads.report.compare): on the rows every run scored, against the best
    "paired_f1_macro_lo",
    "paired_f1_macro_hi",
    "paired_p_vs_best_holm",
    "paired_vs_best",
    "seconds_per_row",
]
UNKNOWN = "unknown"
FINE_TUNED = "fine-tuned from"
"""What the store column says for a fine-tune, which reads no store."""


def eval_set_id(meta: dict[str, Any]) -> str:
    """The evaluation-set id a run recorded, or 'unknown' for a run without one."""
    record = meta.get(EVAL_SET_KEY)
    return str(record.get("id")) if isinstance(record, dict) and record.get("id") else UNKNOWN


def truncation(meta: dict[str, Any]) -> str:
    """What a run's inputs were cut to: '128 tokens', '10 s of audio', or 'unknown' (runs made before runs recorded
    it)."""
    if meta.get("max_length") is not None:
        return f"{meta['max_length']} tokens"
    if meta.get("max_seconds") is not None:
        return f"{meta['max_seconds']:g} s of audio"
    if "max_seconds" in meta:
        return "whole recordings"
    return UNKNOWN


def check_comparable(ids: dict[str, str]) -> None:
    """Refuse runs (name -> eval-set id) scored on different rows, or on unknown rows: one line naming two ids."""
    names = list(ids)
    for name in names:
        if ids[name] == UNKNOWN:
            raise ConfigError(
                f"Run {name} records no evaluation set (eval_set unknown: made before runs recorded the "
                "rows they scored), so it cannot be checked against the others; re-run it, or pass "
                "--allow-mixed to merge it marked."
            )
    first = names[0]
    for name in names[1:]:
        if ids[name] != ids[first]:
            raise ConfigError(
                f"Runs {first} and {name} were scored on different rows (eval_set {ids[first]} vs "
                f"{ids[name]}); compare runs evaluated on the same rows, or pass --allow-mixed to merge "
                "them with the difference marked."
            )


def _opt(value: float | int | None, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def _interval(s: ConfigStats, c: Compared | None) -> str:
    """The paired interval of the comparison, else the run's own (or nothing)."""
    if c is not None:
        return f"{c.f1_lo:.4f}–{c.f1_hi:.4f}"
    return "" if not s.has_interval else f"{s.f1_lo:.4f}–{s.f1_hi:.4f}"


def _versus(c: Compared | None) -> str:
    """'best', 'tied (0.31)', 'worse (<0.001)'; blank for a configuration without predictions."""
    if c is None or c.vs_best is None:
        return ""
    if c.is_best or c.p_vs_best_holm is None:
        return c.vs_best
    p = c.p_vs_best_holm
    return f"{c.vs_best} ({'<0.001' if p < 0.001 else f'{p:.3f}'})"


def _rows_of(runs: list[RunInput]) -> str:
    """The evaluation row count the runs record (they agree when compared)."""
    counts = {int(r.meta.get("eval_rows") or 0) for r in runs} - {0}
    return f"{next(iter(counts)):,}" if len(counts) == 1 else "same"


def write_report(run_dirs: list[Path], out: Path, *, allow_mixed: bool = True) -> Path:
    """Merge run directories into ``out/report.md``, ``report.csv`` and ``report.png``; return the report.md path.

    One line per (run, config), best first: by mean validation macro-F1 when every config has validation scores,
    else by mean evaluation macro-F1 (ties: accuracy, then fewer seconds). ``allow_mixed=False`` (what ``heads
    report`` passes unless ``--allow-mixed``) refuses runs scored on different or unknown rows; otherwise they are
    merged and the runs scored on rows other than the most common evaluation set are marked.
    """
    entries: list[tuple[str, str, ConfigStats]] = []
    inputs: list[RunInput] = []
    stores: dict[str, str] = {}
    ids: dict[str, str] = {}
    cuts: dict[str, str] = {}
    for run_dir in run_dirs:
        meta, rows = read_run(Path(run_dir))
        name = Path(run_dir).resolve().name
        while name in stores:
            name += "'"  # two runs with the same folder name stay distinguishable
        store_ids = sorted({r.store_id for r in rows if r.store_id}) or [str(meta.get("store_fingerprint", "?"))]
        if meta.get("kind") == "finetune":  # fine-tunes read no store: name the model they started from
            model = meta.get("model")
            store_ids = [f"{FINE_TUNED} {model.get('name') if isinstance(model, dict) else model}"]
        stores[name] = ", ".join(store_ids)
        inputs.append(RunInput(name, Path(run_dir), meta, rows))
        ids[name] = eval_set_id(meta)
        cuts[name] = truncation(meta)
        entries += [(name, stores[name], s) for s in aggregate(rows)]
    if not entries:
        raise DataError(
            f"The runs {', '.join(map(str, run_dirs))} hold no result rows; pass runs that finished at least one head."
        )
    if not allow_mixed:
        check_comparable(ids)
    known = Counter(i for i in ids.values() if i != UNKNOWN)
    reference = known.most_common(1)[0][0] if known else None
    other = {name for name, i in ids.items() if i != reference}
    common_cut = Counter(c for c in cuts.values() if c != UNKNOWN).most_common(1)
    cut_other = {name for name, c in cuts.items() if c != UNKNOWN and c != common_cut[0][0]} if common_cut else set()
    rule = selection_rule([s for _, _, s in entries])
    entries.sort(key=lambda e: rank(e[2], rule))
    paired = compare(inputs, [(run, s) for run, _, s in entries]) if reference is not None and not other else {}
    metas = {r.name: r.meta for r in inputs}
    per_row = [seconds_per_row(s, metas[run]) for run, _, s in entries]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "report.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(REPORT_COLUMNS)
            for i, (run, store, s) in enumerate(entries):
                d = s.to_dict()
                cmp = paired.get(i)
                d.update(
                    paired_f1_macro_lo=None if cmp is None else cmp.f1_lo,
                    paired_f1_macro_hi=None if cmp is None else cmp.f1_hi,
                    paired_p_vs_best_holm=None if cmp is None else cmp.p_vs_best_holm,
                    paired_vs_best=None if cmp is None else cmp.vs_best,
                    seconds_per_row=per_row[i],
                )
                writer.writerow([run, store, ids[run], cuts[run], *(_opt(d[c]) for c in REPORT_COLUMNS[4:])])
        with_val = any(s.has_validation for _, _, s in entries)
        with_ci = bool(paired) or any(s.has_interval for _, _, s in entries)
        table = []
        for i, (run, _, s) in enumerate(entries):
            cells = [run + (" †" if run in other else "") + (" ‡" if run in cut_other else ""), *s.key]
            if with_val:
                cells.append("" if s.val_f1_mean is None else pm(s.val_f1_mean, s.val_f1_std or 0.0, s.n))
            cells += [pm(s.accuracy_mean, s.accuracy_std, s.n), pm(s.f1_mean, s.f1_std, s.n)]
            cells.append("" if s.f1_weighted_mean is None else f"{s.f1_weighted_mean:.4f}")
            c = paired.get(i)
            if with_ci:
                cells.append(_interval(s, c))
            if paired:
                cells.append(_versus(c))
            cells += [
                str(s.n),
                _opt(s.trainable_params, "{:,}"),
                _opt(per_row[i], "{:.2g}"),
                _opt(s.seconds_per_epoch, "{:.2f}"),
                f"{s.train_seconds:.1f}",
            ]
            table.append([f"**{c}**" for c in cells] if i == 0 else cells)
        by = (
            "mean validation macro-F1"
            if rule == "validation"
            else "mean evaluation macro-F1 (not every run has validation scores)"
        )
        lines = ["# Heads report", "", f"{len(entries)} configs from {len(stores)} runs, best first by {by}.", ""]
        lines += md_table(
            [
                "run",
                "layers",
                "combine",
                "pooling",
                "head",
                *(["val macro-F1"] if with_val else []),
                "accuracy",
                "macro-F1",
                "weighted F1",
                *(["95% CI macro-F1"] if with_ci else []),
                *(["vs best (McNemar, Holm p)"] if paired else []),
                "runs",
                "trainable params",
                "train s / row",
                "s / epoch",
                "train s",
            ],
            table,
        )
        if paired:
            lines.append(
                f"\nEvery run scored the same {_rows_of(inputs)} evaluation rows: intervals are a 95% paired bootstrap "
                "over them (one set of resamples for every configuration), and each configuration is tested against "
                "the best (exact McNemar test on correctness, Holm-corrected over the configurations compared; tied: "
                "p >= 0.05). Runs without per-row predictions show their own interval, untested. train s / row: "
                "training seconds per training row (a probe's exclude its store's one extraction pass)."
            )
        elif with_ci:
            lines.append(
                "\nIntervals are each run's own (95% bootstrap over its evaluation rows); paired tests against "
                "each run's best are in the runs' summaries and in report.csv."
            )
        lines += ["", "## Stores, models and evaluation sets", ""]
        lines += [
            f"- {run}: `{store}`, evaluation set `{ids[run]}`, inputs cut to {cuts[run]}"
            for run, store in stores.items()
        ]
        if other and reference is None:
            lines.append("\n† no run records its evaluation set: whether they were scored on the same rows is unknown.")
        elif other:
            lines.append(
                f"\n† scored on other rows than evaluation set `{reference}` (or on unknown rows): "
                f"{', '.join(sorted(other))}; their scores are not directly comparable."
            )
        if cut_other:
            lines.append(
                f"\n‡ inputs truncated otherwise than {common_cut[0][0]}: "
                + ", ".join(f"{run} ({cuts[run]})" for run in sorted(cut_other))
                + "; they were scored on the same rows but did not see the same text."
            )
        real_stores = {store for run, store in stores.items() if not store.startswith(FINE_TUNED)}
        if len(real_stores) > 1:  # fine-tunes read no store: only several stores need the warning
            lines.append(
                "\nThe runs come from different stores: compare them only if the stores share their data split."
            )
        lines += ["", "![macro-F1 per config](report.png)", ""]
        (out / "report.md").write_text("\n".join(lines))
        plot_report(out / "report.png", entries)
    except OSError as exc:
        raise OutputNotWritableError(
            f"Cannot write the report under {out} ({exc.strerror or exc}); choose a writable --out."
        ) from None
    return out / "report.md"
