"""``heads``: sweep, train, predict, report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from cli.common import Group, choice, listed, load_yaml_config, setup_logging, unescape
from embstore.data.spec import DEFAULT_MAX_LENGTH
from heads.finetune.config import FEATURE_ENCODER, FREEZE_SPEC, FinetuneConfig
from heads.pretrain.config import PretrainConfig
from heads.probe.config import HeadConfig
from heads.probe.specs import COMBINE
from heads.probe.word import TASKS
from heads.training.optim import OptimConfig

if TYPE_CHECKING:
    from heads.probe.sweep import SweepConfig, SweepResult

_HEAD_OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False),
        help="YAML file of options; flags given here override it. heads sweep: with a 'runs:' list (name + "
        "overrides each) it runs one sweep per entry and writes a merged report.",
    ),
    click.option("--store", help="Store path [default: the most recent complete store in the cache]."),
    click.option("--layers", help="Layer spec: all, 9-12, -4--1, 3,6, last4 [default: all]."),
    click.option("--combine", help=f"Comma list of {listed(COMBINE)} [default: all five; heads train: single]."),
    click.option("--pooling", help="Comma list of stored poolings [default: every stored pooling]."),
    click.option(
        "--head", "heads", help=f"Head kinds, a comma list of {listed(HeadConfig, 'head')} [default: linear]."
    ),
    click.option("--hidden", help="mlp hidden sizes, e.g. 2048 or 512,128. [default: 2048]"),
    click.option("--dropout", type=float, help="mlp, conv, rnn heads: dropout. [default: 0.1]"),
    click.option(
        "--activation",
        type=choice(HeadConfig, "activation"),
        help="mlp and conv heads: activation. [default: relu]",
    ),
    click.option("--conv-hidden", type=int, help="conv head: channels. [default: 512]"),
    click.option(
        "--conv-order",
        type=choice(HeadConfig, "conv_order"),
        help="conv head: the per-layer k3/s3 conv before the pointwise merge of the layers (layers-first), or the "
        "pointwise merge first (merge-first). [default: layers-first]",
    ),
    click.option("--sum-hidden", type=int, help="sum head (pairs): hidden size. [default: 256]"),
    click.option(
        "--tower-hidden",
        help="pair head: widths of each tower's Linear layers, e.g. 128,32 (activation between, tanh after the "
        "last). [default: one layer of --sum-hidden]",
    ),
    click.option(
        "--pair-features",
        help=f"pair head: the features of the towers' vectors u and v the classifier reads, a comma list of "
        f"{listed(HeadConfig, 'pair_features')} (|u-v|, u*v). [default: all four]",
    ),
    click.option("--rnn-hidden", type=int, help="rnn, gru, lstm heads: hidden size. [default: 256]"),
    click.option("--rnn-layers", type=int, help="rnn, gru, lstm heads: stacked layers. [default: 1]"),
    click.option(
        "--bidirectional/--unidirectional",
        default=None,
        help="rnn, gru, lstm heads: read the tokens both ways [default: unidirectional].",
    ),
    click.option(
        "--aggregate",
        type=choice(HeadConfig, "aggregate"),
        help="rnn, gru, lstm heads: how the token states become one vector. [default: mean]",
    ),
    click.option("--lr", type=float, help="Heads trained by AdamW: learning rate. [default: 0.001]"),
    click.option("--weight-decay", type=float, help="Heads trained by AdamW: weight decay. [default: 0.01]"),
    click.option("--batch-size", type=int, help="Heads trained by AdamW: rows per batch. [default: 64]"),
    click.option(
        "--epochs", type=int, help="Heads trained by AdamW: most passes over the training rows. [default: 30]"
    ),
    click.option("--patience", type=int, help="Early-stopping patience in epochs (0: off). [default: 5]"),
    click.option(
        "--report-epoch",
        type=choice(HeadConfig, "report_epoch"),
        help="Heads trained by epochs: keep and score the best validation epoch's weights, or the last epoch's. "
        "[default: best]",
    ),
    click.option(
        "--schedule",
        type=choice(HeadConfig, "schedule"),
        help="Heads trained by AdamW: lr schedule. [default: constant]",
    ),
    click.option("--gamma", type=float, help="Exponential schedule: lr factor per epoch. [default: 0.9]"),
    click.option(
        "--class-weight",
        type=choice(HeadConfig, "class_weight"),
        help="Weigh the loss by inverse class frequency (balanced) or not. [default: none]",
    ),
    click.option(
        "--validation-fraction",
        type=float,
        help="Share of training rows carved (seeded, stratified, group-aware) "
        "as validation: every choice (epoch, C, best configuration) is made there [default: 0.1].",
    ),
    click.option(
        "--val-split",
        help="A store split to use as validation instead of a carve of the training rows [default: none: carve].",
    ),
    click.option(
        "--solver",
        type=choice(HeadConfig, "solver"),
        help="Linear heads: batched L-BFGS over a C grid "
        "(scikit-learn's objective) or minibatch AdamW [default: lbfgs].",
    ),
    click.option(
        "--c-grid", help="Linear/lbfgs: inverse L2 strengths C to try, comma list [default: 1e-4,1e-3,...,100]."
    ),
    click.option("--max-iter", type=int, help="Linear/lbfgs: L-BFGS iterations at most [default: 1000]."),
    click.option("--tol", type=float, help="Linear/lbfgs: gradient tolerance, as scikit-learn's tol [default: 1e-4]."),
    click.option("--train-split", help="Split to train on (a one-split store is carved instead). [default: train]"),
    click.option("--eval-split", help="Split scored for the report [default: test, else validation]."),
    click.option("--holdout", type=float, help="One-split stores: share carved for evaluation [default: 0.2]."),
    click.option("--seeds", type=int, help="Repeat with seeds 0..N-1 (from a config's seed S: S..S+N-1) [default: 1]."),
    click.option(
        "--folds",
        type=int,
        help="K-fold cross-validation of the training rows (all rows of a one-split "
        "store), seeded and stratified, as heads finetune --folds [default: none: score the evaluation rows].",
    ),
    click.option(
        "--keep-fold-models",
        is_flag=True,
        default=None,
        help="With --folds: keep the best configuration's head of every fold, score them together (their averaged "
        "probabilities) on the store's evaluation split, and let heads predict --run average them.",
    ),
    click.option("--max-memory", help="Feature memory budget, e.g. 8GB. [default: 8GB]"),
    click.option(
        "--verify/--no-verify",
        default=None,
        help="Check every row chunk read against the checksum recorded "
        "when it was written; a mismatch stops with one line [default: verify].",
    ),
    click.option(
        "--ci/--no-ci",
        default=None,
        help="Bootstrap 95% intervals of every score and paired tests of every "
        "configuration against the best (exact McNemar, Holm-corrected) [default: on].",
    ),
    click.option(
        "--control",
        help="A control store of the same model shape and rows (embstore extract --random-weights "
        "SEED): every configuration is trained on it too, and the gain over it is reported [default: none].",
    ),
    click.option(
        "--mdl",
        is_flag=True,
        default=None,
        help="Also the online codelength (MDL, bits) of the training labels "
        "given each linear probe's features, and its compression over the uniform code.",
    ),
    click.option(
        "--task",
        type=click.Choice(list(TASKS)),
        help="What one example is: sentence (a store row), word, edge (a word and its head), arc (which word is "
        "the head), regression (a numeric target) [default: sentence].",
    ),
    click.option(
        "--label",
        help="Word, edge and arc tasks: the stored word label (upos, xpos, deprel...); depth (per word) and "
        "distance (--task edge, word pairs) are regression targets from the heads [default: none].",
    ),
    click.option(
        "--rank",
        "ranks",
        help="Probe complexity: a rank-constrained linear probe (head rank) at each of these ranks, e.g. 1,4,16,64 "
        "[default: none].",
    ),
    click.option(
        "--mlp-widths",
        help="Probe complexity: every mlp head at each of these hidden widths, e.g. 16,128,1024 [default: --hidden].",
    ),
    click.option("--alphas", help="Regression: ridge penalties to try, comma list [default: 0.1,1,10,...,1e5]."),
    click.option(
        "--control-task",
        is_flag=True,
        default=None,
        help="Also train every configuration on the control task (each word type a fixed random label, Hewitt & "
        "Liang 2019) and report control accuracy and selectivity.",
    ),
    click.option("--out", help="Run directory [default: runs/<time>-<store>]."),
    click.option("--device", help="cpu, cuda, auto [default: auto, CUDA when present]."),
    click.option(
        "--progress/--no-progress", default=None, help="tqdm bar of configurations done [default: on a terminal]."
    ),
    click.option("-v", "--verbose", is_flag=True, help="Log more."),
]


def head_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_HEAD_OPTIONS):
        f = opt(f)
    return f


def _sweep_config(
    config_file: str | None,
    opts: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
) -> SweepConfig:
    """Defaults, then the YAML file (or its ``values`` already read), then the flags given on the command line."""
    from heads.probe.sweep import SweepConfig

    merged = dict(defaults or {})
    merged.update(load_yaml_config(config_file) if values is None else values)
    if "head" in merged:  # a file's 'head' key is the --head flag, whose value is the 'heads' parameter
        merged["heads"] = merged.pop("head")
    merged.update({k: v for k, v in opts.items() if v is not None})
    return SweepConfig.from_dict(merged)


def _sweep_study(
    runs: list[dict[str, Any]], values: dict[str, Any], opts: dict[str, Any], progress: bool | None
) -> None:
    """A --config file with a 'runs:' list: one sweep per run (the file's options, then the run's, then the flags;
    each into OUT/NAME), then a merged report of them all in OUT/report."""
    from heads.probe.sweep import run_sweep
    from heads.report import write_report
    from heads.report.rundir import run_dir

    base = run_dir(opts.pop("out", None) or values.pop("out", None), "study")
    dirs = []
    for variant in runs:
        variant = dict(variant)
        name = str(variant.pop("name"))
        config = _sweep_config(None, {**opts, "out": str(base / name)}, values={**values, **variant})
        result = run_sweep(_announce(config), show_progress=progress)
        b = result.best
        click.echo(f"{name}: layers {b['layers']} {b['combine']}: test macro-F1 {b['f1_macro']:.4f}", err=True)
        dirs.append(result.run_dir)
    click.echo(str(write_report(dirs, base / "report")))


def _announce(config: SweepConfig) -> SweepConfig:
    if config.store is None:
        from embstore.store.catalog import cache_dir, latest_store

        path = latest_store(cache_dir())
        click.echo(
            f"using store {path} (the most recent complete store in {cache_dir()}; pass --store to choose)", err=True
        )
        import dataclasses

        config = dataclasses.replace(config, store=path)
    return config


@click.group(cls=Group)
@click.version_option(package_name="embstore")
def main() -> None:
    """Train and compare small heads on stored hidden states."""


def _finish(result: SweepResult) -> None:
    if result.rank != 0:  # under torchrun only rank 0 reports
        return
    b = result.best
    if "metric" in b:  # a regression or arc sweep
        from heads.report.rundir import SUMMARY_FILE

        click.echo(
            f"{result.rows} runs; best (chosen on validation): layers {b['layers']} {b['combine']} {b['pooling']} "
            f"{b['head']}: validation {b['metric']} {b['val_value']:.4f}, test {b['metric']} {b['value']:.4f}",
            err=True,
        )
        click.echo(f"summary: {result.run_dir / SUMMARY_FILE}", err=True)
        click.echo(str(result.run_dir))
        return
    val = f"validation macro-F1 {b['val_f1_macro']:.4f}, " if b.get("val_f1_macro") is not None else ""
    click.echo(
        f"{result.rows} runs; best (chosen on validation): layers {b['layers']} {b['combine']} {b['pooling']} "
        f"{b['head']}: "
        f"{val}test macro-F1 {b['f1_macro']:.4f}, test accuracy {b['accuracy']:.4f}",
        err=True,
    )
    from heads.report.rundir import SUMMARY_FILE

    click.echo(f"summary: {result.run_dir / SUMMARY_FILE}", err=True)
    click.echo(str(result.run_dir))


@main.command()
@head_options
def sweep(config_file: str | None, verbose: bool, progress: bool | None, **opts: Any) -> None:
    """Train every head on every layer combination of a store; write results, plots and the best head.

    A --config file with a 'runs:' list (a name and overrides each) runs one sweep per entry and a merged report."""
    setup_logging(verbose)
    from heads.probe.sweep import run_sweep

    values = load_yaml_config(config_file)
    runs = values.pop("runs", None)
    if runs is not None:
        _sweep_study(runs, values, opts, progress)
        return
    _finish(run_sweep(_announce(_sweep_config(None, opts, values=values)), show_progress=progress))


@main.command()
@head_options
def train(config_file: str | None, verbose: bool, progress: bool | None, **opts: Any) -> None:
    """Train one configuration (one layer group, combine, pooling and head)."""
    setup_logging(verbose)
    from embstore.errors import ConfigError
    from heads.probe.sweep import run_sweep

    config = _sweep_config(config_file, opts, defaults={"combine": "single"})
    for name, values in (("head", config.heads), ("combine", config.combine), ("pooling", config.pooling or ())):
        if len(values) > 1:
            raise ConfigError(
                f"heads train trains one configuration; --{name} has {len(values)} values ({','.join(values)}): give "
                f"one, or use heads sweep."
            )
    _finish(run_sweep(_announce(config), show_progress=progress))


@main.command()
@click.argument("input_file", default="-", type=click.File("r"))
@click.option(
    "--run", "run_dir", type=click.Path(exists=True, file_okay=False), help="Run directory (uses its best head)."
)
@click.option("--head-dir", type=click.Path(exists=True, file_okay=False), help="A saved head directory.")
@click.option("--device", help="cpu, cuda, auto [default: auto, CUDA when present].")
@click.option(
    "--predictions",
    "predictions_file",
    type=click.Path(dir_okay=False),
    help="Also write the predictions as FILE.npz, in the format of a sweep's predictions.npz (run 0, row_id = "
    "input line, y_true -1).",
)
def predict(
    input_file: TextIO, run_dir: str | None, head_dir: str | None, device: str | None, predictions_file: str | None
) -> None:
    """Label texts (one per line, TEXT<TAB>PAIR for pairs; '-' reads stdin) with a saved head.

    For a head trained on a speech model's store, or a speech fine-tune (heads finetune --audio-col), each line is an
    audio file path instead.

    Prints one JSON object per line: text, label, probabilities.
    """
    from embstore.device import resolve_device
    from embstore.errors import ConfigError
    from heads.finetune.predict import is_finetune_run, predict_finetuned, predict_finetuned_audio, predict_folds
    from heads.probe.predict import fold_heads, head_modality, label_names, load_head, predict_audio, predict_texts
    from heads.report.rundir import RUN_FILE

    lines = [line.rstrip("\n") for line in input_file if line.strip()]
    if not lines:
        raise ConfigError("No texts to label: the input is empty; give one text per line.")
    texts = [line.split("\t", 1)[0] for line in lines]
    pairs = (
        [line.split("\t", 1)[1] if "\t" in line else "" for line in lines] if any("\t" in x for x in lines) else None
    )
    run_meta = Path(run_dir or "", RUN_FILE)
    meta = json.loads(run_meta.read_text()) if run_dir is not None and run_meta.is_file() else {}
    if run_dir is not None and head_dir is None and meta.get("kind") == "finetune" and meta.get("folds"):
        audio = meta.get("modality") == "audio"  # a fold ensemble: every fold model's probabilities averaged
        labels, proba, names = predict_folds(
            run_dir, [line.strip() for line in lines] if audio else texts, pairs, resolve_device(device), audio
        )
    elif run_dir is not None and head_dir is None and is_finetune_run(run_dir):  # a fine-tuned backbone + classifier
        if meta.get("modality") == "audio":  # each line is an audio file
            labels, proba, names = predict_finetuned_audio(
                run_dir, [line.strip() for line in lines], device=resolve_device(device)
            )
        else:
            labels, proba, names = predict_finetuned(run_dir, texts, pairs, device=resolve_device(device))
    else:
        est = load_head(run_dir, head_dir)
        ests = (fold_heads(run_dir) if run_dir is not None and head_dir is None else []) or [est]
        probas = []
        for one in ests:  # a sweep's --keep-fold-models: every fold's head, probabilities averaged
            if head_modality(one) == "audio":
                labels, proba = predict_audio(one, [line.strip() for line in lines], device=resolve_device(device))
            else:
                labels, proba = predict_texts(one, texts, pairs, device=resolve_device(device))
            probas.append(proba)
        names = label_names(est, probas[0].shape[1])
        if len(probas) > 1:
            import numpy as np

            proba = np.mean(probas, axis=0).astype(np.float32)
            labels = [names[i] for i in proba.argmax(1)]
    if predictions_file is not None:
        import numpy as np

        from heads.report.results import save_predictions

        save_predictions(Path(predictions_file), [(np.arange(len(lines)), None, proba)], names)
    for text, label, p in zip(lines, labels, proba):
        click.echo(
            json.dumps(
                {"text": text, "label": label, "probabilities": {str(n): round(float(v), 6) for n, v in zip(names, p)}},
                ensure_ascii=False,
            )
        )


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", help="Report directory [default: reports/<time>].")
@click.option("--allow-mixed", is_flag=True, help="Merge runs scored on different (or unknown) rows, marking them.")
def report(runs: tuple[str, ...], out: str | None, allow_mixed: bool) -> None:
    """Merge run directories (sweeps, trains, fine-tunes) into one table and plot.

    Runs are put side by side only when they were scored on the same rows (their run.json eval_set ids agree).
    """
    from heads.report import write_report
    from heads.report.rundir import REPORTS_ROOT, run_dir

    target = run_dir(out, "", root=REPORTS_ROOT)
    path = write_report([Path(r) for r in runs], target, allow_mixed=allow_mixed)
    click.echo(str(path))


def _with_flags(values: dict[str, Any], splits: tuple[str, ...], opts: dict[str, Any]) -> dict[str, Any]:
    """A trainer's options: the --config file's ``values``, then the flags given (``--split NAME=FILE`` pairs replace
    the file's data)."""
    values = {**values, **{k: v for k, v in opts.items() if v is not None}}
    if splits:
        values["splits"] = _split_pairs(splits)
        values.setdefault("data", None)
    return values


def trainer_options(
    *, config: type, out: str, progress: str, defaults: dict[str, str]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of the backbone trainers (``heads finetune``, ``heads pretrain``): the optimiser's
    (:class:`heads.training.optim.OptimConfig`; the schedules those the trainer's ``config`` class allows), the seed,
    resuming, the device, the run directory (help text ``out``), the progress bar (``progress``) and -v.
    ``defaults``: the trainer's config defaults (lr, weight_decay, batch_size, epochs, warmup_ratio) as --help shows
    them; the flags default to None so that a --config file's values hold unless a flag is given."""
    options = [
        click.option(
            "--weight-decay",
            type=float,
            help=f"AdamW weight decay, never on biases and LayerNorm weights. [default: {defaults['weight_decay']}]",
        ),
        click.option("--batch-size", type=int, help=f"Rows per batch and process. [default: {defaults['batch_size']}]"),
        click.option("--epochs", type=int, help=f"Passes over the training rows. [default: {defaults['epochs']}]"),
        click.option(
            "--warmup-ratio",
            type=float,
            help=f"Share of the optimizer steps with a linear warmup. [default: {defaults['warmup_ratio']}]",
        ),
        click.option(
            "--schedule", type=choice(config, "optim.schedule"), help="lr decay after the warmup. [default: linear]"
        ),
        click.option("--max-grad-norm", type=float, help="Gradient-norm clipping (0: off). [default: 1]"),
        click.option("--grad-accum", type=int, help="Batches per optimizer step. [default: 1]"),
        click.option(
            "--mixed-precision",
            type=choice(OptimConfig, "mixed_precision"),
            help="accelerate mixed precision. [default: no]",
        ),
        click.option("--seed", type=int, help="Seeds the splits, initialisation and shuffling. [default: 0]"),
        click.option(
            "--resume/--no-resume",
            default=None,
            help="Continue from the run directory's last checkpoint. [default: no-resume]",
        ),
        click.option("--device", help="cpu, cuda, auto [default: auto, CUDA when present]."),
        click.option("--out", help=out),
        click.option("--progress/--no-progress", default=True, show_default=True, help=progress),
        click.option("-v", "--verbose", is_flag=True, help="Log more."),
    ]

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


def _found_columns(config: Any, *, labels: bool) -> Any:
    """``config`` (a FinetuneConfig or PretrainConfig) with the text (and, with ``labels``, label) column found in
    the table's header when no option names it; one line on stderr says which."""
    import dataclasses

    from embstore.data.columns import find_columns

    source, notes = find_columns(config.source, labels=labels, need_labels=labels)
    for note in notes:
        click.echo(note, err=True)
    return dataclasses.replace(config, source=source)


def _split_pairs(values: tuple[str, ...]) -> list[list[str]] | None:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=FILE (e.g. train=train.csv); got {v!r}.")
        out.append([name, path])
    return out or None


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML of options; with a 'runs:' list (name + overrides each) it runs a study and writes a report.",
)
@click.option(
    "--model",
    help="Backbone: minilm, random:NAME, a local HF directory, or scratch:gru, scratch:lstm, scratch:rnn (a "
    "recurrent model trained from nothing on the training rows' words). [default: minilm]",
)
@click.option(
    "--data",
    help="One CSV/TSV/JSONL/Parquet file or builtin:tweets; without "
    "--holdout a one-file table is carved 0.2 for evaluation, as heads sweep carves its store. [default: "
    "builtin:tweets]",
)
@click.option("--split", "splits", multiple=True, help="NAME=FILE, one per split (instead of --data).")
@click.option(
    "--holdout",
    type=float,
    help="Hold out this fraction of --data as a 'test' split, as embstore extract "
    "--holdout does (the same rows for the same --seed).",
)
@click.option("--text-col", help="Text column [default: text or sentence, whichever the table has].")
@click.option("--text-pair-col", help="Second text column: sentence pairs, encoded as [CLS] a [SEP] b.")
@click.option("--label-col", help="Label column [default: label or labels, whichever the table has].")
@click.option(
    "--group-col", help="Column of groups (e.g. speaker or author): every carve keeps each group on one side."
)
@click.option(
    "--audio-col",
    help="Column of audio file paths (relative to the table): fine-tune a speech model "
    "(HuBERT, wav2vec2, WavLM) on the clips.",
    show_default="none: text",
)
@click.option(
    "--skip-bad/--no-skip-bad",
    default=None,
    help="Speech: drop (and count) rows whose audio file is missing, "
    "unreadable, empty or shorter than the model's receptive field, instead of stopping.",
    show_default="no-skip-bad",
)
@click.option(
    "--max-seconds",
    type=float,
    help="Speech: cut each training clip to a random window this long, drawn "
    "anew each epoch; evaluation reads whole clips (Whisper: at most its 30-second window).",
    show_default="20",
)
@click.option(
    "--batch-seconds",
    type=float,
    help="Speech: at most this many seconds of padded audio (rows x longest "
    "clip) per batch, and at most --batch-size rows.",
    show_default="60",
)
@click.option(
    "--augment",
    help="Speech: augment the training clips on the fly, new draws each epoch: a comma list of "
    f"{listed(FinetuneConfig, 'augment')} (the augmenters of embstore extract).",
    show_default="none",
)
@click.option(
    "--snr-db",
    type=float,
    help="--augment noise: signal-to-noise ratio of the added Gaussian noise in dB.",
    show_default="20",
)
@click.option(
    "--noise-std",
    type=float,
    help="--augment noise: a fixed standard deviation of the added noise instead of --snr-db.",
    show_default="none: --snr-db decides",
)
@click.option(
    "--shift-max-seconds",
    type=float,
    help="--augment shift: roll by up to this many seconds either way.",
    show_default="none: by any fraction of the clip",
)
@click.option(
    "--pitch-steps", help="--augment pitch: semitones to draw from (the duration is kept).", show_default="-1,0,1"
)
@click.option(
    "--balance",
    type=choice(FinetuneConfig, "balance"),
    help="Speech, oversample: each epoch, augmented copies (--augment, drawn anew) bring every class of the fitting "
    "rows to the majority's count; the original clips are then read unaugmented.",
    show_default="none",
)
@click.option(
    "--label-from-path",
    help="Speech: a regular expression whose first capture group, searched in each file's name, is its label "
    "(instead of --label-col).",
)
@click.option(
    "--preprocess",
    help="Text: MODULE:FUNCTION (a module or a .py file), a str -> str function applied to every text before "
    "tokenisation; recorded in run.json and the run's fingerprint.",
)
@click.option("--limit", type=int, help="First N rows of each split.")
@click.option(
    "--max-length",
    type=int,
    help="Truncate inputs to this many tokens (embstore extract's default too, so "
    f"both see the same text). [default: {DEFAULT_MAX_LENGTH}]",
)
@click.option(
    "--freeze",
    help=f"Layers to freeze: {FREEZE_SPEC}. [default: none for text, {FEATURE_ENCODER} for speech]",
)
@click.option("--truncate", type=int, help="Classify from layer K and drop the layers above it.")
@click.option("--prune-heads", help="Remove attention heads: '11:0,3;10:5' (layer:heads; layers 1..L, heads from 0).")
@click.option(
    "--prune-fraction", type=float, help="Remove this fraction of the least important heads (Michel et al. 2019)."
)
@click.option(
    "--min-heads-per-layer",
    type=int,
    help="--prune-fraction keeps at least this many heads in every layer. [default: 1]",
)
@click.option(
    "--classifier", type=choice(FinetuneConfig, "classifier"), help="Head on the pooled vector. [default: linear]"
)
@click.option(
    "--classifier-hidden", help="mlp hidden sizes, e.g. 2048 (expand, then to the classes) or 512,128. [default: 2048]"
)
@click.option("--dropout", type=float, help="mlp dropout. [default: 0.1]")
@click.option(
    "--pooling",
    type=choice(FinetuneConfig, "pooling"),
    help="Pooled vector the classifier reads: the first token, the masked mean of the last layer (over tokens or "
    "frames), or the last non-pad token (causal models). [default: cls for encoders, last for causal models, mean "
    "for speech]",
)
@click.option(
    "--template",
    help="A prompt around each text, e.g. 'Review: {text}\\nSentiment:' (\\n is a newline; {text_pair} for pairs), "
    "as embstore extract's; recorded in run.json and used by heads predict.",
)
@click.option(
    "--chat-template/--no-chat-template",
    default=None,
    help="Wrap each text in the tokenizer's chat template as the user turn, with the generation prompt. "
    "[default: no-chat-template]",
)
@click.option("--system", help="The system turn of --chat-template.")
@click.option(
    "--pool-tokens",
    type=choice(FinetuneConfig, "pool_tokens"),
    help="Tokens --pooling mean covers: text (the row's own text tokens, no BOS/EOS/CLS/SEP or template tokens) or all "
    "(every non-pad token). [default: text for causal models, all for encoders]",
)
@click.option(
    "--lora",
    type=int,
    help="LoRA rank R (peft): train low-rank adapters on the blocks --freeze leaves trainable, and the classifier; "
    "the run saves the adapter (RUN/adapter) and the merged model (RUN/model). [default: none: full fine-tune]",
)
@click.option("--lora-alpha", type=int, help="LoRA scaling numerator (updates scaled by alpha / R). [default: 2R]")
@click.option("--lora-dropout", type=float, help="Dropout on the LoRA adapters' input. [default: 0]")
@click.option(
    "--lora-targets",
    help="Comma list of block module names to adapt, matched as peft matches target_modules (e.g. query,value). "
    "[default: the attention and MLP projections of the anatomy map]",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute block activations in the backward pass instead of keeping them (long inputs). "
    "[default: no-gradient-checkpointing]",
)
@click.option(
    "--vocab-min-count",
    type=int,
    help="scratch: keep words seen at least this often in the training rows. [default: 25]",
)
@click.option(
    "--lowercase/--cased", default=None, help="scratch: lower-case before splitting words. [default: lowercase]"
)
@click.option("--embedding-dim", type=int, help="scratch: width of the trainable word embedding. [default: 300]")
@click.option("--rnn-layers", type=int, help="scratch: stacked recurrent layers. [default: 1]")
@click.option("--rnn-hidden", type=int, help="scratch: hidden size per direction. [default: 256]")
@click.option(
    "--bidirectional/--unidirectional", default=None, help="scratch: run both ways. [default: unidirectional]"
)
@click.option(
    "--aggregate",
    type=choice(FinetuneConfig, "aggregate"),
    help="scratch: states over time to one vector (last: the last state of each direction). [default: mean]",
)
@click.option("--lr", type=float, help="Backbone (or LoRA adapter) learning rate. [default: 5e-05; 0.0005 with --lora]")
@click.option("--head-lr", type=float, help="Classifier learning rate, far above the backbone's. [default: 0.001]")
@click.option("--patience", type=int, help="Early-stopping patience in epochs (0: off). [default: 2]")
@click.option("--min-epochs", type=int, help="Early stopping never stops before this many epochs. [default: 3]")
@click.option(
    "--validation-fraction",
    type=float,
    help="Share of the training rows carved "
    "(seeded, stratified, group-aware) as validation rows for early stopping: the rows heads sweep validates on "
    "for the same data, seed and fraction. [default: 0.1]",
)
@click.option("--train-split", help="Split to train on (a one-split table is carved instead). [default: train]")
@click.option("--eval-split", help="Split scored for the report [default: test, else validation].")
@click.option(
    "--folds",
    type=int,
    help="Stratified K-fold cross-validation of the training rows (seeded): "
    "per-fold rows and mean +- std; no model/ is kept (but see --keep-fold-models).",
)
@click.option(
    "--keep-fold-models",
    is_flag=True,
    default=None,
    help="With --folds: keep every fold's model (folds/fold-K/model), score their averaged probabilities on the "
    "evaluation split, and let heads predict --run average them.",
)
@click.option(
    "--eval-steps",
    type=int,
    help="Also score the validation rows (loss, accuracy, macro-F1) every N optimizer steps.",
    show_default="none: once per epoch",
)
@click.option(
    "--split-reports/--no-split-reports",
    default=None,
    help="After training, a classification report of the fitting, validation and evaluation rows (summary.md).",
    show_default="no-split-reports",
)
@trainer_options(
    config=FinetuneConfig,
    out="Run directory [default: runs/<time>-finetune].",
    progress="tqdm bar per epoch with loss and examples/s.",
    defaults={"weight_decay": "0", "batch_size": "8", "epochs": "5", "warmup_ratio": "0"},
)
def finetune(config_file: str | None, splits: tuple[str, ...], progress: bool, verbose: bool, **opts: Any) -> None:
    """Fine-tune the backbone (optionally frozen, truncated or pruned) and report like a sweep."""
    setup_logging(verbose)
    from heads.finetune.run import run_finetune
    from heads.report import write_report
    from heads.report.rundir import run_dir

    values = load_yaml_config(config_file)
    runs = values.pop("runs", None)
    for key in ("template", "system"):
        if isinstance(opts.get(key), str):
            opts[key] = unescape(opts[key])
    values = _with_flags(values, splits, opts)
    quiet_rank = int(os.environ.get("RANK", "0")) != 0  # under torchrun / accelerate launch only rank 0 reports
    if runs is None:
        result = run_finetune(_found_columns(FinetuneConfig.from_dict(values), labels=True), show_progress=progress)
        if quiet_rank:
            return
        if result.folds:
            click.echo(
                f"{result.folds} folds: accuracy {result.accuracy:.4f} ± {result.accuracy_std:.4f}, macro-F1 "
                f"{result.f1_macro:.4f} ± {result.f1_macro_std:.4f}",
                err=True,
            )
        click.echo(
            f"accuracy {result.accuracy:.4f}, macro-F1 {result.f1_macro:.4f}, trainable {result.trainable_params:,} "
            f"of {result.total_params:,} parameters, {result.seconds_per_epoch:.1f}s/epoch",
            err=True,
        )
        click.echo(str(result.run_dir))
        return
    base = run_dir(values.pop("out", None), "study")
    dirs = []
    for variant in runs:
        variant = dict(variant)
        name = str(variant.pop("name"))
        result = run_finetune(
            _found_columns(FinetuneConfig.from_dict({**values, **variant, "out": str(base / name)}), labels=True),
            show_progress=progress,
        )
        click.echo(f"{name}: accuracy {result.accuracy:.4f}, macro-F1 {result.f1_macro:.4f}", err=True)
        dirs.append(result.run_dir)
    click.echo(str(write_report(dirs, base / "report")))


_BERT_FIELDS = {"model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"}


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML of pretrain options (flags override it), or a BERT config YAML such as "
    "configs/models/mini-bert.yaml (then it sets the architecture).",
)
@click.option("--data", help="One CSV/TSV/JSONL/Parquet file; a share is held out for perplexity.")
@click.option("--split", "splits", multiple=True, help="NAME=FILE, one per split (train=..., validation=...).")
@click.option("--text-col", help="Text column [default: text or sentence, whichever the table has].")
@click.option("--text-pair-col", help="Second sentence column: train on pairs [CLS] A [SEP] B [SEP].")
@click.option("--limit", type=int, help="First N rows of each split.")
@click.option(
    "--skip-empty/--no-skip-empty", default=None, help="Drop empty rows instead of failing. [default: no-skip-empty]"
)
@click.option("--train-split", help="[default: train]")
@click.option("--eval-split", help="Held-out split [default: validation, dev or test, else carve rows].")
@click.option("--heldout-fraction", type=float, help="Share of rows carved for held-out perplexity [default: 0.05].")
@click.option(
    "--tokenizer",
    type=click.Path(exists=True),
    help="Reuse this tokenizer (directory or tokenizer.json) instead of training a WordPiece one.",
)
@click.option("--vocab-size", type=int, help="WordPiece vocabulary size [default: 8000].")
@click.option("--min-frequency", type=int, help="WordPiece minimum merge frequency [default: 2].")
@click.option("--lowercase/--cased", default=None, help="Lower-case before WordPiece [default: lowercase].")
@click.option("--cjk-chars/--no-cjk-chars", default=None, help="Split CJK ideographs into characters [default: on].")
@click.option("--model-config", help="BERT config YAML/JSON or a configs/models NAME; flags below override it.")
@click.option("--layers", type=int, help="Encoder layers [default: 4].")
@click.option("--hidden", type=int, help="Hidden size [default: 256].")
@click.option("--heads", type=int, help="Attention heads [default: 4].")
@click.option("--intermediate", type=int, help="Feed-forward size [default: 4 x hidden].")
@click.option("--max-positions", type=int, help="Position embeddings [default: 512].")
@click.option("--max-length", type=int, help="Tokens per sequence, specials included [default: 128].")
@click.option("--mask-prob", type=float, help="Bernoulli masking probability (80/10/10) [default: 0.15].")
@click.option("--whole-word/--no-whole-word", default=None, help="Mask whole words. [default: no-whole-word]")
@click.option(
    "--swap-augment/--no-swap-augment",
    default=None,
    help="Pairs: train on both sentence orders. [default: no-swap-augment]",
)
@click.option(
    "--pair-objective",
    type=choice(PretrainConfig, "pair_objective"),
    help="Pairs: sentence-order or next-sentence prediction, trained jointly [default: none].",
)
@click.option("--pair-weight", type=float, help="Weight of the pair loss [default: 1].")
@click.option("--lr", type=float, help="Peak learning rate [default: 5e-4].")
@click.option("--max-steps", type=int, help="Optimizer steps in total (overrides --epochs).")
@click.option("--max-minutes", type=float, help="Stop after this many minutes of training.")
@trainer_options(
    config=PretrainConfig,
    out="Run directory; the backbone goes to OUT/model [default: runs/<time>-pretrain].",
    progress="tqdm progress bar with tokens/s.",
    defaults={"weight_decay": "0.01", "batch_size": "32", "epochs": "1", "warmup_ratio": "0.06"},
)
def pretrain(config_file: str | None, splits: tuple[str, ...], progress: bool, verbose: bool, **opts: Any) -> None:
    """Pretrain a BERT from scratch with masked-LM; OUT/model is a --model for embstore extract and heads finetune."""
    setup_logging(verbose)
    from heads.pretrain.run import run_pretrain

    values = load_yaml_config(config_file)
    if config_file is not None and _BERT_FIELDS & set(values):  # a model config, not an options file
        values = {"model_config": config_file}
    config = _found_columns(PretrainConfig.from_dict(_with_flags(values, splits, opts)), labels=False)
    result = run_pretrain(config, show_progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    click.echo(
        f"{result.steps} steps, {result.tokens_per_second:,.0f} tokens/s; train MLM loss {result.train_mlm_loss:.4f}, "
        f"masked accuracy {result.train_masked_accuracy:.4f}; held-out perplexity {result.heldout_perplexity:.2f}, "
        f"masked accuracy {result.heldout_masked_accuracy:.4f}",
        err=True,
    )
    click.echo(f"model: {result.model_dir}", err=True)
    click.echo(str(result.run_dir))


if __name__ == "__main__":
    main()
