"""The files of a pretraining run directory besides model/ and checkpoint/ (see :mod:`heads.pretrain.run`)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embstore import __version__
from embstore.errors import OutputNotWritableError
from heads.evalset import EVAL_SET_KEY
from heads.pretrain.config import PretrainConfig
from heads.pretrain.data import CorpusProvenance, PretrainData
from heads.report.rundir import RUN_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    from transformers import BertConfig

__all__ = ["LOG_FILE", "PLOT_FILE", "read_log", "write_outputs"]

LOG_FILE, PLOT_FILE = "pretrain_log.jsonl", "loss_curve.png"


def write_outputs(
    run_dir: Path,
    config: PretrainConfig,
    data: PretrainData,
    bert_config: BertConfig,
    history: list[dict[str, Any]],
    final: dict[str, Any] | None,
) -> None:
    """(Re)write run.json, pretrain_log.jsonl (one line per epoch; epoch 0 is the untrained model),
    loss_curve.png and summary.md from the whole history, so a resumed run's files are complete."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "name": run_dir.name,
            "kind": "pretrain",
            "tool_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "model_config": bert_config.to_diff_dict(),
            "corpus": data.provenance.to_dict(),
            EVAL_SET_KEY: data.provenance.eval_set,
            "final": final,
        }
        (run_dir / RUN_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (run_dir / LOG_FILE).write_text("".join(json.dumps(h, default=str) + "\n" for h in history))
        _plot(run_dir / PLOT_FILE, history)
        (run_dir / SUMMARY_FILE).write_text(
            _summary(run_dir.name, config, data.provenance, bert_config, history, final)
        )
    except OSError as exc:
        raise OutputNotWritableError(
            f"Cannot write the run directory {run_dir} ({exc.strerror or exc}); choose a writable --out."
        ) from None


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch entries of ``pretrain_log.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / LOG_FILE).read_text().splitlines() if line.strip()]


def _plot(path: Path, history: list[dict[str, Any]]) -> None:
    from heads.report.plots import new_figure

    fig, (ax_loss, ax_acc) = new_figure(10, 4, ncols=2)
    trained = [h for h in history if h.get("train_mlm_loss") is not None]
    x_all = [h["steps"] for h in history]
    if trained:
        ax_loss.plot([h["steps"] for h in trained], [h["train_mlm_loss"] for h in trained], marker="o", label="train")
        ax_acc.plot(
            [h["steps"] for h in trained], [h["train_masked_accuracy"] for h in trained], marker="o", label="train"
        )
    ax_loss.plot(x_all, [h["heldout_mlm_loss"] for h in history], marker="s", label="held-out")
    ax_acc.plot(x_all, [h["heldout_masked_accuracy"] for h in history], marker="s", label="held-out")
    ax_loss.set(xlabel="optimizer step", ylabel="MLM loss (nats / masked token)", title="Masked-LM loss")
    ax_acc.set(xlabel="optimizer step", ylabel="masked-token accuracy", title="Masked-token accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _summary(
    name: str,
    config: PretrainConfig,
    corpus: CorpusProvenance,
    bert_config: BertConfig,
    history: list[dict[str, Any]],
    final: dict[str, Any] | None,
) -> str:
    c = bert_config
    lines = [
        f"# Pretraining run {name}",
        "",
        (
            f"- model: BERT {c.num_hidden_layers} layers x {c.hidden_size} hidden, {c.num_attention_heads} heads, "
            f"intermediate {c.intermediate_size}, {c.max_position_embeddings} positions, vocabulary {c.vocab_size} "
            f"({corpus.tokenizer})"
        ),
        (
            f"- corpus: {corpus.train_rows} training rows{' (pairs)' if corpus.pairs else ''}"
            f"{', both orders' if config.swap_augment else ''}; held-out: {corpus.eval_rows} rows "
            f"({corpus.eval_from})"
        ),
        f"- objective: masked-LM at {config.mask_prob} ({'whole words' if config.whole_word else 'tokens'}, 80/10/10)"
        + (f" + {config.pair_objective}" if config.pair_objective else ""),
        (
            f"- optimisation: AdamW lr {config.optim.lr}, batch {config.optim.batch_size} x accumulation "
            f"{config.optim.grad_accum}, "
            f"{config.optim.schedule} schedule, warmup {config.optim.warmup_ratio:.0%}, seed {config.source.seed}"
        ),
    ]
    if final:
        lines.append(
            f"- {final['steps']} optimizer steps in {final['train_seconds']:.0f} s "
            f"({final['tokens_per_second']:.0f} tokens/s), stopped by {final['stopped_by']}"
        )
    lines += [
        "",
        (
            "| epoch | steps | train MLM loss | train masked acc | held-out MLM loss | held-out masked acc "
            "| held-out perplexity | pair acc (held-out) | tokens/s |"
        ),
        "|" + "---|" * 9,
    ]
    for h in history:
        lines.append(
            f"| {h['epoch']} | {h['steps']} | {_fmt(h.get('train_mlm_loss'))} | "
            f"{_fmt(h.get('train_masked_accuracy'))} | {_fmt(h['heldout_mlm_loss'])} | "
            f"{_fmt(h['heldout_masked_accuracy'])} | {_fmt(h['heldout_perplexity'], '.2f')} | "
            f"{_fmt(h.get('heldout_pair_accuracy'))} | {_fmt(h.get('tokens_per_second'), '.0f')} |"
        )
    lines += ["", "Epoch 0 is the randomly initialised model.", "", f"![loss curve]({PLOT_FILE})", ""]
    return "\n".join(lines)
