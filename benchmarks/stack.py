"""Stacked non-linear heads against training them one at a time, and the stack size that decides between them.

Data: a MiniLM store of ../shared/datasets/ag_news (the first 2,000 rows of train_pool and of test), extracted into
``--cache`` when absent. Every CLS layer (7) x 3 seeds = 21 heads of one architecture, ``--epochs`` epochs with
early stopping on validation (the default patience), the default batch size.

1. For each head (mlp hidden 256 and 2048, conv hidden 512, sum, mix): the whole ``heads sweep`` (``run_sweep``,
   which cuts stacks by ``STACK_BYTES_CPU`` on CPU) against the same 21 heads trained one at a time with
   ``HeadClassifier.fit`` on the same rows; seconds and mean test accuracy of both. Target: the sweep never slower.
2. (``--sizes``) ``fit_stacked`` with a forced stack size (1, 3, 7, 21 members) for the same heads: where stacking
   stops paying on this CPU, as parameter bytes of a stack (16 bytes a parameter: weight, gradient, two AdamW
   moments). The threshold STACK_BYTES_CPU is read off this table.

Usage: python benchmarks/stack.py [--epochs 20] [--sizes] [--heads mlp256,mlp2048,conv,sum,mix] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
HEADS = {
    "mlp256": dict(head="mlp", hidden=(256,)),
    "mlp2048": dict(head="mlp", hidden=(2048,)),
    "conv": dict(head="conv", conv_hidden=512),
    "sum": dict(head="sum"),
    "mix": dict(head="mix"),
}


def ensure_store(cache: Path) -> str:
    from embstore import ExtractConfig, extract

    cfg = ExtractConfig.from_dict(
        dict(
            model="minilm",
            layers="all",
            pooling=("cls", "mean"),
            limit=2000,
            out=str(cache),
            data=None,
            splits=(
                ("train", str(SHARED / "ag_news" / "train_pool.csv")),
                ("test", str(SHARED / "ag_news" / "test.csv")),
            ),
            label_col="label",
        )
    )
    return extract(cfg, show_progress=True).path


def one_at_a_time(store: Any, head: dict[str, Any], epochs: int) -> tuple[float, float]:
    """Seconds and mean test accuracy of the 21 heads trained by HeadClassifier.fit, one after another."""
    from heads.probe.config import HeadConfig
    from heads.probe.estimator import HeadClassifier
    from heads.protocol import validation_carve

    cfg = HeadConfig(epochs=epochs, **head)
    y, y_test = store.labels("train"), store.labels("test")
    layered = cfg.head != "mlp"
    accs, seconds = [], 0.0
    for seed in range(3):
        fit, val = validation_carve(y, cfg.validation_fraction, seed)
        for layer in store.layers:
            # a layered head (conv, sum, mix) over layers 0..layer, as the sweep's 'single' combine gives it one layer
            X = store.pooled("train", "cls", [layer]) if layered else store.pooled("train", "cls", [layer])[:, 0]
            Xt = store.pooled("test", "cls", [layer]) if layered else store.pooled("test", "cls", [layer])[:, 0]
            X, Xt = X.astype(np.float32), Xt.astype(np.float32)
            t0 = time.perf_counter()
            est = HeadClassifier(cfg.replace(seed=seed)).fit(
                X[fit], y[fit], X[val], y[val], n_classes=len(store.label_names)
            )
            seconds += time.perf_counter() - t0
            accs.append(float(np.mean(est.predict(Xt) == y_test)))
    return seconds, float(np.mean(accs))


def stacked_sweep(store_path: str, head: dict[str, Any], epochs: int, out: Path) -> tuple[float, float]:
    """Seconds (training phase) and mean test accuracy of the same 21 heads by run_sweep."""
    import pandas as pd

    from heads.probe.config import HeadConfig
    from heads.probe.sweep import SweepConfig, run_sweep

    cfg = HeadConfig(epochs=epochs, **head)
    res = run_sweep(
        SweepConfig(
            store=store_path,
            layers="all",
            combine=("single",),
            pooling=("cls",),
            heads=(cfg.head,),
            seeds=3,
            head=cfg,
            ci=False,
            out=str(out),
        ),
        show_progress=False,
    )
    df = pd.read_csv(res.run_dir / "results.csv")
    timings = json.loads((res.run_dir / "run.json").read_text())["timings"]
    return float(timings["train_s"]), float(df.accuracy.mean())


def forced_sizes(store: Any, head: dict[str, Any], epochs: int, sizes: list[int]) -> list[tuple[int, int, float]]:
    """(stack size, parameter bytes of one stack, seconds) of fit_stacked on the 21 heads at each forced size."""
    import torch

    from heads.probe.config import HeadConfig
    from heads.probe.ensemble import Member, fit_stacked
    from heads.probe.modules import as_inputs, build_module
    from heads.protocol import validation_carve

    cfg = HeadConfig(epochs=epochs, **head)
    y = store.labels("train")
    layered = cfg.head != "mlp"
    inputs = [
        as_inputs(
            (store.pooled("train", "cls", [x]) if layered else store.pooled("train", "cls", [x])[:, 0]).astype(
                np.float32
            ),
            cfg.head,
        )
        for x in store.layers
    ]
    members = [
        Member(f, s, *validation_carve(y, cfg.validation_fraction, s)) for s in range(3) for f in range(len(inputs))
    ]
    n_params = sum(p.numel() for p in build_module(cfg, inputs[0].shape, len(store.label_names)).parameters())
    out = []
    for size in sizes:
        t0 = time.perf_counter()
        fit_stacked(cfg, inputs, inputs, members, y, y, len(store.label_names), torch.device("cpu"), stack_size=size)
        out.append((size, 16 * n_params * size, time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache", default=os.environ.get("EMBSTORE_CACHE", str(ROOT / "cache")), help="store cache directory"
    )
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--sizes", action="store_true", help="also fit_stacked at forced stack sizes 1, 3, 7, 21")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    import tempfile

    import torch

    from embstore import open_store
    from heads.probe.ensemble import STACK_BYTES_CPU

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads); load average {os.getloadavg()[0]:.2f}; STACK_BYTES_CPU {STACK_BYTES_CPU >> 20} MiB",
        flush=True,
    )
    path = ensure_store(Path(args.cache))
    store = open_store(path)
    report: dict[str, Any] = {"machine": platform.platform(), "epochs": args.epochs, "stack_bytes_cpu": STACK_BYTES_CPU}
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        for name in args.heads.split(","):
            head = HEADS[name]
            t_sweep, acc_sweep = stacked_sweep(path, head, args.epochs, Path(tmp) / name)
            t_one, acc_one = one_at_a_time(store, head, args.epochs)
            print(
                f"1. {name:8s}: heads sweep {t_sweep:6.1f}s vs one at a time {t_one:6.1f}s -> {t_one / t_sweep:.2f}x "
                f"({'met' if t_sweep <= t_one else 'MISSED'}: target >= 1.0x); mean test accuracy {acc_sweep:.4f} vs "
                f"{acc_one:.4f}",
                flush=True,
            )
            entry: dict[str, Any] = {
                "sweep_s": t_sweep,
                "one_s": t_one,
                "ratio": t_one / t_sweep,
                "acc_sweep": acc_sweep,
                "acc_one": acc_one,
            }
            if args.sizes:
                rows = forced_sizes(store, head, args.epochs, [1, 3, 7, 21])
                for size, nbytes, sec in rows:
                    print(
                        f"   stack of {size:2d}: {nbytes / 2**20:8.1f} MiB of parameters+grads+moments, {sec:6.1f}s",
                        flush=True,
                    )
                entry["sizes"] = rows
            report[name] = entry
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
