"""Decoder LLMs: the forward stop, extraction against a bare transformers loop, and peak memory
(run through ``python benchmarks/extract.py --decoder`` or ``--peak-memory``; the figures are in BENCHMARKS.md).

``--decoder`` (random:llama-base: 12 blocks x 768, on the first --rows rows of ag_news test.csv, all layers, the
causal defaults last+mean over text tokens, float16 storage), in one process, the contenders interleaved per repeat:

(a) the bare transformers loop over the same length-sorted, token-budgeted batches (tokenizing and sorting
    included), ``output_hidden_states=True``, nothing pooled or stored;
(b) ``embstore extract --layers all`` end to end (CSV read and hashed, tokenizing, the model loaded from its
    safetensors directory, pooling, zarr store with checksums; a ``random:`` model is saved as a directory first,
    so extraction loads weights as it would a real LLM's instead of initialising them at random);
(s) ``embstore extract --layers 0-1``, the same end to end: the forward stops after block 1.

``--peak-memory`` (random:llama-24x2048: 24 blocks x 2048, about 1.1B parameters, float32 compute on the CPU):
the peak RSS of three fresh processes, each measured with ``wait4``:

(w) load the model and nothing else (its weights plus the runtime);
(n) ``embstore extract`` of every layer, last+mean, --rows rows of exactly --seq-len tokens in one batch;
(o) the pre-issue-26 way on the same batch: ``output_hidden_states=True``, every layer stacked in float32, then
    pooled (what the hot loop did before it pooled each layer as it was produced);

against the target: the weights + 2 x one layer's (batch, tokens, hidden) activations + 0.5 GB, and against
``embstore plan``'s estimate (:func:`embstore.extraction.estimate.memory_estimate`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _load() -> float:
    return os.getloadavg()[0]


def decoder(args: argparse.Namespace) -> None:
    """(a), (b), (s): ratios b/a and s/b."""
    from extract import bare  # benchmarks/extract.py

    from embstore import ExtractConfig, extract
    from embstore.backbones.registry import load_backbone
    from embstore.extraction.encode import length_order, tokenize

    work = Path(tempfile.mkdtemp(prefix="embstore-llm-"))
    name = args.model or "random:llama-base"
    model = name
    if name.startswith("random:"):  # saved as a model directory: extraction loads it as it loads a real LLM
        random_bb = load_backbone(name)
        model = str(work / "model")
        random_bb.model.save_pretrained(model)
        random_bb.tokenizer.save_pretrained(model)
        del random_bb
    texts = pd.read_csv(args.data).text.astype(str).tolist()[: args.rows]
    bb = load_backbone(model, args.device)
    enc = tokenize(bb.tokenizer, texts, None, args.max_length)
    ids = [enc.ids[i] for i in length_order(enc.lengths)]
    print(
        f"data: {args.data} ({len(texts)} rows, {int(enc.lengths.sum())} tokens, max length {args.max_length}), "
        f"model {name} ({bb.n_layers} blocks x {bb.hidden}, loaded from a safetensors directory), batches of "
        f"{args.batch_size} rows / {args.token_budget} tokens"
    )

    def run_extract(layers: str, r: int) -> float:
        cfg = ExtractConfig.from_dict(
            dict(
                model=model,
                data=args.data,
                limit=args.rows,
                layers=layers,
                max_length=args.max_length,
                batch_size=args.batch_size,
                token_budget=args.token_budget,
                out=str(work / f"{layers}-{r}"),
                device=args.device,
            )
        )
        t0 = time.perf_counter()
        extract(cfg, show_progress=False)
        return time.perf_counter() - t0

    try:
        bare(bb, ids[: args.batch_size], args.batch_size, args.token_budget, args.device)  # warm-up
        ta, tb, ts, loads = [], [], [], []
        for r in range(args.repeats):
            loads.append(_load())
            ta.append(bare(bb, ids, args.batch_size, args.token_budget, args.device, texts, args.max_length))
            tb.append(run_extract("all", r))
            ts.append(run_extract("0-1", r))
            print(f"repeat {r}: (a) {ta[-1]:.1f} s  (b) {tb[-1]:.1f} s  (s) {ts[-1]:.1f} s  load {loads[-1]:.1f}")
        n = len(texts)
        print(f"(a) bare transformers loop      : {n / min(ta):7.2f} ex/s  (best {min(ta):.1f} s)")
        print(f"(b) embstore extract, all layers: {n / min(tb):7.2f} ex/s  (best {min(tb):.1f} s)")
        print(f"(s) embstore extract --layers 0-1: {n / min(ts):7.2f} ex/s  (best {min(ts):.1f} s)")
        print(f"b/a = {min(ta) / min(tb):.3f} (target >= 0.95); per repeat {[round(a / b, 3) for a, b in zip(ta, tb)]}")
        print(f"s/b = {min(ts) / min(tb):.3f} (target <= 0.35); per repeat {[round(s / b, 3) for s, b in zip(ts, tb)]}")
        print(f"load average during the repeats: {', '.join(f'{x:.1f}' for x in loads)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _synthetic(path: Path, rows: int, seq_len: int) -> None:
    """``rows`` texts that the tokenizer cuts to exactly ``seq_len`` tokens."""
    pd.DataFrame({"text": [" ".join(["the model"] * seq_len)] * rows}).to_csv(path, index=False)


def child(kind: str, model: str, data: str, rows: int, seq_len: int, out: str) -> None:
    """One measured process: (w) load only, (o) the old stacked forward on one batch."""
    import torch

    from embstore.backbones.registry import load_backbone
    from embstore.extraction.encode import pad_batch, tokenize

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    bb = load_backbone(model)
    if kind == "load":
        return
    texts = pd.read_csv(data).text.astype(str).tolist()[:rows]
    enc = tokenize(bb.tokenizer, texts, None, seq_len)
    batch = {k: torch.from_numpy(v) for k, v in pad_batch(enc.ids, None, 0).items()}
    with torch.inference_mode():
        hidden = bb.model(**batch, output_hidden_states=True).hidden_states
        stacked = torch.stack([h.float() for h in hidden])  # (layers, B, T, H): what pool_layers did before
        mask = batch["attention_mask"].bool()
        weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(1).float()
        pooled = [stacked[:, torch.arange(len(mask)), mask.sum(1) - 1], torch.matmul(weights, stacked).squeeze(2)]
    np.save(out, torch.stack(pooled).numpy().astype(np.float16))


def _measured(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _pid, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed with status {status}")
    return int(usage.ru_maxrss) * 1024, time.perf_counter() - t0


def _estimate(model: str, rows: int, seq_len: int) -> tuple[dict[str, Any], int]:
    """``embstore plan``'s memory estimate for the same job, the model built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from embstore.backbones.registry import resolve_random_config
    from embstore.extraction.estimate import memory_estimate
    from embstore.store import layout as L

    cfg = dict(resolve_random_config(model.split(":", 1)[1])[0])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        meta = AutoModel.from_config(config)
    layers = tuple(range(config.num_hidden_layers + 1))
    lay = L.StoreLayout(
        layers=layers,
        poolings=("last", "mean"),
        hidden=config.hidden_size,
        dtype="float16",
        towers=("text",),
        token_layers=(),
        chunk_rows=2048,
        splits={"all": L.SplitLayout.plan(rows, 2048, {"text": rows * seq_len})},
    )
    return memory_estimate(meta, lay, [("all", 0, "text", np.arange(rows), rows * seq_len)]), config.hidden_size


