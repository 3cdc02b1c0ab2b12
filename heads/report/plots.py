"""PNG plots of a run and of a report (matplotlib's Agg renderer, no pyplot, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from heads.report.table import ConfigStats

DATA_PLOT = "data.png"


def profile_entry(counts: Any, lengths: Any, unit: str, augmented: Any = None) -> dict[str, Any]:
    """One split of a run's data profile (run.json ``data``): rows, class counts (and augmented copies per class),
    the length ``unit`` and a 20-bin histogram of the lengths."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    hist, edges = np.histogram(lengths, bins=20) if len(lengths) else (np.zeros(0), np.zeros(0))
    out: dict[str, Any] = {
        "rows": int(np.sum(counts)),
        "class_counts": [int(c) for c in counts],
        "length_unit": unit,
        "length_mean": float(lengths.mean()) if len(lengths) else None,
        "length_max": float(lengths.max()) if len(lengths) else None,
        "length_histogram": {"counts": hist.astype(int).tolist(), "edges": [float(e) for e in edges]},
    }
    if augmented is not None:
        out["augmented_counts"] = [int(c) for c in augmented]
    return out


def plot_data(path: Path, profile: dict[str, dict[str, Any]], label_names: list[str]) -> bool:
    """data.png: per split, its class counts (augmented copies stacked on the originals) and the histogram of its
    row lengths (tokens or seconds), from a data profile (:func:`profile_entry` per split)."""
    if not profile:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(profile), 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, len(profile), squeeze=False)
    for j, (split, entry) in enumerate(profile.items()):
        counts = entry["class_counts"]
        names = list(label_names) if len(label_names) == len(counts) else [str(i) for i in range(len(counts))]
        aug = entry.get("augmented_counts") or [0] * len(counts)
        original = [c - a for c, a in zip(counts, aug)]
        ax = grid[0][j]
        ax.bar(range(len(counts)), original, color="tab:blue", label="original")
        if any(aug):
            ax.bar(range(len(counts)), aug, bottom=original, color="tab:orange", label="augmented copies")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(counts)), names, rotation=45, ha="right", fontsize=8)
        ax.set(title=f"{split}: {entry['rows']} rows", ylabel="rows")
        hist = entry["length_histogram"]
        ax = grid[1][j]
        if hist["counts"]:
            edges = hist["edges"]
            ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
        ax.set(xlabel=entry["length_unit"], ylabel="rows", title=f"{split}: length ({entry['length_unit']})")
    fig.savefig(path, dpi=100)
    return True


