"""``heads finetune`` at its defaults against the Hugging Face Trainer at its defaults, on the same rows.

For every data set and freezing (full fine-tuning, and embeddings + layers 1-4 frozen, ``--freeze 0-4``)
both contenders train MiniLM in the same process on the same training rows and are scored on the same
test rows:

- ours: ``run_finetune`` with nothing but the model, the data and ``--freeze`` given;
- the Trainer: ``AutoModelForSequenceClassification`` on the same weights, ``TrainingArguments`` at their
  defaults (lr 5e-5, batch 8, 3 epochs, linear decay, no warmup, no weight decay, seed 42), the same
  tokenizer and max length, a plain torch Dataset and the Trainer's default padding collator.

Reported: macro-F1 and accuracy on the test rows, and seconds per epoch (ours includes its validation
pass; the Trainer's is train_runtime / epochs). Targets: our macro-F1 >= the Trainer's on every data set
for both freezings, and our seconds per epoch <= 1.1x the Trainer's.

Then (``--surgery``, the default) the other variants on ag_news: all-but-last frozen, truncated to 4
layers, 30% of heads pruned, and the inference speed of the pruned and truncated models.

Data (seeded, from ../shared/datasets):
- ag_news: N rows sampled from train_pool.csv, M from test.csv;
- youtube_6class: N training rows and M test rows, a stratified split of youtube_6class_dedup.csv;
- sentipers: N rows sampled from train.csv, M from test.csv (Persian; MiniLM sees it as characters);
- tweets (on request): builtin:tweets, N training and M test rows, stratified.

Usage:
    python benchmarks/finetune.py --audio --memory      # speech: ours vs the Trainer on HuBERT; peak RSS, 30 s clips
    python benchmarks/finetune.py --lora 8 --train-rows 240 --test-rows 400   # LoRA: ours vs Trainer + peft, and full

    python benchmarks/finetune.py                       # 800 / 800 rows, ag_news youtube sentipers, + surgery
    python benchmarks/finetune.py --quick               # 96 / 96 rows of ag_news, no surgery (a smoke test)
    python benchmarks/finetune.py --datasets ag_news,tweets --train-rows 800 --test-rows 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FREEZINGS = {"full": None, "freeze 0-4": "0-4"}


# --------------------------------------------------------------------------- data


def prepare(name: str, work: Path, train_rows: int, test_rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``work/name/train.csv`` and ``test.csv`` (columns text, label) and return their paths."""
    from sklearn.model_selection import train_test_split

    def sample(df: pd.DataFrame, n: int) -> pd.DataFrame:
        return df.sample(min(n, len(df)), random_state=seed)

    def stratified(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        train, rest = train_test_split(df, train_size=train_rows, stratify=df["label"], random_state=seed)
        test, _ = train_test_split(
            rest,
            train_size=min(test_rows, len(rest) - df["label"].nunique()),
            stratify=rest["label"],
            random_state=seed,
        )
        return train, test

    if name == "ag_news":
        train = sample(pd.read_csv(SHARED / "ag_news" / "train_pool.csv"), train_rows)
        test = sample(pd.read_csv(SHARED / "ag_news" / "test.csv"), test_rows)
    elif name == "youtube":
        df = pd.read_csv(SHARED / "youtube_6class" / "youtube_6class_dedup.csv").rename(columns={"category": "label"})
        train, test = stratified(df)
    elif name == "sentipers":
        train = sample(pd.read_csv(SHARED / "sentipers" / "train.csv"), train_rows)
        test = sample(pd.read_csv(SHARED / "sentipers" / "test.csv"), test_rows)
    elif name == "tweets":
        from embstore.data.tables import builtin_path

        df = (
            pd.read_csv(builtin_path("tweets"), encoding_errors="replace")
            .rename(columns={"sentiment": "label"})
            .dropna(subset=["text", "label"])
        )
        df = df[df["text"].astype(str).str.strip() != ""]
        train, test = stratified(df)
    else:
        raise SystemExit(f"unknown data set {name!r}; choose from ag_news, youtube, sentipers, tweets")
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    for split, df in (("train", train), ("test", test)):
        df = df[["text", "label"]].copy()
        df["text"] = df["text"].astype(str).str.replace(r"[\r\n]+", " ", regex=True)  # one physical line per row
        df.to_csv(out / f"{split}.csv", index=False)
    return out / "train.csv", out / "test.csv"


def majority(train_csv: Path, test_csv: Path) -> float:
    """Test accuracy of always predicting the most frequent training class."""
    top = pd.read_csv(train_csv)["label"].value_counts().idxmax()
    return float((pd.read_csv(test_csv)["label"] == top).mean())


# --------------------------------------------------------------------------- contenders


def run_ours(
    train_csv: Path, test_csv: Path, freeze: str | None, out: Path, show_progress: bool = False, **options: Any
) -> dict[str, Any]:
    """``heads finetune --model minilm --split train=... --split test=... --label-col label [--freeze F]``."""
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.run import run_finetune

    values = {
        "model": "minilm",
        "data": None,
        "splits": [["train", str(train_csv)], ["test", str(test_csv)]],
        "label_col": "label",
        "freeze": freeze,
        "out": str(out),
        **options,
    }
    res = run_finetune(FinetuneConfig.from_dict(values), show_progress=show_progress)
    return {
        "accuracy": res.accuracy,
        "f1_macro": res.f1_macro,
        "seconds_per_epoch": res.seconds_per_epoch,
        "trainable_params": res.trainable_params,
        "run_dir": str(res.run_dir),
    }


class _Encoded(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Tokenised rows with their labels: what a Trainer user writes without the datasets library."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def run_trainer(
    train_csv: Path, test_csv: Path, freeze: str | None, out: Path, max_length: int = 128
) -> dict[str, Any]:
    """transformers.Trainer at its default TrainingArguments; freeze '0-4' freezes embeddings + layers 1-4."""
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from embstore.backbones.registry import minilm_path

    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    names = sorted(set(train["label"]) | set(test["label"]))  # the same label order as ours
    index = {n: i for i, n in enumerate(names)}

    def encoded(df: pd.DataFrame) -> _Encoded:
        enc = tok(df["text"].astype(str).tolist(), truncation=True, max_length=max_length)
        return _Encoded(dict(enc), [index[v] for v in df["label"]])

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    if freeze is not None:
        if freeze != "0-4":
            raise ValueError(f"the Trainer contender knows only freeze '0-4'; got {freeze!r}")
        model.bert.embeddings.requires_grad_(False)
        for layer in model.bert.encoder.layer[:4]:
            layer.requires_grad_(False)
    args = TrainingArguments(output_dir=str(out), report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=encoded(train), processing_class=tok)
    metrics = trainer.train().metrics
    pred = trainer.predict(encoded(test))
    y_pred = np.asarray(pred.predictions).argmax(-1)
    y_true = np.asarray(pred.label_ids)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "seconds_per_epoch": float(metrics["train_runtime"]) / float(args.num_train_epochs),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lr": args.learning_rate,
        "batch_size": args.per_device_train_batch_size,
        "epochs": args.num_train_epochs,
    }


