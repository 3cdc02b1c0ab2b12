"""Extraction throughput, in one run, as ratios.

On a data file (default: MiniLM over ag_news test.csv, all hidden states, CLS + mean):

(a) bare forward loop over the same length-sorted, token-budgeted batches, nothing stored
    (tokenizing and sorting included);
(b) ``embstore extract`` end to end (reading the CSV, tokenizing, all layers, cls+mean, zarr
    store written, provenance and checksums; model loading included);
(c) the naive loop people write: unsorted fixed-size batches padded to their longest row,
    hidden states pooled and gathered in Python lists, saved with numpy at the end;
(d) the hot loop as it was before issue 13 (layer-by-layer pooling, a blocking copy to the host
    per pooling and batch, padding in the loop) and (e) the hot loop now (the forward stops at the
    last layer, one masked reduction for all layers, cast on the device, one copy per batch into
    pinned memory on CUDA, the next batches padded in a prefetch thread), on the same batches.

With ``--seq-len N``: synthetic sequences of exactly N tokens (seeded random ids), so the figure
is sequences/s at a fixed shape: (a), (d) and (e) only. The ready-made GPU measurement is

    python benchmarks/extract.py --model random:bert-base --device cuda --seq-len 128

(all 13 hidden states of a bert-base-shaped model, cls+mean, bf16 autocast on CUDA). It stops
with one line when CUDA is asked for but absent; ``--device cpu`` runs the same measurement here.

Decoder LLMs (benchmarks/extract_llm.py): ``--decoder`` measures the forward stop (``--layers 0-1`` against
``all``) and extraction against a bare transformers loop on a 12-block random decoder; ``--peak-memory`` the peak
RSS of a 24 x 2048 random decoder's extraction against its weights. The GPU measurement for a 1B Llama shape, bf16,
every layer stored, is

    python benchmarks/extract.py --model random:llama-1b --device cuda --seq-len 128 --rows 4096

Usage: python benchmarks/extract.py [--rows 3000] [--repeats 3] [--data ../shared/datasets/ag_news/test.csv]
       python benchmarks/extract.py --seq-len 128 --rows 2048 [--model random:bert-base] [--device cuda]
       python benchmarks/extract.py --decoder --rows 150 --repeats 2 [--max-length 128]
       python benchmarks/extract.py --peak-memory --rows 16 --seq-len 128
       python benchmarks/extract.py --plan-table     # docs/llm.md's disk and memory table (no model is run)
       python benchmarks/extract.py --batching --rows 32 --max-length 128   # batch size at float32 / bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from embstore import ExtractConfig, extract, open_store
from embstore.backbones.registry import load_backbone
from embstore.extraction.encode import (
    ChunkBuffers,
    ChunkEncoder,
    ChunkJob,
    length_order,
    make_batches,
    pad_batch,
    tokenize,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ag_news" / "test.csv"
POOLINGS = ["cls", "mean"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare(
    bb: Any,
    ids: list[list[int]],
    batch_size: int,
    budget: int,
    device: str,
    texts: list[str] | None = None,
    max_length: int = 256,
) -> float:
    """(a) forward only over sorted rows; given ``texts``, their tokenization and sorting are timed too."""
    on_cuda = device.startswith("cuda")
    _sync(device)
    t0 = time.perf_counter()
    if texts is not None:
        enc = tokenize(bb.tokenizer, texts, None, max_length)
        ids = [enc.ids[i] for i in length_order(enc.lengths)]
    lengths = np.array([len(x) for x in ids])
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        for s, e in make_batches(lengths, batch_size, budget):
            b = pad_batch(ids[s:e], None, bb.tokenizer.pad_token_id or 0)
            bb.model(**{k: torch.from_numpy(v).to(device) for k, v in b.items()}, output_hidden_states=True)
    _sync(device)
    return time.perf_counter() - t0


def legacy_encode(
    bb: Any, ids: list[list[int]], layers: list[int], batch_size: int, budget: int, device: str
) -> dict[str, np.ndarray]:
    """(d) the hot loop before issue 13, reproduced: per layer and pooling, a blocking .cpu() per batch."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    buf = ChunkBuffers(len(layers), len(ids), np.concatenate([[0], np.cumsum(lengths)]), np.dtype("float16"))
    on_cuda = device.startswith("cuda")
    for s, e in make_batches(lengths, batch_size, budget):
        batch = pad_batch(ids[s:e], None, bb.tokenizer.pad_token_id or 0)
        tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            hidden = bb.model(**tensors, output_hidden_states=True).hidden_states
            mask = tensors["attention_mask"].bool()
            weights = (mask / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1).float()
            pooled = {}
            for p in POOLINGS:
                last = mask.sum(1) - 1
                per_layer = [
                    hidden[i].float()[:, 0]
                    if p == "cls"
                    else hidden[i].float()[torch.arange(len(last)), last]
                    if p == "last"
                    else torch.bmm(weights, hidden[i].float()).squeeze(1)
                    for i in layers
                ]
                pooled[p] = torch.stack(per_layer).cpu().numpy().astype(np.float16, copy=False)
        buf.put(s, e, pooled, {})
    return dict(buf.pooled)


