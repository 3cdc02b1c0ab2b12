"""Word-level probing on UD English-EWT with MiniLM, in one run, as ratios (targets of issue 29).

Data: ``../shared/datasets/ud_ewt`` (dev as the training split, 2,001 sentences / 25,147 words; test as the
evaluation split). Backbone: MiniLM (``sentence-transformers/all-MiniLM-L6-v2``, the default ``minilm``), every
hidden state (the embeddings and 6 layers), word pooling ``first``.

1. **The word-level linear sweep against scikit-learn.** ``heads sweep --task word --label upos --combine single``
   (every layer, the 7-value C grid of the batched L-BFGS, validation selection, intervals and paired tests, the
   run directory), in process, timed from ``run_sweep`` to its return, against
   ``make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))`` at scikit-learn's default C = 1 fitted
   per layer on the same fit rows (the sweep's training words minus its validation carve, read from its
   ``run.json``) and predicting the test words; the peer's features are read before its clock starts.
   Target: >= 3x.
2. **The control task's cost.** The same sweep with ``--control-task``: ``control_task_s`` (training every
   configuration on the control labels) over ``train_s`` (the task's own training), both from its ``run.json``;
   and the whole sweep with the control task over the whole sweep without it. Target: <= 1.2x.
3. **Word-state extraction against pooled sentence extraction on the same rows.** ``embstore extract`` of the
   first ``--extract-rows`` sentences of dev.conllu (word states ``first`` and the sentence poolings) against the
   same sentences' text (the words joined by spaces, as extraction rebuilds it) in a CSV (the sentence poolings
   only), both fresh stores, interleaved ``--repeats`` times; the median of each. Target: <= 1.3x.

Also printed: UPOS accuracy, control accuracy and selectivity per layer (from the control-task sweep).

Usage: python benchmarks/words.py [--cache DIR] [--extract-rows N] [--repeats K] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
UD = ROOT.parent / "shared" / "datasets" / "ud_ewt"


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_1min_at_start": os.getloadavg()[0],
        "cpu": platform.processor() or platform.machine(),
    }


def ensure_store(cache: Path) -> str:
    from embstore import ExtractConfig, extract

    cfg = ExtractConfig.from_dict(
        dict(
            model="minilm",
            data=None,
            splits=(("train", str(UD / "dev.conllu")), ("test", str(UD / "test.conllu"))),
            out=str(cache / "ewt-minilm.zarr"),
        )
    )
    return extract(cfg, show_progress=False).path


def sweep(store: str, out: Path, control: bool) -> tuple[float, dict[str, Any], Path]:
    from heads.probe.sweep import SweepConfig, run_sweep

    cfg = SweepConfig.from_dict(
        dict(store=store, task="word", label="upos", combine="single", control_task=control, out=str(out))
    )
    t0 = time.perf_counter()
    res = run_sweep(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    run = json.loads((res.run_dir / "run.json").read_text())
    return wall, run, res.run_dir


def sklearn_peer(store_path: str, fit_ids: list[int]) -> tuple[float, list[float]]:
    """Seconds for make_pipeline(StandardScaler(), LogisticRegression()) at C = 1 on every layer, and each layer's
    test accuracy; features read before the clock starts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from embstore import open_store
    from heads.probe.word import ExampleStore

    ex = ExampleStore.open(open_store(store_path), "word", "upos", ["train", "test"], "train")
    fit = np.flatnonzero(np.isin(ex.row_ids("train"), np.asarray(fit_ids)))
    X, T = ex.pooled("train", "first"), ex.pooled("test", "first")
    y, y_test = ex.labels("train")[fit], ex.labels("test")
    X = X[fit]
    t0 = time.perf_counter()
    acc = []
    for i in range(X.shape[1]):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        pipe.fit(X[:, i].astype(np.float32), y)
        acc.append(float((pipe.predict(T[:, i].astype(np.float32)) == y_test).mean()))
    return time.perf_counter() - t0, acc


