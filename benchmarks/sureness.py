"""What it costs to know how sure a sweep's answer is: intervals + paired tests, and the online codelength (MDL).

One store: MiniLM over the built-in tweets (``embstore extract --limit 8000``: the first 8,000 training rows and 7,632
test
rows of its 80/20 split, 3 classes), every layer with cls and mean pooling, so ``heads sweep --combine single`` trains
14 linear
probes. Each variant runs as a fresh process, the variants interleaved ``--repeats`` times (this machine is shared
and noisy; the median is reported), and each run's own phase timings (``run.json["timings"]``) are read back:

1. ``heads sweep --no-ci`` (no intervals, no paired tests) against ``heads sweep`` (the default: intervals and paired
   tests). Target: the uncertainty layer costs at most 10% of the sweep's wall time.
2. ``heads sweep --mdl`` against ``heads sweep``. Target: at most 1.5x.
3. (``--control``) ``heads sweep --control`` with a ``--random-weights 0`` store of the same rows: every
   configuration trained twice; the gain of each layer over the random encoder.

Usage: python benchmarks/sureness.py [--repeats 3] [--limit 8000] [--control] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"no-ci": ["--no-ci"], "default": [], "mdl": ["--mdl"]}


def ensure_store(cache: Path, limit: int, random_weights: int | None = None) -> str:
    from embstore import ExtractConfig, extract

    cfg = ExtractConfig.from_dict(
        dict(
            model="minilm",
            data="builtin:tweets",
            limit=limit,
            layers="all",
            pooling=("cls", "mean"),
            out=str(cache),
            random_weights=random_weights,
        )
    )
    t0 = time.perf_counter()
    path = extract(cfg, show_progress=True).path
    print(f"store: {path} ({time.perf_counter() - t0:.0f}s, extraction or re-use)", flush=True)
    return path


def sweep(store: str, out: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """(wall seconds of the whole process, the run's phase timings)."""
    cmd = [
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
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "run.json").read_text()).get("timings", {})


def measure(cache: Path, limit: int, repeats: int, control: bool) -> dict[str, Any]:
    """Run the variants interleaved ``repeats`` times on the ``limit``-row store (and the control with ``control``);
    print the figures and return them (``benchmarks/sweep.py --sureness`` calls this too)."""
    import torch

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{torch.__version__} "
        f"({torch.get_num_threads()} threads); load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    store = ensure_store(cache, limit)
    walls: dict[str, list[float]] = {k: [] for k in VARIANTS}
    phases: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-sureness-") as tmp:
        for rep in range(repeats):
            for name, extra in VARIANTS.items():
                wall, timings = sweep(store, Path(tmp) / f"{name}-{rep}", extra)
                walls[name].append(wall)
                phases[name].append(timings)
                print(
                    f"  repeat {rep}: {name:8s} {wall:6.2f}s  (in process: train {timings.get('train_s', 0):.2f}s, "
                    f"mdl {timings.get('mdl_s', 0):.2f}s, sureness {timings.get('sureness_s', 0):.2f}s, "
                    f"total {timings.get('total_s', 0):.2f}s)",
                    flush=True,
                )
        med = {k: statistics.median(v) for k, v in walls.items()}
        sure = statistics.median(p["sureness_s"] for p in phases["default"])
        total = statistics.median(p["total_s"] for p in phases["default"])
        ci_ratio = med["default"] / med["no-ci"]
        mdl_ratio = med["mdl"] / med["default"]
        print(
            f"\n1. intervals + paired tests: sweep {med['default']:.2f}s vs --no-ci {med['no-ci']:.2f}s -> "
            f"{ci_ratio:.3f}x "
            f"(target <= 1.10: {'met' if ci_ratio <= 1.10 else 'MISSED'}); measured inside the process: "
            f"{sure:.2f}s of {total:.2f}s = {100 * sure / total:.1f}%"
        )
        print(
            f"2. --mdl: {med['mdl']:.2f}s vs {med['default']:.2f}s -> {mdl_ratio:.2f}x "
            f"(target <= 1.5: {'met' if mdl_ratio <= 1.5 else 'MISSED'}); MDL phase in process "
            f"{statistics.median(p['mdl_s'] for p in phases['mdl']):.2f}s"
        )
        report: dict[str, Any] = {
            "machine": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "store": store,
            "walls": walls,
            "phases": phases,
            "ci_ratio": ci_ratio,
            "mdl_ratio": mdl_ratio,
            "sureness_share": sure / total,
        }
        if control:
            ctl = ensure_store(cache, limit, random_weights=0)
            wall, timings = sweep(store, Path(tmp) / "control", ["--control", ctl])
            rows = [json.loads(line) for line in (Path(tmp) / "control" / "results.jsonl").read_text().splitlines()]
            print(
                f"3. --control (random weights, seed 0): {wall:.2f}s ({wall / med['default']:.2f}x the sweep); gain in "
                "macro-F1 per configuration (95% CI):"
            )
            for r in rows:
                print(
                    f"   {r['layers']:>2} {r['pooling']:>4}: {r['f1_macro']:.4f} vs control "
                    f"{r['control_f1_macro']:.4f} -> "
                    f"{r['gain_f1_macro']:+.4f} ({r['gain_f1_macro_lo']:+.4f} to {r['gain_f1_macro_hi']:+.4f})"
                )
            report["control"] = {
                "wall": wall,
                "rows": [
                    {
                        k: r[k]
                        for k in (
                            "layers",
                            "pooling",
                            "f1_macro",
                            "control_f1_macro",
                            "gain_f1_macro",
                            "gain_f1_macro_lo",
                            "gain_f1_macro_hi",
                        )
                    }
                    for r in rows
                ],
            }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache", default=os.environ.get("EMBSTORE_CACHE", str(ROOT / "cache")), help="store cache directory"
    )
    ap.add_argument(
        "--limit", type=int, default=8000, help="rows per split of the tweets (80%% train, 20%% test) [default: 8000]"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--control", action="store_true", help="also a --control sweep against a --random-weights 0 store")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    report = measure(Path(args.cache), args.limit, args.repeats, args.control)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
