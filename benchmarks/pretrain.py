"""Pretrain a small BERT on WiC for a fixed budget of minutes, then probe every layer against the same
architecture at random initialisation.

1. A short pilot run measures optimizer steps per second, so the real run's schedule (warmup and
   linear decay) is sized to the budget; the real run also stops at the budget.
2. ``heads pretrain`` with configs/pretrain-wic.yaml: the WiC training sentences as pairs, both
   orders (swap augmentation), 15% Bernoulli masking, WordPiece vocabulary trained on the same
   text, held-out perplexity on WiC dev.
3. (a) the pretrained backbone and (b) the same architecture and tokenizer at its random
   initialisation (the pretraining run's own starting weights): ``embstore extract`` of WiC
   train -> test as joint pairs, then ``heads sweep --layers all`` (linear probes on each single
   layer plus the all-layer combinations).
4. Optionally ``heads finetune --folds K`` with a 2048-wide MLP decoder on a subset, for (a) and (b).

Usage: python benchmarks/pretrain.py [--minutes 10] [--out runs/bench-pretrain] [--finetune-rows 400 --folds 5]
       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from embstore import ExtractConfig, extract
from heads.finetune.config import FinetuneConfig
from heads.finetune.run import run_finetune
from heads.pretrain.config import PretrainConfig
from heads.pretrain.run import run_pretrain
from heads.probe.sweep import SweepConfig, run_sweep
from heads.report.results import read_run

ROOT = Path(__file__).resolve().parents[1]
WIC = ROOT.parent / "shared" / "datasets" / "wic"
log = logging.getLogger("bench")


def random_init_dir(pretrain_dir: Path, out: Path, seed: int) -> Path:
    """The pretraining run's starting weights (same config, same seed, same construction) with its tokenizer."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    config = BertConfig.from_pretrained(pretrain_dir)
    set_seed(seed)
    net = BertForPreTraining(config)
    net.bert.save_pretrained(out)
    AutoTokenizer.from_pretrained(pretrain_dir).save_pretrained(out)
    return out


