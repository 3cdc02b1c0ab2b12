"""Linear probes by a batched full-batch solver: multinomial logistic regression by L-BFGS, in float32, on the device.

Every probe of a sweep (layer x pooling x combination x seed x fold: a feature on its own rows) and every inverse
L2 strength ``C`` of the grid is one problem; problems of one feature width are stacked and solved together, and
every width in the same data pass.
The objective of each is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, lbfgs), scaled as scikit-learn
scales it::

    f(W, b) = (1/S) sum_i w_i CE(x_i W + b, y_i) + 1/(2 C S) ||W||^2      (S = sum_i w_i, intercept unpenalised)

on inputs standardised with the training rows' mean and std (``StandardScaler``), stopped when the largest
gradient entry is at most ``tol`` (scipy's ``pgtol``, which scikit-learn sets to its ``tol``). For two classes
scikit-learn fits one weight vector; the symmetric two-class softmax with a doubled penalty has the same
solution, so the penalty is doubled there.

The data arrive as blocks of row chunks from a :class:`ChunkSource` (in memory, or streamed from the store when
the features exceed the memory budget); every iteration is one pass over them (a line-search step that is not
accepted at once costs another). Under torchrun each rank sees only its own chunks and the per-block sums are
all-reduced (in float64), so every rank takes the same steps. Problems that converge stop being computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from heads.probe.lbfgs import BatchedLBFGS, Objective
from heads.probe.modules import inverse_scale
from heads.report.metrics import macro_f1_present

__all__ = ["ChunkSource", "Comm", "LogisticFit", "fit_logistic_probes", "grid_confusions", "grid_scores", "chosen_confusions",
           "probe_probabilities", "RowBlock", "chunks_of"]

log = logging.getLogger(__name__)

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
        return LogisticFit(self.weights[k:k + 1], self.bias[k:k + 1], self.mean, self.scale, self.iterations[k:k + 1],
                           self.converged[k:k + 1], self.train_loss[k:k + 1])


def _stats(source: ChunkSource, feature_of: list[int], widths: list[int], n_classes: int, comm: Comm
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
    n_all, counts_all = flat[:P], flat[P:P + P * n_classes].reshape(P, n_classes)
    cuts = np.cumsum([0, *[widths[f] for f in feature_of]]) + P + P * n_classes
    means = [flat[cuts[p]:cuts[p + 1]] / max(1.0, n_all[p]) for p in range(P)]
    local = [m2[p] + n[p] * (mean[p] - means[p]) ** 2 for p in range(P)]
    m2_all = comm.sum(torch.from_numpy(np.concatenate(local))).numpy()
    cuts = cuts - cuts[0]
    scales = [inverse_scale(m2_all[cuts[p]:cuts[p + 1]] / max(1.0, n_all[p]), means[p], int(n_all[p])).astype(np.float32)
              for p in range(P)]
    return [m.astype(np.float32) for m in means], scales, n_all, counts_all


Block = tuple[dict[int, torch.Tensor], torch.Tensor, "dict[int, torch.Tensor] | None", "dict[int, torch.Tensor | None]"]
"""(standardised features per width (L_d, rows, d), the labels one-hot and transposed (C, rows), row weights per
width (L_d, rows) or None when every row weighs 1, and per width the group positions of the L_d probes that hold any
row of the block, or None when all G_d of them do: a probe none of whose rows is in a block costs nothing there)."""

MERGED_ROWS = 8192
"""Cached blocks whose rows every probe uses are merged up to this many rows: fewer, larger matrix products."""


class _Data:
    """Standardised blocks grouped by feature width, cached on the device or rebuilt per pass."""

    def __init__(self, source: ChunkSource, groups: dict[int, list[int]], feature_of: list[int], means: list[np.ndarray],
                 scales: list[np.ndarray], n_classes: int, class_weights: np.ndarray | None, device: torch.device,
                 cache: bool) -> None:
        self.source, self.groups, self.feature_of, self.n_classes, self.device = source, groups, feature_of, n_classes, device
        self.shift = {d: torch.from_numpy(np.stack([means[j] for j in js])).to(device)[:, None] for d, js in groups.items()}
        self.scale = {d: torch.from_numpy(np.stack([scales[j] for j in js])).to(device)[:, None] for d, js in groups.items()}
        # (G_d, classes) per-probe class weights, or None
        self.cw = None if class_weights is None else \
            {d: torch.from_numpy(class_weights[js].astype(np.float32)).to(device) for d, js in groups.items()}
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
                shift, scale = (self.shift[d], self.scale[d]) if every else (self.shift[d][live[d]], self.scale[d][live[d]])
                stacked = np.stack([feats[self.feature_of[j]] for j in sub]) if sub else \
                    np.zeros((0, len(y), d), dtype=np.float32)
                xs[d] = (torch.from_numpy(stacked).to(self.device) - shift) * scale  # (L_d, rows, d) standardised
                if w is not None:
                    wd = torch.ones(len(sub), len(y), device=self.device) if masks is None else \
                        torch.from_numpy(masks[sub].astype(np.float32)).to(self.device)
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
        if run and ((block[2] is None) != (run[0][2] is None) or
                    sum(b[1].shape[1] for b in run) + block[1].shape[1] > MERGED_ROWS):
            flush()
        run.append(block)
    flush()
    return out


PATH_PATIENCE = 2
"""A probe's C path stops once its validation macro-F1 has fallen at this many consecutive Cs."""


