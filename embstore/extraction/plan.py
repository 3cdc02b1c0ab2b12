"""Planning one extraction, before the model runs over the data: read and tokenize the data (or the
audio headers), load the model, order the rows, lay out the store, and name it by its id.

:func:`quick_id` computes the same id from cheap inputs only (see :mod:`embstore.extraction.store_id`), so a
finished store is found without loading the model; :func:`make_plan` does the full planning that
``embstore extract`` and ``embstore plan`` share.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.backbones.registry import Backbone, load_backbone
from embstore.config import ExtractConfig, default_pooling
from embstore.data.audio import usable_rows
from embstore.data.preprocess import preprocess_identity
from embstore.data.tables import Dataset, SplitData
from embstore.errors import ConfigError, EmbstoreError
from embstore.extraction.encode import Encoded, length_order, tokenize
from embstore.extraction.store_id import data_identity, model_identity, store_fingerprint
from embstore.layers import parse_layers
from embstore.store import layout as L
from embstore.store.backends import is_h5_path
from embstore.store.catalog import cache_dir, slug

__all__ = ["Plan", "make_plan", "quick_id", "store_paths", "precision_of"]


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
        ):
            return None
        available = list(range(int(model["n_layers"]) + 1))
        layers = parse_layers(config.layers, available, "layers")
        token_layers = parse_layers(config.tokens, available, "tokens") if config.tokens else []
    except EmbstoreError:
        return None
    fp = store_fingerprint(
        config,
        model,
        data,
        layers=layers,
        token_layers=token_layers,
        poolings=list(config.pooling or default_pooling(model["modality"])),
        precision=precision_of(device, config.quantize),
    )
    return (fp, *store_paths(config, fp))


def precision_of(device: str, quantize: str) -> str:
    """How the model computes: bf16 autocast on CUDA, int8 dynamic Linear layers with --quantize int8, else float32."""
    return "bf16-autocast" if device.startswith("cuda") else "int8-dynamic" if quantize == "int8" else "float32"


def make_plan(config: ExtractConfig, device: str) -> Plan:
    dataset = config.source.load()
    backbone = load_backbone(
        config.model, device, allow_pickle=config.allow_pickle, random_weights=config.random_weights
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
    poolings = config.pooling or default_pooling(dataset.modality)
    if dataset.modality == "audio":
        return _plan_audio(config, device, dataset, backbone, layers, token_layers, poolings)
    if config.max_length > backbone.max_positions:
        raise ConfigError(
            f"--max-length {config.max_length} exceeds what {config.model} can encode ({backbone.max_positions} "
            f"positions); use --max-length {backbone.max_positions} or less."
        )
    towers = L.PAIR_TOWERS if config.pair_mode == "towers" else (L.SINGLE_TOWER,)
    tok = backbone.tokenizer
    encoded: dict[tuple[str, str], Encoded] = {}
    order: dict[str, np.ndarray] = {}
    splits: dict[str, L.SplitLayout] = {}
    arrays: dict[str, np.ndarray] = {}
    token_counts: dict[tuple[str, str], np.ndarray] = {}
    truncated: dict[str, int] = {}
    for name, sd in dataset.splits.items():
        if config.pair_mode == "towers":
            encoded[(name, "a")] = tokenize(tok, sd.texts, None, config.max_length)
            encoded[(name, "b")] = tokenize(tok, sd.pairs or [], None, config.max_length)
        else:
            encoded[(name, L.SINGLE_TOWER)] = tokenize(tok, sd.texts, sd.pairs, config.max_length)
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
        splits[name] = L.SplitLayout.plan(
            n, config.chunk_rows, n_tokens={t: int(encoded[(name, t)].lengths.sum()) for t in towers}
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
    )
    return _finish_plan(config, device, dataset, backbone, lay, order, encoded, arrays, token_counts, truncated)


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
    from embstore.data.audio import min_samples
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
) -> Plan:
    """The plan with its store id and metadata; ``audio`` is (augmented copies per split, sampling rate)."""
    precision = precision_of(device, config.quantize)
    data = data_identity(config.source)
    if data is None:  # load_dataset has read every file: they exist
        raise RuntimeError("the data files changed while planning; re-run")
    fp = store_fingerprint(
        config,
        model_identity(config.model),
        data,
        layers=list(lay.layers),
        token_layers=list(lay.token_layers),
        poolings=list(lay.poolings),
        precision=precision,
    )
    import torch
    import transformers
    import zarr

    provenance = L.Provenance(
        model={k: v for k, v in backbone.identity.items() if k != "tokenizer"},
        tokenizer=backbone.identity["tokenizer"],
        max_length=config.max_length,
        poolings=lay.poolings,
        dtype=config.dtype,
        precision=precision,
        device=device,
        sources=tuple(dataset.sources),
        text_col=config.source.text_col or "text",
        text_pair_col=config.source.text_pair_col,
        pair_mode=config.pair_mode,
        label_col=config.source.label_col,
        audio_col=config.source.audio_col,
        group_col=config.source.group_col,
        max_seconds=config.max_seconds,
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
