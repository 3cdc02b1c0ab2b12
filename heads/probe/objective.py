"""The objective of the batched linear probes: scikit-learn's logistic regression, every problem of a width at once.

:func:`input_stats` gives every probe its training rows' mean and 1/std (StandardScaler's rule) and class counts;
:class:`StandardisedBlocks` holds the standardised row blocks of every probe, grouped by feature width (cached on the
device when they fit, rebuilt per pass otherwise; a probe none of whose rows is in a block costs nothing there);
:func:`logistic_objective` evaluates the mean cross-entropy, the L2 penalty and the gradient of every active
problem (probe x C) in one pass over the blocks, summed across torchrun ranks in float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from heads.probe.chunks import ChunkSource, Comm
from heads.probe.lbfgs import Objective
from heads.probe.modules import inverse_scale

__all__ = ["input_stats", "StandardisedBlocks", "penalties", "logistic_objective", "MERGED_ROWS"]


def input_stats(
    source: ChunkSource, feature_of: list[int], widths: list[int], n_classes: int, comm: Comm
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Per probe: mean and 1/std (scikit-learn's StandardScaler rule, :func:`inverse_scale`) of its training rows,
    its row count and its class counts. Block means and centred sums of squares are merged exactly (Chan et al.) in
    float64, then across ranks, so a feature with a large mean and a small spread keeps its digits."""
    P = len(feature_of)
    n = np.zeros(P)
    mean = [np.zeros(widths[f]) for f in feature_of]
    m2 = [np.zeros(widths[f]) for f in feature_of]
    counts = np.zeros((P, n_classes))
    for feats, y, masks in source():
        for p, f in enumerate(feature_of):
            x, yy = (feats[f], y) if masks is None else (feats[f][masks[p]], y[masks[p]])
            if not len(yy):
                continue
            x64 = x.astype(np.float64)
            mu = x64.mean(0)
            k = len(yy)
            delta = mu - mean[p]
            mean[p] = mean[p] + delta * (k / (n[p] + k))
            m2[p] = m2[p] + ((x64 - mu) ** 2).sum(0) + delta * delta * (n[p] * k / (n[p] + k))
            n[p] += k
            counts[p] += np.bincount(yy, minlength=n_classes)
    # across ranks: the global mean from the summed n * mean, then every rank's M2 about it
    flat = comm.sum(torch.from_numpy(np.concatenate([n, counts.ravel(), *[n[p] * mean[p] for p in range(P)]]))).numpy()
    n_all, counts_all = flat[:P], flat[P : P + P * n_classes].reshape(P, n_classes)
    cuts = np.cumsum([0, *[widths[f] for f in feature_of]]) + P + P * n_classes
    means = [flat[cuts[p] : cuts[p + 1]] / max(1.0, n_all[p]) for p in range(P)]
    local = [m2[p] + n[p] * (mean[p] - means[p]) ** 2 for p in range(P)]
    m2_all = comm.sum(torch.from_numpy(np.concatenate(local))).numpy()
    cuts = cuts - cuts[0]
    scales = [
        inverse_scale(m2_all[cuts[p] : cuts[p + 1]] / max(1.0, n_all[p]), means[p], int(n_all[p])).astype(np.float32)
        for p in range(P)
    ]
    return [m.astype(np.float32) for m in means], scales, n_all, counts_all


Block = tuple[dict[int, torch.Tensor], torch.Tensor, "dict[int, torch.Tensor] | None", "dict[int, torch.Tensor | None]"]
"""(standardised features per width (L_d, rows, d), the labels one-hot and transposed (C, rows), row weights per
width (L_d, rows) or None when every row weighs 1, and per width the group positions of the L_d probes that hold any
row of the block, or None when all G_d of them do: a probe none of whose rows is in a block costs nothing there)."""

MERGED_ROWS = 8192
"""Cached blocks whose rows every probe uses are merged up to this many rows: fewer, larger matrix products."""


