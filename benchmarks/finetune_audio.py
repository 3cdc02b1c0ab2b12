"""``benchmarks/finetune.py --audio``: ``heads finetune`` on a speech model against ``transformers.Trainer`` on
``HubertForSequenceClassification``, on the same rows, from the same initial weights, with the same frozen parts.

Pretrained speech weights cannot be downloaded here, so both contenders start from the same random-init model of
the real HuBERT-base shape (``random:hubert-base``, 12 x 768); the scores say that both loops learn, not what a
pretrained HuBERT reaches.

- ours: ``run_finetune`` with the study's recipe (feature encoder frozen, the default; mean of frames; a 2-layer MLP
  head of 256; noise on the training clips; batch 2; lr 1e-5 for the backbone, the new head at ``--head-lr`` 1e-3).
- the Trainer: ``HubertForSequenceClassification`` whose ``.hubert`` holds our backbone's initial weights,
  ``freeze_feature_encoder()``, its own head (a 256-wide projector, mean of frames, a linear classifier), the same
  feature extractor, batch 2, lr 1e-5, the same noise (``--snr-db``, drawn per clip and epoch) and the rows our run
  fitted on (read from its run.json: our early-stopping carve is not given to the Trainer, which does not stop early).

Reported: macro-F1 and accuracy on the same held-out (speaker-disjoint) rows and seconds per epoch (ours includes
its validation pass; the Trainer's is train_runtime / epochs). Target: ours <= 1.1x the Trainer's.

``--memory``: peak RSS of one training epoch on 30-second clips, each setting in a fresh process, for
``--batch-seconds`` budgets and a batch of 8: what a batch of 8 long clips would cost if the budget did not cap it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT / "tests"))  # the tone generator


def prepare_emodb(work: Path, per_speaker: int, seed: int = 0) -> tuple[Path, Path]:
    """``per_speaker`` clips of each Emo-DB speaker (stratified by label where it can), absolute paths; speakers 03
    and 08 (one male, one female) are the test speakers, the other 8 train."""
    df = pd.read_csv(SHARED / "emodb" / "labels.csv")
    df["file"] = [str(SHARED / "emodb" / f) for f in df["file"]]
    picked = pd.concat([g.sample(min(per_speaker, len(g)), random_state=seed) for _, g in df.groupby("speaker")])
    test = picked["speaker"].isin(["spk03", "spk08"])
    (work / "emodb").mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = work / "emodb" / "train.csv", work / "emodb" / "test.csv"
    picked[~test].to_csv(train_csv, index=False)
    picked[test].to_csv(test_csv, index=False)
    return train_csv, test_csv


def prepare_tones(work: Path, per_class: int, seconds: float = 1.0) -> tuple[Path, Path]:
    """Generated tones (tests/factories.py, write_tones), 5 speakers; speaker 4 is the test speaker."""
    from factories import write_tones

    table = write_tones(work / "tones", per_class=per_class, speakers=5, seconds=seconds)
    df = pd.read_csv(table)
    df["file"] = [str(table.parent / f) for f in df["file"]]
    test = df["speaker"] == "spk4"
    df[~test].to_csv(work / "tones" / "train.csv", index=False)
    df[test].to_csv(work / "tones" / "test.csv", index=False)
    return work / "tones" / "train.csv", work / "tones" / "test.csv"


def run_ours(train_csv: Path, test_csv: Path, out: Path, model: str, **options: Any) -> dict[str, Any]:
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.run import run_finetune

    values = {
        "model": model,
        "data": None,
        "splits": [["train", str(train_csv)], ["test", str(test_csv)]],
        "audio_col": "file",
        "label_col": "label",
        "group_col": "speaker",
        "out": str(out),
        **options,
    }
    res = run_finetune(FinetuneConfig.from_dict(values), show_progress=False)
    rows = json.loads((res.run_dir / "run.json").read_text())["rows"]
    return {
        "accuracy": res.accuracy,
        "f1_macro": res.f1_macro,
        "seconds_per_epoch": res.seconds_per_epoch,
        "trainable_params": res.trainable_params,
        "fit_rows": rows["fit"],
        "run_dir": str(res.run_dir),
    }


class _Clips:
    """What a Trainer user writes: read the clip, add noise to training clips, let the collator pad."""

    def __init__(self, df: pd.DataFrame, names: list[str], rate: int, snr_db: float | None, seed: int) -> None:
        self.files, self.labels = df["file"].tolist(), [names.index(v) for v in df["label"]]
        self.rate, self.snr_db, self.seed, self.calls = rate, snr_db, seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from embstore.data.audio import load_waveform

        x = load_waveform(self.files[i], self.rate)
        if self.snr_db is not None:
            self.calls += 1
            rng = np.random.default_rng([self.seed, i, self.calls])
            x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(np.mean(x**2) / 10 ** (self.snr_db / 10))
        return {"input_values": x.astype(np.float32), "labels": self.labels[i]}


def run_trainer(
    train_csv: Path,
    test_csv: Path,
    out: Path,
    model: str,
    fit_rows: list[int],
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    snr_db: float | None,
) -> dict[str, Any]:
    import torch
    from sklearn.metrics import f1_score
    from transformers import HubertConfig, HubertForSequenceClassification, Trainer, TrainingArguments

    from embstore.backbones.registry import load_backbone

    backbone = load_backbone(model)  # the weights our run started from
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    names = sorted(set(train["label"]) | set(test["label"]))
    config = HubertConfig(**{**backbone.model.config.to_dict(), "num_labels": len(names)})
    clf = HubertForSequenceClassification(config)
    clf.hubert.load_state_dict(backbone.model.state_dict(), strict=True)
    clf.freeze_feature_encoder()
    fe = backbone.tokenizer

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = fe(
            [it["input_values"] for it in items],
            sampling_rate=fe.sampling_rate,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return {**enc, "labels": torch.tensor([it["labels"] for it in items])}

    args = TrainingArguments(
        output_dir=str(out),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        num_train_epochs=epochs,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=clf,
        args=args,
        data_collator=collate,
        train_dataset=_Clips(train.iloc[fit_rows], names, fe.sampling_rate, snr_db, 0),
    )
    metrics = trainer.train().metrics
    pred = trainer.predict(_Clips(test, names, fe.sampling_rate, None, 0))  # type: ignore[arg-type]
    y_pred, y_true = np.asarray(pred.predictions).argmax(-1), np.asarray(pred.label_ids)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "seconds_per_epoch": float(metrics["train_runtime"]) / epochs,
        "trainable_params": sum(p.numel() for p in clf.parameters() if p.requires_grad),
    }


def compare(
    work: Path, datasets: list[str], model: str, per_speaker: int, epochs: int, snr_db: float
) -> list[dict[str, Any]]:
    rows = []
    for name in datasets:
        train_csv, test_csv = (
            prepare_emodb(work, per_speaker) if name == "emodb" else prepare_tones(work, max(2, per_speaker // 4))
        )
        recipe = dict(lr=1e-5, batch_size=2, epochs=epochs)
        ours = run_ours(
            train_csv,
            test_csv,
            work / name / "ours",
            model,
            classifier="mlp",
            classifier_hidden=[256],
            augment="noise",
            snr_db=snr_db,
            patience=0,
            **recipe,
        )
        hf = run_trainer(train_csv, test_csv, work / name / "hf", model, ours["fit_rows"], snr_db=snr_db, **recipe)
        ratio = ours["seconds_per_epoch"] / hf["seconds_per_epoch"]
        row = {
            "dataset": name,
            "fit_rows": len(ours["fit_rows"]),
            "test_rows": len(pd.read_csv(test_csv)),
            "ours": ours,
            "trainer": hf,
            "time_ratio": ratio,
        }
        rows.append(row)
        print(
            f"{name}: {row['fit_rows']} fit / {row['test_rows']} test rows | ours macro-F1 {ours['f1_macro']:.4f} "
            f"(acc {ours['accuracy']:.4f}, {ours['seconds_per_epoch']:.1f} s/epoch) | Trainer macro-F1 "
            f"{hf['f1_macro']:.4f} (acc {hf['accuracy']:.4f}, {hf['seconds_per_epoch']:.1f} s/epoch) | ratio "
            f"{ratio:.2f}x",
            flush=True,
        )
    print(
        "\n| data set | fit / test rows | ours macro-F1 | Trainer macro-F1 | ours s/epoch | Trainer s/epoch | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, h = r["ours"], r["trainer"]
        print(
            f"| {r['dataset']} | {r['fit_rows']} / {r['test_rows']} | {o['f1_macro']:.4f} | {h['f1_macro']:.4f} | "
            f"{o['seconds_per_epoch']:.1f} | {h['seconds_per_epoch']:.1f} | {r['time_ratio']:.2f}x |"
        )
    return rows


def _memory_child(table: str, model: str, batch_seconds: float, batch_size: int, out: str) -> None:
    """One epoch of fine-tuning on the 30-second clips; prints the peak RSS in MiB."""
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.run import run_finetune

    t0 = time.perf_counter()
    run_finetune(
        FinetuneConfig.from_dict(
            {
                "model": model,
                "data": table,
                "audio_col": "file",
                "label_col": "label",
                "holdout": 0.25,
                "epochs": 1,
                "patience": 0,
                "batch_size": batch_size,
                "batch_seconds": batch_seconds,
                "max_seconds": 30.0,
                "lr": 1e-5,
                "out": out,
            }
        ),
        show_progress=False,
    )
    print(
        json.dumps(
            {
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


def memory(work: Path, model: str, clips: int, budgets: list[float]) -> list[dict[str, Any]]:
    """Peak RSS for each ``--batch-seconds`` budget (batch size 8), and of the model alone, each in a fresh process."""
    from factories import write_tones

    table = write_tones(work / "long", per_class=max(1, clips // 4), speakers=1, seconds=30.0)
    base = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource; from embstore.backbones.registry import load_backbone; "
            f"load_backbone({model!r}); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    rows = [{"setting": "model loaded, no training", "peak_rss_mib": float(base.stdout.split()[-1])}]
    for budget in budgets:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(table),
                model,
                str(budget),
                "8",
                str(work / f"mem-{budget}"),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "setting": f"--batch-seconds {budget:g} (batch-size 8: {int(budget // 30) or 1} clip(s) of 30 s per "
                f"step)",
                **got,
            }
        )
    print("\n| setting | peak RSS (MiB) |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['peak_rss_mib']:.0f} |")
    return rows


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
    _memory_child(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