def fit_logistic_probes(source: ChunkSource, widths: Sequence[int], n_classes: int, c_grid: Sequence[float], *,
                        feature_of: Sequence[int] | None = None, val_source: ChunkSource | None = None,
                        max_iter: int = 1000, tol: float = 1e-4, history: int = 10, class_weight: str = "none",
                        device: torch.device | str = "cpu", cache: bool = True, comm: Comm | None = None,
                        standardize: bool = True, c_of: Sequence[float] | None = None,
                        patience: int = PATH_PATIENCE) -> list[LogisticFit]:
    """Solve every probe along the C path of ``c_grid`` on its rows of ``source``, and pick each probe's C on its
    rows of ``val_source`` (highest validation macro-F1; ties: accuracy, then the lower validation log-loss, then the
    smaller C). One LogisticFit per probe.

    Probe ``p`` reads feature ``feature_of[p]`` (default: probe p reads feature p; feature f is ``widths[f]`` wide).
    With several C the path is screened from the smallest C up (each C solved to ``10 * tol`` starting from the
    previous C's solution, as scikit-learn's ``_logistic_regression_path`` warm-starts), every probe's C scored on
    validation as it is solved, and a probe's path stops once its validation macro-F1 has fallen at ``patience``
    consecutive Cs (the larger Cs take the most iterations and are rarely chosen past a falling curve). C is then
    chosen among the Cs solved, and only each probe's chosen C is solved on to ``tol`` and scored again, until every
    probe's best validation score belongs to a C solved to ``tol``.
    ``class_weight='balanced'`` weighs each probe's rows by ``n / (classes * count)`` of its own rows; ``cache``
    keeps the standardised blocks on the device (else every pass rebuilds them from ``source``);
    ``standardize=False`` fits the raw features (as ``LogisticRegression`` without ``StandardScaler``);
    ``c_of`` gives every probe a C of its own (one per probe, ``c_grid`` is then not used: nothing is chosen).
    """
    comm = comm or Comm()
    device = torch.device(device)
    widths = [int(d) for d in widths]
    fof = list(range(len(widths))) if feature_of is None else [int(f) for f in feature_of]
    if c_of is not None:
        if len(c_of) != len(fof):
            raise ValueError(f"c_of needs one C per probe ({len(fof)}); got {len(c_of)}")
        c_grid = [1.0]
    P, K = len(fof), len(c_grid)
    if K > 1 and val_source is None:
        raise ValueError("choosing C from a grid needs validation rows (val_source)")
    # (P, K) inverse C of every problem
    inv_c = np.array([[1.0 / float(c)] for c in c_of]) if c_of is not None else \
        np.tile([1.0 / float(c) for c in c_grid], (P, 1))
    means, scales, n, counts = _stats(source, fof, widths, n_classes, comm)
    if not standardize:
        means = [np.zeros(widths[feat], np.float32) for feat in fof]
        scales = [np.ones(widths[feat], np.float32) for feat in fof]
    weights = None
    if class_weight == "balanced":  # scikit-learn's: n / (classes present * count), per probe
        present = (counts > 0).sum(1, keepdims=True)
        weights = np.divide(n[:, None], present * counts, out=np.zeros_like(counts), where=counts > 0)
    # the sum of the row weights S per probe (balanced weights also sum to n)
    total = np.maximum(n if weights is None else (weights * counts).sum(1), 1.0)
    groups: dict[int, list[int]] = {}
    for p, feat in enumerate(fof):
        groups.setdefault(widths[feat], []).append(p)
    data = _Data(source, groups, fof, means, scales, n_classes, weights, device, cache)
    lam = _penalties(groups, n_classes, inv_c, total, device)
    objective = _objective(data, groups, n_classes, lam, total, device, comm)
    thetas = {d: torch.zeros(len(js), K, d * n_classes + n_classes, device=device) for d, js in groups.items()}
    run = _Run(BatchedLBFGS(objective, thetas, history=history), groups, fof, widths, n_classes, means, scales, K,
               device, comm, max_iter)
    if K == 1:
        run.solve_all(tol)
        if val_source is not None:  # one C: nothing to choose, the validation scores are still reported
            run.score_all(val_source)
    else:
        assert val_source is not None  # checked above
        run.path(val_source, 10 * tol, patience)
        run.refine(val_source, tol)
    return run.finish(objective, tol)


