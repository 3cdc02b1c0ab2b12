"""Orchestrates one extraction: plan, content address, resume, split work between ranks,
write, mark complete. The model loop itself lives in :mod:`embstore.extraction.encode`."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embstore.backbones.quantize import check_quantize_device, measure_int8, quantize_int8
from embstore.backbones.registry import Backbone, load_backbone
from embstore.config import ExtractConfig
from embstore.device import resolve_device
from embstore.errors import (
    DiskFullError,
    OutputNotWritableError,
    RankFailedError,
    StoreMismatchError,
    StoreNotFoundError,
)
from embstore.extraction.encode import ChunkEncoder, ChunkJob, Encoded
from embstore.extraction.plan import Plan, make_plan, placement_of, quick_id, rank_device, store_paths
from embstore.extraction.ranks import Ranks
from embstore.store import layout as L
from embstore.store.backends import complete_meta, is_h5_path
from embstore.store.lock import StoreLock
from embstore.store.reader import open_store
from embstore.store.writer import StoreWriter, export_h5, io_errors

__all__ = ["extract", "ExtractResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    path: str
    status: str
    """'created', 'resumed' or 'already complete'."""
    rows: dict[str, int]
    truncated: dict[str, int]
    skipped_empty: dict[str, int]
    seconds: float
    words_cut: dict[str, int] = dataclasses.field(default_factory=dict)
    """Word-level data: words per split that no token reached (zeros in the store, marked cut)."""
    words_truncated: dict[str, int] = dataclasses.field(default_factory=dict)
    """Of those, the words --max-length cut off."""


def _check_writable(path: str, needed: int) -> None:
    if "://" in path:
        return
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".embstore-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritableError(
            f"Cannot write the store under {parent} ({exc.strerror}); choose a writable --out or set EMBSTORE_CACHE."
        ) from None
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise DiskFullError(
            f"The store needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free under {parent}; free "
            f"space, store fewer layers/poolings, or choose another --out."
        )


def _needed_bytes(lay: L.StoreLayout, h5: bool) -> int:
    item = np.dtype(lay.dtype).itemsize
    total = 0
    for sl in lay.splits.values():
        total += sl.n_rows * len(lay.layers) * len(lay.poolings) * len(lay.towers) * lay.hidden * item
        total += sum(sl.n_tokens.values()) * len(lay.token_layers) * lay.hidden * item
        total += sl.n_words * len(lay.word_poolings) * len(lay.layers) * lay.hidden * item
    return int(total * (2 if h5 else 1) * 1.02)


def _jobs(plan: Plan, pending: dict[str, list[int]]) -> list[ChunkJob]:
    jobs = []
    for split, chunks in pending.items():
        perm = plan.order[split]
        for c in chunks:
            start, stop = plan.layout.splits[split].rows(c)
            rows = perm[start:stop]
            towers: dict[str, Any] = {}
            for t in plan.layout.towers:
                e = plan.encoded[(split, t)]
                if isinstance(e, Encoded):
                    towers[t] = e.rows(rows)
                else:  # AudioRows
                    towers[t] = [e.items[i] for i in rows]
            aligned = plan.words.get(split)
            words = None if aligned is None else [aligned.spans[i] for i in rows]
            jobs.append(ChunkJob(split=split, chunk=c, towers=towers, words=words))
    return jobs


def make_encoder(backbone: Backbone, lay: L.StoreLayout, config: ExtractConfig, device: str) -> ChunkEncoder:
    """The chunk encoder an extraction with ``config`` runs (``embstore plan`` times the same one)."""
    common: dict[str, Any] = dict(
        layers=lay.layers,
        token_layers=lay.token_layers,
        poolings=lay.poolings,
        dtype=lay.dtype,
        batch_size=config.batch_size,
        token_budget=config.token_budget,
        device=device,
        name=backbone.name,
    )
    if backbone.modality == "audio":  # (plan refuses --word-pooling for audio)
        from embstore.extraction.speech import AudioChunkEncoder

        rate = backbone.sampling_rate
        return AudioChunkEncoder(
            backbone.model,
            backbone.tokenizer,
            backbone.frames,
            batch_seconds=config.batch_seconds,
            max_samples=None if config.max_seconds is None else int(round(config.max_seconds * rate)),
            **common,
        )
    return ChunkEncoder(backbone.model, backbone.tokenizer.pad_token_id or 0, word_poolings=lay.word_poolings, **common)


def _measure_int8(plan: Plan, config: ExtractConfig, device: str) -> dict[str, Any]:
    """Quantise the plan's model in place and return the provenance record of its deviation from
    float32 on the first batch (of the first row chunk of the first split)."""
    split = next(iter(plan.layout.splits))
    encoder = make_encoder(plan.backbone, plan.layout, config, device)
    job = encoder.first_batch(_jobs(plan, {split: [0]})[0])

    def encode() -> dict[tuple[str, str, int | None], np.ndarray]:
        keys: dict[str, tuple[str, str, int | None]] = {}

        def name(tower: str, what: str, layer: int | None) -> str:
            keys[f"{tower}/{what}/{layer}"] = (tower, what, layer)
            return f"{tower}/{what}/{layer}"

        return {keys[n]: a for n, a in encoder.encode(job, name).items()}

    return {**measure_int8(plan.backbone.model, encode, plan.layout.layers), "split": split}


def _run_jobs(
    backbone: Backbone,
    lay: L.StoreLayout,
    config: ExtractConfig,
    write_path: str,
    jobs: list[ChunkJob],
    device: str,
    show_progress: bool,
    desc: str = "extract",
) -> None:
    """Encode row chunks and write each in a background thread while the model runs the next."""
    from tqdm import tqdm

    writer = StoreWriter.open(write_path)
    if config.quantize == "int8":
        quantize_int8(backbone.model)
    encoder = make_encoder(backbone, lay, config, device)
    total = sum(j.n_rows for j in jobs)
    bar = tqdm(total=total, unit="ex", desc=desc, disable=not show_progress, dynamic_ncols=True, mininterval=1.0)
    pending: Future[None] | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for job in jobs:

            def name(tower: str, what: str, layer: int | None, _s: str = job.split, _c: int = job.chunk) -> str:
                if what.startswith("words/"):
                    return L.word_chunk_path(_s, tower, what.split("/", 1)[1], _c)
                return (
                    L.token_chunk_path(_s, tower, layer, _c)
                    if what == "tokens" and layer is not None
                    else L.pooled_path(_s, tower, what)
                )

            data = encoder.encode(job, name, bar.update)
            if pending is not None:
                pending.result()  # at most one chunk waits for the disk: memory stays bounded
            pending = pool.submit(writer.write_chunk, job.split, job.chunk, data)
        if pending is not None:
            pending.result()
    bar.close()


def _worker(
    rank: int, config_dict: dict[str, Any], device: str, write_path: str, jobs: list[ChunkJob], threads: int
) -> None:
    """Entry point of one ``--num-processes`` worker (spawned)."""
    import torch

    torch.set_num_threads(threads)
    config = ExtractConfig.from_dict(config_dict)
    backbone = load_backbone(
        config.model,
        device,
        allow_pickle=config.allow_pickle,
        random_weights=config.random_weights,
        placement=placement_of(config, device),
    )
    lay = StoreWriter.open(write_path).layout
    _run_jobs(backbone, lay, config, write_path, jobs, device, show_progress=rank == 0, desc=f"extract[rank {rank}]")


def _run_processes(
    config: ExtractConfig, plan: Plan, write_path: str, pending: dict[str, list[int]], device: str
) -> None:
    import multiprocessing as mp

    jobs = _jobs(plan, pending)
    n = config.num_processes
    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(n):
        dev = f"cuda:{rank % max(1, _cuda_count())}" if device.startswith("cuda") else device
        p = ctx.Process(target=_worker, args=(rank, config.to_dict(), dev, write_path, jobs[rank::n], threads))
        p.start()
        procs.append(p)
    failed = []
    for rank, p in enumerate(procs):
        p.join()
        if p.exitcode != 0:
            failed.append((rank, p.exitcode))
    if failed:
        raise RankFailedError(
            f"extraction worker process(es) failed (rank, exit code): {failed}; their errors are above; re-run the "
            f"same command to resume from the written chunks"
        )


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def extract(config: ExtractConfig, *, show_progress: bool = True) -> ExtractResult:
    """Run the backbone once over every split and write (or finish) the store.

    Re-running with the same inputs finds the complete store and does nothing; an interrupted
    store is resumed from its last finished row chunk. One process writes a store at a time (a
    lock beside it; ``config.wait`` queues behind the holder). Under torchrun / accelerate launch
    every rank plans, rank 0 takes the lock and creates the store, ranks write disjoint chunks,
    and a failure on any rank stops them all with the same error (:mod:`embstore.extraction.ranks`).
    """
    t0 = time.perf_counter()
    ranks = Ranks.from_env()
    with ranks.phase("planning"):
        device = resolve_device(config.device)
        check_quantize_device(config.quantize, device)
        device = rank_device(config, device, ranks.world)
        quick = quick_id(config, device)
        done = None if quick is None else complete_meta(quick[1], quick[0])
        if quick is not None and done is not None:
            final = quick[1]  # found from file hashes alone: no model load, no tokenizing
        else:
            quick = None
            plan = make_plan(config, device)
            final, write_path = store_paths(config, plan.fingerprint)
            state = store_state(final, write_path, plan.fingerprint)
    if done is not None:
        return _complete_result(final, done, t0)
    rows = {k: v.n_rows for k, v in plan.layout.splits.items()}
    truncated = dict(plan.meta.truncated)

    def result(status: str) -> ExtractResult:
        return ExtractResult(
            path=final,
            status=status,
            rows=rows,
            truncated=truncated,
            skipped_empty=dict(plan.dataset.skipped_empty),
            seconds=time.perf_counter() - t0,
            words_cut={} if plan.meta.words is None else dict(plan.meta.words.cut),
            words_truncated={} if plan.meta.words is None else dict(plan.meta.words.truncated),
        )

    if state == "complete":
        return result("already complete")
    lock = StoreLock(final) if "://" not in final else None
    try:
        with ranks.phase("creating the store"):
            if ranks.main:
                if state == "absent":  # before the lock file: a full disk or read-only --out leaves nothing behind
                    _check_writable(final, _needed_bytes(plan.layout, is_h5_path(final)))
                if lock is not None:
                    lock.acquire(wait=config.wait, ranks=ranks.world)
                    state = store_state(
                        final, write_path, plan.fingerprint
                    )  # another writer may have finished meanwhile
                if state == "absent":
                    if config.quantize == "int8":
                        measured = _measure_int8(plan, config, device)
                        provenance = dataclasses.replace(plan.meta.provenance, quantization=measured)
                        plan.meta = dataclasses.replace(plan.meta, provenance=provenance)
                    StoreWriter.create(write_path, plan.meta, plan.arrays, plan.token_counts)
        state = str(ranks.share(state))
        if state == "complete":
            return result("already complete")
        status = "resumed" if state == "partial" else "created"
        with ranks.phase("writing row chunks"):
            writer = StoreWriter.open(write_path)
            if writer.layout.chunk_rows != plan.layout.chunk_rows:
                log.info("resuming with the store's own --chunk-rows %d", writer.layout.chunk_rows)
            plan.layout = writer.layout  # same content (the fingerprint matched); its chunking wins
            pending = {s: [int(c) for c in np.flatnonzero(~writer.done(s))] for s in plan.layout.splits}
            if status == "resumed" and ranks.main:
                log.info("resuming %s: %d row chunks left", write_path, sum(map(len, pending.values())))
            if ranks.world > 1:
                # chunk c belongs to rank c % world, whatever the other ranks have written already
                mine = {
                    split: [c for c in chunks if c % ranks.world == ranks.rank] for split, chunks in pending.items()
                }
                _run_jobs(
                    plan.backbone,
                    plan.layout,
                    config,
                    write_path,
                    _jobs(plan, mine),
                    device,
                    show_progress and ranks.main,
                )
            elif config.num_processes > 1:
                del plan.backbone.model
                _run_processes(config, plan, write_path, pending, device)
            else:
                _run_jobs(plan.backbone, plan.layout, config, write_path, _jobs(plan, pending), device, show_progress)
        with ranks.phase("finishing the store"):
            if ranks.main:
                _finalize(writer, final, write_path)
    finally:
        if lock is not None:
            lock.release()
    return result(status)


def _complete_result(path: str, meta: L.StoreMeta, t0: float) -> ExtractResult:
    """The result of a run that found its store complete, from the store's own record."""
    return ExtractResult(
        path=path,
        status="already complete",
        rows={s: sl.n_rows for s, sl in meta.layout.splits.items()},
        truncated=dict(meta.truncated),
        skipped_empty=dict(meta.skipped_empty),
        seconds=time.perf_counter() - t0,
        words_cut={} if meta.words is None else dict(meta.words.cut),
        words_truncated={} if meta.words is None else dict(meta.words.truncated),
    )


