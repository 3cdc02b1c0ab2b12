"""How good ``embstore plan`` is, on the README's default job (MiniLM over 2,000 + 2,000 tweets).

For each repeat, in a fresh empty cache: ``embstore plan --limit N --json`` (its wall time and its
``estimated_seconds``), then ``embstore extract --limit N`` (its wall time), then the same extract
again (the "already complete" answer). Every command is a new process, as a user runs them, so the
figures include Python start-up and imports. Reports estimate / real (target: within 2x, i.e. 0.5-2.0),
planned bytes == stored bytes, and the re-run time (target: under 1 s).

Usage: python benchmarks/plan.py [--limit 2000] [--repeats 3] [-- EXTRA EXTRACT OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.embstore_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="more extract options (after --)")
    a = ap.parse_args()
    opts = ["--limit", str(a.limit), *a.extra]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}"
    )
    print(f"job: embstore extract {' '.join(opts)}")
    print("repeat | plan s | estimate s | extract s | estimate/real | planned bytes == stored | re-run s")
    for r in range(a.repeats):
        cache = Path(tempfile.mkdtemp(prefix="embstore-plan-bench-"))
        env = {**os.environ, "EMBSTORE_CACHE": str(cache)}
        try:
            plan_s, out = _run(["plan", *opts, "--json"], env)
            report = json.loads(out)
            real_s, out = _run(["extract", "-q", *opts], env)
            path = out.strip().splitlines()[-1]
            stored = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
            again_s, _ = _run(["extract", "-q", *opts], env)
            print(
                f"{r} | {plan_s:.1f} | {report['estimated_seconds']:.1f} | {real_s:.1f} | "
                f"{report['estimated_seconds'] / real_s:.2f} | {report['bytes'] == stored} ({report['bytes']} vs "
                f"{stored}) | {again_s:.2f}"
            )
        finally:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