# --------------------------------------------------------------------------- surgery variants


def inference_seconds(model_dir: Path, texts: list[str], repeats: int = 2) -> float:
    """Best-of-N seconds for one pass of the encoder over ``texts`` (sorted batches, inference mode)."""
    from embstore.backbones.registry import load_backbone
    from embstore.extraction.encode import length_order, make_batches, pad_batch, tokenize

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


def surgery(train_csv: Path, test_csv: Path, work: Path, full_run: Path | None) -> dict[str, Any]:
    """The other fine-tuning variants at our defaults, and the inference speed of the smaller models."""
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.run import run_finetune

    base = {
        "model": "minilm",
        "data": None,
        "splits": [["train", str(train_csv)], ["test", str(test_csv)]],
        "label_col": "label",
    }
    variants = {
        "freeze 0-5 (all but last)": {"freeze": "all-but-last"},
        "truncate 4": {"truncate": 4},
        "prune 30% of heads": {"prune_fraction": 0.3},
    }
    results: dict[str, Any] = {}
    n_train = len(pd.read_csv(train_csv))
    for name, kw in variants.items():
        res = run_finetune(
            FinetuneConfig.from_dict({**base, **kw, "out": str(work / name.split()[0])}), show_progress=False
        )
        results[name] = {
            "accuracy": res.accuracy,
            "f1_macro": res.f1_macro,
            "trainable_params": res.trainable_params,
            "total_params": res.total_params,
            "seconds_per_epoch": res.seconds_per_epoch,
            "run_dir": str(res.run_dir),
        }
        print(
            f"{name:28s} acc {res.accuracy:.4f}  macro-F1 {res.f1_macro:.4f}  trainable {res.trainable_params:>10,} "
            f"of {res.total_params:>10,}  {res.seconds_per_epoch:6.1f} s/epoch  "
            f"{n_train / res.seconds_per_epoch:6.1f} train ex/s",
            flush=True,
        )
    if full_run is not None:
        texts = pd.read_csv(test_csv)["text"].astype(str).tolist()
        t_full = inference_seconds(full_run / "model", texts)
        for name in ("truncate 4", "prune 30% of heads"):
            t = inference_seconds(Path(results[name]["run_dir"]) / "model", texts)
            results[name]["inference_speedup"] = t_full / t
            print(
                f"inference {name}: {len(texts) / t:7.1f} ex/s vs full {len(texts) / t_full:7.1f} ex/s "
                f"-> {t_full / t:.2f}x",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--datasets", default="ag_news,youtube,sentipers", help="comma list of ag_news, youtube, sentipers, tweets"
    )
    ap.add_argument("--train-rows", type=int, default=800)
    ap.add_argument("--test-rows", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0, help="seed of the row sampling")
    ap.add_argument(
        "--surgery",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the all-but-last / truncate / prune variants on ag_news, with inference speed",
    )
    ap.add_argument("--quick", action="store_true", help="96 / 96 rows of ag_news, no surgery: a smoke test")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    ap.add_argument(
        "--audio",
        action="store_true",
        help="speech instead: ours against the Trainer on "
        "HubertForSequenceClassification (benchmarks/finetune_audio.py)",
    )
    ap.add_argument("--audio-datasets", default="emodb,tones", help="--audio: comma list of emodb, tones")
    ap.add_argument("--audio-model", default="random:hubert-base", help="--audio/--memory: the speech model")
    ap.add_argument(
        "--per-speaker",
        type=int,
        default=8,
        help="--audio: clips per Emo-DB speaker (tones: per speaker, a quarter per class)",
    )
    ap.add_argument("--audio-epochs", type=int, default=1, help="--audio: epochs of both contenders")
    ap.add_argument("--snr-db", type=float, default=23.0, help="--audio: noise on the training clips, both contenders")
    ap.add_argument("--lora", type=int, help="LoRA of this rank instead: ours vs the Trainer + peft, and both full")
    ap.add_argument("--lora-model", default="minilm", help="--lora: minilm or random:NAME (both load its weights)")
    ap.add_argument("--max-length", type=int, default=128, help="--lora: tokens per row, both contenders")
    ap.add_argument("--lora-epochs", type=int, help="--lora: epochs of every contender [default: each its own]")
    ap.add_argument("--memory", action="store_true", help="peak RSS of an epoch on 30-second clips per --budgets")
    ap.add_argument("--memory-clips", type=int, default=4, help="--memory: 30-second clips (3/4 of them train)")
    ap.add_argument("--budgets", default="30,60", help="--memory: --batch-seconds values to measure")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.train_rows, args.test_rows, args.surgery = "ag_news", 96, 96, False
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="embstore-ft-"))
    machine = (
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )
    print(f"machine: {machine}", flush=True)
    if args.audio or args.memory:
        import finetune_audio as fa

        report_audio: dict[str, Any] = {"machine": machine, "model": args.audio_model}
        if args.audio:
            report_audio["audio"] = fa.compare(
                work,
                [d.strip() for d in args.audio_datasets.split(",") if d.strip()],
                args.audio_model,
                args.per_speaker,
                args.audio_epochs,
                args.snr_db,
            )
        if args.memory:
            report_audio["memory"] = fa.memory(
                work, args.audio_model, args.memory_clips, [float(b) for b in args.budgets.split(",")]
            )
        if args.json:
            Path(args.json).write_text(json.dumps(report_audio, indent=2, default=str) + "\n")
        return
    if args.lora is not None:
        import finetune_lora

        train_csv, test_csv = prepare("ag_news", work, args.train_rows, args.test_rows, args.seed)
        print(
            f"\nag_news: {args.train_rows} train / {args.test_rows} test rows, {args.lora_model}, "
            f"{args.max_length} tokens, epochs {args.lora_epochs or 'each its default'}, "
            f"load {os.getloadavg()[0]:.2f}"
        )
        rows = finetune_lora.compare(train_csv, test_csv, work / "lora", args.lora, args.lora_model, args.max_length)
        print(f"load after: {os.getloadavg()[0]:.2f}")
        print(
            "\n| variant | ours macro-F1 | Trainer macro-F1 | ours s/epoch | Trainer s/epoch | ratio | ours trainable "
            "| Trainer trainable | ours optimiser state | Trainer optimiser state |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            o, h = r["ours"], r["trainer"]
            print(
                f"| {r['variant']} | {o['f1_macro']:.4f} | {h['f1_macro']:.4f} | {o['seconds_per_epoch']:.1f} | "
                f"{h['seconds_per_epoch']:.1f} | {o['seconds_per_epoch'] / h['seconds_per_epoch']:.2f}x | "
                f"{o['trainable_params']:,} | {h['trainable_params']:,} | "
                f"{o['optimizer_state_bytes'] / 2**20:.2f} MiB | {h['optimizer_state_bytes'] / 2**20:.2f} MiB |"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "lora": rows}, indent=2, default=str) + "\n")
        return
    report: dict[str, Any] = {
        "machine": machine,
        "train_rows": args.train_rows,
        "test_rows": args.test_rows,
        "rows": [],
    }
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        train_csv, test_csv = prepare(name, work, args.train_rows, args.test_rows, args.seed)
        maj = majority(train_csv, test_csv)
        print(
            f"\n{name}: {len(pd.read_csv(train_csv))} train / {len(pd.read_csv(test_csv))} test rows, "
            f"majority class {maj:.4f} of test",
            flush=True,
        )
        for variant, freeze in FREEZINGS.items():
            ours = run_ours(train_csv, test_csv, freeze, work / name / f"ours-{variant.replace(' ', '')}")
            hf = run_trainer(train_csv, test_csv, freeze, work / name / f"hf-{variant.replace(' ', '')}")
            row = {
                "dataset": name,
                "variant": variant,
                "majority_accuracy": maj,
                "ours": ours,
                "trainer": hf,
                "f1_met": ours["f1_macro"] >= hf["f1_macro"],
                "time_ratio": ours["seconds_per_epoch"] / hf["seconds_per_epoch"],
            }
            row["time_met"] = row["time_ratio"] <= 1.1
            report["rows"].append(row)
            print(
                f"  {variant:11s} ours macro-F1 {ours['f1_macro']:.4f} (acc {ours['accuracy']:.4f}, "
                f"{ours['seconds_per_epoch']:.1f} s/epoch) | Trainer macro-F1 {hf['f1_macro']:.4f} "
                f"(acc {hf['accuracy']:.4f}, {hf['seconds_per_epoch']:.1f} s/epoch) | time ratio "
                f"{row['time_ratio']:.2f}x",
                flush=True,
            )
    print(
        "\n| data set | variant | majority | ours macro-F1 | Trainer macro-F1 | ours s/epoch | Trainer s/epoch | ratio "
        "| F1 target | time target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        o, h = r["ours"], r["trainer"]
        print(
            f"| {r['dataset']} | {r['variant']} | {r['majority_accuracy']:.3f} | {o['f1_macro']:.4f} | "
            f"{h['f1_macro']:.4f} | "
            f"{o['seconds_per_epoch']:.1f} | {h['seconds_per_epoch']:.1f} | {r['time_ratio']:.2f}x | "
            f"{'met' if r['f1_met'] else 'MISSED'} | {'met' if r['time_met'] else 'MISSED'} |"
        )
    if args.surgery:
        print("\nsurgery variants on ag_news at our defaults:", flush=True)
        train_csv, test_csv = work / "ag_news" / "train.csv", work / "ag_news" / "test.csv"
        if not train_csv.is_file():
            train_csv, test_csv = prepare("ag_news", work, args.train_rows, args.test_rows, args.seed)
        full = next(
            (
                Path(r["ours"]["run_dir"])
                for r in report["rows"]
                if r["dataset"] == "ag_news" and r["variant"] == "full"
            ),
            None,
        )
        report["surgery"] = surgery(train_csv, test_csv, work / "ag_news" / "surgery", full)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    missed = [r for r in report["rows"] if not (r["f1_met"] and r["time_met"])]
    print(f"\n{len(report['rows']) - len(missed)} of {len(report['rows'])} comparisons meet both targets", flush=True)


if __name__ == "__main__":
    sys.exit(main())
