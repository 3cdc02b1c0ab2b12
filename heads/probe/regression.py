"""``heads sweep --task regression``: ridge probes of a numeric target on every layer, the penalty grid solved in one
pass (:mod:`heads.probe.ridge`), the penalty chosen on validation, scored by R² and mean squared error with
bootstrap intervals and compared with the best by a paired bootstrap of the squared-error difference
(:mod:`heads.report.scored`).

Targets:

* sentence level (``--task regression``, no ``--label``): the store's labels read as numbers (a numeric
  ``--label-col`` at extraction: every label value must parse as a number);
* word level: ``--label depth`` (each word's depth in its dependency tree, the root 0), or any word label whose
  values are all numbers (``--task regression --label NAME``, or ``--task word --label depth``);
* word pairs: ``--task edge --label distance``: the path length between every two words of a sentence in its tree
  (Hewitt & Manning 2019's structural probe target), features ``[h_i, h_j, h_i * h_j]``.

Words no token reached (``cut``) are left out, and so are the pairs that hold one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.data.words import tree_depths, tree_distances
from embstore.errors import ConfigError, DataError
from embstore.store.reader import Store, open_store
from heads.probe.ridge import fit_ridge_path
from heads.probe.scored_setup import StateCache, combos_for, split_roles_of, validation_rows
from heads.probe.word import ID_STRIDE
from heads.report import rundir
from heads.report.scored import ScoredRun, write_scored_run

__all__ = ["RegressionExamples", "regression_examples", "run_regression"]


@dataclass
class RegressionExamples:
    """The examples of one split."""

    first: np.ndarray
    """(n,) the row (sentence level) or word whose states an example reads."""
    second: np.ndarray | None
    """(n,) the second word of a pair example, else None."""
    y: np.ndarray
    """(n,) float64 targets."""
    groups: np.ndarray | None
    """(n,) sentences (no carve cuts through one), or None."""
    ids: np.ndarray
    """(n,) int64 unique example ids (source rows, or sentence row * 65536 + word position)."""
    more_ids: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


def _numeric(values: list[str], what: str, path: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise ConfigError(
            f"--task regression needs a numeric target, and {what} of {path} has the value {bad!r}; extract a "
            "numeric label column, or use --label depth (or --task edge --label distance) on word-level data."
        ) from None


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def target_level(task: str, label: str | None) -> str:
    """'sentence', 'word' or 'pair'."""
    if task == "edge":
        if label != "distance":
            raise ConfigError(f"--task edge with a regression target takes --label distance; got {label!r}.")
        return "pair"
    return "sentence" if label is None else "word"


def regression_examples(store: Store, split: str, level: str, label: str | None) -> RegressionExamples:
    """The examples of ``split`` at ``level`` ('sentence', 'word', 'pair') with their targets."""
    if level == "sentence":
        if store.label_names is None:
            raise DataError(f"{store.path} was extracted without labels; re-extract with --label-col COLUMN.")
        values = _numeric(store.label_names, "the labels", store.path)
        y = values[store.labels(split)]
        keep = ~store.augmented(split)
        g = store.groups(split)
        ids = store.row_ids(split)
        return RegressionExamples(
            np.flatnonzero(keep), None, y[keep], None if g is None else g[keep], ids[keep], {"row": ids[keep]}
        )
    if not store.word_poolings:
        raise ConfigError(
            f"A word-level target needs word states, and {store.path} has none; extract word-level data (a CoNLL-U "
            "file, or a table with a 'tokens' list column) with embstore extract --word-pooling first."
        )
    cut = store.word_cut(split)
    sentence = store.row_ids(split)[store.word_sentence(split)].astype(np.int64)
    position = store.word_position(split)
    offsets = store.word_offsets(split)
    if level == "word":
        if label == "depth":
            y = tree_depths(_heads(store, split), offsets).astype(np.float64)
        else:
            names = store.word_label_names
            if label not in names:
                raise ConfigError(
                    f"--label {label!r} is not a word label of {store.path}; its word labels are "
                    f"{', '.join(names) or 'none'}, and depth (from the heads)."
                )
            y = _numeric(names[label], f"word label {label!r}", store.path)[store.word_labels(split, label)]
        keep = np.flatnonzero(~cut & (y >= 0))
        return RegressionExamples(
            keep,
            None,
            y[keep],
            sentence[keep],
            sentence[keep] * ID_STRIDE + position[keep],
            {"sentence_id": sentence[keep], "word_id": position[keep]},
        )
    heads = _heads(store, split)
    firsts, seconds, ys = [], [], []
    for s in range(len(offsets) - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        if hi - lo < 2:
            continue
        dist = tree_distances(heads[lo:hi])
        i, j = np.triu_indices(hi - lo, k=1)
        ok = ~cut[lo + i] & ~cut[lo + j] & (dist[i, j] >= 0)
        firsts.append(lo + i[ok])
        seconds.append(lo + j[ok])
        ys.append(dist[i[ok], j[ok]])
    first = np.concatenate(firsts).astype(np.int64) if firsts else np.zeros(0, np.int64)
    second = np.concatenate(seconds).astype(np.int64) if seconds else np.zeros(0, np.int64)
    pair_id = sentence[first] * ID_STRIDE * ID_STRIDE + position[first] * ID_STRIDE + position[second]
    return RegressionExamples(
        first,
        second,
        (np.concatenate(ys) if ys else np.zeros(0)).astype(np.float64),
        sentence[first],
        pair_id,
        {"sentence_id": sentence[first], "word_id": position[first], "head_id": position[second]},
    )


def _heads(store: Store, split: str) -> np.ndarray:
    if not store.has_word_heads:
        raise ConfigError(
            f"Tree depth and distance come from dependency heads, and {store.path} stores none; extract a CoNLL-U "
            "file or a word table with a 'head' column."
        )
    return store.word_heads(split)


def run_regression(config: Any, path: str) -> tuple[Path, dict[str, Any], int]:
    """Train and score every ridge configuration of ``config`` (a :class:`heads.probe.sweep.SweepConfig`); (run
    directory, the best configuration, rows written)."""
    from embstore import __version__

    t0 = time.perf_counter()
    if config.folds:
        raise ConfigError("--task regression scores the evaluation split; --folds is not supported for it yet.")
    store = open_store(path, verify=config.verify)
    level = target_level(config.task, config.label)
    examples = {s: regression_examples(store, s, level, config.label) for s in store.splits}
    roles = split_roles_of(
        store.splits,
        {s: len(e) for s, e in examples.items()},
        config.train_split,
        config.eval_split,
        config.holdout,
        config.head.seed,
        {s: e.groups for s, e in examples.items()},
        {s: e.ids for s, e in examples.items()},
        path,
    )
    poolings = config.pooling or tuple(store.poolings if level == "sentence" else store.word_poolings)
    stored = store.poolings if level == "sentence" else store.word_poolings
    missing = [p for p in poolings if p not in stored]
    if missing:
        raise ConfigError(f"Pooling {','.join(missing)} is not in {path}; it stores {', '.join(stored)}.")
    combos = combos_for(config.layers, config.combine, poolings, store.layers, "ridge")
    cache = StateCache(store, level)
    tr, ev = examples[roles.train_split], examples[roles.eval_split]
    alphas = tuple(config.alphas)
    runs: list[ScoredRun] = []
    for seed in range(config.seeds):
        fit, val = validation_rows(roles.train_rows, config.head.validation_fraction, seed, tr.groups, tr.ids)
        for combo in combos:
            c0 = time.perf_counter()
            d = cache.width(combo)

            def blocks(rows: np.ndarray = fit) -> Any:
                second = None if tr.second is None else tr.second[rows]
                feats = cache.blocks(combo, roles.train_split, tr.first[rows], second)
                start = 0
                for X in feats:
                    yield X, tr.y[rows][start : start + len(X)]
                    start += len(X)

            ridge = fit_ridge_path(blocks, d, alphas, standardize=config.head.standardize)
            val_pred = np.concatenate(
                [
                    ridge.predict(X)
                    for X in cache.blocks(
                        combo, roles.train_split, tr.first[val], None if tr.second is None else tr.second[val]
                    )
                ]
            )  # (n_val, A)
            val_mse = ((val_pred - tr.y[val][:, None]) ** 2).mean(0)
            k = int(np.argmin(val_mse))  # ties: the smaller penalty (earlier in the grid)
            sst = float(((tr.y[val] - tr.y[val].mean()) ** 2).mean()) or 1e-300
            rows = roles.eval_rows
            pred = np.concatenate(
                [
                    ridge.predict(X, k)
                    for X in cache.blocks(
                        combo, roles.eval_split, ev.first[rows], None if ev.second is None else ev.second[rows]
                    )
                ]
            )
            runs.append(
                ScoredRun(
                    key=combo.key,
                    seed=seed,
                    rows=rows,
                    y=ev.y[rows],
                    pred=pred,
                    val_score=1.0 - float(val_mse[k]) / sst,
                    val_mse=float(val_mse[k]),
                    hyper={"alpha": float(alphas[k])},
                    seconds=time.perf_counter() - c0,
                    params=d + 1,
                    history=[
                        {"alpha": float(a), "val_mse": float(m), "val_r2": 1.0 - float(m) / sst}
                        for a, m in zip(alphas, val_mse)
                    ],
                    ids={k2: v[rows] for k2, v in ev.more_ids.items()},
                )
            )
    definition = {
        "sentence": "the store's labels read as numbers, one example per row",
        "word": (
            "the depth of each word in its dependency tree (the root 0)"
            if config.label == "depth"
            else f"word label {config.label} read as a number"
        )
        + ", one example per word",
        "pair": "the tree distance (path length) between every two words of a sentence, one example per pair; "
        "features [h_i, h_j, h_i * h_j]",
    }[level]
    cut = sum(int(store.word_cut(s).sum()) for s in store.splits) if level != "sentence" else 0
    meta = {
        "kind": "sweep",
        "store": path,
        "store_fingerprint": store.fingerprint,
        "model": store.provenance.model_name,
        "config": config.to_dict(),
        "task": {
            "task": config.task,
            "label": config.label,
            "level": level,
            "definition": definition,
            "word_pooling": list(poolings) if level != "sentence" else None,
            "probe": "ridge regression on standardised features (scikit-learn's Ridge objective), the penalty grid "
            f"{', '.join(f'{a:g}' for a in alphas)} solved in one pass and chosen on validation mean squared error",
            "control_task": None,
        },
        "train_split": roles.train_split,
        "eval_split": roles.eval_split,
        "train_rows": int(len(roles.train_rows)),
        "eval_rows": int(len(roles.eval_rows)),
        "validation": f"a seeded {config.head.validation_fraction:g} carve of the training "
        + ("rows" if level == "sentence" else "sentences (each whole on one side)"),
        "notes": [f"{cut} words no token reached were left out"] if cut else [],
        "embstore": __version__,
    }
    run_dir = rundir.run_dir(config.out, f"sweep-{Path(path).stem[:40]}")
    t_train = time.perf_counter() - t0
    rows_out, best, _tied = write_scored_run(run_dir, meta, "regression", runs, seed=config.head.seed, ci=config.ci)
    import json

    from heads.report.rundir import RUN_FILE

    written = json.loads((run_dir / RUN_FILE).read_text())
    written["timings"] = {"train_s": round(t_train, 4), "total_s": round(time.perf_counter() - t0, 4)}
    (run_dir / RUN_FILE).write_text(json.dumps(written, indent=2, default=str) + "\n")
    b = next(r for r in rows_out if r.key == best)
    return (
        run_dir,
        {
            "layers": best[0],
            "combine": best[1],
            "pooling": best[2],
            "head": best[3],
            "metric": "R²",
            "value": b.value,
            "value_lo": b.value_lo,
            "value_hi": b.value_hi,
            "val_value": b.val_value,
        },
        len(rows_out),
    )
