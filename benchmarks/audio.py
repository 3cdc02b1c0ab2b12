"""Speech extraction and sweep benchmark on Emo-DB (../shared/datasets/emodb), in one run.

0. Extraction against plain loops, on the first --rows Emo-DB files, in one run: (a) a bare
   forward loop over the same duration-sorted batches with the waveforms already decoded and
   resampled, nothing stored; (b) ``embstore extract`` end to end (reading, resampling, every
   layer, mean+max, zarr store with checksums); (c) the naive loop of speech tutorials: one file at
   a time through the feature extractor and the model, pooled per layer into Python lists, saved
   with numpy at the end.
1. Extraction throughput, seconds of audio per wall second, with and without duration bucketing
   (rows sorted by duration so batches hold similar lengths, versus source order). Every Emo-DB
   file in the shared copy is exactly 2.00 s, so bucketing cannot matter there; the bucketing
   comparison therefore runs on variable-length clips derived from it: each clip joins 1-4
   recordings of one speaker and is cut to a seeded random length between 0.5 and 8 s (written
   to a temporary directory, never into the repository).
2. The full sweep: ``embstore extract`` on all 535 Emo-DB files (speaker-grouped holdout,
   mean+max pooling, every layer) then ``heads sweep --layers all``, reporting wall time,
   majority baseline and per-layer accuracy. No pretrained speech weights can be downloaded
   here, so the models are randomly initialised (random:hubert-tiny and a HuBERT-base-shaped
   random:hubert-base): the speed figures are real, the accuracies say nothing about
   pretrained HuBERT.

3. ``--only-exactness``: the cost of exact batches (embstore.backbones.padding): ``embstore extract`` at batch 8
   on --exact-clips variable-length clips (as in 1), a group-norm HuBERT-base shape, every layer, mean pooling,
   float32, once with the padding fixes switched off (what extraction did before: the group norm sees the batch's
   padding) and once with them, and clip by clip (batch 1, the alternative exactness); seconds per hour of audio,
   and each store's largest difference from the clip-by-clip store.

Usage: python benchmarks/audio.py [--model random:hubert-base] [--clips 200] [--sweep-model random:hubert-tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from embstore import ExtractConfig, extract, open_store
from heads.probe.sweep import SweepConfig, run_sweep

EMODB = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "emodb"


def variable_clips(root: Path, out: Path, n: int, seed: int = 0) -> tuple[Path, float]:
    """n clips of 0.5-8 s joined from recordings of one speaker; returns the table and total seconds."""
    table = pd.read_csv(root / "labels.csv")
    rng = np.random.default_rng(seed)
    rows, total = [], 0.0
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        first = table.iloc[int(rng.integers(len(table)))]
        same = table[table.speaker == first.speaker]
        parts = [first] + [same.iloc[int(j)] for j in rng.integers(len(same), size=int(rng.integers(0, 4)))]
        x = np.concatenate([sf.read(root / p.file, dtype="float32")[0] for p in parts])
        rate = sf.info(root / first.file).samplerate
        seconds = float(rng.uniform(0.5, min(8.0, len(x) / rate)))
        x = x[: int(seconds * rate)]
        sf.write(out / f"clip{i:04d}.wav", x, rate)
        rows.append({"file": f"clip{i:04d}.wav", "label": first.label, "speaker": first.speaker})
        total += len(x) / rate
    pd.DataFrame(rows).to_csv(out / "clips.csv", index=False)
    return out / "clips.csv", total


def bare_and_naive(model: str, files: list[Path], batch_seconds: float, out: Path) -> tuple[float, float]:
    """(bare forward loop seconds, naive per-file loop seconds) for the same files."""
    from embstore.backbones.registry import load_backbone
    from embstore.data.audio import load_waveform
    from embstore.extraction.encode import length_order, make_batches

    bb = load_backbone(model)
    rate = bb.sampling_rate
    waves = [load_waveform(f, rate) for f in files]
    lengths = np.array([len(w) for w in waves])
    order = length_order(lengths)
    sorted_waves = [waves[i] for i in order]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a, b in make_batches(lengths[order], 64, int(batch_seconds * rate)):
            enc = bb.tokenizer(
                sorted_waves[a:b], sampling_rate=rate, padding=True, return_attention_mask=True, return_tensors="pt"
            )
            bb.model(**enc, output_hidden_states=True)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    means, maxes = [], []
    with torch.no_grad():
        for f in files:
            x = load_waveform(f, rate)
            enc = bb.tokenizer(x, sampling_rate=rate, return_tensors="pt")
            hs = bb.model(**enc, output_hidden_states=True).hidden_states
            means.append([h[0].mean(0).numpy() for h in hs])
            maxes.append([h[0].amax(0).numpy() for h in hs])
    np.save(out / "mean.npy", np.array(means, dtype=np.float16))
    np.save(out / "max.npy", np.array(maxes, dtype=np.float16))
    return bare, time.perf_counter() - t0


def timed_extract(cfg: ExtractConfig) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = extract(cfg, show_progress=False)
    return time.perf_counter() - t0, res.path


def exactness_cost(model: str, root: Path, tmpd: Path, n_clips: int) -> dict[str, object]:
    """Section 3 of the module docstring: extraction at batch 8 without and with the padding fixes, and at batch 1."""
    import contextlib

    from embstore.extraction.speech import AudioChunkEncoder

    clips, total = variable_clips(root, tmpd / "exact-clips", n_clips, seed=1)
    common = dict(model=model, data=str(clips), audio_col="file", label_col="label", layers="all", pooling="mean",
                  dtype="float32", batch_seconds=80.0, out=str(tmpd / "exact-stores"))  # fmt: skip
    extract(ExtractConfig.from_dict(dict(common, limit=8, out=str(tmpd / "warm"))), show_progress=False)
    fixed = AudioChunkEncoder.exactness
    runs: dict[str, tuple[float, str]] = {}
    try:
        AudioChunkEncoder.exactness = lambda self: contextlib.nullcontext()  # type: ignore[method-assign]
        # the store id says batching: exact either way; a separate directory keeps the runs apart
        runs["before"] = timed_extract(ExtractConfig.from_dict(dict(common, batch_size=8, out=str(tmpd / "before"))))
    finally:
        AudioChunkEncoder.exactness = fixed  # type: ignore[method-assign]
    runs["after"] = timed_extract(ExtractConfig.from_dict(dict(common, batch_size=8, out=str(tmpd / "after"))))
    runs["clip_by_clip"] = timed_extract(ExtractConfig.from_dict(dict(common, batch_size=1, out=str(tmpd / "one"))))
    with open_store(runs["clip_by_clip"][1]) as one:
        order = np.argsort(one.row_ids("all"))
        ref = one.pooled("all", "mean")[order]
        diffs = {}
        for name in ("before", "after"):
            with open_store(runs[name][1]) as s:
                got = s.pooled("all", "mean")[np.argsort(s.row_ids("all"))]
                diffs[name] = float(np.abs(got - ref).max())
    hour = 3600.0 / total
    return {
        "model": model,
        "clips": n_clips,
        "audio_seconds": round(total, 1),
        **{f"{k}_s": round(v[0], 2) for k, v in runs.items()},
        **{f"{k}_s_per_hour": round(v[0] * hour, 1) for k, v in runs.items()},
        "before_max_abs_diff_vs_clip_by_clip": diffs["before"],
        "after_max_abs_diff_vs_clip_by_clip": diffs["after"],
        "load_before": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:hubert-base", help="model of the bucketing comparison")
    ap.add_argument("--clips", type=int, default=200, help="variable-length clips for the bucketing comparison")
    ap.add_argument("--rows", type=int, default=100, help="Emo-DB files of the bare/naive comparison")
    ap.add_argument("--only-loops", action="store_true", help="run only the bare/naive comparison")
    ap.add_argument("--only-exactness", action="store_true", help="run only the cost of exact batches (section 3)")
    ap.add_argument("--exact-clips", type=int, default=40, help="variable-length clips of section 3")
    ap.add_argument("--batch-seconds", type=float, default=60.0)
    ap.add_argument("--sweep-models", default="random:hubert-tiny,random:hubert-base")
    ap.add_argument("--data", default=str(EMODB))
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    root = Path(args.data)
    if not (root / "labels.csv").is_file():
        raise SystemExit(f"{root}/labels.csv not found: the benchmark reads ../shared/datasets/emodb")
    out: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}"
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if args.only_exactness:
            out["exactness"] = exactness_cost(args.model, root, tmpd, args.exact_clips)
            print(json.dumps(out, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
            return
        table = pd.read_csv(root / "labels.csv").head(args.rows)
        few = [(root / f).resolve() for f in table.file]
        table.assign(file=[str(f) for f in few]).to_csv(tmpd / "few.csv", index=False)
        seconds = float(sum(sf.info(f).duration for f in few))
        (tmpd / "naive").mkdir()
        bare_s, naive_s = bare_and_naive(args.model, few, args.batch_seconds, tmpd / "naive")
        ext_s, _ = timed_extract(
            ExtractConfig.from_dict(
                dict(
                    model=args.model,
                    data=str(tmpd / "few.csv"),
                    audio_col="file",
                    label_col="label",
                    layers="all",
                    batch_seconds=args.batch_seconds,
                    out=str(tmpd / "stores-loops"),
                )
            )
        )
        out["loops"] = {
            "model": args.model,
            "files": len(few),
            "audio_seconds": round(seconds, 1),
            "bare_s": round(bare_s, 2),
            "extract_s": round(ext_s, 2),
            "naive_s": round(naive_s, 2),
            "extract_over_bare_throughput": round(bare_s / ext_s, 3),
            "extract_over_naive_throughput": round(naive_s / ext_s, 3),
        }
        print(json.dumps(out["loops"]), flush=True)
        if args.only_loops:
            print(json.dumps(out, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
            return
        clips, total = variable_clips(root, tmpd / "clips", args.clips)
        common = dict(
            model=args.model,
            data=str(clips),
            audio_col="file",
            label_col="label",
            layers="all",
            batch_seconds=args.batch_seconds,
            out=str(tmpd / "stores"),
        )
        # warm-up: model load and first-call overheads, on a few rows
        extract(ExtractConfig.from_dict(dict(**common, limit=8)), show_progress=False)
        t_bucket, _ = timed_extract(ExtractConfig.from_dict(dict(**common)))
        t_plain, _ = timed_extract(ExtractConfig.from_dict(dict(**common, bucket=False)))
        out["bucketing"] = {
            "model": args.model,
            "clips": args.clips,
            "audio_seconds": round(total, 1),
            "bucketed_s": round(t_bucket, 2),
            "source_order_s": round(t_plain, 2),
            "bucketed_audio_s_per_s": round(total / t_bucket, 1),
            "source_order_audio_s_per_s": round(total / t_plain, 1),
            "speedup": round(t_plain / t_bucket, 2),
        }
        print(json.dumps(out["bucketing"]), flush=True)

        sweeps = []
        n_files = len(pd.read_csv(root / "labels.csv"))
        for model in [m for m in args.sweep_models.split(",") if m]:
            cfg = ExtractConfig.from_dict(
                dict(
                    model=model,
                    data=str(root / "labels.csv"),
                    audio_col="file",
                    label_col="label",
                    group_col="speaker",
                    holdout=0.2,
                    layers="all",
                    batch_seconds=args.batch_seconds,
                    out=str(tmpd / "stores"),
                )
            )
            t_ext, path = timed_extract(cfg)
            t0 = time.perf_counter()
            res = run_sweep(SweepConfig(store=path, layers="all", out=str(tmpd / f"run-{model.split(':')[-1]}")))
            t_sweep = time.perf_counter() - t0
            rows = [json.loads(line) for line in (res.run_dir / "results.jsonl").read_text().splitlines()]
            meta = json.loads((res.run_dir / "run.json").read_text())
            with open_store(path) as s:
                test_speakers = sorted({s.group_names[g] for g in s.groups("test")})
            per_layer = {
                f"{r['layers']}/{r['pooling']}": round(r["accuracy"], 3) for r in rows if r["combine"] == "single"
            }
            sweeps.append(
                {
                    "model": model,
                    "files": n_files,
                    "audio_seconds": round(2.0 * n_files, 1),
                    "extract_s": round(t_ext, 2),
                    "audio_s_per_s": round(2.0 * n_files / t_ext, 1),
                    "sweep_s": round(t_sweep, 2),
                    "configs": len(rows),
                    "test_speakers": test_speakers,
                    "train_rows": meta["train_rows"],
                    "eval_rows": meta["eval_rows"],
                    "majority_accuracy": round(meta["majority_accuracy"], 3),
                    "best": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.best.items()},
                    "per_layer_accuracy": per_layer,
                }
            )
            print(json.dumps(sweeps[-1]), flush=True)

        # augmentation paid once: one noise+shift+speed copy of every minority-class training row
        aug = ExtractConfig.from_dict(
            dict(
                model="random:hubert-tiny",
                data=str(root / "labels.csv"),
                audio_col="file",
                label_col="label",
                group_col="speaker",
                holdout=0.2,
                augment=("noise", "shift", "speed"),
                copies=1,
                batch_seconds=args.batch_seconds,
                out=str(tmpd / "stores"),
            )
        )
        t_aug, path = timed_extract(aug)
        with open_store(path) as s:
            out["augmentation"] = {
                "model": "random:hubert-tiny",
                "extract_s": round(t_aug, 2),
                "rows": {sp: s.n_rows(sp) for sp in s.splits},
                "augmented": s.meta.augmented,
            }
        print(json.dumps(out["augmentation"]), flush=True)
    out["sweeps"] = sweeps
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
