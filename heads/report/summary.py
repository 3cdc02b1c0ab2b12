"""``summary.md`` of one run: the configuration table with the best row marked, how it was chosen, and the best
configuration's per-class table and confusion matrix."""

from __future__ import annotations

import json
from typing import Any

from heads.report.metrics import averages
from heads.report.plots import names_for
from heads.report.table import ConfigStats, most_selective, pm, selection_rule

__all__ = ["summary_md", "md_table", "per_class_table", "fold_ensemble_md"]


def _config_table(stats: list[ConfigStats], best: ConfigStats, rule: str) -> list[str]:
    """One line per configuration: choice, scores with intervals, the paired test, control gain and MDL."""
    with_val = any(s.has_validation for s in stats)
    with_c = any("C" in s.first.hyperparameters for s in stats)
    with_ci = any(s.has_interval for s in stats)
    with_p = any(s.p_vs_best_holm is not None for s in stats)
    with_control = any(s.control_f1_mean is not None for s in stats)
    with_mdl = any(s.mdl_bits is not None for s in stats)
    table = []
    for s in stats:
        cells = list(s.key)
        if with_c:
            cs = s.first.hyperparameters.get("C")
            cells.append("" if cs is None else f"{float(cs):g}")
        if with_val:
            cells += [
                "" if s.val_accuracy_mean is None else f"{s.val_accuracy_mean:.4f}",
                "" if s.val_f1_mean is None else pm(s.val_f1_mean, s.val_f1_std or 0.0, s.n),
            ]
        cells += [pm(s.accuracy_mean, s.accuracy_std, s.n), pm(s.f1_mean, s.f1_std, s.n)]
        cells.append("" if s.f1_weighted_mean is None else f"{s.f1_weighted_mean:.4f}")
        if with_ci:
            cells.append(_ci(s.f1_lo, s.f1_hi))
        if with_p:
            cells.append(_p(s.p_vs_best_holm))
        if with_control:
            cells += [
                "" if s.control_f1_mean is None else f"{s.control_f1_mean:.4f}",
                ""
                if s.gain_f1_mean is None
                else f"{s.gain_f1_mean:+.4f}"
                + (
                    f" ({s.gain_f1_lo:+.4f} to {s.gain_f1_hi:+.4f})"
                    if s.gain_f1_lo is not None and s.gain_f1_hi is not None
                    else ""
                ),
            ]
        if with_mdl:
            cells += [
                "" if s.mdl_bits is None else f"{s.mdl_bits:,.0f}",
                "" if s.compression is None else f"{s.compression:.2f}",
            ]
        cells += [str(s.n), f"{s.train_seconds:.1f}"]
        if s is best:
            cells = [f"**{c}**" if c else c for c in cells] + [f"← best ({rule})"]
        else:
            cells.append(s.vs_best if s.vs_best in ("tied", "worse", "better") else "")
        table.append(cells)
    header = ["layers", "combine", "pooling", "head"] + (["C"] if with_c else [])
    header += (["val accuracy", "val macro-F1"] if with_val else []) + [
        "test accuracy",
        "test macro-F1",
        "test weighted F1",
    ]
    header += (["95% CI macro-F1"] if with_ci else []) + (["p vs best (Holm)"] if with_p else [])
    header += (["control macro-F1", "gain (95% CI)"] if with_control else []) + (
        ["MDL bits", "compression"] if with_mdl else []
    )
    return md_table(header + ["runs", "train s", ""], table)


def _ci_of(mean: float | None, lo: float | None, hi: float | None, sign: bool = False) -> str:
    if mean is None:
        return ""
    fmt = "{:+.4f}" if sign else "{:.4f}"
    shown = fmt.format(mean)
    return shown + (f" ({fmt.format(lo)} to {fmt.format(hi)})" if lo is not None and hi is not None else "")


