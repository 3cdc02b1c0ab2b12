"""``embstore plan``: what an extraction will do, before it runs.

It plans exactly as ``embstore extract`` does (reads and tokenizes the data or the audio headers,
loads the model, decides the layout and the store id) and then, without running the model over the
data, reports:

* rows, tokens (or seconds of audio) and truncated rows per split;
* the bytes the store will take on disk, per pooling and per per-token layer. Chunks are stored
  uncompressed at their full chunk shape, so the hidden states' bytes follow from the layout; the
  metadata and per-row arrays are measured by building the real skeleton in memory, so a zarr
  store's total is exact (an HDF5 export's is an estimate);
* the free space where the store will be written;
* an estimate of the extraction's wall time from timing a few real batches of the very encoder
  the extraction runs, spread over the length-sorted batches, plus the planning time itself;
* an estimate of its peak memory (:func:`memory_estimate`): the weights, one batch's activations inside a block
  (each layer is pooled as it is produced, so the states of one layer at a time, never all of them), the pooled and
  host buffers of a row chunk, and the runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embstore.config import ExtractConfig
from embstore.extraction.encode import ChunkJob, Encoded, make_batches
from embstore.store import layout as L
from embstore.store.backends import is_h5_path

if TYPE_CHECKING:
    from embstore.extraction.plan import Plan

__all__ = ["PlanReport", "plan_extraction", "memory_estimate", "SAMPLE_BATCHES", "RUNTIME_BYTES"]

SAMPLE_BATCHES = 8
"""Batches timed for the estimate (after one untimed warm-up batch)."""


@dataclass(frozen=True)
class PlanReport:
    """Everything ``embstore plan`` prints; ``to_dict`` is its ``--json`` object."""

    path: str
    state: str
    """'absent', 'partial' (a run would resume it) or 'complete' (a run would do nothing)."""
    fingerprint: str
    model: str
    device: str
    modality: str
    splits: dict[str, dict[str, Any]]
    bytes: int
    """The store's size on disk once complete."""
    bytes_exact: bool
    bytes_detail: dict[str, Any]
    free_bytes: int | None
    """Free space under the store's directory (None for remote stores)."""
    peak_bytes: int
    """Space needed while extracting (an HDF5 store is staged as zarr, then exported)."""
    estimated_seconds: float
    timing: dict[str, Any] = field(default_factory=dict)
    memory_bytes: int = 0
    """Estimated peak memory of the extraction (host and devices together)."""
    memory_detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(
    plan: Plan, pending: dict[str, list[int]], config: ExtractConfig
) -> list[tuple[str, int, str, np.ndarray, int]]:
    """Every forward batch the extraction will run: (split, chunk, tower, stored row positions, padded units)."""
    out = []
    audio = plan.dataset.modality == "audio"
    budget = max(1, int(config.batch_seconds * plan.backbone.sampling_rate)) if audio else config.token_budget
    for split, chunks in pending.items():
        sl = plan.layout.splits[split]
        perm = plan.order[split]
        for c in chunks:
            start, stop = sl.rows(c)
            rows = np.arange(start, stop)
            for tower in plan.layout.towers:
                e = plan.encoded[(split, tower)]
                lengths = (e.lengths if isinstance(e, Encoded) else e.samples)[perm[start:stop]].astype(np.int64)
                for b0, b1 in make_batches(lengths, config.batch_size, budget):
                    out.append((split, c, tower, rows[b0:b1], int((b1 - b0) * max(1, int(lengths[b0:b1].max())))))
    return out


def _job(plan: Plan, split: str, chunk: int, tower: str, rows: np.ndarray) -> ChunkJob:
    """A job holding just ``rows`` (stored positions) of one tower: encoding it runs exactly one batch."""
    src = plan.order[split][rows]
    e = plan.encoded[(split, tower)]
    if isinstance(e, Encoded):
        towers: dict[str, Any] = {tower: e.rows(src)}
    else:
        towers = {tower: [e.items[i] for i in src]}
    aligned = plan.words.get(split)
    words = None if aligned is None else [aligned.spans[i] for i in src]
    return ChunkJob(split=split, chunk=chunk, towers=towers, words=words)


