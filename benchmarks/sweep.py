"""Head sweeps from a store, in one run, as ratios:

1. A sweep of every single layer (cls and mean) plus sum / concat / mix of the last 4 layers,
   linear heads, against scikit-learn ``LogisticRegression(max_iter=1000)`` fitted per config on
   the same features (mix: on the concatenated 4 layers). Target: >= 10x faster in total, test
   accuracy within 0.5 points of scikit-learn on every config.
2. One head trained 10 epochs from the store against the same head trained the way people do
   without a cache: the frozen backbone runs on every batch of every epoch.

Store: MiniLM over ../shared/datasets/ag_news (train_pool -> train, test.csv -> test), made once
(content-addressed in the cache, so a re-run reuses it).

Usage: python benchmarks/sweep.py [--test-rows N] [--uncached-rows 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from embstore import ExtractConfig, extract, open_store
from embstore.encode import pad_batch, tokenize
from embstore.models import load_backbone
from heads.probe.config import HeadConfig
from heads.probe.estimator import HeadClassifier
from heads.probe.sweep import SweepConfig, run_sweep

AG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ag_news"


def sklearn_baseline(store, rows) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression

    y_tr, y_te = store.labels("train"), store.labels("test")
    acc, total = {}, 0.0
    for _, r in rows.iterrows():
        spec = str(r.layers)
        Xtr = store.pooled("train", r.pooling, spec).astype(np.float32)
        Xte = store.pooled("test", r.pooling, spec).astype(np.float32)
        if r["combine"] in ("single", "concat", "mix"):
            Xtr, Xte = Xtr.reshape(len(Xtr), -1), Xte.reshape(len(Xte), -1)
        elif r["combine"] == "sum":
            Xtr, Xte = Xtr.sum(1), Xte.sum(1)
        elif r["combine"] == "mean":
            Xtr, Xte = Xtr.mean(1), Xte.mean(1)
        t0 = time.perf_counter()
        clf = LogisticRegression(max_iter=1000).fit(Xtr, y_tr)
        total += time.perf_counter() - t0
        acc[(spec, r["combine"], r.pooling)] = float((clf.predict(Xte) == y_te).mean())
    return total, acc


def uncached_head(texts: list[str], y: np.ndarray, epochs: int, cfg: HeadConfig) -> float:
    """The usual loop: every batch of every epoch runs the frozen backbone, then the head."""
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
            idx = perm[s:s + cfg.batch_size]
            b = pad_batch([enc.ids[i] for i in idx], None, bb.tokenizer.pad_token_id)
            with torch.no_grad():  # frozen backbone, as people write it
                h = bb.model(**{k: torch.from_numpy(v) for k, v in b.items()}).last_hidden_state
                m = torch.from_numpy(b["attention_mask"])[:, :, None].float()
                x = (h * m).sum(1) / m.sum(1)
            loss = torch.nn.functional.cross_entropy(head(x), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-rows", type=int, default=None, help="limit rows per split (default: all)")
    ap.add_argument("--uncached-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    t0 = time.perf_counter()
    store_path = extract(ExtractConfig(model="minilm", data=None, splits=(("train", str(AG / "train_pool.csv")), ("test", str(AG / "test.csv"))),
                                       label_col="label", limit=args.test_rows), show_progress=True).path
    t_extract = time.perf_counter() - t0
    store = open_store(store_path)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"store: {store_path} (train {store.n_rows('train')}, test {store.n_rows('test')}; extraction {t_extract:.1f}s, 0 if reused)")

    # Warm the one-time imports both sides would otherwise pay inside the timings (torch's optimizer
    # pulls in torch._dynamo, ~1.5 s; matplotlib ~0.8 s; scikit-learn's estimators).
    import matplotlib.backends.backend_agg  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

    # 1. the sweep against scikit-learn
    t0 = time.perf_counter()
    single = run_sweep(SweepConfig(store=store_path, layers="all", combine=("single",), out="runs/bench-sweep-single"))
    last4 = run_sweep(SweepConfig(store=store_path, layers="last4", combine=("sum", "concat", "mix"), out="runs/bench-sweep-last4"))
    t_ours = time.perf_counter() - t0
    rows = pd.concat([pd.read_csv(single.run_dir / "results.csv"), pd.read_csv(last4.run_dir / "results.csv")])
    t_sk, sk = sklearn_baseline(store, rows)
    print(f"\n1. sweep of {len(rows)} linear configs: embstore {t_ours:.1f}s (whole sweeps, results and plots included) vs "
          f"scikit-learn {t_sk:.1f}s (fit only) -> {t_sk / t_ours:.1f}x faster")
    worst = 0.0
    for _, r in rows.iterrows():
        ref = sk[(str(r.layers), r["combine"], r.pooling)]
        worst = max(worst, ref - r.accuracy)
        print(f"   layers {str(r.layers):>5} {r['combine']:>6} {r.pooling:>4}: accuracy {r.accuracy:.4f}  sklearn {ref:.4f}  diff {100 * (r.accuracy - ref):+.2f} pts")
    print(f"   largest shortfall vs scikit-learn: {100 * worst:.2f} points (target <= 0.5)")

    # 2. cached vs uncached training of one head
    n = args.uncached_rows
    texts = pd.read_csv(AG / "train_pool.csv").text.astype(str).tolist()[:n]
    y = pd.read_csv(AG / "train_pool.csv").label.to_numpy()[:n]
    cfg = HeadConfig(head="linear", epochs=args.epochs, patience=0, batch_size=64)
    X = store.pooled("train", "mean", "-1")[:, 0]
    rid = store.row_ids("train")
    pos = np.argsort(rid)[:n]  # the same first n source rows
    t0 = time.perf_counter()
    HeadClassifier(cfg).fit(X[pos], store.labels("train")[pos])
    t_cached = time.perf_counter() - t0
    t_uncached = uncached_head(texts, y, args.epochs, cfg)
    print(f"\n2. one linear head on layer 6 mean, {n} rows, {args.epochs} epochs: from the store {t_cached:.2f}s, "
          f"recomputing the backbone every epoch {t_uncached:.1f}s -> {t_uncached / t_cached:.0f}x "
          f"(one extraction pass of these rows costs about {t_uncached / args.epochs:.1f}s, so {t_uncached / (t_uncached / args.epochs + t_cached):.1f}x including it)")


if __name__ == "__main__":
    main()
