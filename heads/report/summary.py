"""``summary.md`` of one run: the configuration table with the best row marked, how it was chosen, and the best
configuration's per-class table and confusion matrix."""

from __future__ import annotations

from typing import Any

from heads.report.plots import names_for
from heads.report.table import ConfigStats, pm, selection_rule

__all__ = ["summary_md", "md_table"]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _how_chosen(meta: dict[str, Any], rule: str) -> str:
    if rule == "validation":
        where = meta.get("validation") or "the validation rows"
        return (f"- best configuration: the highest mean validation macro-F1 (validation: {where}); every choice "
                "(epoch, C, configuration, saved head) was made there, and the evaluation split was scored once per "
                "configuration, for reporting only")
    return ("- best configuration: the highest mean evaluation macro-F1 (these runs record no validation scores, so "
            "the choice is optimistic)")


def summary_md(meta: dict[str, Any], stats: list[ConfigStats], best: ConfigStats | None, label_names: list[str],
               files: list[str], skipped: list[str], skip_reason: dict[str, str]) -> str:
    """The markdown summary of a run directory (see :class:`heads.report.results.RunWriter`)."""
    lines = [f"# Heads run {meta.get('name', '')}".rstrip(), "",
             f"- store: `{meta.get('store_path', meta.get('store', '?'))}` (fingerprint `{meta.get('store_fingerprint', '?')}`)",
             f"- model: `{meta.get('model', meta.get('model_name', '?'))}`",
             f"- labels: {', '.join(label_names)}", f"- rows: {sum(s.n for s in stats)} runs of {len(stats)} configs"]
    if meta.get("majority_accuracy") is not None:
        lines.append(f"- majority-class baseline accuracy: {float(meta['majority_accuracy']):.4f}")
    if meta.get("eval_split") is not None and meta.get("train_rows") is not None:
        carved = " (carved from it)" if meta.get("carved_eval") else ""
        lines.append(f"- training split `{meta.get('train_split')}` ({meta['train_rows']} rows"
                     + (f", {meta['augmented_rows']} augmented" if meta.get("augmented_rows") else "")
                     + f"), evaluation split `{meta['eval_split']}`{carved} ({meta.get('eval_rows')} rows)")
    if meta.get("eval_set"):
        lines.append(f"- evaluation set `{meta['eval_set'].get('id')}` ({meta['eval_set'].get('rows')} rows)")
    if meta.get("kept_apart"):
        lines.append(f"- every carve keeps {meta['kept_apart']} apart (no group on both sides)")
    for note in meta.get("notes") or []:
        lines.append(f"- {note}")
    if best is None:
        return "\n".join(lines + ["", "No result rows were written.", ""])
    rule = selection_rule(stats)
    lines.append(_how_chosen(meta, rule))
    with_val = any(s.has_validation for s in stats)
    with_c = any("C" in s.first.hyperparameters for s in stats)
    table = []
    for s in stats:
        cells = list(s.key)
        if with_c:
            cs = s.first.hyperparameters.get("C")
            cells.append("" if cs is None else f"{float(cs):g}")
        if with_val:
            cells += ["" if s.val_accuracy_mean is None else f"{s.val_accuracy_mean:.4f}",
                      "" if s.val_f1_mean is None else pm(s.val_f1_mean, s.val_f1_std or 0.0, s.n)]
        cells += [pm(s.accuracy_mean, s.accuracy_std, s.n), pm(s.f1_mean, s.f1_std, s.n), str(s.n), f"{s.train_seconds:.1f}"]
        if s is best:
            cells = [f"**{c}**" if c else c for c in cells] + [f"← best ({rule})"]
        else:
            cells.append("")
        table.append(cells)
    several = any(s.n > 1 for s in stats)
    lines += ["", "## Configs" + (" (mean ± std over seeds/folds)" if several else ""), ""]
    header = ["layers", "combine", "pooling", "head"] + (["C"] if with_c else [])
    header += (["val accuracy", "val macro-F1"] if with_val else []) + ["test accuracy", "test macro-F1", "runs", "train s", ""]
    lines += md_table(header, table)
    first = best.first
    lines += ["", f"## Best config: {' / '.join(best.key)} (seed {first.seed}"
              + (f", fold {first.fold})" if first.fold is not None else ")"), ""]
    if best.has_validation:
        lines += [f"Validation macro-F1 {pm(best.val_f1_mean or 0.0, best.val_f1_std or 0.0, best.n)}, test macro-F1 "
                  f"{pm(best.f1_mean, best.f1_std, best.n)} (accuracy: validation {best.val_accuracy_mean:.4f}, "
                  f"test {best.accuracy_mean:.4f}). Per class on the evaluation split:", ""]
    names = [n for n in label_names if n in first.per_class] or list(first.per_class)
    lines += md_table(["label", "precision", "recall", "F1", "support"],
                      [[n, *(f"{first.per_class[n][k]:.4f}" for k in ("precision", "recall", "f1")),
                        str(first.per_class[n]["support"])] for n in names])
    if first.confusion:
        cm_names = names_for(first.confusion, label_names)
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
        lines += md_table(["true \\ predicted", *cm_names], [[n, *map(str, r)] for n, r in zip(cm_names, first.confusion)])
    lines += ["", "## Plots", ""] + [f"- [{f}]({f})" for f in files]
    lines += [f"- {f}: skipped ({skip_reason[f]})" for f in skipped]
    return "\n".join(lines) + "\n"
