"""Linear-probe sweeps against scikit-learn, the arithmetic floor, and the out-of-core sweep, in one run, as ratios.

Peer: what a careful user runs, ``make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))`` fitted per
configuration on the same rows (our training rows: the training split minus the validation carve), at scikit-learn's
default C = 1 and over our 7-value C grid.
Stores: MiniLM over the built-in tweets (3 classes), every hidden state, cls and mean, extracted into ``--cache``
when absent (content-addressed: a re-run reuses them): ``tweets2k`` (``embstore extract --limit 2000``, the README's
default job), ``tweets8k`` (``--limit 8000``) and, with ``--full``, ``tweets`` (no limit: 30,526 training rows).
Configurations: every layer for cls and for mean (14), ``heads sweep --combine single``.

1. the whole ``heads sweep`` process (imports, store read, training, intervals and tests, results, plots) against
   a script that reads the same features and fits scikit-learn per configuration, both fresh processes: at C = 1
   (target >= 3x on 8k and the full store, >= 1.5x on 2k) and over the same C grid (target >= 15x; on the full
   store only estimated, from the C = 1 fits).
2. accuracy: mean test accuracy with C picked on validation at least scikit-learn's at C = 1; every configuration
   within 0.3 points of scikit-learn at the C we picked.
3. the floor: the solver's arithmetic (4 x rows x width x classes flops per probe, C and pass) over its time, next
   to torch.bmm of the same shapes (one pass of every probe at one C) and a 2048^3 matmul on this machine.
4. memory: the 8k sweep with ``--max-memory`` at half of what its features need, against in memory: time ratio
   (target <= 1.5x) and peak RSS (target <= budget + 0.5 GB).
5. (``--uncached-rows N``) one head trained from the store against the usual loop that runs the frozen backbone on
   every batch of every epoch.

6. (``--sureness N``) what the intervals and paired tests cost (target <= 10% of the sweep) and what ``--mdl`` costs
   (target <= 1.5x), on the 8k store, each variant N times interleaved (``benchmarks/sureness.py`` on its own adds the
   random-encoder control).

Stacked non-linear heads against one at a time: ``benchmarks/stack.py``.

Usage: python benchmarks/sweep.py [--cache DIR] [--datasets tweets2k,tweets8k] [--full] [--baseline DIR] [--sureness N]
[--json out.json]
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
LIMITS = {"tweets2k": 2000, "tweets8k": 8000, "tweets": None}
SK_SCRIPT = r"""
import sys, json
import numpy as np
from embstore import open_store
from heads.protocol import validation_carve
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
store = open_store(sys.argv[1])
grid = json.loads(sys.argv[2])
y, y_test = store.labels("train"), store.labels("test")
fit, _ = validation_carve(y, 0.1, 0, row_ids=store.row_ids("train"))  # the rows the sweep fits on (seed 0)
for pooling in ("cls", "mean"):
    X_all, T_all = store.pooled("train", pooling), store.pooled("test", pooling)
    for i in range(X_all.shape[1]):
        X, T = X_all[:, i].astype(np.float32), T_all[:, i].astype(np.float32)
        for C in grid:
            make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X[fit], y[fit]).predict(T)
"""
_WRAP = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); w = time.perf_counter() - t; "
    "print(json.dumps([p.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.stderr[-3000:]]))"
)


def ensure_store(name: str, cache: Path) -> str:
    from embstore import ExtractConfig, extract

    cfg = ExtractConfig.from_dict(
        dict(
            model="minilm",
            data="builtin:tweets",
            limit=LIMITS[name],
            layers="all",
            pooling=("cls", "mean"),
            out=str(cache),
        )
    )
    t0 = time.perf_counter()
    path = extract(cfg, show_progress=True).path
    print(f"store {name}: {path} ({time.perf_counter() - t0:.0f}s, extraction or re-use)", flush=True)
    return path


def timed_process(args: list[str], cwd: Path = ROOT) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of ``args`` run as a fresh process, measured by a wrapper process whose
    only child it is (getrusage of children reports the largest child's peak, in KiB on Linux). ``cwd`` other than
    this checkout runs that checkout's code (an older embstore, for a before/after figure)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    proc = subprocess.run([sys.executable, "-c", _WRAP, *args], cwd=cwd, capture_output=True, text=True, env=env)
    code, wall, peak_kib, err = json.loads(proc.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"{' '.join(args[:4])}... failed:\n{err}")
    return float(wall), int(peak_kib) * 1024


def sweep_cmd(store: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli.heads_cli",
        "sweep",
        "--store",
        store,
        "--combine",
        "single",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def sklearn_accuracy(
    store: Any, fit: np.ndarray, Cs: dict[tuple[int, str], float]
) -> dict[tuple[int, str], dict[float, float]]:
    """Test accuracy of scikit-learn's scaled logistic regression per (layer, pooling) at C = 1 and at the given C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y, y_test = store.labels("train"), store.labels("test")
    out: dict[tuple[int, str], dict[float, float]] = {}
    for (layer, pooling), C in Cs.items():
        X = store.pooled("train", pooling, [layer])[:, 0].astype(np.float32)
        T = store.pooled("test", pooling, [layer])[:, 0].astype(np.float32)
        out[(layer, pooling)] = {
            c: float(
                np.mean(
                    make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
                    .fit(X[fit], y[fit])
                    .predict(T)
                    == y_test
                )
            )
            for c in sorted({1.0, C})
        }
    return out


