"""Planning one extraction, before the model runs over the data: read and tokenize the data (or the
audio headers), load the model, order the rows, lay out the store, and name it by its id.

:func:`quick_id` computes the same id from cheap inputs only (see :mod:`embstore.extraction.store_id`), so a
finished store is found without loading the model; :func:`make_plan` does the full planning that
``embstore extract`` and ``embstore plan`` share.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.backbones.anatomy import is_causal, top_state
from embstore.backbones.registry import Backbone, Placement, load_backbone
from embstore.config import ExtractConfig, default_pooling
from embstore.data.audio import usable_rows
from embstore.data.preprocess import preprocess_identity
from embstore.data.tables import Dataset, SplitData
from embstore.device import parse_device_memory, rank_device_memory, rank_gpus, resolve_compute_dtype
from embstore.errors import ConfigError, EmbstoreError
from embstore.extraction.encode import Encoded, length_order, tokenize
from embstore.extraction.store_id import audio_batching, data_identity, model_identity, store_fingerprint
from embstore.extraction.words import WordAlignment, align_words, word_poolings_for
from embstore.layers import parse_layers
from embstore.store import layout as L
from embstore.store.backends import is_h5_path
from embstore.store.catalog import cache_dir, slug

__all__ = ["Plan", "make_plan", "quick_id", "store_paths", "precision_of", "poolings_of", "placement_of", "rank_device"]


@dataclass
class Plan:
    """Everything decided before the model runs; identical in every rank."""

    backbone: Backbone
    dataset: Dataset
    layout: L.StoreLayout
    fingerprint: str
    order: dict[str, np.ndarray]
    encoded: dict[tuple[str, str], Any]
    """(split, tower) -> Encoded token ids (text) or AudioRows (audio)."""
    meta: L.StoreMeta
    """The store's root attribute as it is created (not complete)."""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    token_counts: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    words: dict[str, WordAlignment] = field(default_factory=dict)
    """Word-level data: split -> its words aligned to their tokens (rows in source order)."""


def quick_id(config: ExtractConfig, device: str) -> tuple[str, str, str] | None:
    """(fingerprint, final path, write path) from cheap inputs only (no model load, no tokenizing), or
    None when those cannot decide it; the full plan then computes the same id, or reports the problem."""
    try:
        model = model_identity(config.model)
        data = data_identity(config.source)
        if (
            data is None
            or model["n_layers"] is None
            or model["modality"] != ("audio" if config.source.audio_col else "text")
            or config.chat_template  # the prompt is rendered by the tokenizer
        ):
            return None
        available = list(range(int(model["n_layers"]) + 1))
        layers = parse_layers(config.layers, available, "layers")
        token_layers = parse_layers(config.tokens, available, "tokens") if config.tokens else []
        word_data = _word_data_hint(config)
        if word_data is None:
            return None
        word_poolings = word_poolings_for(config.word_pooling, word_data)
        poolings = poolings_of(config, model["modality"], bool(model["causal"]))
        precision = precision_of(resolve_compute_dtype(config.compute_dtype, device), config.quantize)
    except EmbstoreError:
        return None
    fp = store_fingerprint(
        config,
        model,
        data,
        layers=layers,
        token_layers=token_layers,
        poolings=list(poolings),
        precision=precision,
        word_poolings=list(word_poolings),
        text=None if model["modality"] == "audio" else config.text_spec(bool(model["causal"])).id_content(),
    )
    return (fp, *store_paths(config, fp))


def _word_data_hint(config: ExtractConfig) -> bool | None:
    """Whether the data is word-level, from file names and headers alone (None: only reading it can tell)."""
    from embstore.data.columns import table_columns
    from embstore.data.words import WORDS_COL, is_conllu

    src = config.source
    if src.audio_col or (src.data is not None and src.data.startswith("builtin:")):
        return False
    paths = [src.data] if src.data is not None else [p for _, p in src.splits]
    if all(is_conllu(p) for p in paths):
        return True
    if any(is_conllu(p) for p in paths):
        return None
    return None if any(WORDS_COL in table_columns(p) for p in paths) else False