def _time_batches(
    plan: Plan, config: ExtractConfig, device: str, batches: list[tuple[str, int, str, np.ndarray, int]]
) -> tuple[float, dict[str, Any]]:
    """Estimated seconds to encode ``batches`` and what was timed.

    Times SAMPLE_BATCHES batches evenly spread over the length-sorted order, then gives every
    batch the seconds per padded unit (token or sample) of the timed batch nearest in width.
    """
    from embstore.extraction.run import make_encoder

    if not batches:
        return 0.0, {"batches_timed": 0, "batches": 0}
    if config.quantize == "int8":  # time what the extraction will run
        from embstore.backbones.quantize import quantize_int8

        quantize_int8(plan.backbone.model)
    encoder = make_encoder(plan.backbone, plan.layout, config, device)

    def run(b: tuple[str, int, str, np.ndarray, int]) -> float:
        job = _job(plan, b[0], b[1], b[2], b[3])
        t0 = time.perf_counter()
        encoder.encode(job, lambda tower, what, layer: f"{tower}/{what}/{layer}")
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(min(batches, key=lambda b: b[4]))  # warm-up: allocations and thread pools, paid once per run
    picks = sorted({int(round(i)) for i in np.linspace(0, len(batches) - 1, min(SAMPLE_BATCHES, len(batches)))})
    widths, rates, timed_rows, timed_seconds = [], [], 0, 0.0
    for i in picks:
        b = batches[i]
        seconds = run(b)
        widths.append(b[4] / len(b[3]))
        rates.append(seconds / b[4])
        timed_rows += len(b[3])
        timed_seconds += seconds
    order = np.argsort(widths)
    w, r = np.asarray(widths)[order], np.asarray(rates)[order]
    total = 0.0
    for b in batches:
        total += float(np.interp(b[4] / len(b[3]), w, r)) * b[4]
    return total, {
        "batches": len(batches),
        "batches_timed": len(picks),
        "rows_timed": timed_rows,
        "seconds_timed": round(timed_seconds, 3),
    }


RUNTIME_BYTES = 500 << 20
"""Python, torch, transformers and the tokenizer (about what a tiny model's extraction takes: BENCHMARKS.md)."""


