"""What the batched linear solver reads, and how torchrun ranks sum what they read.

A source yields blocks of rows, each with every feature's raw (unstandardised) values and which rows each probe
uses (a probe is a feature on its own rows: seeds, folds and the online code's prefixes share a feature, not their
rows). :data:`RowBlock` is the same block with its absolute row positions first, for scoring rows one by one;
:func:`chunks_of` drops them for the solver. :class:`Comm` sums across ranks (a no-op in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

__all__ = ["Chunk", "ChunkSource", "RowBlock", "chunks_of", "Comm"]

Chunk = tuple[list[np.ndarray], np.ndarray, "np.ndarray | None"]
"""One block of rows: one float32 (rows, width) array per feature, the rows' labels (rows,) int64, and which rows
each probe uses, (probes, rows) bool (None: every probe uses every row)."""


class ChunkSource(Protocol):
    """Blocks of rows (this rank's row chunks), each with every feature's raw (unstandardised) values and each probe's
    rows. Probes that share a feature but not their rows (seeds, folds) read it once."""

    def __call__(self) -> Iterator[Chunk]: ...


class Comm:
    """Sums across torchrun ranks (a no-op in one process). nccl reduces CUDA tensors only, gloo CPU ones: a
    tensor is moved to the backend's device for the reduction and back."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        nccl = self.distributed and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        import torch.distributed as dist

        x = t.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)


RowBlock = tuple[np.ndarray, list[np.ndarray], np.ndarray, "np.ndarray | None"]
"""A :data:`Chunk` with its rows first: (absolute row positions (rows,), features, labels, probe masks)."""


def chunks_of(blocks: Callable[[], Iterator[RowBlock]]) -> ChunkSource:
    """The solver's chunk source from a source of row blocks (the blocks without their rows)."""

    def chunks() -> Iterator[Chunk]:
        for _rows, feats, y, masks in blocks():
            yield feats, y, masks

    return chunks
