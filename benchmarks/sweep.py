"""Linear-probe sweeps against scikit-learn, stacked MLP heads against one-at-a-time training, and the stream
path's memory, in one run, as ratios.

Peer: what a careful user runs, ``make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))`` fitted per
configuration on the same rows (our training rows: the training split minus the validation carve).
Configurations: every layer for cls and mean, plus concat of the last four (16 for MiniLM's 7 hidden states).
Data: MiniLM stores of ../shared/datasets/ag_news (train_pool -> test) and youtube_6class (holdout 0.2),
extracted into ``--cache`` when absent (content-addressed: a re-run reuses them).

1. training phase: our batched L-BFGS over the default C grid (C picked on validation) vs scikit-learn's fits at
   its default C = 1, summed over configurations. Target >= 10x. Also at one C (``--c-grid 1``) vs the same fits,
   and against scikit-learn over the whole grid (what choosing C costs it).
2. the whole ``heads sweep`` process (imports, store read, training, results, plots) vs a script that reads the
   same features and fits scikit-learn per configuration, both as fresh processes. Target >= 5x.
3. accuracy: every configuration within 0.3 points of scikit-learn at the same C (C = 1), and with the C picked on
   validation, mean accuracy at least scikit-learn's at its default.
4. MLP heads on every layer (mean pooling) x 3 seeds: one stacked training against the same heads trained one at
   a time (``HeadClassifier.fit``). Target >= 5x.
5. memory: a sweep of every single layer whose features are twice ``--max-memory`` streams row chunks; peak
   RSS (getrusage of the process) at most the budget + 0.5 GB.
6. (``--uncached-rows N``) one head trained from the store against the usual loop that runs the frozen backbone
   on every batch of every epoch.

Usage: python benchmarks/sweep.py [--quick] [--cache DIR] [--json out.json] [--datasets ag_news,youtube] [--uncached-rows 500]
``--quick`` uses 600 rows per split, a small MLP and few epochs: a check that everything runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DATASETS = {
    "ag_news": dict(splits=(("train", str(SHARED / "ag_news" / "train_pool.csv")), ("test", str(SHARED / "ag_news" / "test.csv"))),
                    data=None, label_col="label"),
    "youtube": dict(data=str(SHARED / "youtube_6class" / "youtube_6class_dedup.csv"), label_col="category", holdout=0.2),
}
SK_SCRIPT = r"""
import sys, time, json
import numpy as np
from embstore import open_store
from heads.protocol import validation_carve
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
store = open_store(sys.argv[1])
configs = json.loads(sys.argv[2])
y, y_test = store.labels("train"), store.labels("test")
fit, _ = validation_carve(y, 0.1, 0)
for layers, pooling in configs:
    X = store.pooled("train", pooling, layers).astype(np.float32)
    X_test = store.pooled("test", pooling, layers).astype(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X.reshape(len(X), -1)[fit], y[fit])
    clf.predict(X_test.reshape(len(X_test), -1))
"""


def ensure_store(name: str, cache: Path, limit: int | None) -> str:
    from embstore import ExtractConfig, extract

    spec = dict(DATASETS[name])
    cfg = ExtractConfig.from_dict(dict(model="minilm", layers="all", pooling=("cls", "mean"), limit=limit, out=str(cache), **spec))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    path = extract(cfg, show_progress=True).path
    print(f"store {name}: {path} ({time.perf_counter() - t0:.0f}s, extraction or re-use)", flush=True)
    return path


def configs(store: Any) -> list[tuple[list[int], str, str]]:
    """(layers, pooling, combine) of the 16 configurations."""
    out = [([x], p, "single") for p in ("cls", "mean") for x in store.layers]
    out += [(store.layers[-4:], p, "concat") for p in ("cls", "mean")]
    return out


def features(store: Any, split: str, layers: list[int], pooling: str) -> np.ndarray:
    X = store.pooled(split, pooling, layers).astype(np.float32)
    return X.reshape(len(X), -1)


def sklearn_fits(store: Any, cfgs: list[tuple[list[int], str, str]], fit: np.ndarray, Cs: list[float]) -> dict[tuple[Any, ...], dict[float, tuple[float, float]]]:
    """{(layers, pooling, combine): {C: (fit seconds, test accuracy)}} for make_pipeline(StandardScaler(), LR(C))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y, y_test = store.labels("train"), store.labels("test")
    out: dict[tuple[Any, ...], dict[float, tuple[float, float]]] = {}
    for layers, pooling, combine in cfgs:
        X, X_test = features(store, "train", layers, pooling), features(store, "test", layers, pooling)
        res = {}
        for C in Cs:
            t0 = time.perf_counter()
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X[fit], y[fit])
            seconds = time.perf_counter() - t0
            res[C] = (seconds, float(np.mean(clf.predict(X_test) == y_test)))
        out[(tuple(layers), pooling, combine)] = res
    return out