class _Run:
    """The state of one :func:`fit_logistic_probes` call: the solver, and per probe and C whether it was solved
    (on the path), solved to the full tolerance (refined), its iterations and its validation scores."""

    def __init__(self, solver: BatchedLBFGS, groups: dict[int, list[int]], fof: list[int], widths: list[int],
                 n_classes: int, means: list[np.ndarray], scales: list[np.ndarray], K: int, device: torch.device,
                 comm: Comm, max_iter: int) -> None:
        self.solver, self.groups, self.fof, self.widths, self.C = solver, groups, fof, widths, n_classes
        self.means, self.scales, self.K, self.device, self.comm, self.max_iter = means, scales, K, device, comm, max_iter
        self.P = len(fof)
        self.its = {d: torch.zeros(len(js), K, dtype=torch.long, device=device) for d, js in groups.items()}
        self.solved = np.zeros((self.P, K), dtype=bool)
        self.refined = np.zeros((self.P, K), dtype=bool)
        self.val: np.ndarray | None = None
        self.val_loss = np.full((self.P, K), np.inf)

    def _mask(self, pairs: Sequence[tuple[int, int]]) -> dict[int, torch.Tensor]:
        only = {d: torch.zeros(len(js), self.K, dtype=torch.bool, device=self.device) for d, js in self.groups.items()}
        for p, k in pairs:
            d = self.widths[self.fof[p]]
            only[d][self.groups[d].index(p), k] = True
        return only

    def _solve(self, pairs: Sequence[tuple[int, int]], tol: float) -> None:
        more, _ = self.solver.run(self.max_iter, tol, only=self._mask(pairs))
        self.its = {d: self.its[d] + more[d] for d in self.its}


    def fits(self) -> list[LogisticFit]:
        return _unpack(self.solver.thetas, self.groups, self.P, self.C, self.means, self.scales, self.its)

    def _score(self, val_source: ChunkSource, pairs: Sequence[tuple[int, int]]) -> None:
        """Validation confusions and log-losses of the given (probe, C) solutions, as they are now."""
        now = self.fits()
        cms, losses = grid_scores([now[p].at(k) for p, k in pairs], val_source, self.C, self.fof, comm=self.comm,
                                  probes=[p for p, _ in pairs])
        if self.val is None:
            self.val = np.zeros((self.P, self.K, self.C, self.C), dtype=np.int64)
        for (p, k), cm, lo in zip(pairs, cms[:, 0], losses[:, 0]):
            self.val[p, k], self.val_loss[p, k] = cm, lo

    def solve_all(self, tol: float) -> None:
        pairs = [(p, k) for p in range(self.P) for k in range(self.K)]
        self._solve(pairs, tol)
        self.solved[:] = self.refined[:] = True

    def score_all(self, val_source: ChunkSource) -> None:
        self._score(val_source, [(p, k) for p in range(self.P) for k in range(self.K)])

    def path(self, val_source: ChunkSource, screen_tol: float, patience: int) -> None:
        """The C path: smallest C first, each C warm-started from the previous one's solution, scored on validation
        as it is solved; a probe leaves the path once its validation macro-F1 fell at ``patience`` consecutive Cs."""
        on = np.ones(self.P, dtype=bool)
        falls = np.zeros(self.P, dtype=np.int64)
        last = np.full(self.P, -np.inf)
        for k in range(self.K):
            live = [int(p) for p in np.flatnonzero(on)]
            if not live:
                break
            if k:
                # warm start from the previous C (its curvature pairs are not carried over: measured, they made the
                # larger Cs' solves longer, not shorter)
                for th in self.solver.thetas.values():
                    th[:, k] = th[:, k - 1]
            pairs = [(p, k) for p in live]
            self._solve(pairs, screen_tol)
            self.solved[live, k] = True
            self._score(val_source, pairs)
            assert self.val is not None  # scored just above
            for p in live:
                f1 = macro_f1_present(self.val[p, k])
                falls[p] = falls[p] + 1 if f1 < last[p] else 0
                last[p] = f1
                on[p] = falls[p] < patience

    def refine(self, val_source: ChunkSource, tol: float) -> None:
        """Choose on validation; solve the choice on to the full tolerance and score it again. A refined solution
        may score lower than its screening one (less converged is more regularised), so repeat until every probe's
        best score belongs to a refined C (at most K rounds, usually one)."""
        assert self.val is not None  # the path scored every C it solved
        for _round in range(self.K):
            todo = [(p, k) for p in range(self.P) for k in [self.choice(p)] if not self.refined[p, k]]
            if not todo:
                break
            self._solve(todo, tol)
            self._score(val_source, todo)
            for p, k in todo:
                self.refined[p, k] = True

    def choice(self, p: int) -> int:
        assert self.val is not None
        return _choose(self.val[p], self.val_loss[p], self.solved[p])

    def finish(self, objective: Objective, tol: float) -> list[LogisticFit]:
        """The fits, with their training loss, convergence and validation scores; unsolved Cs are marked."""
        fits = self.fits()
        solved = {d: torch.from_numpy(self.solved[js]).to(self.device) for d, js in self.groups.items()}
        _, data_loss, grad = objective(self.solver.thetas, solved)
        for d, js in self.groups.items():
            for gi, p in enumerate(js):
                f = fits[p]
                f.solved = self.solved[p].copy()
                f.train_loss = np.where(f.solved, data_loss[d][gi].cpu().numpy(), np.nan)
                f.refined = self.refined[p].copy()
                reached = np.where(self.refined[p], tol, 10 * tol)
                f.converged = (grad[d][gi].abs().amax(-1).cpu().numpy() <= reached * 1.0001) & f.solved
                if self.val is not None:
                    f.val_confusion, f.val_loss = self.val[p], self.val_loss[p]
                    if self.K > 1:
                        f.chosen = self.choice(p)
        bad = sum(int((f.solved & ~f.converged).sum()) for f in fits)
        if bad:
            log.warning("%d of %d L-BFGS problems (probe x C) stopped at --max-iter %d before reaching tol %g; raise "
                        "--max-iter", bad, int(self.solved.sum()), self.max_iter, tol)
        return fits