def floor(store_path: str, work: Path) -> dict[str, float]:
    """Flops the solver did and the time it took (in process), against torch.bmm of one pass and a big matmul."""
    import torch

    import heads.probe.objective as objective
    from heads.probe.sweep import SweepConfig, run_sweep

    done = {"flops": 0.0, "seconds": 0.0, "shape": (0, 0, 0, 0)}
    real = objective._terms

    def counted(X: Any, W: Any, b: Any, onehot: Any, ww: Any, C: int) -> Any:
        t0 = time.perf_counter()
        out = real(X, W, b, onehot, ww, C)
        done["seconds"] += time.perf_counter() - t0
        done["flops"] += 4.0 * X.shape[0] * W.shape[1] * X.shape[1] * X.shape[2]  # forward and gradient products
        done["shape"] = max(done["shape"], (X.shape[0], X.shape[1], X.shape[2], W.shape[1]))  # type: ignore[type-var]
        return out

    objective._terms = counted  # type: ignore[assignment]
    try:
        res = run_sweep(
            SweepConfig(store=store_path, combine=("single",), out=str(work / "floor"), ci=False), show_progress=False
        )
    finally:
        objective._terms = real  # type: ignore[assignment]
    train_s = float(json.loads((res.run_dir / "run.json").read_text())["timings"]["train_s"])
    g, rows, d, kc = done["shape"]  # type: ignore[misc]
    X, W = torch.randn(g, rows, d), torch.randn(g, kc, d)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.bmm(torch.bmm(W, X.transpose(1, 2)), X)
    bmm = 4.0 * g * kc * rows * d * reps / (time.perf_counter() - t0)
    A = torch.randn(2048, 2048)
    t0 = time.perf_counter()
    for _ in range(5):
        A @ A
    peak = 2.0 * 2048**3 * 5 / (time.perf_counter() - t0)
    return {
        "flops": done["flops"],
        "solver_terms_s": done["seconds"],
        "train_s": train_s,
        "achieved_gflops": done["flops"] / train_s / 1e9,
        "terms_gflops": done["flops"] / max(1e-9, done["seconds"]) / 1e9,
        "bmm_gflops": bmm / 1e9,
        "peak_gflops": peak / 1e9,
        "bmm_shape": [g, rows, d, kc],
    }


