"""Fine-tuning variants of MiniLM on the same data, in one run: full, frozen 0..L-1, truncated, 30%-pruned.

Reports seconds per epoch, training examples/s and test accuracy / macro-F1 per variant, then the
inference speed of the pruned and truncated models against the full one (same texts, same batches).

Usage: python benchmarks/finetune.py [--train-rows 800] [--test-rows 800] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from embstore.encode import length_order, make_batches, pad_batch, tokenize
from embstore.models import load_backbone
from heads.finetune import run_finetune
from heads.finetune_config import FinetuneConfig

AG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ag_news"


def inference_seconds(model_dir: Path, texts: list[str], repeats: int = 2) -> float:
    """Best-of-N seconds for one pass of the encoder over ``texts`` (sorted batches, inference mode)."""
    bb = load_backbone(str(model_dir))
    enc = tokenize(bb.tokenizer, texts, None, 128)
    order = length_order(enc.lengths)
    ids = [enc.ids[i] for i in order]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s, e in make_batches(enc.lengths[order], 64, 16384):
                b = pad_batch(ids[s:e], None, bb.tokenizer.pad_token_id)
                bb.model(**{k: torch.from_numpy(v) for k, v in b.items()})
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=800)
    ap.add_argument("--test-rows", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embstore-ft-"))
    train = pd.read_csv(AG / "train_pool.csv").head(args.train_rows)
    test = pd.read_csv(AG / "test.csv").head(args.test_rows)
    train[["text", "label"]].to_csv(work / "train.csv", index=False)
    test[["text", "label"]].to_csv(work / "test.csv", index=False)
    base = dict(model="minilm", data=None, splits=[["train", str(work / "train.csv")], ["test", str(work / "test.csv")]],
                label_col="label", max_length=128, epochs=args.epochs, batch_size=16, lr=5e-5, patience=args.epochs)
    variants = {"full": {}, "freeze 0-5 (all but last)": {"freeze": "all-but-last"}, "truncate 4": {"truncate": 4},
                "prune 30% of heads": {"prune_fraction": 0.3}}
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"data: ag_news train_pool first {len(train)} rows -> test first {len(test)} rows; MiniLM, max length 128, "
          f"{args.epochs} epochs, batch 16, lr 5e-5")
    results = {}
    for name, kw in variants.items():
        res = run_finetune(FinetuneConfig.from_dict({**base, **kw, "out": str(work / name.split()[0])}))
        results[name] = res
        print(f"{name:28s} acc {res.accuracy:.4f}  macro-F1 {res.f1_macro:.4f}  trainable {res.trainable_params:>10,} of "
              f"{res.total_params:>10,}  {res.seconds_per_epoch:6.1f} s/epoch  {len(train) / res.seconds_per_epoch:6.1f} train ex/s")
    texts = test.text.astype(str).tolist()
    t_full = inference_seconds(results["full"].run_dir / "model", texts)
    for name in ("truncate 4", "prune 30% of heads"):
        t = inference_seconds(results[name].run_dir / "model", texts)
        print(f"inference {name}: {len(texts) / t:7.1f} ex/s vs full {len(texts) / t_full:7.1f} ex/s -> {t_full / t:.2f}x")


if __name__ == "__main__":
    main()