class StandardisedBlocks:
    """Standardised blocks grouped by feature width, cached on the device or rebuilt per pass."""

    def __init__(
        self,
        source: ChunkSource,
        groups: dict[int, list[int]],
        feature_of: list[int],
        means: list[np.ndarray],
        scales: list[np.ndarray],
        n_classes: int,
        class_weights: np.ndarray | None,
        device: torch.device,
        cache: bool,
    ) -> None:
        self.source, self.groups, self.feature_of, self.n_classes, self.device = (
            source,
            groups,
            feature_of,
            n_classes,
            device,
        )
        self.shift = {
            d: torch.from_numpy(np.stack([means[j] for j in js])).to(device)[:, None] for d, js in groups.items()
        }
        self.scale = {
            d: torch.from_numpy(np.stack([scales[j] for j in js])).to(device)[:, None] for d, js in groups.items()
        }
        # (G_d, classes) per-probe class weights, or None
        self.cw = (
            None
            if class_weights is None
            else {d: torch.from_numpy(class_weights[js].astype(np.float32)).to(device) for d, js in groups.items()}
        )
        self.cached: list[Block] | None = None
        if cache:
            self.cached = _merged(self._build())

    def _build(self) -> Iterator[Block]:
        for feats, y, masks in self.source():
            yt = torch.from_numpy(y).to(self.device)
            onehot = torch.nn.functional.one_hot(yt, self.n_classes).float().T.contiguous()  # (C, rows)
            live: dict[int, torch.Tensor | None] = {}
            xs: dict[int, torch.Tensor] = {}
            w: dict[int, torch.Tensor] | None = None if masks is None and self.cw is None else {}
            for d, js in self.groups.items():
                pos = np.arange(len(js)) if masks is None else np.flatnonzero(masks[js].any(1))
                every = len(pos) == len(js)
                live[d] = None if every else torch.from_numpy(pos).to(self.device)
                sub = [js[i] for i in pos]
                shift, scale = (
                    (self.shift[d], self.scale[d]) if every else (self.shift[d][live[d]], self.scale[d][live[d]])
                )
                stacked = (
                    np.stack([feats[self.feature_of[j]] for j in sub])
                    if sub
                    else np.zeros((0, len(y), d), dtype=np.float32)
                )
                xs[d] = (torch.from_numpy(stacked).to(self.device) - shift) * scale  # (L_d, rows, d) standardised
                if w is not None:
                    wd = (
                        torch.ones(len(sub), len(y), device=self.device)
                        if masks is None
                        else torch.from_numpy(masks[sub].astype(np.float32)).to(self.device)
                    )
                    if self.cw is not None:
                        wd = wd * (self.cw[d] if every else self.cw[d][live[d]])[:, yt]
                    w[d] = wd
            yield xs, onehot, w, live

    def __iter__(self) -> Iterator[Block]:
        return iter(self.cached) if self.cached is not None else self._build()


def _merged(blocks: Iterator[Block]) -> list[Block]:
    """Consecutive blocks that every probe holds rows of, concatenated along the rows up to MERGED_ROWS."""
    out: list[Block] = []
    run: list[Block] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            xs = {d: torch.cat([b[0][d] for b in run], 1) for d in run[0][0]}
            w = None if run[0][2] is None else {d: torch.cat([b[2][d] for b in run], 1) for d in run[0][2]}  # type: ignore[index]
            out.append((xs, torch.cat([b[1] for b in run], 1), w, run[0][3]))
        run.clear()

    for block in blocks:
        whole = all(v is None for v in block[3].values())
        if not whole:
            flush()
            out.append(block)
            continue
        if run and (
            (block[2] is None) != (run[0][2] is None)
            or sum(b[1].shape[1] for b in run) + block[1].shape[1] > MERGED_ROWS
        ):
            flush()
        run.append(block)
    flush()
    return out