def linear_part(name: str, store_path: str, work: Path, report: dict[str, Any], baseline: Path | None = None) -> None:
    from embstore import open_store
    from heads.probe.config import HeadConfig
    from heads.protocol import validation_carve

    store = open_store(store_path)
    y = store.labels("train")
    # the rows our sweep fits on (seed 0): its carve is drawn in source-row order
    fit, _ = validation_carve(y, HeadConfig().validation_fraction, 0, row_ids=store.row_ids("train"))
    grid = list(HeadConfig().c_grid)
    full = LIMITS[name] is None
    print(
        f"\n== {name}: 14 linear configurations, {len(fit)} training rows, {store.n_rows('test')} test rows", flush=True
    )
    w_ours, _ = timed_process(sweep_cmd(store_path, work / f"{name}-ours"))
    w_c1, _ = timed_process([sys.executable, "-c", SK_SCRIPT, store_path, json.dumps([1.0])])
    w_grid = None if full else timed_process([sys.executable, "-c", SK_SCRIPT, store_path, json.dumps(grid)])[0]
    est = w_grid is None
    if est:  # the full store: the grid estimated from C = 1 (the larger Cs take longer, so this is low)
        w_grid = len(grid) * w_c1
    target = 1.5 if name == "tweets2k" else 3.0
    print(
        f"1. whole process: heads sweep {w_ours:.1f}s vs scikit-learn at C=1 {w_c1:.1f}s -> {w_c1 / w_ours:.2f}x "
        f"(target >= {target}x: {'met' if w_c1 / w_ours >= target else 'MISSED'}); over the same {len(grid)}-value "
        f"grid "
        f"{w_grid:.1f}s{' (estimated: 7 x C=1)' if est else ''} -> {w_grid / w_ours:.1f}x (target >= 15x: "
        f"{'met' if w_grid / w_ours >= 15 else 'MISSED'})",
        flush=True,
    )
    ours = pd.read_csv(work / f"{name}-ours" / "results.csv")
    picked = {(int(r.layers), r.pooling): float(r.hp_C) for _, r in ours.iterrows()}
    sk = sklearn_accuracy(store, fit, picked)
    mean_ours = float(ours.accuracy.mean())
    mean_sk = float(np.mean([v[1.0] for v in sk.values()]))
    same = [100 * (r.accuracy - sk[(int(r.layers), r.pooling)][float(r.hp_C)]) for _, r in ours.iterrows()]
    print(
        f"2. accuracy: mean test accuracy ours (C picked on validation) {mean_ours:.4f} vs scikit-learn at C=1 "
        f"{mean_sk:.4f} ({'met' if mean_ours >= mean_sk else 'MISSED'}: at least it); at our C, ours minus "
        f"scikit-learn "
        f"per configuration {min(same):+.2f} to {max(same):+.2f} points (target within 0.3); picked C: "
        f"{dict(pd.Series(ours.hp_C).value_counts().sort_index())}",
        flush=True,
    )
    report[name] = {
        "train_rows": int(len(fit)),
        "ours_s": w_ours,
        "sklearn_c1_s": w_c1,
        "sklearn_grid_s": w_grid,
        "grid_estimated": est,
        "ratio_c1": w_c1 / w_ours,
        "ratio_grid": w_grid / w_ours,
        "mean_acc": mean_ours,
        "sklearn_c1_mean_acc": mean_sk,
        "same_c_diff_points": [min(same), max(same)],
    }
    if baseline is not None:  # the same sweep by an older checkout: before / after, in the same run
        w_base, _ = timed_process(sweep_cmd(store_path, work / f"{name}-base"), cwd=baseline)
        base = pd.read_csv(work / f"{name}-base" / "results.csv")
        base = base[base["combine"] == "single"]
        print(
            f"   before ({baseline}): {w_base:.1f}s -> this checkout {w_base / w_ours:.2f}x faster; mean test accuracy "
            f"{float(base.accuracy.mean()):.4f} then, {mean_ours:.4f} now",
            flush=True,
        )
        report[name].update(baseline_s=w_base, baseline_mean_acc=float(base.accuracy.mean()))


def memory_part(store_path: str, work: Path, report: dict[str, Any]) -> None:
    from embstore import open_store
    from heads.probe.features import FeatureBank
    from heads.probe.specs import Combo

    store = open_store(store_path)
    combos = [Combo((x,), "single", p, "linear") for p in store.poolings for x in store.layers]
    needed = FeatureBank.bytes_needed(store, combos, ["train", "test"])
    budget = needed // 2
    w_mem, rss_mem = timed_process(sweep_cmd(store_path, work / "mem-in"))
    w_half, rss_half = timed_process(sweep_cmd(store_path, work / "mem-half", "--max-memory", str(budget)))
    meta = json.loads((work / "mem-half" / "run.json").read_text())
    limit = budget + (1 << 29)
    print(
        f"\n4. memory: features {needed / 2**20:.0f} MiB, --max-memory {budget / 2**20:.0f} MiB "
        f"({meta['feature_groups']} "
        f"groups, {meta['streamed_configurations']} streamed): {w_half:.1f}s vs in memory {w_mem:.1f}s -> "
        f"{w_half / w_mem:.2f}x (target <= 1.5x: {'met' if w_half / w_mem <= 1.5 else 'MISSED'}); peak RSS "
        f"{rss_half / 2**20:.0f} MiB vs budget + 0.5 GB = {limit / 2**20:.0f} MiB "
        f"({'met' if rss_half <= limit else 'MISSED'}; "
        f"in memory {rss_mem / 2**20:.0f} MiB)",
        flush=True,
    )
    report["memory"] = {
        "features_bytes": needed,
        "budget_bytes": budget,
        "in_memory_s": w_mem,
        "half_s": w_half,
        "ratio": w_half / w_mem,
        "peak_rss_bytes": rss_half,
        "peak_rss_in_memory": rss_mem,
        "groups": meta["feature_groups"],
        "streamed": meta["streamed_configurations"],
    }