def precision_of(compute_dtype: str, quantize: str) -> str:
    """How the model computes: its parameters' dtype ('float32', 'bfloat16', 'float16'), or 'int8-dynamic' with
    --quantize int8 (dynamic int8 Linear layers, on the CPU)."""
    return "int8-dynamic" if quantize == "int8" else compute_dtype


def poolings_of(config: ExtractConfig, modality: str, causal: bool) -> tuple[str, ...]:
    """The poolings stored: ``--pooling``, or the default of the modality and the model (last,mean for a causal
    one); ``cls`` on a causal model is refused in one line."""
    poolings = config.pooling or default_pooling(modality, causal)
    if causal and "cls" in poolings:
        raise ConfigError(
            f"--pooling cls reads position 0, which in a causal model ({config.model}) has seen only itself (after a "
            "BOS token it is one vector for every row): pass --pooling last, the last token, which has seen the whole "
            "text (e.g. --pooling last,mean)."
        )
    return tuple(poolings)


def placement_of(config: ExtractConfig, device: str) -> Placement:
    """How the extraction holds the model: its compute dtype and device map (with ``--gpus-per-rank``, over this
    rank's group of GPUs: :func:`embstore.device.rank_gpus`)."""
    memory: dict[int | str, int] | None = (
        dict(parse_device_memory(config.max_device_memory)) if config.max_device_memory else None
    )
    if config.gpus_per_rank is not None and device.startswith("cuda"):
        import torch
        from accelerate.utils import get_max_memory

        group = rank_gpus(int(os.environ.get("LOCAL_RANK", "0")), config.gpus_per_rank, torch.cuda.device_count())
        memory = rank_device_memory(group, memory, get_max_memory())  # type: ignore[arg-type]
    return Placement(
        dtype=resolve_compute_dtype(config.compute_dtype, device),
        device_map=config.device_map,
        max_memory=memory,
        offload_dir=config.offload_dir,
    )


def rank_device(config: ExtractConfig, device: str, world: int) -> str:
    """The device of this rank under torchrun/accelerate: cuda:LOCAL_RANK, or with ``--gpus-per-rank K`` the first
    GPU of its group; ``device`` itself in a single process or on the CPU."""
    if world <= 1 or not device.startswith("cuda"):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local * (config.gpus_per_rank or 1)}"


