"""The heads run directory: the only module that knows its files.

Layout of one run (``heads sweep``, ``heads train``, ``heads finetune`` all write it)::

    run.json          meta: store path and fingerprint, model, label_names, command/config, created, version
    results.jsonl     one ResultRow per line, appended and flushed as each config x seed finishes
    results.csv       the same rows, flat (hyperparameters as hp_<name> columns)
    summary.md        per-config mean ± std table, best config, its per-class table and confusion matrix
    *.png             metric_per_layer.png, learning_curves.png, confusion_best.png

``heads report`` reads several runs back with :func:`read_run` and merges them with :func:`write_report`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embstore._version import __version__
from embstore.errors import DataError, DataFileNotFoundError, OutputNotWritableError
from heads.metrics import mean_std
from heads.plots import names_for, plot_confusion, plot_curves, plot_per_layer, plot_report

__all__ = ["ResultRow", "ConfigStats", "RunWriter", "aggregate", "best_config", "read_run", "write_report"]

RUN_FILE, ROWS_FILE, CSV_FILE, SUMMARY_FILE = "run.json", "results.jsonl", "results.csv", "summary.md"
PLOT_PER_LAYER, PLOT_CURVES, PLOT_CONFUSION = "metric_per_layer.png", "learning_curves.png", "confusion_best.png"
RUN_FORMAT_VERSION = 1
CSV_COLUMNS = ["layers", "combine", "pooling", "head", "seed", "fold", "accuracy", "f1_macro", "train_seconds",
               "best_epoch", "trainable_params", "seconds_per_epoch", "store_id"]

ConfigKey = tuple[str, str, str, str]


@dataclass(frozen=True)
class ResultRow:
    """One trained head: one config x seed (x fold), scored on the evaluation split."""

    layers: str
    """Layer spec as written by the user: ``9-12``, ``12`` or ``3,6``."""
    combine: str
    """How the layers were combined: single, concat, sum, mean, mix, tokens, pair, finetune..."""
    pooling: str
    head: str
    seed: int
    accuracy: float
    f1_macro: float
    train_seconds: float
    hyperparameters: dict[str, Any]
    per_class: dict[str, dict[str, float]]
    """{label: {precision, recall, f1, support}}."""
    confusion: list[list[int]]
    """Rows: true label index, columns: predicted."""
    store_id: str
    """Fingerprint of the store the features came from."""
    fold: int | None = None
    best_epoch: int | None = None
    trainable_params: int | None = None
    seconds_per_epoch: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per epoch: epoch, train_loss, val_accuracy, val_f1_macro, lr."""
    mix_weights: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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
    """The first row written for this config: its per-class table, confusion and history are shown."""

    @property
    def is_single(self) -> bool:
        """True for one layer on its own (plotted per layer)."""
        return self.key[1] == "single" and _layer_index(self.key[0]) is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the first row)."""
        layers, combine, pooling, head = self.key
        return {"layers": layers, "combine": combine, "pooling": pooling, "head": head, "n": self.n,
                "accuracy_mean": self.accuracy_mean, "accuracy_std": self.accuracy_std,
                "f1_macro_mean": self.f1_mean, "f1_macro_std": self.f1_std, "train_seconds": self.train_seconds,
                "trainable_params": self.trainable_params, "seconds_per_epoch": self.seconds_per_epoch}


def _layer_index(layers: str) -> int | None:
    try:
        return int(layers)
    except ValueError:
        return None


def _rank(s: ConfigStats) -> tuple[float, float, float]:
    # Higher macro-F1, then higher accuracy, then fewer seconds.
    return (-s.f1_mean, -s.accuracy_mean, s.train_seconds)


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
        stats.append(ConfigStats(key, len(group), acc_m, acc_s, f1_m, f1_s, mean_std([r.train_seconds for r in group])[0],
                                 params, mean_std(spe)[0] if spe else None, group[0]))

    def order(s: ConfigStats) -> tuple[int, str, str, int, str, str]:
        layers, combine, pooling, head = s.key
        if s.is_single:
            return (0, pooling, head, _layer_index(layers) or 0, "", "")
        return (1, layers, combine, 0, pooling, head)

    return sorted(stats, key=order)


def best_config(stats: list[ConfigStats]) -> ConfigStats:
    """Highest mean macro-F1; ties: higher mean accuracy, then fewer train seconds."""
    if not stats:
        raise DataError("No result rows to choose a best config from; train at least one head first.")
    return min(stats, key=_rank)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def _opt(value: float | int | None, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


class RunWriter:
    """Writes one run directory: ``run.json`` now, ``results.jsonl`` row by row, the rest in :meth:`finish`."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], *, resume: bool = False) -> None:
        """``meta``: store path/fingerprint, model, label_names, command/config. ``resume`` keeps rows already written."""
        self.run_dir = Path(run_dir)
        self.meta = {"name": self.run_dir.name, "format_version": RUN_FORMAT_VERSION, "tool_version": __version__,
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta}
        self.rows: list[ResultRow] = []
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume and (self.run_dir / ROWS_FILE).exists():
                self.rows = read_run(self.run_dir)[1]
            (self.run_dir / RUN_FILE).write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
            self._jsonl = open(self.run_dir / ROWS_FILE, "a" if resume else "w", encoding="utf-8")
        except OSError as exc:
            raise OutputNotWritableError(
                f"Cannot write the run directory {self.run_dir} ({exc.strerror or exc}); choose a writable --out."
            ) from None

    def add(self, row: ResultRow) -> None:
        """Append one row to results.jsonl and flush, so a crashed sweep keeps every finished row."""
        self._jsonl.write(json.dumps(row.to_dict(), default=str) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self.rows.append(row)

    def finish(self, label_names: list[str], best_key: ConfigKey | None = None) -> dict[str, Any]:
        """Write results.csv, summary.md and the plots; return the summary (configs, best, files, skipped plots).

        ``best_key`` overrides the best config (default: highest mean macro-F1, see :func:`best_config`).
        """
        self._jsonl.close()
        _write_csv(self.run_dir / CSV_FILE, self.rows)
        stats = aggregate(self.rows)
        best = None
        if stats:
            best = next((s for s in stats if s.key == tuple(best_key)), None) if best_key else best_config(stats)
            if best is None:
                raise DataError(f"best_key {best_key} matches no config of this run; pass one of {[s.key for s in stats]}.")
        files, skipped = [], []
        for name, draw in ((PLOT_PER_LAYER, plot_per_layer), (PLOT_CURVES, plot_curves),
                           (PLOT_CONFUSION, plot_confusion)):
            if draw(self.run_dir / name, stats, best, label_names):
                files.append(name)
            else:
                skipped.append(name)
        (self.run_dir / SUMMARY_FILE).write_text(_summary_md(self.meta, stats, best, label_names, files, skipped))
        return {"run_dir": str(self.run_dir), "n_rows": len(self.rows), "configs": [s.to_dict() for s in stats],
                "best": best.to_dict() if best else None, "plots": files, "skipped_plots": skipped}


def _write_csv(path: Path, rows: list[ResultRow]) -> None:
    hp_names = sorted({name for r in rows for name in r.hyperparameters})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS + [f"hp_{n}" for n in hp_names])
        for r in rows:
            base = [_opt(getattr(r, c)) for c in CSV_COLUMNS]
            hps = [_csv_value(r.hyperparameters.get(n)) for n in hp_names]
            writer.writerow(base + hps)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _summary_md(meta: dict[str, Any], stats: list[ConfigStats], best: ConfigStats | None, label_names: list[str],
                files: list[str], skipped: list[str]) -> str:
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
    if meta.get("kept_apart"):
        lines.append(f"- every carve keeps {meta['kept_apart']} apart (no group on both sides)")
    if best is None:
        return "\n".join(lines + ["", "No result rows were written.", ""])
    table = []
    for s in stats:
        cells = [*s.key, _pm(s.accuracy_mean, s.accuracy_std), _pm(s.f1_mean, s.f1_std), str(s.n), f"{s.train_seconds:.1f}"]
        if s is best:
            cells = [f"**{c}**" for c in cells] + ["← best"]
        else:
            cells.append("")
        table.append(cells)
    lines += ["", "## Configs (mean ± std over seeds/folds)", ""]
    lines += _md_table(["layers", "combine", "pooling", "head", "accuracy", "macro-F1", "runs", "train s", ""], table)
    first = best.first
    lines += ["", f"## Best config: {' / '.join(best.key)} (seed {first.seed}"
              + (f", fold {first.fold})" if first.fold is not None else ")"), ""]
    names = [n for n in label_names if n in first.per_class] or list(first.per_class)
    lines += _md_table(["label", "precision", "recall", "F1", "support"],
                       [[n, *(f"{first.per_class[n][k]:.4f}" for k in ("precision", "recall", "f1")),
                         str(first.per_class[n]["support"])] for n in names])
    if first.confusion:
        cm_names = names_for(first.confusion, label_names)
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
        lines += _md_table(["true \\ predicted", *cm_names], [[n, *map(str, r)] for n, r in zip(cm_names, first.confusion)])
    lines += ["", "## Plots", ""] + [f"- [{f}]({f})" for f in files]
    lines += [f"- {f}: skipped ({_SKIP_REASON[f]})" for f in skipped]
    return "\n".join(lines) + "\n"