def store_state(final: str, write_path: str, fingerprint: str) -> str:
    """'complete', 'partial' (resumable) or 'absent'; raises when something else is in the way.

    A store made from other inputs is :class:`StoreMismatchError`; one whose metadata cannot be
    parsed is :class:`StoreDamagedError` (from :func:`check_metadata`), never silently "not ours".
    """
    for path in dict.fromkeys((final, write_path)):
        if "://" not in path and not os.path.exists(path):
            continue
        try:
            store = open_store(path, allow_incomplete=True)
        except StoreNotFoundError:
            if "://" in path:
                continue  # nothing at that URL yet
            raise StoreMismatchError(
                f"{path} exists and is not an embstore store; choose another --out or remove it."
            ) from None
        with store:
            if store.fingerprint != fingerprint:
                what = "a store" if store.complete else "a partial store"
                raise StoreMismatchError(
                    f"{path} holds {what} made from other inputs (fingerprint {store.fingerprint[:12]}, this run "
                    f"{fingerprint[:12]}); choose another --out or delete it."
                )
            if path == final and store.complete:
                return "complete"
            if path == write_path:
                return "partial"
    return "absent"


def _finalize(writer: StoreWriter, final: str, write_path: str) -> None:
    missing = {s: int((~writer.done(s)).sum()) for s in writer.layout.splits}
    if any(missing.values()):
        raise RuntimeError(f"row chunks still missing after extraction: {missing}; re-run to resume")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    writer.finalize(now)
    if final != write_path:
        export_h5(write_path, final)
        with io_errors(write_path):
            shutil.rmtree(write_path)