def penalties(
    groups: dict[int, list[int]], n_classes: int, inv_c: np.ndarray, total: np.ndarray, device: torch.device
) -> dict[int, torch.Tensor]:
    """lam = 1 / (C_pk S_p) per probe p (its rows' total weight S_p) and C (``inv_c`` (P, K)), (G_d, K) per width;
    two classes: doubled (module docstring)."""
    factor = 2.0 if n_classes == 2 else 1.0
    return {
        d: (
            factor
            * torch.tensor(inv_c[js], dtype=torch.float64, device=device)
            / torch.tensor(total[js], dtype=torch.float64, device=device)[:, None]
        ).float()
        for d, js in groups.items()
    }


def logistic_objective(
    data: StandardisedBlocks,
    groups: dict[int, list[int]],
    n_classes: int,
    lam: dict[int, torch.Tensor],
    total: np.ndarray,
    device: torch.device,
    comm: Comm,
) -> Objective:
    S = {d: torch.tensor(total[js], dtype=torch.float64, device=device) for d, js in groups.items()}  # (G_d,)
    C = n_classes

    def objective(
        thetas: dict[int, torch.Tensor], active: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Mean loss (with and without penalty) and gradient of every problem; inactive ones are left at 0.

        Only configurations with an active problem, and only the C columns some of them need, are computed.
        """
        sel = {d: (active[d].any(1).nonzero().flatten(), active[d].any(0).nonzero().flatten()) for d in thetas}
        loss = {d: torch.zeros(len(gs), len(ks), dtype=torch.float64, device=device) for d, (gs, ks) in sel.items()}
        # accumulated in the layouts the matmuls produce; (Ga, Ka, D) once per call, below
        grad_w = {
            d: torch.zeros(len(gs), len(ks) * C, d, dtype=torch.float64, device=device) for d, (gs, ks) in sel.items()
        }
        grad_b = {
            d: torch.zeros(len(gs), len(ks), C, dtype=torch.float64, device=device) for d, (gs, ks) in sel.items()
        }
        params, slot = {}, {}
        for d, (gs, ks) in sel.items():
            th = thetas[d][gs][:, ks]  # (Ga, Ka, D)
            # (Ga, Ka*C, d) and (Ga, Ka*C, 1): logits come out as (Ga, Ka*C, rows), rows innermost, so the softmax
            # over a few classes runs along contiguous rows instead of along a last dimension of 2-10
            W = th[..., : d * C].reshape(len(gs), len(ks), d, C).transpose(2, 3).reshape(len(gs), len(ks) * C, d)
            params[d] = (W, th[..., d * C :].reshape(len(gs), len(ks) * C, 1))
            slot[d] = torch.full((thetas[d].shape[0],), -1, dtype=torch.long, device=device)
            slot[d][gs] = torch.arange(len(gs), device=device)  # group position -> position among the active
        runs = {d: _runs(gs) for d, (gs, _ks) in sel.items()}
        for xs, onehot, w, live in data:
            for d, (gs, ks) in sel.items():
                if not len(gs):
                    continue
                W, b = params[d]
                if (
                    live[d] is None
                ):  # every probe of the width has rows here: contiguous runs of the active ones, as views
                    for lo, hi, at in runs[d]:
                        ww = None if w is None else w[d][lo:hi]
                        nll, gw, gb = _terms(xs[d][lo:hi], W[at : at + hi - lo], b[at : at + hi - lo], onehot, ww, C)
                        loss[d][at : at + hi - lo] += nll
                        grad_w[d][at : at + hi - lo] += gw
                        grad_b[d][at : at + hi - lo] += gb
                    continue
                # only the active probes that hold rows of this block
                where = slot[d][live[d]]
                keep = (where >= 0).nonzero().flatten()
                if not len(keep):
                    continue
                idx = where[keep]
                for lo, hi, at in _runs(keep):  # contiguous runs of the block's probes, as views
                    part = idx[at : at + hi - lo]
                    nll, gw, gb = _terms(xs[d][lo:hi], W[part], b[part], onehot, None if w is None else w[d][lo:hi], C)
                    loss[d].index_add_(0, part, nll)
                    grad_w[d].index_add_(0, part, gw.double())
                    grad_b[d].index_add_(0, part, gb.double())
        grad = {
            d: torch.cat(
                [grad_w[d].view(len(gs), len(ks), C, d).transpose(2, 3).reshape(len(gs), len(ks), d * C), grad_b[d]], -1
            )
            for d, (gs, ks) in sel.items()
        }
        fs, data_fs, gs_out = {}, {}, {}
        for d, (gs, ks) in sel.items():
            reduced = comm.sum(torch.cat([loss[d].flatten(), grad[d].flatten()]))
            Sg = S[d][gs]
            mean_loss = reduced[: loss[d].numel()].view_as(loss[d]) / Sg[:, None]
            gr = (reduced[loss[d].numel() :].view_as(grad[d]) / Sg[:, None, None]).float()  # (Ga, Ka, D)
            Wflat = thetas[d][gs][:, ks][..., : d * C]
            lk = lam[d][gs][:, ks]  # (Ga, Ka)
            pen = 0.5 * lk * (Wflat * Wflat).sum(-1)
            gr[..., : d * C] += lk[..., None] * Wflat
            full_f = torch.zeros(thetas[d].shape[:2], dtype=torch.float64, device=device)
            full_d = torch.zeros_like(full_f)
            full_g = torch.zeros_like(thetas[d])
            cells = (gs[:, None], ks[None, :])
            full_f[cells] = mean_loss + pen.double()
            full_d[cells] = mean_loss
            full_g[cells] = gr
            fs[d], data_fs[d], gs_out[d] = full_f, full_d, full_g
        return fs, data_fs, gs_out

    return objective


def _runs(gs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(lo, hi, at): the sorted group positions ``gs`` as contiguous runs lo..hi-1, ``at`` the run's first position
    among ``gs``; a run's features are a view of the block, never a copy."""
    out: list[tuple[int, int, int]] = []
    for at, g in enumerate(gs.tolist()):
        if out and out[-1][1] == g:
            lo, _hi, first = out[-1]
            out[-1] = (lo, g + 1, first)
        else:
            out.append((g, g + 1, at))
    return out


def _terms(
    X: torch.Tensor, W: torch.Tensor, b: torch.Tensor, onehot: torch.Tensor, ww: torch.Tensor | None, C: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cross-entropy of a block of rows and its gradients, for Ga probes at Ka Cs each.

    X (Ga, rows, d) standardised features, W (Ga, Ka*C, d), b (Ga, Ka*C, 1), onehot (C, rows), ww (Ga, rows) row
    weights or None. Returns the summed (weighted) negative log-likelihood (Ga, Ka) in float64, d/dW (Ga, Ka*C, d)
    and d/db (Ga, Ka, C). Logits are (Ga, Ka, C, rows), rows innermost: the softmax over a few classes then runs
    along contiguous rows instead of along a last dimension of 2-10.
    """
    Ga, rows = X.shape[0], X.shape[1]
    Ka = W.shape[1] // C
    z = torch.baddbmm(b, W, X.transpose(1, 2)).view(Ga, Ka, C, rows)  # logits
    z = z.sub_(z.amax(2, keepdim=True))  # shifted by each row's largest logit
    e = z.exp()
    total = e.sum(2, keepdim=True)  # (Ga, Ka, 1, rows)
    picked = (z * onehot).sum(2) - total.log().squeeze(2)  # (Ga, Ka, rows): log p(y | x)
    weights = None if ww is None else ww[:, None]  # (Ga, 1, rows)
    nll = -(picked if weights is None else picked * weights).sum(-1).double()
    dl = e.div_(total).sub_(onehot)  # d loss / d logits
    if weights is not None:
        dl.mul_(weights[:, :, None])
    # (Ga, Ka*C, d): dl X reads X in its row-major order
    return nll, torch.bmm(dl.view(Ga, Ka * C, rows), X), dl.sum(-1)