def memory_estimate(
    model: Any, lay: L.StoreLayout, batches: list[tuple[str, int, str, np.ndarray, int]]
) -> dict[str, Any]:
    """Peak memory of an extraction of ``model`` (it may sit on the meta device: only its parameters' sizes are
    read) into a store of layout ``lay``, over the planned ``batches`` (:func:`_batches`), in bytes per part and their
    sum as ``total``.

    - ``weights``: the parameters in the compute dtype;
    - ``activations``: the widest batch inside one block: its (rows x tokens) states twice (the block's input and
      its normed copy) plus three MLP intermediates (gate, up, activation) in the compute dtype, and the attention
      scores (rows x heads x tokens^2, float32) where the kernel materialises them (a padded batch on the CPU);
    - ``pooled``: the float32 pooled values and their storage-dtype copy of one batch;
    - ``chunks``: two row chunks of stored values on the host (one being written while the next fills);
    - ``runtime``: :data:`RUNTIME_BYTES`.
    """
    cfg = model.config
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    item = params[0].element_size() if params else 4
    hidden = int(getattr(cfg, "hidden_size", lay.hidden) or lay.hidden)
    inner = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    store_item = np.dtype(lay.dtype).itemsize
    k, p = len(lay.layers), len(lay.poolings)
    widest, pooled = 0, 0
    for _split, _chunk, _tower, rows, padded in batches:
        n = len(rows)
        width = padded // max(1, n)
        widest = max(widest, padded * (2 * hidden + 3 * inner) * item + n * heads * width * width * 4)
        pooled = max(
            pooled, p * k * n * hidden * (4 + store_item) + len(lay.token_layers) * padded * hidden * store_item
        )
    most_rows = max((sl.chunk_rows for sl in lay.splits.values()), default=0)
    tokens = max((sum(sl.n_tokens.values()) // max(1, sl.n_chunks) for sl in lay.splits.values()), default=0)
    chunk = len(lay.towers) * (p * k * most_rows + len(lay.token_layers) * tokens) * hidden * store_item
    detail = {
        "weights": int(weights),
        "activations": int(widest),
        "pooled": int(pooled),
        "chunks": int(2 * chunk),
        "runtime": RUNTIME_BYTES,
    }
    detail["total"] = sum(detail.values())
    return detail


def _skeleton_bytes(plan: Plan) -> tuple[int, int, int]:
    """(bytes of the skeleton: metadata + per-row arrays, growth of the root metadata when marked complete,
    number of arrays), measured by building the real skeleton in memory."""
    import datetime as _dt

    import fsspec

    from embstore.store.writer import StoreWriter

    root = f"/embstore-plan-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        writer = StoreWriter.create(f"memory://{root}", plan.meta, plan.arrays, plan.token_counts)
        before = int(fs.du(root, total=True))
        meta_before = int(fs.du(f"{root}/zarr.json", total=True))
        writer.finalize(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        grown = int(fs.du(f"{root}/zarr.json", total=True)) - meta_before
        arrays = sum(
            1
            for f in fs.find(root)
            if f.endswith("/zarr.json") and b'"node_type":"array"' in fs.cat(f).replace(b" ", b"")
        )
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)
    return before, grown, arrays


def _h5_bytes(data_bytes: int, arrays: int, chunks: int, attrs: int) -> int:
    """HDF5 file size estimate: the data, ~2.5 KB of headers per dataset, ~40 bytes of chunk index per chunk,
    the attributes and ~6 KB of superblock and root group (measured with h5py 3)."""
    return data_bytes + 2500 * arrays + 40 * chunks + attrs + 6000


def _state_bytes(lay: L.StoreLayout) -> dict[str, Any]:
    """Bytes of the pooled hidden states (full chunks, uncompressed) per pooling, and of the progress arrays."""
    item = np.dtype(lay.dtype).itemsize
    per_pooling = {p: 0 for p in lay.poolings}
    progress = 0
    for sl in lay.splits.values():
        for p in lay.poolings:
            per_pooling[p] += len(lay.towers) * len(lay.layers) * sl.n_chunks * sl.chunk_rows * lay.hidden * item
        # a done flag, the chunk's sha256 and one sha256 per (tower, pooling or tokens, layer)
        progress += sl.n_chunks * (1 + 32 + 32 * len(lay.digest_entries()))
    return {"pooled": per_pooling, "progress": progress}


def _token_chunk_bytes(plan: Plan) -> dict[str, int]:
    """Bytes of the per-token arrays per layer: each row chunk's array is stored in chunks of
    TOKEN_CHUNK_ROWS token rows (the last one full-size too)."""
    lay = plan.layout
    item = np.dtype(lay.dtype).itemsize
    out = {str(layer): 0 for layer in lay.token_layers}
    if not lay.token_layers:
        return out
    for split, sl in lay.splits.items():
        for tower in lay.towers:
            counts = plan.token_counts[(split, tower)].astype(np.int64)
            for c in range(sl.n_chunks):
                start, stop = sl.rows(c)
                n_tok = int(counts[start:stop].sum())
                if n_tok == 0:
                    continue
                rows_per_chunk = min(n_tok, L.TOKEN_CHUNK_ROWS)
                stored = -(-n_tok // rows_per_chunk) * rows_per_chunk * lay.hidden * item
                for layer in lay.token_layers:
                    out[str(layer)] += stored
    return out


def _word_chunk_bytes(plan: Plan) -> dict[str, int]:
    """Bytes of the word states per word pooling: each row chunk's (layers, words, hidden) array is stored in chunks
    of (1, WORD_CHUNK_ROWS, hidden) (the last one full-size too)."""
    lay = plan.layout
    item = np.dtype(lay.dtype).itemsize
    out = {p: 0 for p in lay.word_poolings}
    for split, sl in lay.splits.items():
        if not lay.word_poolings:
            break
        offsets = plan.arrays[L.word_offsets_path(split)]
        for c in range(sl.n_chunks):
            start, stop = sl.rows(c)
            n_words = int(offsets[stop] - offsets[start])
            if n_words == 0:
                continue
            rows = min(n_words, L.WORD_CHUNK_ROWS)
            for p in lay.word_poolings:
                out[p] += len(lay.towers) * len(lay.layers) * -(-n_words // rows) * rows * lay.hidden * item
    return out


def plan_extraction(config: ExtractConfig) -> PlanReport:
    """Plan ``config``'s extraction and estimate its size and time (see the module docstring)."""
    from embstore.device import resolve_device
    from embstore.extraction.plan import make_plan, store_paths
    from embstore.extraction.run import store_state
    from embstore.store.writer import StoreWriter

    t0 = time.perf_counter()
    device = resolve_device(config.device)
    plan = make_plan(config, device)
    final, write_path = store_paths(config, plan.fingerprint)
    state = store_state(final, write_path, plan.fingerprint)
    planning_seconds = time.perf_counter() - t0

    lay = plan.layout
    pending = {s: list(range(sl.n_chunks)) for s, sl in lay.splits.items()}
    if state == "partial":
        writer = StoreWriter.open(write_path)
        pending = {s: [int(c) for c in np.flatnonzero(~writer.done(s))] for s in writer.layout.splits}
    elif state == "complete":
        pending = {s: [] for s in lay.splits}

    states = _state_bytes(lay)
    states["tokens"] = _token_chunk_bytes(plan)
    states["words"] = _word_chunk_bytes(plan)
    skeleton, grown, n_arrays = _skeleton_bytes(plan)
    data_bytes = (
        sum(states["pooled"].values())
        + sum(states["tokens"].values())
        + sum(states["words"].values())
        + states["progress"]
    )
    zarr_bytes = skeleton + grown + data_bytes
    h5 = is_h5_path(final)
    n_chunks = sum(sl.n_chunks for sl in lay.splits.values())
    per_chunk = len(lay.layers) * (len(lay.poolings) + len(lay.word_poolings)) + len(lay.token_layers)
    chunks = n_chunks * (len(lay.towers) * per_chunk + 2)
    total = (
        _h5_bytes(data_bytes + skeleton, n_arrays, chunks, grown + len(json.dumps(plan.meta.to_dict(), default=str)))
        if h5
        else zarr_bytes
    )
    detail = {
        "pooled": states["pooled"],
        "tokens": states["tokens"],
        "words": states["words"],
        "metadata_and_row_arrays": skeleton + grown,
        "progress": states["progress"],
        "format": "h5" if h5 else "zarr",
    }

    free = None
    if "://" not in final:
        probe = Path(final).parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = int(shutil.disk_usage(probe).free)

    batches = _batches(plan, pending, config)
    memory = memory_estimate(plan.backbone.model, lay, batches or _batches(plan, {s: [0] for s in lay.splits}, config))
    compute, timing = _time_batches(plan, config, device, batches)
    timing.update(
        {
            "planning_seconds": round(planning_seconds, 3),
            "compute_seconds": round(compute, 3),
            "num_processes": config.num_processes,
            "cpu_threads": _threads(),
        }
    )
    estimate = planning_seconds + compute if state != "complete" else planning_seconds

    splits: dict[str, dict[str, Any]] = {}
    audio = plan.dataset.modality == "audio"
    for name, sl in lay.splits.items():
        entry: dict[str, Any] = {
            "rows": sl.n_rows,
            "chunks": sl.n_chunks,
            "chunks_left": len(pending.get(name, [])),
            "truncated": int(plan.meta.truncated.get(name, 0)),
        }
        if audio:
            entry["seconds"] = float(plan.arrays[L.duration_path(name)].astype(np.float64).sum())
            entry["frames"] = int(sum(sl.n_tokens.values()))
            entry["augmented"] = int((plan.meta.augmented or {}).get(name, 0))
        else:
            entry["tokens"] = int(sum(sl.n_tokens.values()))
        if lay.word_poolings:
            entry["words"] = sl.n_words
            entry["words_cut"] = int(plan.meta.words.cut.get(name, 0)) if plan.meta.words else 0
        splits[name] = entry
    return PlanReport(
        path=final,
        state=state,
        fingerprint=plan.fingerprint,
        model=config.model,
        device=device,
        # int8 stores also record their measured deviation in the metadata (a few hundred bytes)
        modality=plan.dataset.modality,
        splits=splits,
        bytes=int(total),
        bytes_exact=not h5 and config.quantize == "none",
        bytes_detail=detail,
        free_bytes=free,
        peak_bytes=int(zarr_bytes + (total if h5 else 0)),
        estimated_seconds=round(float(estimate), 2),
        timing=timing,
        memory_bytes=int(memory["total"]),
        memory_detail=memory,
    )


def _threads() -> int:
    import torch

    return int(torch.get_num_threads()) if "OMP_NUM_THREADS" not in os.environ else int(os.environ["OMP_NUM_THREADS"])