def _selectivity_section(stats: list[ConfigStats], best: ConfigStats) -> list[str]:
    """Per configuration (single layers first, in layer order): test accuracy, control accuracy and selectivity,
    with their 95% intervals; then the most selective configuration beside the most accurate one."""
    rows = []
    for s in stats:
        cells = list(s.key) + [
            _ci_of(s.accuracy_mean, s.accuracy_lo, s.accuracy_hi),
            _ci_of(s.control_task_accuracy_mean, s.control_task_lo, s.control_task_hi),
            _ci_of(s.selectivity_mean, s.selectivity_lo, s.selectivity_hi, sign=True),
            "" if s.val_selectivity_mean is None else f"{s.val_selectivity_mean:+.4f}",
        ]
        rows.append([f"**{c}**" if c and s is best else c for c in cells])
    lines = ["## Accuracy and selectivity per layer", ""]
    lines += md_table(
        [
            "layers",
            "combine",
            "pooling",
            "head",
            "test accuracy (95% CI)",
            "control accuracy (95% CI)",
            "selectivity (95% CI)",
            "val selectivity",
        ],
        rows,
    )
    top = most_selective(stats)
    lines += [""]
    lines.append(
        f"- most accurate (the best, chosen on validation macro-F1): **{_name(best)}**, test accuracy "
        f"{_ci_of(best.accuracy_mean, best.accuracy_lo, best.accuracy_hi)}, selectivity "
        f"{_ci_of(best.selectivity_mean, best.selectivity_lo, best.selectivity_hi, sign=True)}"
    )
    if top is not None:
        lines.append(
            f"- most selective (the highest validation selectivity): **{_name(top)}**, test selectivity "
            f"{_ci_of(top.selectivity_mean, top.selectivity_lo, top.selectivity_hi, sign=True)}, test accuracy "
            f"{_ci_of(top.accuracy_mean, top.accuracy_lo, top.accuracy_hi)}"
            + (" (the same configuration)" if top is best else "")
        )
    above = sum(1 for s in stats if (s.selectivity_lo or 0.0) > 0)
    lines.append(
        f"- selectivity = accuracy - control accuracy, row by row; {above} of {len(stats)} configurations have a "
        "95% interval above 0"
    )
    return lines


def per_class_table(per_class: dict[str, dict[str, Any]], label_names: list[str]) -> list[str]:
    """Precision, recall, F1 and support per class, then the macro and the support-weighted averages (the rows of
    scikit-learn's ``classification_report``)."""
    names = [n for n in label_names if n in per_class] or list(per_class)
    support = str(sum(int(per_class[n]["support"]) for n in names))
    rows = [
        [n, *(f"{per_class[n][k]:.4f}" for k in ("precision", "recall", "f1")), str(per_class[n]["support"])]
        for n in names
    ]
    for how in ("macro", "weighted"):
        avg = averages({n: per_class[n] for n in names}, how)
        rows.append([f"*{how} avg*", *(f"{avg[k]:.4f}" for k in ("precision", "recall", "f1")), support])
    return md_table(["label", "precision", "recall", "F1", "support"], rows)


_SPLIT_NAMES = {"fit": "training (fitting) rows", "validation": "validation rows", "evaluation": "evaluation rows"}


def _split_reports(reports: dict[str, Any], label_names: list[str]) -> list[str]:
    """The classification report of every split (heads finetune --split-reports), the same weights on each."""
    if not reports:
        return []
    lines = ["", "## Classification report per split (the kept weights)", ""]
    for name, m in reports.items():
        loss = "" if m.get("loss") is None else f", loss {m['loss']:.4f}"
        lines += [
            f"**{_SPLIT_NAMES.get(name, name)}**: accuracy {m['accuracy']:.4f}, macro-F1 {m['f1_macro']:.4f}{loss}"
        ]
        lines += [""] + per_class_table(m["per_class"], label_names) + [""]
    return lines


def fold_ensemble_md(record: dict[str, Any] | None, label_names: list[str]) -> list[str]:
    """The fold models' averaged probabilities on the evaluation split (heads finetune --keep-fold-models)."""
    if not record:
        return []
    if "accuracy" not in record:
        return ["", "## Fold ensemble", "", str(record.get("note", ""))]
    return [
        "",
        "## Fold ensemble",
        "",
        f"The {len(record['folds'])} fold models together ({record['how']}) on the {record['rows']} rows of split "
        f"`{record['split']}`: accuracy {record['accuracy']:.4f}, macro-F1 {record['f1_macro']:.4f}.",
        "",
        *per_class_table(record["per_class"], label_names),
    ]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _how_chosen(meta: dict[str, Any], rule: str) -> str:
    if rule == "validation":
        where = meta.get("validation") or "the validation rows"
        return (
            f"- best configuration: the highest mean validation macro-F1 (validation: {where}); every choice "
            "(epoch, C, configuration, saved head) was made there, and the evaluation split was scored once per "
            "configuration, for reporting only"
        )
    return (
        "- best configuration: the highest mean evaluation macro-F1 (these runs record no validation scores, so "
        "the choice is optimistic)"
    )


def _ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f"{lo:.4f}–{hi:.4f}"


