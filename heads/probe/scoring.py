"""What a linear probe's solutions say about rows: confusions and log-losses on validation (to choose C), and
per-row class probabilities (the evaluation rows' predictions, the online code's block costs).

:class:`LogisticFit` is one probe's solutions over its C grid, in the unstandardised input's shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from heads.probe.chunks import ChunkSource, Comm, RowBlock

__all__ = ["LogisticFit", "grid_confusions", "grid_scores", "chosen_confusions", "probe_probabilities"]


@dataclass
class LogisticFit:
    """One probe's solutions over the C grid, in the input (unstandardised) feature space's shapes."""

    weights: np.ndarray
    """(K, d, classes) float32, acting on standardised inputs."""
    bias: np.ndarray
    """(K, classes) float32."""
    mean: np.ndarray
    """(d,) float32: training rows' mean."""
    scale: np.ndarray
    """(d,) float32: 1 / std (floored), as :class:`heads.probe.modules.Standardize` holds it."""
    iterations: np.ndarray
    """(K,) iterations until each C converged (or max_iter)."""
    converged: np.ndarray
    """(K,) bool."""
    train_loss: np.ndarray
    """(K,) mean (weighted) cross-entropy on the training rows, without the penalty."""
    chosen: int = 0
    """Index of the C chosen on validation."""
    val_confusion: np.ndarray | None = None
    """(K, classes, classes) validation confusion counts per C (rows: true)."""
    val_loss: np.ndarray | None = None
    """(K,) mean validation log-loss (natural log) per C."""
    refined: np.ndarray | None = None
    """(K,) bool: solved to ``tol`` (the chosen C, and any other that was a candidate); the rest of the grid only
    to the screening tolerance 10 x tol."""
    solved: np.ndarray | None = None
    """(K,) bool: on the probe's C path (the path stops once validation macro-F1 has fallen at two consecutive Cs;
    the Cs past it were not solved: their weights are meaningless and their scores absent)."""

    def at(self, k: int) -> "LogisticFit":
        """The solution at grid index ``k`` alone (K = 1)."""
        return LogisticFit(
            self.weights[k : k + 1],
            self.bias[k : k + 1],
            self.mean,
            self.scale,
            self.iterations[k : k + 1],
            self.converged[k : k + 1],
            self.train_loss[k : k + 1],
        )


def grid_confusions(
    fits: Sequence[LogisticFit],
    source: ChunkSource,
    n_classes: int,
    feature_of: Sequence[int] | None = None,
    comm: Comm | None = None,
    probes: Sequence[int] | None = None,
) -> np.ndarray:
    """(len(fits), K, classes, classes) confusion counts (rows: true) of every fit at every C on its probe's rows
    of ``source``: ``fits[i]`` is probe ``probes[i]`` (default i), reading feature ``feature_of[probe]``."""
    return grid_scores(fits, source, n_classes, feature_of, comm, probes)[0]


def grid_scores(
    fits: Sequence[LogisticFit],
    source: ChunkSource,
    n_classes: int,
    feature_of: Sequence[int] | None = None,
    comm: Comm | None = None,
    probes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grid_confusions` and (len(fits), K) the mean log-loss (natural log) of every fit at every C on the
    same rows."""
    comm = comm or Comm()
    K = len(fits[0].bias) if fits else 0
    which = list(range(len(fits))) if probes is None else list(probes)
    fof = list(range(max(which, default=-1) + 1)) if feature_of is None else list(feature_of)
    cm = torch.zeros(len(fits), K, n_classes, n_classes, dtype=torch.float64)
    nll = torch.zeros(len(fits), K, dtype=torch.float64)
    tensors = [
        (torch.from_numpy(f.weights), torch.from_numpy(f.bias), torch.from_numpy(f.mean), torch.from_numpy(f.scale))
        for f in fits
    ]
    for feats, y, masks in source():
        for i, (W, b, mu, sc) in enumerate(tensors):
            q = which[i]
            rows = slice(None) if masks is None else torch.from_numpy(masks[q])
            yt = torch.from_numpy(y)[rows]
            if not len(yt):
                continue
            x = (torch.from_numpy(feats[fof[q]])[rows] - mu) * sc
            logits = torch.einsum("nd,kdc->knc", x, W) + b[:, None]  # (K, rows, classes)
            pred = logits.argmax(-1)  # (K, rows)
            nll[i] -= torch.log_softmax(logits, -1).gather(-1, yt.view(1, -1, 1).expand(K, -1, 1)).sum((1, 2)).double()
            for k in range(K):
                cm[i, k].view(-1).index_add_(0, yt * n_classes + pred[k], torch.ones(len(yt), dtype=torch.float64))
    flat = comm.sum(torch.cat([cm.flatten(), nll.flatten()]))
    counts = flat[: cm.numel()].view_as(cm).numpy().round().astype(np.int64)
    rows_seen = np.maximum(counts.sum((2, 3)), 1)
    return counts, flat[cm.numel() :].view_as(nll).numpy() / rows_seen


def chosen_confusions(
    fits: Sequence[LogisticFit],
    source: ChunkSource,
    n_classes: int,
    feature_of: Sequence[int] | None = None,
    comm: Comm | None = None,
) -> np.ndarray:
    """(probes, classes, classes) confusion counts of each probe at its chosen C on its rows of ``source``."""
    return grid_confusions([f.at(f.chosen) for f in fits], source, n_classes, feature_of, comm=comm)[:, 0]


def probe_probabilities(
    fits: Sequence[LogisticFit],
    blocks: Callable[[], Iterator[RowBlock]],
    rows_of: Sequence[np.ndarray],
    feature_of: Sequence[int],
    comm: Comm | None = None,
    log: bool = False,
) -> list[np.ndarray]:
    """Class probabilities of every probe on its rows: one (len(rows_of[p]), classes) float32 array per probe, in
    the order of its sorted ``rows_of[p]`` (``log``: natural log-probabilities, exact where a probability would
    round to 0). Each fit is used at its first C (pass ``fit.at(k)``); ``blocks`` yields this rank's row blocks with
    each probe's rows marked, and the ranks' parts are summed (each row is scored by exactly one rank)."""
    comm = comm or Comm()
    n_classes = fits[0].bias.shape[1] if fits else 0
    out = [np.zeros((len(r), n_classes), dtype=np.float32) for r in rows_of]
    tensors = [
        (
            torch.from_numpy(f.weights[0]),
            torch.from_numpy(f.bias[0]),
            torch.from_numpy(f.mean),
            torch.from_numpy(f.scale),
        )
        for f in fits
    ]
    for rows, feats, _y, masks in blocks():
        for p, (W, b, mu, sc) in enumerate(tensors):
            take = np.arange(len(rows)) if masks is None else np.flatnonzero(masks[p])
            if not len(take):
                continue
            x = (torch.from_numpy(feats[feature_of[p]][take]) - mu) * sc
            proba = (torch.log_softmax if log else torch.softmax)(x @ W + b, dim=-1).numpy()
            out[p][np.searchsorted(rows_of[p], rows[take])] = proba
    if comm.distributed and out:
        flat = comm.sum(torch.from_numpy(np.concatenate([o.ravel() for o in out])))
        cuts = np.cumsum([0, *[o.size for o in out]])
        out = [flat[cuts[i] : cuts[i + 1]].numpy().reshape(o.shape) for i, o in enumerate(out)]
    return out
