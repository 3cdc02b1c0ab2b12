"""LoRA: ``heads finetune --lora R`` against the Hugging Face Trainer + peft LoRA at the same R and targets, and both
full fine-tunes, on the same rows and the same initial weights (MiniLM); run by ``benchmarks/finetune.py --lora R``.

- ours: ``run_finetune`` with the model, the data and ``lora=R`` (everything else at its defaults: the adapters at
  ``LORA_LR``, alpha 2R, the anatomy map's attention and MLP projections of every block);
- the peer: ``AutoModelForSequenceClassification`` wrapped by ``peft.get_peft_model`` with ``LoraConfig(r=R,
  lora_alpha=2R, target_modules=<the same projections>, task_type="SEQ_CLS")`` (peft then trains the classifier
  fully, as ours does), the Trainer at its default ``TrainingArguments``;
- the two full fine-tunes (ours at its defaults, the Trainer at its defaults) beside them.

Reported per contender: macro-F1 and accuracy on the test rows, seconds per epoch (ours includes its validation
pass), trainable parameters, and the optimiser state (AdamW's two moments per trainable parameter, measured as the
bytes of the optimizer's state tensors after training for the Trainer, and after one step of ours on the same
model for ours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

# the anatomy map's projections of a BERT block, as peft target_modules (block-relative names match the same way)
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (exp_avg, exp_avg_sq; step counters)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def model_dir(name: str, work: Path) -> Path:
    """A local directory of ``name``'s weights and tokenizer, which both contenders load (the same initial weights):
    MiniLM's own, or a random:NAME model saved once."""
    from embstore.backbones.pruned import save_model
    from embstore.backbones.registry import load_backbone, minilm_path

    if name == "minilm":
        return minilm_path()
    out = work / f"model-{name.replace(':', '-')}"
    if not (out / "config.json").is_file():
        backbone = load_backbone(name)
        save_model(backbone.model, backbone.tokenizer, out)
    return out


def our_optimizer_bytes(path: Path, lora: int | None, n_classes: int) -> int:
    """Optimizer-state bytes of one AdamW step of ours on the run's model shape (the backbone after surgery)."""
    from embstore.backbones.registry import load_backbone
    from heads.finetune.config import FinetuneConfig
    from heads.finetune.model import SequenceClassifier
    from heads.finetune.run import prepare_encoder
    from heads.protocol.optim import adamw
    from heads.training.optim import param_groups

    config = FinetuneConfig.from_dict({"data": "x.csv", "lora": lora})
    encoder = prepare_encoder(config, load_backbone(str(path)).model).model
    model = SequenceClassifier(encoder, n_classes)
    opt = adamw(param_groups(model, config.optim.lr, 0.0, head_prefix="head.", head_lr=config.head_lr), config.optim.lr)
    ids = torch.randint(1000, 2000, (2, 16))
    torch.nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 1])).backward()
    opt.step()
    return state_bytes(opt)


def run_trainer_lora(
    path: Path, train_csv: Path, test_csv: Path, r: int | None, out: Path, max_length: int, epochs: int | None = None
) -> dict[str, Any]:
    """The Trainer at its defaults on the model at ``path``, with peft LoRA of rank ``r`` on BERT_TARGETS (None:
    a full fine-tune)."""
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(str(path))
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    names = sorted(set(train["label"]) | set(test["label"]))
    index = {n: i for i, n in enumerate(names)}

    class Encoded(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self, df: pd.DataFrame) -> None:
            self.enc = dict(tok(df["text"].astype(str).tolist(), truncation=True, max_length=max_length))
            self.labels = [index[v] for v in df["label"]]

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=len(names))
    if r is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=BERT_TARGETS, task_type="SEQ_CLS")
        )
    args = TrainingArguments(
        output_dir=str(out),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **({} if epochs is None else {"num_train_epochs": epochs}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=Encoded(train), processing_class=tok)
    metrics = trainer.train().metrics
    pred = trainer.predict(Encoded(test))
    y_pred, y_true = np.asarray(pred.predictions).argmax(-1), np.asarray(pred.label_ids)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "seconds_per_epoch": float(metrics["train_runtime"]) / float(args.num_train_epochs),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": state_bytes(trainer.optimizer),
        "lr": args.learning_rate,
        "epochs": args.num_train_epochs,
    }


def compare(
    train_csv: Path,
    test_csv: Path,
    work: Path,
    r: int,
    model: str = "minilm",
    max_length: int = 128,
    epochs: int | None = None,
) -> list[dict[str, Any]]:
    """Ours and the Trainer, LoRA of rank ``r`` and full, on the same rows and initial weights (``model``): one dict
    per variant. ``epochs``: both train this many (None: each its default, ours 5 with early stopping, the
    Trainer's 3)."""
    from finetune import run_ours

    path = model_dir(model, work)
    n_classes = pd.read_csv(train_csv)["label"].nunique()
    rows = []
    for variant, rank in ((f"LoRA r={r}", r), ("full", None)):
        options: dict[str, Any] = {"model": str(path), "max_length": max_length, **({"lora": rank} if rank else {})}
        if epochs is not None:
            options["epochs"], options["min_epochs"] = epochs, min(3, epochs)
        ours = run_ours(train_csv, test_csv, None, work / f"ours-{rank}", **options)
        ours["optimizer_state_bytes"] = our_optimizer_bytes(path, rank, n_classes)
        peer = run_trainer_lora(path, train_csv, test_csv, rank, work / f"hf-{rank}", max_length, epochs)
        rows.append({"variant": variant, "ours": ours, "trainer": peer})
        print(
            f"  {variant:9s} ours macro-F1 {ours['f1_macro']:.4f} ({ours['seconds_per_epoch']:.1f} s/epoch, "
            f"{ours['trainable_params']:,} trainable, optimiser state {ours['optimizer_state_bytes'] / 2**20:.2f} MiB) "
            f"| Trainer macro-F1 {peer['f1_macro']:.4f} ({peer['seconds_per_epoch']:.1f} s/epoch, "
            f"{peer['trainable_params']:,} trainable, optimiser state {peer['optimizer_state_bytes'] / 2**20:.2f} MiB)",
            flush=True,
        )
    return rows