def our_sweep(store_path: str, out: Path, c_grid: str | None) -> pd.DataFrame:
    from heads.probe.config import HeadConfig
    from heads.probe.sweep import SweepConfig, run_sweep

    head = HeadConfig() if c_grid is None else HeadConfig(c_grid=tuple(float(c) for c in c_grid.split(",")))
    a = run_sweep(SweepConfig(store=store_path, layers="all", combine=("single",), out=str(out / "single"), head=head), show_progress=False)
    b = run_sweep(SweepConfig(store=store_path, layers="last4", combine=("concat",), out=str(out / "concat"), head=head), show_progress=False)
    return pd.concat([pd.read_csv(a.run_dir / "results.csv"), pd.read_csv(b.run_dir / "results.csv")], ignore_index=True)


def key_of(row: Any, store: Any) -> tuple[Any, ...]:
    layers = tuple(store.layers[-4:]) if row["combine"] == "concat" else (int(row.layers),)
    return (layers, row.pooling, row["combine"])


_WRAP = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
         "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); w = time.perf_counter() - t; "
         "print(json.dumps([p.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.stderr[-3000:]]))")


def timed_process(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of ``args`` run as a fresh process, measured by a wrapper process whose
    only child it is (getrusage of children reports the largest child's peak, in KiB on Linux)."""
    proc = subprocess.run([sys.executable, "-c", _WRAP, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    code, wall, peak_kib, err = json.loads(proc.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"{' '.join(args[:4])}... failed:\n{err}")
    return float(wall), int(peak_kib) * 1024


def linear_part(name: str, store_path: str, work: Path, report: dict[str, Any]) -> None:
    from embstore import open_store
    from heads.probe.config import HeadConfig
    from heads.protocol import validation_carve

    store = open_store(store_path)
    cfgs = configs(store)
    y = store.labels("train")
    fit, _ = validation_carve(y, HeadConfig().validation_fraction, 0)  # the rows our sweep fits on (seed 0)
    grid = list(HeadConfig().c_grid)
    print(f"\n== {name}: {len(cfgs)} linear configurations, {len(fit)} training rows, {store.n_rows('test')} test rows", flush=True)

    sk = sklearn_fits(store, cfgs, fit, grid)
    sk_default = sum(v[1.0][0] for v in sk.values())
    sk_grid = sum(s for v in sk.values() for s, _ in v.values())
    ours = our_sweep(store_path, work / f"{name}-grid", None)
    ours_c1 = our_sweep(store_path, work / f"{name}-c1", "1")
    t_grid, t_c1 = float(ours.train_seconds.sum()), float(ours_c1.train_seconds.sum())
    print(f"1. training phase: ours over the {len(grid)}-value C grid {t_grid:.2f}s vs scikit-learn at C=1 {sk_default:.2f}s "
          f"-> {sk_default / t_grid:.1f}x (target >= 10x)")
    print(f"   ours at one C (C=1) {t_c1:.2f}s vs scikit-learn at C=1 {sk_default:.2f}s -> {sk_default / t_c1:.1f}x; "
          f"scikit-learn over the same grid {sk_grid:.2f}s -> {sk_grid / t_grid:.1f}x")

    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    heads_cmd = [sys.executable, "-m", "cli.heads_cli", "sweep", "--store", store_path, "--layers", "all", "--combine",
                 "single", "--no-progress", "--out", str(work / f"{name}-process")]
    concat_cmd = [sys.executable, "-m", "cli.heads_cli", "sweep", "--store", store_path, "--layers", "last4", "--combine",
                  "concat", "--no-progress", "--out", str(work / f"{name}-process-concat")]
    w1, _ = timed_process(heads_cmd, env)
    w2, _ = timed_process(concat_cmd, env)
    sk_cfg = json.dumps([(layers, pooling) for layers, pooling, _ in cfgs])
    w_sk, _ = timed_process([sys.executable, "-c", SK_SCRIPT, store_path, sk_cfg], env)
    print(f"2. whole process: heads sweep x2 (every layer; concat of the last four) {w1 + w2:.1f}s vs a scikit-learn "
          f"script {w_sk:.1f}s -> {w_sk / (w1 + w2):.1f}x (target >= 5x)")

    diffs, rows = [], []
    for _, r in ours_c1.iterrows():
        ref = sk[key_of(r, store)][1.0][1]
        diffs.append(100 * (r.accuracy - ref))
        rows.append((str(r.layers), r["combine"], r.pooling, r.accuracy, ref))
    worst = max(abs(d) for d in diffs)
    print(f"3. at C=1, ours minus scikit-learn per configuration (points): min {min(diffs):+.2f}, max {max(diffs):+.2f}; "
          f"largest |diff| {worst:.2f} (target <= 0.3)")
    for (layers, combine, pooling, acc, ref), d in zip(rows, diffs):
        print(f"   {layers:>8} {combine:>6} {pooling:>4}: ours {acc:.4f}  scikit-learn {ref:.4f}  {d:+.2f}")
    picked = float(ours.accuracy.mean())
    sk_mean = float(np.mean([v[1.0][1] for v in sk.values()]))
    same_c = [sk[key_of(r, store)][float(r.hp_C)][1] for _, r in ours.iterrows()]
    print(f"   with C picked on validation: mean accuracy ours {picked:.4f} vs scikit-learn at C=1 {sk_mean:.4f} "
          f"(target: at least it); scikit-learn at our picked C {np.mean(same_c):.4f}; picked C: "
          f"{dict(pd.Series(ours.hp_C).value_counts().sort_index())}")
    report[name] = {"configs": len(cfgs), "train_rows": int(len(fit)), "ours_grid_s": t_grid, "ours_c1_s": t_c1,
                    "sklearn_c1_s": sk_default, "sklearn_grid_s": sk_grid, "train_ratio": sk_default / t_grid,
                    "process_ours_s": w1 + w2, "process_sklearn_s": w_sk, "process_ratio": w_sk / (w1 + w2),
                    "max_abs_diff_points_c1": worst, "picked_mean_acc": picked, "sklearn_c1_mean_acc": sk_mean,
                    "per_config": [dict(zip(("layers", "combine", "pooling", "ours", "sklearn"), r)) for r in rows]}


def mlp_part(store_path: str, work: Path, report: dict[str, Any], hidden: int, epochs: int) -> None:
    """Every layer (mean pooling) x 3 seeds: one stack vs one HeadClassifier.fit at a time, same rows and settings."""
    from embstore import open_store
    from heads.probe.config import HeadConfig
    from heads.probe.estimator import HeadClassifier
    from heads.probe.sweep import SweepConfig, run_sweep
    from heads.protocol import validation_carve

    store = open_store(store_path)
    cfg = HeadConfig(head="mlp", hidden=(hidden,), epochs=epochs)
    res = run_sweep(SweepConfig(store=store_path, layers="all", combine=("single",), pooling=("mean",), heads=("mlp",),
                                seeds=3, head=cfg, out=str(work / "mlp")), show_progress=False)
    stacked = pd.read_csv(res.run_dir / "results.csv")
    t_stacked = float(stacked.train_seconds.sum())
    y = store.labels("train")
    X_all = store.pooled("train", "mean")
    t0 = time.perf_counter()
    accs = []
    for seed in range(3):
        fit, val = validation_carve(y, cfg.validation_fraction, seed)
        for i, _ in enumerate(store.layers):
            X = X_all[:, i]
            est = HeadClassifier(cfg.replace(seed=seed)).fit(X[fit], y[fit], X[val], y[val])
            accs.append(float(np.mean(est.predict(store.pooled("test", "mean", [store.layers[i]])[:, 0]) == store.labels("test"))))
    t_single = time.perf_counter() - t0
    print(f"\n4. MLP (hidden {hidden}, up to {epochs} epochs, early stopping) on {len(store.layers)} layers x 3 seeds: stacked "
          f"{t_stacked:.1f}s vs one at a time {t_single:.1f}s -> {t_single / t_stacked:.1f}x (target >= 5x); mean test "
          f"accuracy stacked {stacked.accuracy.mean():.4f}, one at a time {np.mean(accs):.4f}")
    report["mlp"] = {"hidden": hidden, "epochs": epochs, "stacked_s": t_stacked, "single_s": t_single,
                     "ratio": t_single / t_stacked}


def memory_part(store_path: str, work: Path, report: dict[str, Any]) -> None:
    from embstore import open_store

    store = open_store(store_path)
    row = len(store.layers) * len(store.poolings) * store.hidden * np.dtype(store.layout.dtype).itemsize
    needed = sum(store.n_rows(s) for s in ("train", "test")) * row
    budget = needed // 2
    try:
        wall, rss = timed_process([sys.executable, "-m", "cli.heads_cli", "sweep", "--store", store_path, "--layers", "all",
                                   "--combine", "single", "--max-memory", str(budget), "--no-progress",
                                   "--out", str(work / "memory")])
    except SystemExit as exc:  # e.g. a --quick store whose one row chunk is more than half of its features
        print(f"\n5. memory: not measured on this store ({str(exc).strip().splitlines()[-1]})")
        return
    meta = json.loads((work / "memory" / "run.json").read_text())
    limit = budget + (1 << 29)
    print(f"\n5. memory: features {needed / 2**20:.0f} MiB, --max-memory {budget / 2**20:.0f} MiB (streamed: "
          f"{not meta['features_preloaded']}); peak RSS {rss / 2**20:.0f} MiB vs budget + 0.5 GB = {limit / 2**20:.0f} MiB "
          f"({'met' if rss <= limit else 'MISSED'}); {wall:.1f}s")
    report["memory"] = {"features_bytes": needed, "budget_bytes": budget, "peak_rss_bytes": rss, "met": rss <= limit,
                        "streamed": not meta["features_preloaded"]}


def uncached_part(store_path: str, rows: int, epochs: int) -> None:
    """One linear head (the minibatch AdamW loop) from the store vs the usual loop that runs the frozen backbone on
    every batch of every epoch (ag_news train_pool, the same first source rows)."""
    import torch

    from embstore import open_store
    from embstore.encode import pad_batch, tokenize
    from embstore.models import load_backbone
    from heads.probe.config import HeadConfig
    from heads.probe.estimator import HeadClassifier

    store = open_store(store_path)
    cfg = HeadConfig(head="linear", solver="adamw", epochs=epochs, patience=0, batch_size=64)
    pos = np.argsort(store.row_ids("train"))[:rows]  # the same first source rows
    X, y = store.pooled("train", "mean", [store.layers[-1]])[:, 0][pos], store.labels("train")[pos]
    t0 = time.perf_counter()
    HeadClassifier(cfg).fit(X, y)
    t_cached = time.perf_counter() - t0
    table = pd.read_csv(SHARED / "ag_news" / "train_pool.csv")
    texts, labels = table.text.astype(str).tolist()[:rows], table.label.to_numpy()[:rows]
    bb = load_backbone("minilm")
    enc = tokenize(bb.tokenizer, texts, None, 256)
    torch.manual_seed(0)
    head = torch.nn.Linear(bb.hidden, int(labels.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(texts), generator=gen).numpy()
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            b = pad_batch([enc.ids[i] for i in idx], None, bb.tokenizer.pad_token_id)
            with torch.no_grad():  # frozen backbone, as people write it
                h = bb.model(**{k: torch.from_numpy(v) for k, v in b.items()}).last_hidden_state
                m = torch.from_numpy(b["attention_mask"])[:, :, None].float()
                x = (h * m).sum(1) / m.sum(1)
            loss = torch.nn.functional.cross_entropy(head(x), torch.from_numpy(labels[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    t_uncached = time.perf_counter() - t0
    print(f"\n6. one linear head on the last layer, mean, {rows} rows, {epochs} epochs: from the store {t_cached:.2f}s, "
          f"recomputing the backbone every epoch {t_uncached:.1f}s -> {t_uncached / t_cached:.0f}x (one extraction pass "
          f"of these rows is about {t_uncached / epochs:.1f}s, so {t_uncached / (t_uncached / epochs + t_cached):.1f}x including it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="600 rows per split, small MLP, few epochs: checks that it runs")
    ap.add_argument("--cache", default=os.environ.get("EMBSTORE_CACHE", str(ROOT / "cache")), help="store cache directory")
    ap.add_argument("--datasets", default="ag_news,youtube")
    ap.add_argument("--mlp-hidden", type=int, default=None, help="[default: 2048, the default mlp head; --quick: 64]")
    ap.add_argument("--mlp-epochs", type=int, default=None, help="[default: 30; --quick: 4]")
    ap.add_argument("--uncached-rows", type=int, default=0, help="also time one head against recomputing the backbone "
                    "every epoch on this many ag_news rows (0: skip; BENCHMARKS.md used 500)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    import torch

    for name in args.datasets.split(","):
        if name not in DATASETS:
            raise SystemExit(f"--datasets: unknown {name!r}; choose from {', '.join(DATASETS)}")
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is not present: the shared datasets sit beside the checkout")
    limit = 600 if args.quick else None
    cache = Path(args.cache)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cuda {torch.cuda.is_available()}", flush=True)
    stores = {name: ensure_store(name, cache, limit) for name in args.datasets.split(",")}
    # Warm the imports both sides would otherwise pay inside the in-process timings.
    import matplotlib.backends.backend_agg  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401

    report: dict[str, Any] = {"machine": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                              "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        for name, path in stores.items():
            linear_part(name, path, work, report)
        first = next(iter(stores.values()))
        mlp_part(first, work, report, args.mlp_hidden or (64 if args.quick else 2048), args.mlp_epochs or (4 if args.quick else 30))
        memory_part(first, work, report)
    if args.uncached_rows and "ag_news" in stores:
        uncached_part(stores["ag_news"], args.uncached_rows, 10)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