_SKIP_REASON = {PLOT_PER_LAYER: "no single-layer configs", PLOT_CURVES: "the best config has no per-epoch history",
                PLOT_CONFUSION: "no best config or no confusion matrix"}


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[ResultRow]]:
    """(meta, rows) of a run directory written by :class:`RunWriter`.

    A truncated last line (the process died mid-write) is skipped; any other bad line raises.
    """
    run_dir = Path(run_dir)
    hint = "pass a directory written by heads sweep/train/finetune"
    if not run_dir.is_dir():
        raise DataFileNotFoundError(f"Run directory {run_dir} does not exist; {hint}.")
    for name in (ROWS_FILE, RUN_FILE):
        if not (run_dir / name).is_file():
            raise DataFileNotFoundError(f"{run_dir} is not a heads run directory (no {name}); {hint}.")
    try:
        meta = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{run_dir / RUN_FILE} is not valid JSON ({exc.msg}); rerun the command that wrote {run_dir}.") from None
    lines = (run_dir / ROWS_FILE).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(ResultRow.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if i == len(lines) - 1:
                continue  # the last row was being written when the process stopped
            raise DataError(f"{run_dir / ROWS_FILE} line {i + 1} is not a result row ({exc}); "
                            f"delete that line or rerun the command that wrote {run_dir}.") from None
    return meta, rows


REPORT_COLUMNS = ["run", "store_id", "layers", "combine", "pooling", "head", "n", "accuracy_mean", "accuracy_std",
                  "f1_macro_mean", "f1_macro_std", "trainable_params", "seconds_per_epoch", "train_seconds"]


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Merge run directories into ``out/report.md``, ``report.csv`` and ``report.png``; return the report.md path.

    One line per (run, config), sorted by mean macro-F1 descending (ties: accuracy, then fewer seconds).
    Runs on different stores may be merged; the store of each run is listed.
    """
    entries: list[tuple[str, str, ConfigStats]] = []
    stores: dict[str, str] = {}
    for run_dir in run_dirs:
        meta, rows = read_run(Path(run_dir))
        name = Path(run_dir).resolve().name
        while name in stores:
            name += "'"  # two runs with the same folder name stay distinguishable
        ids = sorted({r.store_id for r in rows if r.store_id}) or [str(meta.get("store_fingerprint", "?"))]
        if meta.get("kind") == "finetune":  # fine-tunes read no store: name the model they started from
            model = meta.get("model")
            ids = [f"fine-tuned from {model.get('name') if isinstance(model, dict) else model}"]
        stores[name] = ", ".join(ids)
        entries += [(name, stores[name], s) for s in aggregate(rows)]
    if not entries:
        raise DataError(f"The runs {', '.join(map(str, run_dirs))} hold no result rows; pass runs that finished at least one head.")
    entries.sort(key=lambda e: _rank(e[2]))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "report.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(REPORT_COLUMNS)
            for run, store, s in entries:
                d = s.to_dict()
                writer.writerow([run, store, *(_opt(d[c]) for c in REPORT_COLUMNS[2:])])
        table = []
        for i, (run, _, s) in enumerate(entries):
            cells = [run, *s.key, _pm(s.accuracy_mean, s.accuracy_std), _pm(s.f1_mean, s.f1_std), str(s.n),
                     _opt(s.trainable_params, "{:,}"), _opt(s.seconds_per_epoch, "{:.2f}"), f"{s.train_seconds:.1f}"]
            table.append([f"**{c}**" for c in cells] if i == 0 else cells)
        lines = ["# Heads report", "", f"{len(entries)} configs from {len(stores)} runs, best first.", ""]
        lines += _md_table(["run", "layers", "combine", "pooling", "head", "accuracy", "macro-F1", "runs",
                            "trainable params", "s / epoch", "train s"], table)
        lines += ["", "## Stores and models", ""] + [f"- {run}: `{store}`" for run, store in stores.items()]
        if len(set(stores.values())) > 1:
            lines.append("\nThe runs come from different stores: compare them only if the stores share their data split.")
        lines += ["", "![macro-F1 per config](report.png)", ""]
        (out / "report.md").write_text("\n".join(lines))
        plot_report(out / "report.png", entries)
    except OSError as exc:
        raise OutputNotWritableError(f"Cannot write the report under {out} ({exc.strerror or exc}); choose a writable --out.") from None
    return out / "report.md"