def make_plan(config: ExtractConfig, device: str) -> Plan:
    dataset = config.source.load()
    backbone = load_backbone(
        config.model,
        device,
        allow_pickle=config.allow_pickle,
        random_weights=config.random_weights,
        placement=placement_of(config, device),
    )
    if backbone.modality != dataset.modality:
        if backbone.modality == "audio":
            raise ConfigError(
                f"{config.model} is a speech model and takes audio, but the data is text; pass --audio-col COLUMN (a "
                f"table of audio file paths), or a text model."
            )
        raise ConfigError(
            f"{config.model} is a text model, but --audio-col gives audio; pass a speech model (random:hubert-tiny, or "
            f"a local HuBERT/wav2vec2/WavLM directory)."
        )
    available = list(range(backbone.n_layers + 1))
    layers = parse_layers(config.layers, available, "layers")
    token_layers = parse_layers(config.tokens, available, "tokens") if config.tokens else []
    causal = is_causal(backbone.model)
    poolings = poolings_of(config, dataset.modality, causal)
    if dataset.modality == "audio":
        return _plan_audio(config, device, dataset, backbone, layers, token_layers, poolings)
    if config.max_length > backbone.max_positions:
        raise ConfigError(
            f"--max-length {config.max_length} exceeds what {config.model} can encode ({backbone.max_positions} "
            f"positions); use --max-length {backbone.max_positions} or less."
        )
    towers = L.PAIR_TOWERS if config.pair_mode == "towers" else (L.SINGLE_TOWER,)
    word_poolings = word_poolings_for(config.word_pooling, dataset.word_labels is not None)
    if word_poolings and config.pair_mode == "towers":
        raise ConfigError("--word-pooling stores the words of single sentences; it does not take --towers.")
    words: dict[str, WordAlignment] = {}
    word_counts: dict[str, dict[str, int]] = {"cut": {}, "truncated": {}}
    tok = backbone.tokenizer
    spec = config.text_spec(causal)
    encoded: dict[tuple[str, str], Encoded] = {}
    order: dict[str, np.ndarray] = {}
    splits: dict[str, L.SplitLayout] = {}
    arrays: dict[str, np.ndarray] = {}
    token_counts: dict[tuple[str, str], np.ndarray] = {}
    truncated: dict[str, int] = {}
    for name, sd in dataset.splits.items():
        if config.pair_mode == "towers":
            encoded[(name, "a")] = tokenize(tok, sd.texts, None, config.max_length, spec)
            encoded[(name, "b")] = tokenize(tok, sd.pairs or [], None, config.max_length, spec)
        else:
            encoded[(name, L.SINGLE_TOWER)] = tokenize(tok, sd.texts, sd.pairs, config.max_length, spec)
        total = np.sum([encoded[(name, t)].lengths.astype(np.int64) for t in towers], axis=0)  # (n,)
        order[name] = perm = length_order(total) if config.bucket else np.arange(len(total))
        n = len(perm)
        _row_arrays(arrays, name, sd, perm, np.arange(len(perm)))
        for t in towers:
            e = encoded[(name, t)]
            arrays[L.n_tokens_path(name, t)] = e.lengths[perm]
            arrays[L.truncated_path(name, t)] = e.truncated[perm]
            token_counts[(name, t)] = e.lengths[perm]
        truncated[name] = int(sum(encoded[(name, t)].truncated.sum() for t in towers))
        n_words = 0
        if word_poolings and sd.words is not None and dataset.word_labels is not None:
            words[name] = aligned = align_words(tok, sd.words, encoded[(name, L.SINGLE_TOWER)].ids, config.max_length)
            n_words = _word_arrays(arrays, name, sd, perm, aligned, dataset.word_labels)
            word_counts["cut"][name] = int(aligned.cut.sum())
            word_counts["truncated"][name] = int(aligned.truncated.sum())
        splits[name] = L.SplitLayout.plan(
            n, config.chunk_rows, n_tokens={t: int(encoded[(name, t)].lengths.sum()) for t in towers}, n_words=n_words
        )
    lay = L.StoreLayout(
        layers=tuple(layers),
        poolings=tuple(poolings),
        hidden=backbone.hidden,
        dtype=config.dtype,
        towers=tuple(towers),
        token_layers=tuple(token_layers),
        chunk_rows=config.chunk_rows,
        splits=splits,
        word_poolings=word_poolings,
    )
    words_info = None
    if word_poolings and dataset.word_labels is not None:
        first = next(iter(dataset.splits.values())).words or []
        words_info = L.WordsMeta(
            labels={k: tuple(v) for k, v in dataset.word_labels.items()},
            heads=bool(first) and first[0].heads is not None,
            cut=word_counts["cut"],
            truncated=word_counts["truncated"],
        )
    plan = _finish_plan(
        config,
        device,
        dataset,
        backbone,
        lay,
        order,
        encoded,
        arrays,
        token_counts,
        truncated,
        words_meta=words_info,
        text_record=L.TextRecord.from_dict(spec.record(tok)),
    )
    plan.words = words
    return plan


