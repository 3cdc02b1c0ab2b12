"""``heads sweep --mdl``: the online codelength of the training labels given a configuration's features.

Voita & Titov (2020), "Information-Theoretic Probing with Minimum Description Length", online code, as computed
here (in bits: -log2 p, never nats):

1. the training rows (original rows only: augmented copies are not data to transmit; the validation carve is
   included, the online code needs no validation) are put in source order (by their row id, the position in the
   data file) and shuffled with ``numpy.random.default_rng(seed).permutation``;
2. blocks end at ``max(1, round(f * n))`` rows for f in 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25, 50 and
   100% (:data:`FRACTIONS`; equal ends merge);
3. the first block costs ``t1 * log2 K`` bits (the uniform code over K classes);
4. every later block costs ``-sum log2 p(y | x)`` under a logistic-regression probe trained on all rows before it,
   at the configuration's validation-chosen C, standardised on those rows (the configuration's own probe);
   a block whose preceding rows do not yet hold every class is also coded uniformly.

``compression = n log2 K / mdl_bits``. Every block probe of every configuration is one problem of the batched
L-BFGS solver (a feature on its own rows, with its own C), all of one seed solved together. The rows are fed in the
shuffled order, so a block of rows is computed only for the probes whose training prefix holds it: the work is
about one solve over all n rows per configuration, not one per block. Only linear probes take part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from heads.probe.chunks import Comm, RowBlock, chunks_of
from heads.probe.config import HeadConfig
from heads.probe.features import BLOCK_ROWS, FeatureBank, feature_width
from heads.probe.scoring import probe_probabilities
from heads.probe.solvers import fit_logistic_probes
from heads.probe.specs import Combo

__all__ = ["FRACTIONS", "block_ends", "online_order", "Codelength", "online_codelengths"]

FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


def block_ends(n: int) -> list[int]:
    """Sorted distinct ends of the online code's blocks over ``n`` rows (the last is ``n``)."""
    ends = sorted({max(1, round(f * n)) for f in FRACTIONS} | {n})
    return [e for e in ends if e <= n]


def online_order(rows: np.ndarray, row_ids: np.ndarray, seed: int) -> np.ndarray:
    """``rows`` (store positions) in the online code's order: by source row id, then a seeded permutation."""
    rows = np.asarray(rows, dtype=np.int64)
    by_source = rows[np.argsort(row_ids[rows], kind="stable")]
    return by_source[np.random.default_rng(seed).permutation(len(by_source))]


@dataclass(frozen=True)
class Codelength:
    """The online code of one configuration and seed."""

    bits: float
    uniform_bits: float
    """``n log2 K``: the labels sent without any features."""
    rows: int
    blocks: list[dict[str, Any]]
    """Per block: start, end, bits, and whether it was coded uniformly."""

    @property
    def compression(self) -> float:
        return self.uniform_bits / self.bits if self.bits > 0 else math.inf


def _ordered_blocks(
    bank: FeatureBank,
    combos: Sequence[Combo],
    split: str,
    order: np.ndarray,
    y: np.ndarray,
    ends_of: np.ndarray,
    comm: Comm,
) -> Callable[[], Iterator[RowBlock]]:
    """Blocks of the shuffled ``order`` (block b on rank b % world), cut at every probe's end and at most
    ``BLOCK_ROWS`` long: probe p holds the first ``ends_of[p]`` rows of the order, so every block is whole to the
    probes that hold it, and a probe computes only its own rows (late blocks belong to few probes)."""
    cuts = sorted({0, *(int(e) for e in ends_of)})
    spans = [(a, min(hi, a + BLOCK_ROWS)) for lo, hi in zip(cuts[:-1], cuts[1:]) for a in range(lo, hi, BLOCK_ROWS)]

    def blocks() -> Iterator[RowBlock]:
        for b, (start, stop) in enumerate(spans):
            if b % comm.world != comm.rank:
                continue
            rows = order[start:stop]
            feats = [np.ascontiguousarray(bank.features(c, split, rows), dtype=np.float32) for c in combos]
            yield rows, feats, y[rows], np.broadcast_to((start < ends_of)[:, None], (len(ends_of), len(rows)))

    return blocks