def _p(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"


def _name(s: ConfigStats) -> str:
    return " / ".join(s.key)


def _answer(meta: dict[str, Any], stats: list[ConfigStats], best: ConfigStats) -> list[str]:
    """The opening paragraph: the best configuration, how sure, and which configurations it does not beat."""
    unc = meta.get("uncertainty") or {}
    test = "test" if not meta.get("config", {}).get("folds") else "held-out"
    head = f"**{_name(best)}** is the best configuration"
    if best.has_validation:
        head += f", chosen on validation macro-F1 ({best.val_f1_mean:.4f})"
    head += f": {test} macro-F1 {best.f1_mean:.4f}"
    if best.has_interval:
        head += f" (95% CI {_ci(best.f1_lo, best.f1_hi)})"
    head += f", accuracy {best.accuracy_mean:.4f}"
    if best.accuracy_lo is not None:
        head += f" ({_ci(best.accuracy_lo, best.accuracy_hi)})"
    lines = ["## Answer", "", head + "."]
    if not unc:
        lines += [
            "",
            "No intervals or paired tests (the run was made with --no-ci, or records no per-row predictions).",
        ]
        return lines
    others = [s for s in stats if s is not best and s.p_vs_best_holm is not None]
    tied = [s for s in others if s.tied_with_best]
    worse = [s for s in others if s.vs_best == "worse"]
    better = [s for s in others if s.vs_best == "better"]
    rows = unc.get("pooled_rows")
    how = (
        f"exact McNemar test on the {rows} {test} rows, Holm-corrected over the {len(others)} configurations "
        f"compared, p ≥ {unc.get('alpha', 0.05):g}"
    )
    if tied:
        names = ", ".join(f"{_name(s)} ({s.f1_mean:.4f})" for s in tied)
        lines += [
            "",
            f"{len(tied)} configuration{'s are' if len(tied) > 1 else ' is'} statistically indistinguishable from "
            f"it ({how}): {names}. Treat them as ties: the data cannot tell them apart.",
        ]
    elif others and not better:
        lines += ["", f"Every other configuration is significantly worse than it ({how.replace('p ≥', 'p <')})."]
    if worse and (tied or better):
        lines += ["", f"{len(worse)} configuration{'s are' if len(worse) > 1 else ' is'} significantly worse."]
    if better:
        names = ", ".join(f"{_name(s)} ({s.f1_mean:.4f})" for s in better)
        lines += [
            "",
            f"{len(better)} configuration{'s score' if len(better) > 1 else ' scores'} significantly higher on "
            f"the {test} rows ({how.replace('p ≥', 'p <')}): {names}. The choice made on validation did not carry "
            "over to them; with more validation rows (--validation-fraction) or seeds (--seeds) it would be "
            "surer.",
        ]
    seeds = int(meta.get("config", {}).get("seeds") or 1)
    if seeds > 1:
        lines += [
            "",
            f"With {seeds} seeds, intervals are of the mean over seeds; the paired tests use seed "
            f"{unc.get('paired_seed', 0)}'s runs.",
        ]
    if meta.get("config", {}).get("folds"):
        lines += ["", "With folds, intervals and tests use every fold's held-out rows together."]
    control = meta.get("control")
    gains = [s for s in stats if s.gain_f1_mean is not None]
    if control and gains:
        what = (
            f"random weights, seed {control['random_weights']}"
            if control.get("random_weights") is not None
            else f"`{control.get('model')}`"
        )
        lines += [
            "",
            f"Against the control store ({what}), the best configuration gains {best.gain_f1_mean or 0.0:+.4f} "
            f"macro-F1"
            + (f" (95% CI {_ci(best.gain_f1_lo, best.gain_f1_hi)})" if best.gain_f1_lo is not None else "")
            + f"; {sum(1 for s in gains if (s.gain_f1_lo or 0.0) > 0)} of {len(gains)} configurations gain "
            "with a 95% interval above 0.",
        ]
    return lines


def _text_lines(text: dict[str, Any] | None) -> list[str]:
    """What the model read, from the store's text record: the template or rendered chat template, and the tokens
    mean and max cover (none for stores from before it was recorded, or of audio)."""
    if not text:
        return []
    prompt = text.get("prompt")
    kind = "chat template" if text.get("chat_template") else "template"
    shown = f"{kind} `{json.dumps(prompt)[1:-1]}`" if prompt else "the text alone (no template)"
    covered = "the text tokens" if text.get("pool_tokens") == "text" else "every token"
    return [f"- text: {shown}; mean and max over {covered}"]


def summary_md(
    meta: dict[str, Any],
    stats: list[ConfigStats],
    best: ConfigStats | None,
    label_names: list[str],
    files: list[str],
    skipped: list[str],
    skip_reason: dict[str, str],
) -> str:
    """The markdown summary of a run directory (see :class:`heads.report.results.RunWriter`)."""
    lines = [f"# Heads run {meta.get('name', '')}".rstrip(), ""]
    if best is not None:
        lines += _answer(meta, stats, best) + ["", "## Run", ""]
    lines += [
        f"- store: `{meta.get('store_path', meta.get('store', '?'))}` (fingerprint "
        f"`{meta.get('store_fingerprint', '?')}`)",
        f"- model: `{meta.get('model', meta.get('model_name', '?'))}`"
        + (f", computing in {meta['compute_dtype']}" if meta.get("compute_dtype") else ""),
        *_text_lines(meta.get("text")),
        f"- labels: {', '.join(label_names)}",
        f"- rows: {sum(s.n for s in stats)} runs of {len(stats)} configs",
    ]
    if meta.get("majority_accuracy") is not None:
        lines.append(f"- majority-class baseline accuracy: {float(meta['majority_accuracy']):.4f}")
    if meta.get("eval_split") is not None and meta.get("train_rows") is not None:
        carved = " (carved from it)" if meta.get("carved_eval") else ""
        lines.append(
            f"- training split `{meta.get('train_split')}` ({meta['train_rows']} rows"
            + (f", {meta['augmented_rows']} augmented" if meta.get("augmented_rows") else "")
            + f"), evaluation split `{meta['eval_split']}`{carved} ({meta.get('eval_rows')} rows)"
        )
    if meta.get("eval_set"):
        lines.append(f"- evaluation set `{meta['eval_set'].get('id')}` ({meta['eval_set'].get('rows')} rows)")
    if meta.get("kept_apart"):
        lines.append(f"- every carve keeps {meta['kept_apart']} apart (no group on both sides)")
    task = meta.get("task")
    if task:
        lines.append(
            f"- task: {task.get('task')} (label `{task.get('label')}`"
            + (f", word pooling {', '.join(task['word_pooling'])}" if task.get("word_pooling") else "")
            + (f"; features {task['features']}" if task.get("features") else "")
            + "); examples "
            + ", ".join(f"{k} {v}" for k, v in (task.get("examples") or {}).items())
            + (f"; {task['groups']}" if task.get("groups") else "")
        )
        ct = task.get("control_task")
        lines.append(
            f"- control task: {ct['definition']} ({ct.get('types')} training types, seed {ct.get('seed')}; "
            f"{ct.get('citation')})"
            if ct
            else "- control task: none (pass --control-task for control accuracy and selectivity)"
        )
    for note in meta.get("notes") or []:
        lines.append(f"- {note}")
    if meta.get("control"):
        c = meta["control"]
        lines.append(
            f"- control store: `{c.get('store')}` (model `{c.get('model')}`"
            + (f", random weights seed {c['random_weights']}" if c.get("random_weights") is not None else "")
            + "): every configuration trained on it too, same rows, carve and selection rule"
        )
    if meta.get("uncertainty"):
        u = meta["uncertainty"]
        lines.append(
            f"- intervals: 95% {u.get('interval', 'bootstrap')}, {u.get('resamples')} resamples; paired test: "
            f"{u.get('test', 'exact McNemar')}"
        )
    if meta.get("mdl"):
        m = meta["mdl"]
        lines.append(f"- MDL: {m.get('definition')}; {m.get('rows')} rows; heads: {m.get('heads')}")
    if best is None:
        return "\n".join(lines + ["", "No result rows were written.", ""])
    rule = selection_rule(stats)
    lines.append(_how_chosen(meta, rule))
    lines += ["", "## Configs" + (" (mean ± std over seeds/folds)" if any(s.n > 1 for s in stats) else ""), ""]
    lines += _config_table(stats, best, rule)
    if any(s.has_selectivity for s in stats):
        lines += [""] + _selectivity_section(stats, best)
    first = best.first
    lines += [
        "",
        f"## Best config: {' / '.join(best.key)} (seed {first.seed}"
        + (f", fold {first.fold})" if first.fold is not None else ")"),
        "",
    ]
    if best.has_validation:
        lines += [
            f"Validation macro-F1 {pm(best.val_f1_mean or 0.0, best.val_f1_std or 0.0, best.n)}, test macro-F1 "
            f"{pm(best.f1_mean, best.f1_std, best.n)} (accuracy: validation {best.val_accuracy_mean:.4f}, "
            f"test {best.accuracy_mean:.4f}). Per class on the evaluation split:",
            "",
        ]
    lines += per_class_table(first.per_class, label_names)
    if first.confusion:
        cm_names = names_for(first.confusion, label_names)
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
        lines += md_table(
            ["true \\ predicted", *cm_names], [[n, *map(str, r)] for n, r in zip(cm_names, first.confusion)]
        )
    lines += _split_reports(first.extra.get("split_reports") or {}, label_names)
    lines += fold_ensemble_md(meta.get("fold_ensemble"), label_names)
    lines += ["", "## Plots", ""] + [f"- [{f}]({f})" for f in files]
    if meta.get("data"):
        lines.append("- [data.png](data.png): class counts and row lengths of every split read")
    lines += [f"- {f}: skipped ({skip_reason[f]})" for f in skipped]
    return "\n".join(lines) + "\n"