def _word_arrays(
    arrays: dict[str, np.ndarray],
    name: str,
    sd: SplitData,
    perm: np.ndarray,
    aligned: WordAlignment,
    vocab: dict[str, list[str]],
) -> int:
    """The per-word arrays of one split in stored row order (offsets, cut, head, labels, forms); the word count."""
    rows = sd.words or []
    counts = np.array([len(r.forms) for r in rows], dtype=np.int64)
    source_offsets = np.concatenate([[0], np.cumsum(counts)])
    # flat source-order positions of every word, in stored row order
    parts = [np.arange(source_offsets[i], source_offsets[i + 1]) for i in perm]
    take = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    arrays[L.word_offsets_path(name)] = np.concatenate([[0], np.cumsum(counts[perm])]).astype(np.int64)
    arrays[L.word_cut_path(name)] = aligned.cut[take]
    if rows and rows[0].heads is not None:
        arrays[L.word_head_path(name)] = np.concatenate([np.asarray(rows[i].heads, np.int32) for i in perm])
    for label, values in vocab.items():
        lookup = {v: j for j, v in enumerate(values)}
        arrays[L.word_label_path(name, label)] = np.fromiter(
            (lookup[v] for i in perm for v in rows[i].labels[label]), dtype=np.int32, count=len(take)
        )
    forms = [f.encode("utf-8") for i in perm for f in rows[i].forms]
    arrays[L.word_form_bytes_path(name)] = np.frombuffer(b"".join(forms) or b"\0", dtype=np.uint8)[
        : sum(map(len, forms))
    ]
    arrays[L.word_form_offsets_path(name)] = np.concatenate([[0], np.cumsum([len(f) for f in forms])]).astype(np.int64)
    return int(len(take))


def _row_arrays(arrays: dict[str, np.ndarray], name: str, sd: SplitData, perm: np.ndarray, source: np.ndarray) -> None:
    """Per-row arrays known before the model runs; ``source[perm]`` maps stored rows to source rows."""
    src = source[perm]
    arrays[L.row_ids_path(name)] = sd.row_ids[src]
    if sd.labels is not None:
        arrays[L.labels_path(name)] = sd.labels[src]
    if sd.groups is not None:
        arrays[L.groups_path(name)] = sd.groups[src]


def _usable_clips(dataset: Dataset, rate: int, minimum: int, skip_bad: bool) -> Dataset:
    """``dataset`` without the clips too short for one frame (:func:`embstore.data.audio.usable_rows`: refused, or
    dropped with ``--skip-bad`` and counted with the other unusable rows in ``skipped_empty``)."""
    splits, skipped = dict(dataset.splits), dict(dataset.skipped_empty)
    for name, sd in dataset.splits.items():
        keep = usable_rows(
            sd.audio or [],
            sd.clip_lengths(rate),
            np.arange(len(sd)),
            minimum=minimum,
            rate=rate,
            split=name,
            skip_bad=skip_bad,
        )
        if len(keep) < len(sd):
            splits[name] = sd.subset(keep)
            skipped[name] = skipped.get(name, 0) + len(sd) - len(keep)
    return dataclasses.replace(dataset, splits=splits, skipped_empty=skipped)


def _used(spec: Any, field: str) -> bool:
    """Whether augmentation ``spec`` records the newer per-row ``field`` (older stores lack these arrays)."""
    if field == "pitch":
        return "pitch" in spec.transforms
    if field == "shift_seconds":
        return "shift" in spec.transforms and spec.shift_max_seconds is not None
    return "noise" in spec.transforms and spec.noise_std is not None