def online_codelengths(
    combos: Sequence[Combo],
    chosen_c: dict[tuple[Combo, int], float],
    seeds: Sequence[int],
    bank: FeatureBank,
    split: str,
    rows: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    cfg: HeadConfig,
    device: torch.device,
    comm: Comm,
    source: Callable[[Sequence[np.ndarray], Sequence[int]], Callable[[], Iterator[RowBlock]]],
) -> dict[tuple[Combo, int], Codelength]:
    """The online codelength of every (pooled linear combo, seed): ``rows`` are the training split's original
    rows, ``y`` the split's labels, ``chosen_c[(combo, seed)]`` the probe's C. ``source(row_sets, set_of_probe)``
    gives row blocks in store order with each probe's rows marked (used to score the blocks, and to train when
    the features are not in memory)."""
    row_ids = bank.store.row_ids(split)
    widths = [feature_width(c, bank.store.hidden) for c in combos]
    log2k = math.log2(n_classes)
    out: dict[tuple[Combo, int], Codelength] = {}
    for seed in seeds:
        order = online_order(rows, row_ids, seed)
        n = len(order)
        ends = block_ends(n)
        # probe per (combo, block t >= 1) whose prefix order[:ends[t-1]] holds every class
        seen = np.zeros(n_classes, dtype=bool)
        coded = []  # block index t -> whether a probe codes it
        start = 0
        for t, end in enumerate(ends):
            coded.append(t > 0 and bool(seen.all()))
            seen[y[order[start:end]]] = True
            start = end
        jobs = [(ci, t) for ci in range(len(combos)) for t in range(1, len(ends)) if coded[t]]
        codes = {ci: [0.0] * len(ends) for ci in range(len(combos))}
        if jobs:
            prefix_end = np.array([ends[t - 1] for _, t in jobs])
            prefixes = [np.sort(order[:e]) for e in prefix_end]
            feature_of = [ci for ci, _ in jobs]
            c_of = [chosen_c[(combos[ci], seed)] for ci, _ in jobs]
            train: Callable[[], Iterator[RowBlock]] = (
                _ordered_blocks(bank, combos, split, order, y, prefix_end, comm)
                if bank.preloaded
                else source(prefixes, list(range(len(jobs))))
            )
            fits = fit_logistic_probes(
                chunks_of(train),
                widths,
                n_classes,
                [1.0],
                feature_of=feature_of,
                max_iter=cfg.max_iter,
                tol=cfg.tol,
                class_weight=cfg.class_weight,
                device=device,
                cache=True,
                comm=comm,
                standardize=cfg.standardize,
                c_of=c_of,
            )
            nexts = [np.sort(order[ends[t - 1] : ends[t]]) for _, t in jobs]
            logp = probe_probabilities(
                fits, source(nexts, list(range(len(jobs)))), nexts, feature_of, comm=comm, log=True
            )
            for (ci, t), lp, rows_t in zip(jobs, logp, nexts):
                codes[ci][t] = float(-lp[np.arange(len(rows_t)), y[rows_t]].astype(np.float64).sum() / math.log(2))
        for ci, combo in enumerate(combos):
            blocks, start = [], 0
            for t, end in enumerate(ends):
                uniform = not coded[t]
                bits = (end - start) * log2k if uniform else codes[ci][t]
                blocks.append({"start": start, "end": end, "bits": bits, "uniform": uniform})
                start = end
            out[(combo, seed)] = Codelength(
                bits=float(sum(b["bits"] for b in blocks)), uniform_bits=n * log2k, rows=n, blocks=blocks
            )
    return out
