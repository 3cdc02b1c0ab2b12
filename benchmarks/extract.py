"""Extraction throughput on ag_news with MiniLM, in one run, as ratios:

(a) bare forward loop over the same length-sorted, token-budgeted batches, nothing stored;
(b) ``embstore extract`` end to end (reading the CSV, tokenizing, all layers, cls+mean, zarr
    store written, provenance and checksums; model loading included);
(c) the naive loop people write: unsorted fixed-size batches padded to their longest row,
    hidden states pooled and gathered in Python lists, saved with numpy at the end.

Usage: python benchmarks/extract.py [--rows 3000] [--repeats 3] [--data ../shared/datasets/ag_news/test.csv]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from embstore import ExtractConfig, extract, open_store
from embstore.encode import length_order, make_batches, pad_batch, tokenize
from embstore.models import load_backbone

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ag_news" / "test.csv"


def bare(texts: list[str], model_name: str, max_length: int, batch_size: int, budget: int, device: str) -> float:
    bb = load_backbone(model_name, device)
    t0 = time.perf_counter()
    enc = tokenize(bb.tokenizer, texts, None, max_length)
    order = length_order(enc.lengths)
    ids = [enc.ids[i] for i in order]
    with torch.inference_mode():
        for s, e in make_batches(enc.lengths[order], batch_size, budget):
            b = pad_batch(ids[s:e], None, bb.tokenizer.pad_token_id)
            bb.model(**{k: torch.from_numpy(v).to(device) for k, v in b.items()}, output_hidden_states=True)
    return time.perf_counter() - t0


def naive(texts: list[str], model_name: str, max_length: int, batch_size: int, out: Path, device: str) -> float:
    bb = load_backbone(model_name, device)
    t0 = time.perf_counter()
    cls_rows, mean_rows = [], []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = bb.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            hs = bb.model(**enc, output_hidden_states=True).hidden_states
            m = enc["attention_mask"][:, :, None].float()
            for i in range(len(hs[0])):
                cls_rows.append([h[i, 0].cpu().numpy() for h in hs])
                mean_rows.append([((h[i] * m[i]).sum(0) / m[i].sum()).cpu().numpy() for h in hs])
    np.save(out / "cls.npy", np.array(cls_rows, dtype=np.float16))
    np.save(out / "mean.npy", np.array(mean_rows, dtype=np.float16))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rows", type=int, default=3000, help="first N rows (0: all 7600)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of (a) and (b); best is reported")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.rows = args.rows or None
    texts = pd.read_csv(args.data).text.astype(str).tolist()[: args.rows]
    n = len(texts)
    work = Path(tempfile.mkdtemp(prefix="embstore-bench-"))
    try:
        load_backbone(args.model, args.device)  # warm imports and file cache for every contender
        ta, tb = [], []
        for r in range(args.repeats):  # interleaved, best of N: this machine is shared and noisy
            ta.append(bare(texts, args.model, args.max_length, args.batch_size, args.token_budget, args.device))
            cfg = ExtractConfig.from_dict(dict(model=args.model, data=args.data, limit=args.rows, layers="all", pooling=("cls", "mean"),
                                max_length=args.max_length, batch_size=args.batch_size, token_budget=args.token_budget,
                                out=str(work / f"run{r}"), device=args.device))
            t0 = time.perf_counter()
            res = extract(cfg, show_progress=False)
            tb.append(time.perf_counter() - t0)
        tc = naive(texts, args.model, args.max_length, args.batch_size, work, args.device)
        store = open_store(res.path)
        minimum = len(store.layers) * store.hidden * len(store.poolings) * 2
        per_example = store.nbytes() / n
        a, b = min(ta), min(tb)
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
        print(f"data: {args.data} ({n} rows), model {args.model}, layers {len(store.layers)}, poolings cls+mean, best of {args.repeats}")
        print(f"(a) bare forward loop, sorted batches : {n / a:8.1f} ex/s  ({a:.1f} s; all: {', '.join(f'{t:.1f}' for t in ta)})")
        print(f"(b) embstore extract (end to end)     : {n / b:8.1f} ex/s  ({b:.1f} s; all: {', '.join(f'{t:.1f}' for t in tb)})")
        print(f"(c) naive loop, unsorted, lists, npy  : {n / tc:8.1f} ex/s  ({tc:.1f} s)")
        print(f"b/a = {a / b:.3f}   (target >= 0.95: storage nearly free)")
        print(f"b/c = {tc / b:.3f}   (target >= 1.5)")
        print(f"bytes/example: {per_example:.0f} stored vs {minimum} minimum (layers x hidden x poolings x 2) = {per_example / minimum:.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