def _plan_audio(
    config: ExtractConfig,
    device: str,
    dataset: Dataset,
    backbone: Backbone,
    layers: list[int],
    token_layers: list[int],
    poolings: tuple[str, ...],
) -> Plan:
    """Audio rows: lengths from file headers, augmented copies for the training split only."""
    from embstore.data.audio import check_window, min_samples
    from embstore.extraction.speech import plan_audio_split

    rate = backbone.sampling_rate  # (ExtractConfig already refused cls pooling with --audio-col)
    spec = config.augment_spec()
    encoded: dict[tuple[str, str], Any] = {}
    order: dict[str, np.ndarray] = {}
    splits: dict[str, L.SplitLayout] = {}
    arrays: dict[str, np.ndarray] = {}
    token_counts: dict[tuple[str, str], np.ndarray] = {}
    truncated: dict[str, int] = {}
    augmented: dict[str, int] = {}
    t = L.AUDIO_TOWER
    dataset = _usable_clips(dataset, rate, min_samples(backbone.frames), config.source.skip_bad)
    for name, sd in dataset.splits.items():
        rows = plan_audio_split(
            sd,
            rate=rate,
            frames_of=backbone.frames,
            max_seconds=config.max_seconds,
            augment=spec if name == "train" else None,
            label_names=dataset.label_names,
        )
        window = backbone.window_samples
        check_window(
            [it.path for it in rows.items],
            rows.samples,
            window=window,
            rate=rate,
            split=name,
            max_seconds=config.max_seconds,
            fix=f"Pass --max-seconds {(window or 0) / rate:g} to keep the first {(window or 0) / rate:g} s of each "
            "(and a milder --augment speed if the copies grew), or remove them.",
        )
        encoded[(name, t)] = rows
        order[name] = perm = length_order(rows.samples) if config.bucket else np.arange(len(rows.items))
        _row_arrays(arrays, name, sd, perm, rows.source)
        arrays[L.n_tokens_path(name, t)] = rows.frames[perm].astype(np.int32)
        arrays[L.truncated_path(name, t)] = rows.cropped[perm]
        arrays[L.duration_path(name)] = (rows.samples[perm] / rate).astype(np.float32)
        token_counts[(name, t)] = rows.frames[perm]
        truncated[name] = int(rows.cropped.sum())
        if spec is not None and name == "train":
            params = [it.augment for it in rows.items]
            nan = float("nan")
            arrays[L.augment_path(name, "copy")] = np.array(
                [0 if p is None else p.copy for p in params], dtype=np.int16
            )[perm]
            fields = [("speed", "speed"), ("shift", "shift_fraction"), ("snr_db", "snr_db")]
            fields += [(f, f) for f in ("pitch", "shift_seconds", "noise_std") if _used(spec, f)]
            for f, attr in fields:
                arrays[L.augment_path(name, f)] = np.array(
                    [nan if p is None else getattr(p, attr) for p in params], dtype=np.float32
                )[perm]
            augmented[name] = int(sum(p is not None for p in params))
        splits[name] = L.SplitLayout.plan(len(perm), config.chunk_rows, n_tokens={t: int(rows.frames.sum())})
    lay = L.StoreLayout(
        layers=tuple(layers),
        poolings=tuple(poolings),
        hidden=backbone.hidden,
        dtype=config.dtype,
        towers=(t,),
        token_layers=tuple(token_layers),
        chunk_rows=config.chunk_rows,
        splits=splits,
    )
    return _finish_plan(
        config, device, dataset, backbone, lay, order, encoded, arrays, token_counts, truncated, (augmented, rate)
    )