def new_encode(encoder: ChunkEncoder, ids: list[list[int]]) -> dict[str, np.ndarray]:
    """(e) the hot loop now: what ``embstore extract`` runs per row chunk."""
    return encoder.encode(
        ChunkJob(split="bench", chunk=0, towers={"x": (ids, None, None)}), lambda tower, what, layer: what
    )


def naive(texts: list[str], bb: Any, max_length: int, batch_size: int, out: Path, device: str) -> float:
    t0 = time.perf_counter()
    cls_rows, mean_rows = [], []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = bb.tokenizer(
                texts[s : s + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hs = bb.model(**enc, output_hidden_states=True).hidden_states
            m = enc["attention_mask"][:, :, None].float()
            for i in range(len(hs[0])):
                cls_rows.append([h[i, 0].cpu().numpy() for h in hs])
                mean_rows.append([((h[i] * m[i]).sum(0) / m[i].sum()).cpu().numpy() for h in hs])
    np.save(out / "cls.npy", np.array(cls_rows, dtype=np.float16))
    np.save(out / "mean.npy", np.array(mean_rows, dtype=np.float16))
    return time.perf_counter() - t0


def hot_loops(
    bb: Any, ids: list[list[int]], args: argparse.Namespace, texts: list[str] | None = None
) -> tuple[list[float], list[float], list[float]]:
    """(a), (d), (e) interleaved, after one warm-up pass of each."""
    global POOLINGS
    from embstore.backbones.anatomy import is_causal

    if is_causal(bb.model):
        POOLINGS = ["last", "mean"]  # a causal model's defaults (cls is refused for it)
    layers = list(range(bb.n_layers + 1))
    encoder = ChunkEncoder(
        bb.model,
        bb.tokenizer.pad_token_id or 0,
        layers=layers,
        token_layers=[],
        poolings=POOLINGS,
        dtype="float16",
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        device=args.device,
    )
    warm = ids[: args.batch_size]
    bare(bb, warm, args.batch_size, args.token_budget, args.device)
    legacy_encode(bb, warm, layers, args.batch_size, args.token_budget, args.device)
    new_encode(encoder, warm)
    ta, td, te = [], [], []
    for _ in range(args.repeats):  # interleaved, best of N: a shared machine is noisy
        ta.append(bare(bb, ids, args.batch_size, args.token_budget, args.device, texts, args.max_length))
        t0 = time.perf_counter()
        old = legacy_encode(bb, ids, layers, args.batch_size, args.token_budget, args.device)
        td.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = new_encode(encoder, ids)
        te.append(time.perf_counter() - t0)
    for p in POOLINGS:
        a, b = old[p].astype(np.float32), new[p].astype(np.float32)
        same = np.array_equal(old[p].view(np.uint16), new[p].view(np.uint16))
        # on CUDA the new loop pools in float32 where the old one did the mean under bf16 autocast
        print(f"values {p}: {'identical' if same else f'max abs diff {np.abs(a - b).max():.2e}'} (d) vs (e)")
    return ta, td, te


def _line(label: str, n: int, times: list[float], unit: str) -> str:
    best = min(times)
    return f"{label}: {n / best:9.1f} {unit}  ({best:.2f} s; all: {', '.join(f'{t:.2f}' for t in times)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rows", type=int, default=3000, help="first N rows (0: all 7600); with --seq-len, N sequences")
    ap.add_argument("--seq-len", type=int, help="synthetic sequences of exactly this many tokens instead of --data")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; best is reported")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compute-dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--decoder", action="store_true", help="decoder LLMs: forward stop and b/a (extract_llm.py)")
    ap.add_argument("--peak-memory", action="store_true", help="peak RSS of a 24 x 2048 decoder (extract_llm.py)")
    ap.add_argument("--plan-table", action="store_true", help="docs/llm.md's disk and memory table (extract_llm.py)")
    ap.add_argument("--batching", action="store_true", help="batch 16 vs 1 at float32 and bfloat16 (extract_llm.py)")
    args = ap.parse_args()
    if args.plan_table:
        import extract_llm

        extract_llm.plan_table()
        return
    if args.batching:
        import extract_llm

        args.model = None if args.model == "minilm" else args.model
        extract_llm.batching(args)
        return
    if args.decoder or args.peak_memory:
        import extract_llm

        print(
            f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads "
            f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
        )
        args.model = None if args.model == "minilm" else args.model
        (extract_llm.decoder if args.decoder else extract_llm.peak_memory)(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__}; run this on a GPU machine "
            "(with a CUDA build of torch) or pass --device cpu."
        )
    gpu = f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, "
        f"device {args.device}{gpu}{' (bf16 autocast)' if gpu else ''}"
    )
    from embstore.backbones.registry import Placement
    from embstore.device import resolve_compute_dtype

    dtype = resolve_compute_dtype(args.compute_dtype, args.device)
    bb = load_backbone(args.model, args.device, placement=Placement(dtype=dtype))
    print(f"compute dtype {dtype}")
    if args.seq_len is not None:
        n = args.rows or 2048
        rng = np.random.default_rng(0)
        low = 1000 if len(bb.tokenizer) > 2000 else 5  # plain word pieces, past the special tokens
        tok = bb.tokenizer
        first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        ids = [
            [int(first if first is not None else low)]
            + rng.integers(low, len(tok), args.seq_len - 2).tolist()
            + [int(end if end is not None else low)]
            for _ in range(n)
        ]
        print(
            f"data: {n} synthetic sequences of {args.seq_len} tokens, model {args.model}, {bb.n_layers + 1} hidden "
            f"states "
            f"stored, poolings cls+mean, batches of {args.batch_size} rows / {args.token_budget} tokens, best of "
            f"{args.repeats}"
        )
        ta, td, te = hot_loops(bb, ids, args)
        print(_line("(a) bare forward loop, nothing stored ", n, ta, "seq/s"))
        print(_line("(d) hot loop before issue 13         ", n, td, "seq/s"))
        print(_line("(e) hot loop now (what extract runs) ", n, te, "seq/s"))
        print(f"e/a = {min(ta) / min(te):.3f}   (pooling + storage overhead; 1.0 = free)")
        print(
            f"e/d = {min(td) / min(te):.3f}   (speed-up over the previous hot loop; CPU target: >= 1.0, no regression)"
        )
        return
    args.rows = args.rows or None
    texts = pd.read_csv(args.data).text.astype(str).tolist()[: args.rows]
    n = len(texts)
    enc = tokenize(bb.tokenizer, texts, None, args.max_length)
    ids = [enc.ids[i] for i in length_order(enc.lengths)]
    work = Path(tempfile.mkdtemp(prefix="embstore-bench-"))
    try:
        ta, td, te = hot_loops(bb, ids, args, texts)
        tb = []
        for r in range(args.repeats):
            cfg = ExtractConfig.from_dict(
                dict(
                    model=args.model,
                    data=args.data,
                    limit=args.rows,
                    layers="all",
                    pooling=tuple(POOLINGS),
                    max_length=args.max_length,
                    batch_size=args.batch_size,
                    token_budget=args.token_budget,
                    out=str(work / f"run{r}"),
                    device=args.device,
                )
            )
            t0 = time.perf_counter()
            res = extract(cfg, show_progress=False)
            tb.append(time.perf_counter() - t0)
        tc = naive(texts, bb, args.max_length, args.batch_size, work, args.device)
        store = open_store(res.path)
        minimum = len(store.layers) * store.hidden * len(store.poolings) * 2
        per_example = store.nbytes() / n
        a, b = min(ta), min(tb)
        print(
            f"data: {args.data} ({n} rows), model {args.model}, layers {len(store.layers)}, poolings cls+mean, best of "
            f"{args.repeats}"
        )
        print(_line("(a) bare forward loop, sorted batches ", n, ta, "ex/s"))
        print(_line("(b) embstore extract (end to end)     ", n, tb, "ex/s"))
        print(f"(c) naive loop, unsorted, lists, npy   : {n / tc:9.1f} ex/s  ({tc:.1f} s)")
        print(_line("(d) hot loop before issue 13          ", n, td, "ex/s"))
        print(_line("(e) hot loop now                      ", n, te, "ex/s"))
        print(f"b/a = {a / b:.3f}   (target >= 0.95: storage nearly free)")
        print(f"b/c = {tc / b:.3f}   (target >= 1.5)")
        print(f"e/d = {min(td) / min(te):.3f}   (hot loop now vs before issue 13; target >= 1.0 on CPU)")
        print(
            f"bytes/example: {per_example:.0f} stored vs {minimum} minimum (layers x hidden x poolings x 2) = "
            f"{per_example / minimum:.3f}x"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