def _choose(cm: np.ndarray, loss: np.ndarray, solved: np.ndarray | None = None) -> int:
    """Index of the best C from (K, classes, classes) validation confusions and (K,) validation log-losses: the
    highest macro-F1, then accuracy, then the lowest log-loss (where the counts cannot tell Cs apart, as on a
    separable task, the likelihood can), then the smaller C; only Cs that were ``solved`` (default: all) count."""
    best = (-1.0, -1.0, -np.inf)
    pick = 0
    for k in range(len(cm)):
        if solved is not None and not solved[k]:
            continue
        score = (macro_f1_present(cm[k]), float(np.trace(cm[k])) / max(1, int(cm[k].sum())), -float(loss[k]))
        if score > best:  # strictly better: the smaller C (earlier in the grid) wins exact ties
            best, pick = score, k
    return pick


def _unpack(thetas: dict[int, torch.Tensor], groups: dict[int, list[int]], n_probes: int, n_classes: int,
            means: list[np.ndarray], scales: list[np.ndarray], its: dict[int, torch.Tensor]) -> list[LogisticFit]:
    C = n_classes
    fits: list[LogisticFit | None] = [None] * n_probes
    for d, js in groups.items():
        th = thetas[d].detach().cpu()
        K = th.shape[1]
        for gi, j in enumerate(js):
            fits[j] = LogisticFit(weights=th[gi, :, : d * C].reshape(K, d, C).numpy().copy(), bias=th[gi, :, d * C:].numpy().copy(),
                                  mean=means[j], scale=scales[j], iterations=its[d][gi].cpu().numpy().copy(),
                                  converged=np.zeros(K, dtype=bool), train_loss=np.zeros(K))
    return [f for f in fits if f is not None]