def _finish_plan(
    config: ExtractConfig,
    device: str,
    dataset: Dataset,
    backbone: Backbone,
    lay: L.StoreLayout,
    order: dict[str, np.ndarray],
    encoded: dict[tuple[str, str], Any],
    arrays: dict[str, np.ndarray],
    token_counts: dict[tuple[str, str], np.ndarray],
    truncated: dict[str, int],
    audio: tuple[dict[str, int], int] | None = None,
    words_meta: L.WordsMeta | None = None,
    text_record: L.TextRecord | None = None,
) -> Plan:
    """The plan with its store id and metadata; ``audio`` is (augmented copies per split, sampling rate),
    ``words_meta`` what a store of word-level data knows about its words, ``text_record`` the template and
    pooled-token choice as provenance records them (text stores)."""
    precision = precision_of(resolve_compute_dtype(config.compute_dtype, device), config.quantize)
    causal = is_causal(backbone.model)
    text = None if dataset.modality == "audio" else config.text_spec(causal).id_content()
    data = data_identity(config.source)
    if data is None:  # load_dataset has read every file: they exist
        raise RuntimeError("the data files changed while planning; re-run")
    model = model_identity(config.model)
    fp = store_fingerprint(
        config,
        model,
        data,
        layers=list(lay.layers),
        token_layers=list(lay.token_layers),
        poolings=list(lay.poolings),
        precision=precision,
        word_poolings=list(lay.word_poolings),
        text=text,
    )
    import torch
    import transformers
    import zarr

    provenance = L.Provenance(
        model={k: v for k, v in backbone.identity.items() if k not in ("tokenizer", "compute_dtype")},
        tokenizer=backbone.identity["tokenizer"],
        max_length=config.max_length,
        poolings=lay.poolings,
        dtype=config.dtype,
        precision=precision,
        compute_dtype=backbone.identity["compute_dtype"],
        causal=causal,
        top_layer=top_state(backbone.model),
        text=text_record,
        device=device,
        sources=tuple(dataset.sources),
        text_col=config.source.text_col or "text",
        text_pair_col=config.source.text_pair_col,
        pair_mode=config.pair_mode,
        label_col=config.source.label_col,
        audio_col=config.source.audio_col,
        group_col=config.source.group_col,
        max_seconds=config.max_seconds,
        batching=audio_batching(config, model) if audio is not None else None,
        augment=None
        if not config.augment
        else {
            "transforms": list(config.augment),
            "copies": config.copies,
            "classes": config.augment_classes,
            "snr_db": config.snr_db,
            "seed": config.source.seed,
            **config.augment_extras(),
        },
        rows={k: v.n_rows for k, v in lay.splits.items()},
        tool={
            "embstore": L.EMBSTORE_VERSION,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "zarr": zarr.__version__,
            "python": sys.version.split()[0],
        },
        config=config.to_dict(),
        preprocess=None if config.source.preprocess is None else preprocess_identity(config.source.preprocess),
        label_from_path=config.source.label_from_path,
    )
    meta = L.StoreMeta(
        complete=False,
        fingerprint=fp,
        modality=dataset.modality,
        group_names=None if dataset.group_names is None else tuple(dataset.group_names),
        layout=lay,
        label_names=None if dataset.label_names is None else tuple(dataset.label_names),
        truncated=truncated,
        skipped_empty=dict(dataset.skipped_empty),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        finished=None,
        provenance=provenance,
        augmented=None if audio is None else audio[0],
        sampling_rate=None if audio is None else audio[1],
        words=words_meta,
    )
    return Plan(
        backbone=backbone,
        dataset=dataset,
        layout=lay,
        fingerprint=fp,
        order=order,
        encoded=encoded,
        meta=meta,
        arrays=arrays,
        token_counts=token_counts,
    )


def store_paths(config: ExtractConfig, fingerprint: str) -> tuple[str, str]:
    """(final store path, zarr path written during extraction)."""
    out = config.out
    if out is not None and out.startswith("file://"):
        out = out[len("file://") :]
    if out is not None and (out.rstrip("/").endswith((".zarr", ".h5", ".hdf5"))):
        final = out.rstrip("/")
    else:
        data_name = (
            config.source.data.split(":", 1)[-1] if config.source.data else "-".join(n for n, _ in config.source.splits)
        )
        data_name = (
            Path(data_name).stem if config.source.data and not config.source.data.startswith("builtin:") else data_name
        )
        suffix = ".h5" if config.format == "h5" else ".zarr"
        base = Path(out) if out is not None else cache_dir()
        model = slug(config.model) + ("" if config.random_weights is None else f"-random{config.random_weights}")
        final = str(base / f"{model}-{slug(data_name)}-{fingerprint[:12]}{suffix}")
    return final, (final + ".partial.zarr" if is_h5_path(final) else final)
