"""``embstore``: extract, info, ls, verify."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from cli.common import Group, UserError, choice, explicit, listed, load_yaml_config, setup_logging, unescape
from embstore.config import ExtractConfig, default_pooling
from embstore.data.spec import DEFAULT_MAX_LENGTH
from embstore.data.words import WORD_POOLINGS


def _split_option(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=FILE (e.g. train=train.csv); got {v!r}.")
        out.append((name, path))
    return tuple(out)


@click.group(cls=Group)
@click.version_option(package_name="embstore")
def main() -> None:
    """Run a frozen backbone once; store every layer; probe them from the store."""


def extract_options(f: Any) -> Any:
    """The options of ``embstore extract``, shared by ``embstore plan`` (which takes exactly the same)."""
    for option in reversed(
        [
            click.option(
                "--config",
                "config_file",
                type=click.Path(exists=True, dir_okay=False),
                help="YAML file of options; flags given here override it.",
            ),
            click.option(
                "--data",
                help="One CSV/TSV/JSONL/Parquet file, a CoNLL-U file (.conllu: word-level data), or builtin:tweets "
                "[default: builtin:tweets when no --split is given].",
            ),
            click.option(
                "--split",
                "splits",
                multiple=True,
                callback=_split_option,
                help="NAME=FILE, one per split (repeatable).",
            ),
            click.option(
                "--holdout", type=float, help="Hold out this fraction of --data as a 'test' split (seeded, stratified)."
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed of --holdout."),
            click.option("--text-col", help="Text column [default: text or sentence, whichever the table has]."),
            click.option(
                "--text-pair-col",
                help="Second text column: encoded jointly ([CLS] a [SEP] b), or separately with --towers.",
            ),
            click.option(
                "--towers",
                is_flag=True,
                help="Encode --text-col and --text-pair-col separately and store both (towers 'a' and 'b').",
            ),
            click.option(
                "--label-col",
                help="Label column (strings or integers) [default: label or labels, whichever the "
                "table has; none if it has neither].",
            ),
            click.option(
                "--no-labels", is_flag=True, help="Extract without labels, even from a table with a label column."
            ),
            click.option(
                "--audio-col", help="Audio: column of audio file paths (relative to the table); needs a speech --model."
            ),
            click.option(
                "--group-col", help="Column of groups (e.g. speaker): --holdout keeps each group in one split."
            ),
            click.option(
                "--max-seconds",
                type=float,
                help="Audio: crop recordings to their first N seconds (Whisper: at most its 30-second window; a longer "
                "clip is refused without it).",
            ),
            click.option(
                "--label-from-path",
                help="Audio: a regular expression whose first capture group, searched in each file's name, is its "
                "label (instead of --label-col), e.g. '^.{5}(.)'.",
            ),
            click.option(
                "--preprocess",
                help="Text: MODULE:FUNCTION (a module or a .py file), a str -> str function applied to every text "
                "before tokenisation; part of the store id.",
            ),
            click.option(
                "--skip-bad",
                is_flag=True,
                help="Audio: drop rows whose file is missing, unreadable or empty, or whose clip is shorter than the "
                "model's receptive field, instead of failing (the store counts them).",
            ),
            click.option(
                "--augment",
                help=f"Audio: augmented training copies with these transforms: comma list of "
                f"{listed(ExtractConfig, 'augment')}.",
            ),
            click.option(
                "--copies", type=int, default=1, show_default=True, help="Augmented copies per chosen training row."
            ),
            click.option(
                "--augment-classes",
                default="minority",
                show_default=True,
                help="Rows to augment: minority (classes below the mean size), all, or a comma list of labels.",
            ),
            click.option(
                "--snr-db",
                type=float,
                default=20.0,
                show_default=True,
                help="Noise augmentation: signal-to-noise ratio in dB.",
            ),
            click.option(
                "--noise-std",
                type=float,
                help="Noise augmentation: a fixed standard deviation of the added Gaussian noise (an absolute "
                "amplitude) instead of --snr-db [default: none: --snr-db decides].",
            ),
            click.option(
                "--shift-max-seconds",
                type=float,
                help="Shift augmentation: roll each copy by up to this many seconds either way [default: none: by "
                "any fraction of the clip].",
            ),
            click.option(
                "--pitch-steps",
                default="-1,0,1",
                show_default=True,
                help="Pitch augmentation: semitones to draw from, one per copy (the clip's duration is kept).",
            ),
            click.option(
                "--balance",
                type=choice(ExtractConfig, "balance"),
                default="none",
                show_default=True,
                help="oversample: augmented copies (of --augment) bring every class of the training split to the "
                "majority class's count, instead of --copies of the --augment-classes rows.",
            ),
            click.option(
                "--batch-seconds",
                type=float,
                default=60.0,
                show_default=True,
                help="Audio: most padded seconds of audio per forward batch.",
            ),
            click.option(
                "--bucket/--no-bucket",
                default=True,
                show_default=True,
                help="Sort rows by length (tokens or duration) so batches hold similar lengths.",
            ),
            click.option(
                "--model",
                default="minilm",
                show_default=True,
                help="minilm, random:NAME (tiny-bert, bert-base, hubert-tiny, hubert-base...), a local HF directory, "
                "or a Hub id in the local HF cache.",
            ),
            click.option(
                "--layers",
                default="all",
                show_default=True,
                help="Layers to store: all, 9-12, -4--1, 3,6 (0 = embeddings).",
            ),
            click.option(
                "--pooling",
                help=f"Comma list of {listed(ExtractConfig, 'pooling')} (last: each row's last non-pad token) "
                f"[default: {','.join(default_pooling('text'))} for encoders, "
                f"{','.join(default_pooling('text', causal=True))} for causal models, "
                f"{','.join(default_pooling('audio'))} for audio].",
            ),
            click.option(
                "--pool-tokens",
                type=choice(ExtractConfig, "pool_tokens"),
                help="Tokens mean and max cover: text (the row's own text tokens, no BOS/EOS/CLS/SEP or template "
                "tokens) or all (every non-pad token) [default: text for causal models, all for encoders].",
            ),
            click.option(
                "--template",
                help="A prompt around each text, e.g. 'Review: {text}\\nSentiment:' (\\n is a newline; {text_pair} "
                "for pairs); part of the store id.",
            ),
            click.option(
                "--chat-template",
                is_flag=True,
                help="Wrap each text in the tokenizer's chat template as the user turn, with the generation prompt "
                "(so last reads where the answer begins).",
            ),
            click.option("--system", help="The system turn of --chat-template."),
            click.option("--tokens", help="Also store per-token states of these layers (same syntax as --layers)."),
            click.option(
                "--word-pooling",
                help="Word-level data (CoNLL-U, or JSONL/Parquet with a 'tokens' list column): comma list of "
                f"{', '.join(WORD_POOLINGS)}, each word's subword states pooled, for every layer "
                "[default: first for word-level data, none for sentences].",
            ),
            click.option(
                "--max-length",
                type=int,
                default=DEFAULT_MAX_LENGTH,
                show_default=True,
                help="Truncate inputs to this many tokens (the default of heads finetune too, so both see the same "
                "text).",
            ),
            click.option("--batch-size", type=int, default=64, show_default=True, help="Most rows per forward batch."),
            click.option(
                "--token-budget",
                type=int,
                default=16384,
                show_default=True,
                help="Most padded tokens per forward batch.",
            ),
            click.option(
                "--dtype",
                type=choice(ExtractConfig, "dtype"),
                default="float16",
                show_default=True,
                help="Storage dtype (a value beyond float16's range stops the extraction: pass float32). bfloat16 is "
                "not offered: neither zarr 3 nor HDF5 has a bfloat16 type.",
            ),
            click.option(
                "--compute-dtype",
                type=choice(ExtractConfig, "compute_dtype"),
                default="auto",
                show_default=True,
                help="The dtype of the model's parameters in the forward: auto is float32 on CPU (a bf16 checkpoint "
                "is cast up), bfloat16 on CUDA where supported. Recorded and part of the store id.",
            ),
            click.option(
                "--device-map",
                type=choice(ExtractConfig, "device_map"),
                help="Spread a model bigger than one device over the GPUs, the CPU and --offload-dir "
                "(transformers/accelerate big-model inference).",
            ),
            click.option(
                "--max-device-memory",
                help="With --device-map: the most memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
            ),
            click.option(
                "--offload-dir",
                type=click.Path(file_okay=False),
                help="With --device-map: where weights that fit no device are offloaded.",
            ),
            click.option(
                "--gpus-per-rank",
                type=click.IntRange(min=1),
                help="Under torchrun/accelerate launch with --device-map: each rank maps the model over its own K "
                "GPUs (local rank r gets GPUs r*K..r*K+K-1), so 8 GPUs run 2 copies of a model that needs 4.",
            ),
            click.option(
                "--format",
                "fmt",
                type=choice(ExtractConfig, "format"),
                default="zarr",
                show_default=True,
                help="Store format.",
            ),
            click.option(
                "--out",
                help="Store path (*.zarr / *.h5) or a directory for the store [default: $EMBSTORE_CACHE or ./cache].",
            ),
            click.option("--limit", type=int, help="Keep the first N rows of each split."),
            click.option("--skip-empty", is_flag=True, help="Drop empty or missing text rows instead of failing."),
            click.option(
                "--chunk-rows",
                type=int,
                default=2048,
                show_default=True,
                help="Rows per work unit / storage chunk (the unit of resume).",
            ),
            click.option(
                "--num-processes",
                type=int,
                default=1,
                show_default=True,
                help="Worker processes sharing the work (under 'accelerate launch' ranks are used instead).",
            ),
            click.option("--device", help="cpu, cuda, cuda:1 ..., auto [default: auto, CUDA when present]."),
            click.option(
                "--wait",
                is_flag=True,
                help="If another process is writing this store, wait for it, then resume or report it complete.",
            ),
            click.option(
                "--quantize",
                type=choice(ExtractConfig, "quantize"),
                default="none",
                show_default=True,
                help="int8: dynamic int8 quantisation of the Linear layers, CPU only (faster; changes the values: "
                "the deviation from float32 is measured and recorded in provenance).",
            ),
            click.option(
                "--allow-pickle",
                is_flag=True,
                help="Accept a model directory whose weights are pickle files (.bin/.pt); "
                "they are loaded with torch.load(weights_only=True). Without it only safetensors weights load.",
            ),
            click.option(
                "--random-weights",
                type=click.IntRange(min=0),
                metavar="SEED",
                help="A control store: --model's architecture and tokenizer with its weights re-initialised from its "
                "config (as from_config does) under SEED; pass it to 'heads sweep --control'.",
            ),
        ]
    ):
        f = option(f)
    return f


def _extract_config(ctx: click.Context, config_file: str | None, opts: dict[str, Any]) -> Any:
    """The ExtractConfig of the command line: the --config file, then the flags given (which override it); the
    text and label columns the options leave out are found in the table's header (one line each says which)."""
    import dataclasses

    from embstore.data.columns import find_columns

    no_labels = bool(opts.pop("no_labels", False))
    values = load_yaml_config(config_file)
    renames = {"fmt": "format", "towers": "pair_mode"}
    for key, value in opts.items():
        name = renames.get(key, key)
        if explicit(ctx, key) or name not in values:
            if key == "towers":
                value = "towers" if value else "joint"
            if key in ("pooling", "augment", "word_pooling") and isinstance(value, str):
                value = tuple(p.strip() for p in value.split(",") if p.strip())
            if key in ("template", "system") and isinstance(value, str) and explicit(ctx, key):
                value = unescape(value)
            values[name] = value
    if not values.get("splits") and not values.get("data"):
        values["data"] = "builtin:tweets"
    out = values.get("out")
    if out and str(out).endswith((".h5", ".hdf5")):
        values["format"] = "h5"
    try:
        config = ExtractConfig.from_dict(values)
    except TypeError as exc:
        raise UserError(f"Bad option in {config_file}: {exc}") from None
    source, notes = find_columns(config.source, labels=not no_labels)
    for note in notes:
        click.echo(note, err=True)
    return dataclasses.replace(config, source=source)