def peak_memory(args: argparse.Namespace) -> None:
    """(w), (n), (o) against the target."""
    model = args.model or "random:llama-24x2048"
    seq_len = args.seq_len or 128
    work = Path(tempfile.mkdtemp(prefix="embstore-peak-"))
    try:
        data = work / "rows.csv"
        _synthetic(data, args.rows, seq_len)
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--model", model, "--data", str(data), "--rows", str(args.rows), "--seq-len", str(seq_len)]
        est, hidden = _estimate(model, args.rows, seq_len)
        loads = [_load()]
        w = _measured([*me, "--child", "load", *common, "--out", str(work / "w.npy")])
        loads.append(_load())
        extract_cmd = [sys.executable, "-m", "cli.embstore_cli", "extract", "--model", model, "--data", str(data)]
        extract_cmd += ["--no-labels", "--max-length", str(seq_len), "--batch-size", str(args.rows), "-q"]
        extract_cmd += ["--token-budget", str(args.rows * seq_len), "--out", str(work / "n.zarr")]
        n = _measured(extract_cmd)
        loads.append(_load())
        o = _measured([*me, "--child", "old", *common, "--out", str(work / "o.npy")])
        loads.append(_load())
        weights, layer = est["weights"], args.rows * seq_len * hidden * 4
        target = weights + 2 * layer + 500_000_000  # 0.5 GB
        gib = 1 << 30
        print(
            f"model {model}: weights {weights / gib:.2f} GiB (float32); one batch of {args.rows} rows x {seq_len} "
            f"tokens; one layer's states {layer / (1 << 20):.1f} MiB"
        )
        print(f"(w) load only                 : peak RSS {w[0] / gib:.2f} GiB ({w[1]:.0f} s)")
        print(f"(n) embstore extract          : peak RSS {n[0] / gib:.2f} GiB ({n[1]:.0f} s)")
        print(f"(o) stacked forward, pre-26   : peak RSS {o[0] / gib:.2f} GiB ({o[1]:.0f} s)")
        verdict = "met" if n[0] <= target else "MISSED"
        print(f"target weights + 2 x layer + 0.5 GB = {target / gib:.2f} GiB: (n) {verdict}")
        parts = json.dumps({k: round(v / gib, 3) for k, v in est.items()})
        print(f"embstore plan's estimate: {est['total'] / gib:.2f} GiB ({parts} GiB)")
        print(f"load average: {', '.join(f'{x:.1f}' for x in loads)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def batching(args: argparse.Namespace) -> None:
    """How much the batch size moves stored values at float32 and at bfloat16 compute (the store id leaves batching
    out): the same rows at batch 16 and batch 1, the largest |difference| of last and mean over every layer, beside
    bfloat16's own difference from float32."""
    from embstore.backbones.registry import Placement, load_backbone
    from embstore.extraction.encode import ChunkEncoder, ChunkJob, length_order, tokenize

    model = args.model or "random:llama-base"
    texts = pd.read_csv(args.data).text.astype(str).tolist()[: args.rows]
    out: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for dtype in ("float32", "bfloat16"):
        bb = load_backbone(model, placement=Placement(dtype=dtype))
        enc = tokenize(bb.tokenizer, texts, None, args.max_length)
        order = length_order(enc.lengths)
        job = ChunkJob(split="b", chunk=0, towers={"x": enc.rows(order)})
        for batch in (1, 16):
            encoder = ChunkEncoder(
                bb.model,
                0,
                layers=list(range(bb.n_layers + 1)),
                token_layers=[],
                poolings=["last", "mean"],
                dtype="float32",
                batch_size=batch,
                token_budget=1 << 20,
                device="cpu",
            )
            out[(dtype, batch)] = encoder.encode(job, lambda t, w, layer: w)
    print(f"model {model}, {len(texts)} rows of {args.data}, max length {args.max_length}, values stored as float32")
    for p in ("last", "mean"):
        f32 = np.abs(out[("float32", 16)][p] - out[("float32", 1)][p]).max()
        b16 = np.abs(out[("bfloat16", 16)][p] - out[("bfloat16", 1)][p]).max()
        vs = np.abs(out[("bfloat16", 1)][p] - out[("float32", 1)][p]).max()
        scale = np.abs(out[("float32", 1)][p]).max()
        print(
            f"{p}: batch 16 vs 1 at float32 {f32:.2e}, at bfloat16 {b16:.2e}; bfloat16 vs float32 {vs:.2e} "
            f"(largest |value| {scale:.3g})"
        )


LLAMA_7B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}
"""The 32 x 4096 shape of docs/llm.md's table (Llama-2-7B's)."""