def _penalties(groups: dict[int, list[int]], n_classes: int, inv_c: np.ndarray, total: np.ndarray,
               device: torch.device) -> dict[int, torch.Tensor]:
    """lam = 1 / (C_pk S_p) per probe p (its rows' total weight S_p) and C (``inv_c`` (P, K)), (G_d, K) per width;
    two classes: doubled (module docstring)."""
    factor = 2.0 if n_classes == 2 else 1.0
    return {d: (factor * torch.tensor(inv_c[js], dtype=torch.float64, device=device)
                / torch.tensor(total[js], dtype=torch.float64, device=device)[:, None]).float() for d, js in groups.items()}


def _objective(data: _Data, groups: dict[int, list[int]], n_classes: int, lam: dict[int, torch.Tensor], total: np.ndarray,
               device: torch.device, comm: Comm) -> Objective:
    S = {d: torch.tensor(total[js], dtype=torch.float64, device=device) for d, js in groups.items()}  # (G_d,)
    C = n_classes

    def objective(thetas: dict[int, torch.Tensor], active: dict[int, torch.Tensor]
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Mean loss (with and without penalty) and gradient of every problem; inactive ones are left at 0.

        Only configurations with an active problem, and only the C columns some of them need, are computed.
        """
        sel = {d: (active[d].any(1).nonzero().flatten(), active[d].any(0).nonzero().flatten()) for d in thetas}
        loss = {d: torch.zeros(len(gs), len(ks), dtype=torch.float64, device=device) for d, (gs, ks) in sel.items()}
        # accumulated in the layouts the matmuls produce; (Ga, Ka, D) once per call, below
        grad_w = {d: torch.zeros(len(gs), len(ks) * C, d, dtype=torch.float64, device=device) for d, (gs, ks) in sel.items()}
        grad_b = {d: torch.zeros(len(gs), len(ks), C, dtype=torch.float64, device=device) for d, (gs, ks) in sel.items()}
        params, slot = {}, {}
        for d, (gs, ks) in sel.items():
            th = thetas[d][gs][:, ks]  # (Ga, Ka, D)
            # (Ga, Ka*C, d) and (Ga, Ka*C, 1): logits come out as (Ga, Ka*C, rows), rows innermost, so the softmax
            # over a few classes runs along contiguous rows instead of along a last dimension of 2-10
            W = th[..., : d * C].reshape(len(gs), len(ks), d, C).transpose(2, 3).reshape(len(gs), len(ks) * C, d)
            params[d] = (W, th[..., d * C:].reshape(len(gs), len(ks) * C, 1))
            slot[d] = torch.full((thetas[d].shape[0],), -1, dtype=torch.long, device=device)
            slot[d][gs] = torch.arange(len(gs), device=device)  # group position -> position among the active
        runs = {d: _runs(gs) for d, (gs, _ks) in sel.items()}
        for xs, onehot, w, live in data:
            for d, (gs, ks) in sel.items():
                if not len(gs):
                    continue
                W, b = params[d]
                if live[d] is None:  # every probe of the width has rows here: contiguous runs of the active ones, as views
                    for lo, hi, at in runs[d]:
                        ww = None if w is None else w[d][lo:hi]
                        nll, gw, gb = _terms(xs[d][lo:hi], W[at:at + hi - lo], b[at:at + hi - lo], onehot, ww, C)
                        loss[d][at:at + hi - lo] += nll
                        grad_w[d][at:at + hi - lo] += gw
                        grad_b[d][at:at + hi - lo] += gb
                    continue
                # only the active probes that hold rows of this block
                where = slot[d][live[d]]
                keep = (where >= 0).nonzero().flatten()
                if not len(keep):
                    continue
                idx = where[keep]
                nll, gw, gb = _terms(xs[d][keep], W[idx], b[idx], onehot, None if w is None else w[d][keep], C)
                loss[d].index_add_(0, idx, nll)
                grad_w[d].index_add_(0, idx, gw.double())
                grad_b[d].index_add_(0, idx, gb.double())
        grad = {d: torch.cat([grad_w[d].view(len(gs), len(ks), C, d).transpose(2, 3).reshape(len(gs), len(ks), d * C),
                              grad_b[d]], -1) for d, (gs, ks) in sel.items()}
        fs, data_fs, gs_out = {}, {}, {}
        for d, (gs, ks) in sel.items():
            reduced = comm.sum(torch.cat([loss[d].flatten(), grad[d].flatten()]))
            Sg = S[d][gs]
            mean_loss = reduced[: loss[d].numel()].view_as(loss[d]) / Sg[:, None]
            gr = (reduced[loss[d].numel():].view_as(grad[d]) / Sg[:, None, None]).float()  # (Ga, Ka, D)
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


def _terms(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor, onehot: torch.Tensor, ww: torch.Tensor | None, C: int
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


def grid_confusions(fits: Sequence[LogisticFit], source: ChunkSource, n_classes: int,
                    feature_of: Sequence[int] | None = None, comm: Comm | None = None,
                    probes: Sequence[int] | None = None) -> np.ndarray:
    """(len(fits), K, classes, classes) confusion counts (rows: true) of every fit at every C on its probe's rows
    of ``source``: ``fits[i]`` is probe ``probes[i]`` (default i), reading feature ``feature_of[probe]``."""
    return grid_scores(fits, source, n_classes, feature_of, comm, probes)[0]


def grid_scores(fits: Sequence[LogisticFit], source: ChunkSource, n_classes: int,
                feature_of: Sequence[int] | None = None, comm: Comm | None = None,
                probes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grid_confusions` and (len(fits), K) the mean log-loss (natural log) of every fit at every C on the
    same rows."""
    comm = comm or Comm()
    K = len(fits[0].bias) if fits else 0
    which = list(range(len(fits))) if probes is None else list(probes)
    fof = list(range(max(which, default=-1) + 1)) if feature_of is None else list(feature_of)
    cm = torch.zeros(len(fits), K, n_classes, n_classes, dtype=torch.float64)
    nll = torch.zeros(len(fits), K, dtype=torch.float64)
    tensors = [(torch.from_numpy(f.weights), torch.from_numpy(f.bias), torch.from_numpy(f.mean), torch.from_numpy(f.scale))
               for f in fits]
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
    counts = flat[:cm.numel()].view_as(cm).numpy().round().astype(np.int64)
    rows_seen = np.maximum(counts.sum((2, 3)), 1)
    return counts, flat[cm.numel():].view_as(nll).numpy() / rows_seen


def chosen_confusions(fits: Sequence[LogisticFit], source: ChunkSource, n_classes: int,
                      feature_of: Sequence[int] | None = None, comm: Comm | None = None) -> np.ndarray:
    """(probes, classes, classes) confusion counts of each probe at its chosen C on its rows of ``source``."""
    return grid_confusions([f.at(f.chosen) for f in fits], source, n_classes, feature_of, comm=comm)[:, 0]


RowBlock = tuple[np.ndarray, list[np.ndarray], np.ndarray, "np.ndarray | None"]
"""A :data:`Chunk` with its rows first: (absolute row positions (rows,), features, labels, probe masks)."""


def chunks_of(blocks: Callable[[], Iterator[RowBlock]]) -> ChunkSource:
    """The solver's chunk source from a source of row blocks (the blocks without their rows)."""
    def chunks() -> Iterator[Chunk]:
        for _rows, feats, y, masks in blocks():
            yield feats, y, masks
    return chunks


def probe_probabilities(fits: Sequence[LogisticFit], blocks: Callable[[], Iterator[RowBlock]], rows_of: Sequence[np.ndarray],
                        feature_of: Sequence[int], comm: Comm | None = None, log: bool = False) -> list[np.ndarray]:
    """Class probabilities of every probe on its rows: one (len(rows_of[p]), classes) float32 array per probe, in
    the order of its sorted ``rows_of[p]`` (``log``: natural log-probabilities, exact where a probability would
    round to 0). Each fit is used at its first C (pass ``fit.at(k)``); ``blocks`` yields this rank's row blocks with
    each probe's rows marked, and the ranks' parts are summed (each row is scored by exactly one rank)."""
    comm = comm or Comm()
    n_classes = fits[0].bias.shape[1] if fits else 0
    out = [np.zeros((len(r), n_classes), dtype=np.float32) for r in rows_of]
    tensors = [(torch.from_numpy(f.weights[0]), torch.from_numpy(f.bias[0]), torch.from_numpy(f.mean), torch.from_numpy(f.scale))
               for f in fits]
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
        out = [flat[cuts[i]:cuts[i + 1]].numpy().reshape(o.shape) for i, o in enumerate(out)]
    return out