def extraction(rows: int, repeats: int, work: Path) -> dict[str, Any]:
    from embstore import ExtractConfig, extract
    from embstore.data.words import read_conllu

    words = read_conllu(UD / "dev.conllu")[:rows]
    conllu = work / "dev_head.conllu"
    keep, lines = 0, []
    for line in (UD / "dev.conllu").read_text(encoding="utf-8").splitlines():
        lines.append(line)
        if not line.strip():
            keep += 1
            if keep == rows:
                break
    conllu.write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = work / "dev_head.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([[r.text] for r in words])

    def run(data: Path, name: str) -> float:
        out = work / f"{name}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig.from_dict(dict(model="minilm", data=str(data), out=str(out)))
        t0 = time.perf_counter()
        res = extract(cfg, show_progress=False)
        wall = time.perf_counter() - t0
        assert res.path == str(out)
        shutil.rmtree(out, ignore_errors=True)
        return wall

    words_s, sentence_s = [], []
    for _ in range(repeats):
        words_s.append(run(conllu, "words"))
        sentence_s.append(run(table, "sentences"))
    return {
        "rows": len(words),
        "words": int(sum(len(r.forms) for r in words)),
        "word_extract_s": words_s,
        "sentence_extract_s": sentence_s,
        "ratio_median": float(np.median(words_s) / np.median(sentence_s)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "cache" / "bench-words"))
    ap.add_argument("--extract-rows", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sweep, control, extract")
    ap.add_argument("--json")
    args = ap.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"machine": machine()}
    store = ensure_store(cache)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wall = None
        if "sweep" not in skip:
            wall, run, _ = sweep(store, work / "plain", control=False)
            fit_ids = run["rows"]["fit"]
            out["sweep"] = {"wall_s": wall, "timings": run.get("timings"), "fit_words": len(fit_ids)}
            print(f"word sweep (UPOS, 7 layers x 7 C): {wall:.1f} s, {len(fit_ids)} fit words", flush=True)
            sk_s, sk_acc = sklearn_peer(store, fit_ids)
            out["sklearn"] = {"seconds": sk_s, "accuracy": sk_acc}
            out["sweep_vs_sklearn"] = sk_s / wall
            print(f"scikit-learn C=1 x 7 layers: {sk_s:.1f} s -> ratio {sk_s / wall:.2f}x (target >= 3x)", flush=True)
        if "control" not in skip:
            cwall, crun, cdir = sweep(store, work / "control", control=True)
            t = crun["timings"]
            out["control"] = {
                "wall_s": cwall,
                "timings": t,
                "control_over_task_train": t["control_task_s"] / t["train_s"],
                "whole_sweep_ratio": None if wall is None else cwall / wall,
            }
            print(
                f"control task: control_task_s {t['control_task_s']:.1f} / train_s {t['train_s']:.1f} = "
                f"{t['control_task_s'] / t['train_s']:.2f}x (target <= 1.2x); the sweep with it {cwall:.1f} s"
                + ("" if wall is None else f", without {wall:.1f} s: {cwall / wall:.2f}x"),
                flush=True,
            )
            rows = [json.loads(x) for x in (cdir / "results.jsonl").read_text().splitlines() if x.strip()]
            per_layer = {
                r["layers"]: {
                    k: r.get(k)
                    for k in (
                        "accuracy",
                        "control_accuracy",
                        "selectivity",
                        "selectivity_lo",
                        "selectivity_hi",
                        "accuracy_lo",
                        "accuracy_hi",
                    )
                }
                for r in rows
            }
            out["per_layer"] = per_layer
            for layer, r in per_layer.items():
                print(f"  layer {layer}: {r}", flush=True)
        if "extract" not in skip:
            out["extraction"] = extraction(args.extract_rows, args.repeats, work)
            e = out["extraction"]
            print(
                f"extraction of {e['rows']} sentences ({e['words']} words): word states {e['word_extract_s']} s, "
                f"pooled sentences {e['sentence_extract_s']} s -> {e['ratio_median']:.2f}x (target <= 1.3x)",
                flush=True,
            )
    out["machine"]["load_1min_at_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out["machine"]))


if __name__ == "__main__":
    main()