def probe(model_dir: Path, work: Path, name: str) -> dict[str, Any]:
    """Extract WiC train/test with ``model_dir`` and sweep linear probes over all layers."""
    t0 = time.perf_counter()
    store = extract(
        ExtractConfig.from_dict(
            dict(
                model=str(model_dir),
                data=None,
                splits=(("train", str(WIC / "train.csv")), ("test", str(WIC / "test.csv"))),
                text_col="sentence1",
                text_pair_col="sentence2",
                label_col="label",
                max_length=64,
                out=str(work / f"{name}.zarr"),
            )
        ),
        show_progress=False,
    )
    t_extract = time.perf_counter() - t0
    sweep = run_sweep(
        SweepConfig.from_dict({"store": str(store.path), "layers": "all", "out": str(work / f"sweep-{name}")})
    )
    _, rows = read_run(sweep.run_dir)
    table = [
        {"layers": r.layers, "combine": r.combine, "pooling": r.pooling, "accuracy": r.accuracy, "f1_macro": r.f1_macro}
        for r in rows
    ]
    return {"extract_seconds": t_extract, "sweep_dir": str(sweep.run_dir), "best": sweep.best, "rows": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="Pretraining budget [default: 10].")
    ap.add_argument("--pilot-minutes", type=float, default=0.75)
    ap.add_argument("--out", default="runs/bench-pretrain")
    ap.add_argument("--finetune-rows", type=int, default=400, help="WiC train rows for the fold fine-tune (0: skip).")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch threads [default: torch's choice, one per core].")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("accelerate", "heads.probe", "embstore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.chdir(ROOT)  # the config's relative paths
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from cli.common import load_yaml_config

    base = load_yaml_config("configs/pretrain-wic.yaml")
    machine = (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, cuda {torch.cuda.is_available()}"
    )
    log.info("machine: %s", machine)

    pilot = run_pretrain(
        PretrainConfig.from_dict({**base, "max_minutes": args.pilot_minutes, "epochs": 1, "out": str(work / "pilot")}),
        show_progress=False,
    )
    pilot_meta = json.loads((pilot.run_dir / "run.json").read_text())["final"]
    steps_per_second = pilot_meta["steps"] / pilot_meta["train_seconds"]
    max_steps = max(10, int(steps_per_second * args.minutes * 60))
    log.info("pilot: %.2f steps/s -> %d steps for %.1f minutes", steps_per_second, max_steps, args.minutes)

    t0 = time.perf_counter()
    res = run_pretrain(
        PretrainConfig.from_dict(
            {**base, "max_steps": max_steps, "max_minutes": args.minutes, "out": str(work / "pretrain")}
        ),
        show_progress=False,
    )
    wall = time.perf_counter() - t0
    meta = json.loads((res.run_dir / "run.json").read_text())
    init = res.history[0]
    log.info(
        "pretrained %d steps in %.0f s (%.0f tokens/s): held-out masked acc %.4f vs %.4f at init",
        res.steps,
        meta["final"]["train_seconds"],
        res.tokens_per_second,
        res.heldout_masked_accuracy,
        init["heldout_masked_accuracy"],
    )
    random_dir = random_init_dir(res.model_dir, work / "random-init", int(base.get("seed", 0)))

    report: dict[str, Any] = {
        "machine": machine,
        "budget_minutes": args.minutes,
        "planned_steps": max_steps,
        "steps": res.steps,
        "stopped_by": meta["final"]["stopped_by"],
        "train_seconds": meta["final"]["train_seconds"],
        "wall_seconds": wall,
        "tokens_per_second": res.tokens_per_second,
        "parameters": meta["final"]["parameters"],
        "vocab_size": meta["corpus"]["vocab_size"],
        "train_rows": meta["corpus"]["train_rows"],
        "final": {
            "train_mlm_loss": res.train_mlm_loss,
            "train_masked_accuracy": res.train_masked_accuracy,
            "heldout_mlm_loss": res.heldout_mlm_loss,
            "heldout_masked_accuracy": res.heldout_masked_accuracy,
            "heldout_perplexity": res.heldout_perplexity,
        },
        "init": {k: init[k] for k in ("heldout_mlm_loss", "heldout_masked_accuracy", "heldout_perplexity")},
        "history": res.history,
    }
    for name, model_dir in (("pretrained", res.model_dir), ("random", random_dir)):
        report[f"probe_{name}"] = probe(model_dir, work, name)
        log.info("%s: best %s", name, report[f"probe_{name}"]["best"])
    if args.finetune_rows:
        import pandas as pd

        pd.read_csv(WIC / "train.csv").head(args.finetune_rows).to_csv(work / "ft-train.csv", index=False)
        for name, model_dir in (("pretrained", res.model_dir), ("random", random_dir)):
            t1 = time.perf_counter()
            ft = run_finetune(
                FinetuneConfig.from_dict(
                    dict(
                        model=str(model_dir),
                        data=str(work / "ft-train.csv"),
                        text_col="sentence1",
                        text_pair_col="sentence2",
                        label_col="label",
                        folds=args.folds,
                        epochs=3,
                        patience=0,
                        lr=3e-4,
                        batch_size=32,
                        max_length=64,
                        classifier="mlp",
                        classifier_hidden=(2048,),
                        out=str(work / f"ft-{name}"),
                    )
                )
            )
            report[f"finetune_{name}"] = {
                "accuracy": ft.accuracy,
                "accuracy_std": ft.accuracy_std,
                "f1_macro": ft.f1_macro,
                "f1_macro_std": ft.f1_macro_std,
                "seconds": time.perf_counter() - t1,
            }
            log.info("finetune %s: %s", name, report[f"finetune_{name}"])
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("report: %s", work / "report.json")


if __name__ == "__main__":
    main()