def names_for(confusion: list[list[int]], label_names: list[str]) -> list[str]:
    return list(label_names) if len(label_names) == len(confusion) else [str(i) for i in range(len(confusion))]


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    # A bare Figure on an Agg canvas: no pyplot, no global backend switch, safe in threads and notebooks.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_per_layer(path: Path, stats: list[ConfigStats], best: ConfigStats | None, label_names: list[str]) -> bool:
    singles = [s for s in stats if s.is_single]
    if not singles:
        return False
    fig, (ax,) = new_figure(7, 4.2)
    lines: dict[tuple[str, str], list[ConfigStats]] = {}
    for s in singles:
        lines.setdefault((s.key[2], s.key[3]), []).append(s)
    several_heads = len({head for _, head in lines}) > 1
    banded = any(s.has_interval for s in singles)
    controlled = any(s.control_f1_mean is not None for s in singles)
    for (pooling, head), group in lines.items():
        xs = [int(s.key[0]) for s in group]
        name = f"{pooling} / {head}" if several_heads else pooling
        drawn = ax.errorbar(
            xs, [s.f1_mean for s in group], yerr=[s.f1_std for s in group], marker="o", capsize=3, label=name
        )
        color = drawn.lines[0].get_color()
        if banded:  # the 95% bootstrap interval of each layer's score
            inside = [s for s in group if s.has_interval]
            ax.fill_between(
                [int(s.key[0]) for s in inside],
                [float(s.f1_lo or 0.0) for s in inside],
                [float(s.f1_hi or 0.0) for s in inside],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        if controlled:  # the same configuration on the control store, under the real curve
            ctrl = [s for s in group if s.control_f1_mean is not None]
            ax.plot(
                [int(s.key[0]) for s in ctrl],
                [float(s.control_f1_mean or 0.0) for s in ctrl],
                linestyle="--",
                marker="x",
                color=color,
                alpha=0.7,
                label=f"{name}: control",
            )
    ax.set_xticks(sorted({int(s.key[0]) for s in singles}))
    ylabel = "macro-F1 (mean ± std" + (", band: 95% CI" if banded else "") + ")"
    ax.set(
        xlabel="layer",
        ylabel=ylabel,
        title="Macro-F1 per single layer" + (" (dashed: control store)" if controlled else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend(title="pooling / head" if several_heads else "pooling")
    fig.savefig(path, dpi=120)
    return True


def plot_curves(path: Path, stats: list[ConfigStats], best: ConfigStats | None, label_names: list[str]) -> bool:
    """Training loss and validation macro-F1 per epoch of the best config; for an L-BFGS probe (history per C
    of the grid) its validation curve: macro-F1 and training loss against C, the chosen C marked."""
    history = best.first.history if best else []
    if not best or not history:
        return False
    steps = best.first.extra.get("step_evaluations") or []  # fine-tunes with --eval-steps: a third panel
    fig, axes = new_figure(15 if steps else 10, 4, ncols=3 if steps else 2)
    ax_loss, ax_f1 = axes[0], axes[1]
    if all("C" in h for h in history):
        import math

        # log10(C) on a linear axis with C as tick labels: matplotlib's log scale costs more than the rest of the plot
        def value(h: dict[str, Any], key: str) -> float:  # a C past the end of the path has none
            v = h.get(key)
            return float("nan") if v is None else float(v)

        xs = [math.log10(float(h["C"])) for h in history]
        ax_loss.plot(xs, [value(h, "train_loss") for h in history], marker="o")
        ax_loss.set(xlabel="C (inverse L2 strength)", ylabel="training loss", title="Training loss per C")
        ax_f1.plot(xs, [value(h, "val_f1_macro") for h in history], marker="o", color="tab:green")
        ax_f1.set(xlabel="C (inverse L2 strength)", ylabel="validation macro-F1", title="Validation macro-F1 per C")
        chosen = best.first.hyperparameters.get("C")
        if chosen is not None:
            ax_f1.axvline(math.log10(float(chosen)), color="gray", linestyle="--", label=f"chosen C {float(chosen):g}")
            ax_f1.legend()
        for ax in (ax_loss, ax_f1):
            ax.set_xticks(xs, [f"{float(h['C']):g}" for h in history])
            ax.grid(alpha=0.3)
    else:
        _epoch_curves(ax_loss, ax_f1, history, best.first.best_epoch)
    if steps:
        ax_steps = axes[2]
        xs = [e["step"] for e in steps]
        ax_steps.plot(xs, [_num(e.get("val_accuracy")) for e in steps], marker=".", label="val accuracy")
        ax_steps.plot(xs, [_num(e.get("val_loss")) for e in steps], marker=".", label="val loss")
        ax_steps.set(xlabel="optimizer step", title="Validation every --eval-steps steps")
        ax_steps.grid(alpha=0.3)
        ax_steps.legend()
    fig.suptitle(f"{' / '.join(best.key)} (seed {best.first.seed})")
    fig.savefig(path, dpi=120)
    return True


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _epoch_curves(ax_loss: Any, ax_f1: Any, history: list[dict[str, Any]], best_epoch: int | None) -> None:
    """Loss (training, and validation where recorded) and validation scores (with the training accuracy where
    recorded: fine-tunes) per epoch, the kept epoch marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    ax_loss.plot(epochs, [_num(h.get("train_loss")) for h in history], marker="o", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [_num(h.get("val_loss")) for h in history], marker="o", label="val loss")
        ax_loss.legend()
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    if any(h.get("train_accuracy") is not None for h in history):
        ax_f1.plot(epochs, [_num(h.get("train_accuracy")) for h in history], marker="o", label="train accuracy")
    if any(h.get("val_accuracy") is not None for h in history):
        ax_f1.plot(epochs, [_num(h.get("val_accuracy")) for h in history], marker="o", label="val accuracy")
    ax_f1.plot(
        epochs, [_num(h.get("val_f1_macro")) for h in history], marker="o", color="tab:green", label="val macro-F1"
    )
    ax_f1.set(xlabel="epoch", ylabel="score", title="Accuracy and validation macro-F1")
    if best_epoch is not None:
        ax_f1.axvline(best_epoch, color="gray", linestyle="--", label=f"kept epoch {best_epoch}")
    ax_f1.legend()
    for ax in (ax_loss, ax_f1):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_confusion(path: Path, stats: list[ConfigStats], best: ConfigStats | None, label_names: list[str]) -> bool:
    if best is None or not best.first.confusion:
        return False
    import numpy as np

    cm = np.asarray(best.first.confusion)
    names = names_for(best.first.confusion, label_names)
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig, (ax,) = new_figure(size + 1, size)
    ax.imshow(cm, cmap="Blues")  # counts are written in the cells, so no colour bar
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    threshold = cm.max() / 2 if cm.size else 0
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion: {' / '.join(best.key)} (seed {best.first.seed})")
    fig.savefig(path, dpi=120)
    return True


def plot_report(path: Path, entries: list[tuple[str, str, ConfigStats]]) -> None:
    fig, (ax,) = new_figure(9, max(2.5, 0.35 * len(entries) + 1.2))
    labels = [f"{run}: {s.key[3]} {s.key[0]} {s.key[1]} {s.key[2]}" for run, _, s in entries][::-1]
    means, stds = [s.f1_mean for _, _, s in entries][::-1], [s.f1_std for _, _, s in entries][::-1]
    colors = ["tab:blue"] * (len(entries) - 1) + ["tab:orange"]  # the best (drawn last = top) stands out
    ax.barh(range(len(entries)), means, xerr=stds, color=colors, capsize=2)
    ax.set_yticks(range(len(entries)), labels, fontsize=8)
    ax.set(xlabel="evaluation macro-F1 (mean ± std)", title="Macro-F1 per config, best (as the report ranks) on top")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)


def plot_selectivity(path: Path, stats: list[ConfigStats], best: ConfigStats | None, label_names: list[str]) -> bool:
    """Accuracy and selectivity (accuracy - control-task accuracy) per single layer, each with its 95% band, beside
    each other (``--control-task``)."""
    singles = [s for s in stats if s.is_single and s.has_selectivity]
    if not singles:
        return False
    fig, (ax_acc, ax_sel) = new_figure(11, 4.2, ncols=2)
    lines: dict[tuple[str, str], list[ConfigStats]] = {}
    for s in singles:
        lines.setdefault((s.key[2], s.key[3]), []).append(s)
    for (pooling, head), group in lines.items():
        xs = [int(s.key[0]) for s in group]
        name = f"{pooling} / {head}"
        drawn = ax_acc.plot(xs, [s.accuracy_mean for s in group], marker="o", label=name)
        color = drawn[0].get_color()
        ax_acc.plot(
            xs,
            [float(s.control_task_accuracy_mean or 0.0) for s in group],
            linestyle="--",
            marker="x",
            color=color,
            alpha=0.7,
            label=f"{name}: control task",
        )
        ax_sel.plot(xs, [float(s.selectivity_mean or 0.0) for s in group], marker="o", color=color, label=name)
        for ax, lo, hi in (
            (ax_acc, [s.accuracy_lo for s in group], [s.accuracy_hi for s in group]),
            (ax_sel, [s.selectivity_lo for s in group], [s.selectivity_hi for s in group]),
        ):
            if all(v is not None for v in lo + hi):
                ax.fill_between(
                    xs,
                    [float(v or 0.0) for v in lo],
                    [float(v or 0.0) for v in hi],
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
    ticks = sorted({int(s.key[0]) for s in singles})
    ax_acc.set(xlabel="layer", ylabel="accuracy (band: 95% CI)", title="Accuracy per layer (dashed: control task)")
    ax_sel.set(xlabel="layer", ylabel="selectivity (band: 95% CI)", title="Selectivity = accuracy - control accuracy")
    ax_sel.axhline(0.0, color="gray", linewidth=0.8)
    for ax in (ax_acc, ax_sel):
        ax.set_xticks(ticks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return True