def plan_table(rows: int = 100_000, seq_len: int = 128) -> None:
    """docs/llm.md's table: disk and peak memory of a 32 x 4096 model over ``rows`` rows of ``seq_len`` tokens, from
    the functions ``embstore plan`` uses (the layout's bytes and :func:`memory_estimate`), the model built on the
    meta device (a random 7B model cannot be built on this machine)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from embstore.extraction.encode import make_batches
    from embstore.extraction.estimate import _state_bytes, memory_estimate
    from embstore.store import layout as L

    cfg = dict(LLAMA_7B)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    gib = 1 << 30
    print(f"{rows} rows x {seq_len} tokens, 32 x 4096 (Llama-2-7B shape), default --token-budget 16384")
    print("| layers | poolings | --dtype | --compute-dtype | disk | peak memory (weights + one batch + buffers) |")
    print("|---|---|---|---|---|---|")
    lengths = np.full(rows, seq_len)
    spans = make_batches(lengths, 64, 16384)
    batches = [("all", 0, "text", np.arange(a, b), (b - a) * seq_len) for a, b in spans[:1]]
    for layers, poolings, dtype, compute in (
        ("all", ("last", "mean"), "float16", "bfloat16"),
        ("all", ("last", "mean"), "float32", "bfloat16"),
        ("all", ("last", "mean", "max"), "float16", "bfloat16"),
        ("-4--1", ("last",), "float16", "bfloat16"),
        ("all", ("last", "mean"), "float16", "float32"),
    ):
        with torch.device("meta"):
            meta = AutoModel.from_config(config, dtype=getattr(torch, compute))
        chosen = tuple(range(33)) if layers == "all" else tuple(range(29, 33))
        lay = L.StoreLayout(
            layers=chosen,
            poolings=poolings,
            hidden=4096,
            dtype=dtype,
            towers=("text",),
            token_layers=(),
            chunk_rows=2048,
            splits={"all": L.SplitLayout.plan(rows, 2048, {"text": rows * seq_len})},
        )
        disk = sum(_state_bytes(lay)["pooled"].values())
        mem = memory_estimate(meta, lay, batches)
        print(
            f"| {layers} | {','.join(poolings)} | {dtype} | {compute} | {disk / gib:.1f} GiB | "
            f"{mem['total'] / gib:.1f} GiB ({mem['weights'] / gib:.1f} + {mem['activations'] / gib:.2f} + "
            f"{(mem['pooled'] + mem['chunks'] + mem['runtime']) / gib:.2f}) |"
        )
    tokens = rows * seq_len * 33 * 4096 * 2
    print(f"--tokens all instead (every token of every layer, float16): {tokens / (1 << 40):.1f} TiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["load", "old"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    child(args.child, args.model, args.data, args.rows, args.seq_len, args.out)


if __name__ == "__main__":
    main()