@main.command()
@extract_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.pass_context
def extract(ctx: click.Context, config_file: str | None, quiet: bool, verbose: bool, **opts: Any) -> None:
    """Run the backbone once over every split and store every chosen layer."""
    setup_logging(verbose)
    config = _extract_config(ctx, config_file, opts)
    from embstore.extraction.run import extract as run_extract

    result = run_extract(config, show_progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun only rank 0 reports
        return
    rows = ", ".join(f"{k} {v}" for k, v in result.rows.items())
    click.echo(f"{result.status}: {rows} rows in {result.seconds:.1f}s", err=True)
    trunc = sum(result.truncated.values())
    if trunc:
        click.echo(f"truncated at --max-length {config.max_length}: {trunc} inputs ({result.truncated})", err=True)
    if result.words_cut:
        click.echo(
            f"words no token reached (their states are zeros, marked cut): {sum(result.words_cut.values())} "
            f"({result.words_cut}; --max-length {config.max_length} cut off {sum(result.words_truncated.values())})",
            err=True,
        )
    skipped = sum(result.skipped_empty.values())
    if skipped:
        what = "unusable audio rows" if config.source.audio_col else "empty rows"
        click.echo(f"skipped {what}: {skipped} ({result.skipped_empty})", err=True)
    click.echo(result.path)


@main.command()
@extract_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (bytes, estimated_seconds, splits...).")
@click.option("-q", "--quiet", is_flag=True, help="Accepted for symmetry with extract.", hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.pass_context
def plan(ctx: click.Context, config_file: str | None, as_json: bool, quiet: bool, verbose: bool, **opts: Any) -> None:
    """Say what 'embstore extract' with these options would do: rows, tokens, bytes, free disk, time.

    Takes exactly the options of extract. Reads and tokenizes the data and times a few real batches;
    the model does not run over the whole data and nothing is written.
    """
    setup_logging(verbose)
    config = _extract_config(ctx, config_file, opts)
    from embstore.extraction.estimate import plan_extraction

    report = plan_extraction(config)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    click.echo(_plan_text(report))


def _plan_text(r: Any) -> str:
    state = {"absent": "new", "partial": "partial: a run resumes it", "complete": "complete: a run does nothing"}[
        r.state
    ]
    lines = [f"store      {r.path} ({state})", f"model      {r.model} on {r.device} ({r.modality})"]
    for name, s in r.splits.items():
        size = (
            (
                f"{s['seconds']:.1f} s of audio, {s['frames']} frames, {s['truncated']} cropped"
                + (f", {s['augmented']} augmented" if s.get("augmented") else "")
            )
            if r.modality == "audio"
            else f"{s['tokens']} tokens, {s['truncated']} truncated"
            + (f", {s['words']} words ({s['words_cut']} cut off)" if "words" in s else "")
        )
        lines.append(f"split      {name}: {s['rows']} rows, {size}, {s['chunks_left']}/{s['chunks']} chunks to write")
    d = r.bytes_detail
    parts = [f"{p} {_human(n)}" for p, n in d["pooled"].items()] + [
        f"tokens of layer {k} {_human(n)}" for k, n in d["tokens"].items()
    ]
    parts += [f"words ({p}) {_human(n)}" for p, n in d.get("words", {}).items()]
    parts.append(f"metadata and row arrays {_human(d['metadata_and_row_arrays'] + d['progress'])}")
    lines.append(
        f"bytes      {_human(r.bytes)} ({r.bytes} bytes{'' if r.bytes_exact else ', estimated'}): " + ", ".join(parts)
    )
    if r.peak_bytes > r.bytes:
        lines.append(f"peak       {_human(r.peak_bytes)} while extracting (HDF5 is staged as zarr, then exported)")
    if r.free_bytes is not None:
        verdict = "enough" if r.free_bytes >= r.peak_bytes else "NOT ENOUGH: free space or choose another --out"
        lines.append(f"disk       {_human(r.free_bytes)} free where the store goes ({verdict})")
    m = r.memory_detail
    if m:
        lines.append(
            f"memory     about {_human(m['total'])} at peak, estimated: weights {_human(m['weights'])}, one batch "
            f"inside a block {_human(m['activations'])}, pooled {_human(m['pooled'])}, two row chunks "
            f"{_human(m['chunks'])}, runtime {_human(m['runtime'])}"
        )
    t = r.timing
    timed = (
        f"{t['batches_timed']} of {t['batches']} batches timed ({t['rows_timed']} rows in {t['seconds_timed']:.2f} s)"
        if t.get("batches_timed")
        else "nothing to encode"
    )
    lines.append(
        f"time       about {_duration(r.estimated_seconds)} on {r.device}: {timed}, planning "
        f"{t['planning_seconds']:.1f} s"
    )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.argument("store_path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(store_path: str, as_json: bool) -> None:
    """Describe a store: splits, layers, shapes, bytes, provenance."""
    from embstore.store.reader import open_store

    with open_store(store_path, allow_incomplete=True) as store:
        d = store.describe()
        prov = store.provenance
    if as_json:
        click.echo(json.dumps(d, default=str))
        return
    lines = [
        f"store      {d['path']} ({d['format']}, {d['modality']}, {'complete' if d['complete'] else 'INCOMPLETE'})",
        f"model      {prov.model_name}  hidden {d['hidden']}  layers {','.join(map(str, d['layers']))}",
        f"poolings   {','.join(d['poolings'])}  dtype {d['dtype']}  towers {','.join(d['towers'])}"
        + (f"  tokens for layers {','.join(map(str, d['token_layers']))}" if d["token_layers"] else ""),
        f"labels     {', '.join(d['label_names']) if d['label_names'] else '(none)'}",
    ]
    if prov.compute_dtype:
        lines.append(f"compute    {prov.compute_dtype} (precision {prov.precision})")
    if prov.text is not None:
        text = prov.text
        lines.append(
            f"text       pool-tokens {text.pool_tokens}"
            + (f"  {'chat template' if text.chat_template else 'template'} {text.prompt!r}" if text.prompt else "")
        )
    if d.get("group_names"):
        lines.append(f"groups     {', '.join(d['group_names'])}")
    unit, cut = ("frames", "cropped") if d["modality"] == "audio" else ("tokens", "truncated")
    for name, s in d["splits"].items():
        lines.append(
            f"split      {name}: {s['rows']} rows, {s['chunks_done']}/{s['chunks']} chunks, "
            f"{sum(s['tokens'].values())} {unit}, {s['truncated'] or 0} {cut}"
            + (f", {s['augmented']} augmented" if s.get("augmented") else "")
            + (f", {s['words']} words ({s['words_cut']} cut)" if "words" in s else "")
        )
    if d.get("word_poolings"):
        lines.append(
            f"words      pooling {','.join(d['word_poolings'])}  labels "
            + ", ".join(f"{k} ({n} values)" for k, n in d["word_labels"].items())
            + ("  heads" if d.get("word_heads") else "")
        )
    for src in prov.sources:
        lines.append(
            f"source     {src['split']}: {src['path']} sha256 {src['sha256'][:16]}... columns "
            f"{','.join(src['columns'])}"
        )
    if d["modality"] == "audio":
        lines.append(f"batching   {_batching(prov.batching)}")
    lines.append(f"bytes      {_human(d['bytes'])}")
    lines.append(f"created    {d['created']}  finished {d['finished']}  embstore {prov.tool.get('embstore')}")
    click.echo("\n".join(lines))


def _batching(batching: object) -> str:
    """The ``embstore info`` line on an audio store's batching (``Provenance.batching``)."""
    if batching == "exact":
        return "exact: each clip has the values it has alone, whatever shares its batch"
    if isinstance(batching, dict):
        opts = ", ".join(f"{k} {v}" for k, v in batching.items() if k != "why")
        why = (
            "int8 quantises each batch's activations with one scale"
            if batching.get("why") == "int8"
            else "the anatomy map does not know this speech model"
        )
        return f"changes values ({opts}, in the store id): {why}"
    return "not recorded (a store written before embstore recorded it)"


@main.command("ls")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="Directory to list [default: $EMBSTORE_CACHE or ./cache].",
)
def ls_(directory: str | None) -> None:
    """List the stores in the cache with their state."""
    from embstore.store.catalog import cache_dir, store_entries
    from embstore.store.reader import open_store

    base = Path(directory) if directory else cache_dir()
    if not base.is_dir():
        click.echo(f"no stores: {base} does not exist", err=True)
        return
    entries = store_entries(base)
    for p in entries:
        try:
            with open_store(p, allow_incomplete=True) as store:
                d = store.describe()
                model = store.provenance.model_name
            done = sum(s["chunks_done"] for s in d["splits"].values())
            total = sum(s["chunks"] for s in d["splits"].values())
            state = "complete" if d["complete"] else f"incomplete {done}/{total} chunks"
            rows = ",".join(f"{k}={v['rows']}" for k, v in d["splits"].items())
            click.echo(f"{p}\t{state}\t{model}\t{rows}\t{_human(d['bytes'])}")
        except Exception as exc:  # one unreadable entry must not hide the others
            click.echo(f"{p}\tunreadable ({type(exc).__name__})")
    if not entries:
        click.echo(f"no stores in {base}", err=True)


@main.command()
@click.argument("store_path")
def verify(store_path: str) -> None:
    """Check completeness and every row chunk's checksum. Exit 1 if anything is wrong."""
    from embstore.store.reader import open_store

    with open_store(store_path, allow_incomplete=True) as store:
        problems = store.verify()
        n = sum(sl.n_chunks for sl in store.layout.splits.values())
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        click.echo(f"{store_path}: {len(problems)} problem(s)", err=True)
        raise SystemExit(1)
    click.echo(f"{store_path}: ok ({n} row chunks verified)")


if __name__ == "__main__":
    main()