def uncached_part(store_path: str, rows: int, epochs: int) -> None:
    """One linear head (the minibatch AdamW loop) from the store vs the usual loop that runs the frozen backbone on
    every batch of every epoch (the tweets, the same first source rows)."""
    import torch

    from embstore import open_store
    from embstore.backbones.registry import load_backbone
    from embstore.data.tables import builtin_path, read_table
    from embstore.extraction.encode import pad_batch, tokenize
    from heads.probe.config import HeadConfig
    from heads.probe.estimator import HeadClassifier

    store = open_store(store_path)
    cfg = HeadConfig(head="linear", solver="adamw", epochs=epochs, patience=0, batch_size=64)
    pos = np.argsort(store.row_ids("train"))[:rows]  # the same first source rows
    X, y = store.pooled("train", "mean", [store.layers[-1]])[:, 0][pos], store.labels("train")[pos]
    t0 = time.perf_counter()
    HeadClassifier(cfg).fit(X, y)
    t_cached = time.perf_counter() - t0
    table = read_table(builtin_path("tweets"))
    texts = table["text"].iloc[store.row_ids("train")[pos]].astype(str).tolist()
    bb = load_backbone("minilm")
    enc = tokenize(bb.tokenizer, texts, None, 256)
    torch.manual_seed(0)
    head = torch.nn.Linear(bb.hidden, int(y.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(texts), generator=gen).numpy()
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            b = pad_batch([enc.ids[i] for i in idx], None, bb.tokenizer.pad_token_id)
            with torch.no_grad():  # frozen backbone, as people write it
                h = bb.model(**{k: torch.from_numpy(v) for k, v in b.items()}).last_hidden_state
                m = torch.from_numpy(b["attention_mask"])[:, :, None].float()
                x = (h * m).sum(1) / m.sum(1)
            loss = torch.nn.functional.cross_entropy(head(x), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    t_uncached = time.perf_counter() - t0
    print(
        f"\n5. one linear head on the last layer, mean, {rows} rows, {epochs} epochs: from the store {t_cached:.2f}s, "
        f"recomputing the backbone every epoch {t_uncached:.1f}s -> {t_uncached / t_cached:.0f}x (one extraction pass "
        f"of these rows is about {t_uncached / epochs:.1f}s, so {t_uncached / (t_uncached / epochs + t_cached):.1f}x "
        f"including it)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache", default=os.environ.get("EMBSTORE_CACHE", str(ROOT / "cache")), help="store cache directory"
    )
    ap.add_argument("--datasets", default="tweets2k,tweets8k", help="any of tweets2k, tweets8k, tweets")
    ap.add_argument("--full", action="store_true", help="also the full default store (tweets, 30,526 training rows)")
    ap.add_argument("--no-memory", action="store_true", help="skip the out-of-core part")
    ap.add_argument(
        "--uncached-rows",
        type=int,
        default=0,
        help="also time one head against recomputing the backbone every epoch on this many rows (0: skip)",
    )
    ap.add_argument(
        "--baseline",
        help="a checkout of an older embstore (git worktree add DIR REV): its heads sweep on "
        "the same stores, for a before/after figure",
    )
    ap.add_argument(
        "--sureness",
        type=int,
        default=0,
        metavar="REPEATS",
        help="also what intervals + paired tests and --mdl cost on the 8k store (benchmarks/sureness.py), "
        "each variant this many times, interleaved (0: skip)",
    )
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    import torch

    names = [n for n in args.datasets.split(",") if n] + (["tweets"] if args.full else [])
    for name in names:
        if name not in LIMITS:
            raise SystemExit(f"--datasets: unknown {name!r}; choose from {', '.join(LIMITS)}")
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{torch.__version__} "
        f"({torch.get_num_threads()} threads), cuda {torch.cuda.is_available()}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    cache = Path(args.cache)
    stores = {name: ensure_store(name, cache) for name in dict.fromkeys(names)}
    report: dict[str, Any] = {"machine": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        for name, path in stores.items():
            linear_part(name, path, work, report, Path(args.baseline) if args.baseline else None)
        main_store = stores.get("tweets8k") or next(iter(stores.values()))
        f = floor(main_store, work)
        print(
            f"\n3. the floor ({'tweets8k' if 'tweets8k' in stores else next(iter(stores))}): the solver did "
            f"{f['flops'] / 1e9:.1f} GFLOP in {f['train_s']:.1f}s of training -> {f['achieved_gflops']:.1f} GFLOP/s "
            f"({f['terms_gflops']:.1f} GFLOP/s inside its products and softmax); torch.bmm of the same shapes "
            f"{f['bmm_gflops']:.1f} GFLOP/s (memory-bound: a few classes per row of features); a 2048^3 matmul "
            f"{f['peak_gflops']:.1f} GFLOP/s",
            flush=True,
        )
        report["floor"] = f
        if not args.no_memory:
            memory_part(main_store, work, report)
    if args.sureness:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from sureness import measure

        print("\n6. what knowing how sure costs (intervals + paired tests; --mdl), 8k store:", flush=True)
        report["sureness"] = measure(cache, LIMITS["tweets8k"] or 8000, args.sureness, control=False)
    if args.uncached_rows:
        uncached_part(stores.get("tweets8k") or next(iter(stores.values())), args.uncached_rows, 10)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
