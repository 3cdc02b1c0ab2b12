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
from collections.abc import Sequence

import numpy as np
import torch

from heads.probe.chunks import ChunkSource, Comm
from heads.probe.lbfgs import BatchedLBFGS, Objective
from heads.probe.objective import StandardisedBlocks, input_stats, logistic_objective, penalties
from heads.probe.scoring import LogisticFit, grid_scores
from heads.report.metrics import macro_f1_present

__all__ = ["fit_logistic_probes", "PATH_PATIENCE"]

log = logging.getLogger(__name__)


PATH_PATIENCE = 2
"""A probe's C path stops once its validation macro-F1 has fallen at this many consecutive Cs."""


def fit_logistic_probes(
    source: ChunkSource,
    widths: Sequence[int],
    n_classes: int,
    c_grid: Sequence[float],
    *,
    feature_of: Sequence[int] | None = None,
    val_source: ChunkSource | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    history: int = 10,
    class_weight: str = "none",
    device: torch.device | str = "cpu",
    cache: bool = True,
    comm: Comm | None = None,
    standardize: bool = True,
    c_of: Sequence[float] | None = None,
    patience: int = PATH_PATIENCE,
) -> list[LogisticFit]:
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
    inv_c = (
        np.array([[1.0 / float(c)] for c in c_of])
        if c_of is not None
        else np.tile([1.0 / float(c) for c in c_grid], (P, 1))
    )
    means, scales, n, counts = input_stats(source, fof, widths, n_classes, comm)
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
    data = StandardisedBlocks(source, groups, fof, means, scales, n_classes, weights, device, cache)
    lam = penalties(groups, n_classes, inv_c, total, device)
    objective = logistic_objective(data, groups, n_classes, lam, total, device, comm)
    thetas = {d: torch.zeros(len(js), K, d * n_classes + n_classes, device=device) for d, js in groups.items()}
    run = _Run(
        BatchedLBFGS(objective, thetas, history=history),
        groups,
        fof,
        widths,
        n_classes,
        means,
        scales,
        K,
        device,
        comm,
        max_iter,
    )
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

    def __init__(
        self,
        solver: BatchedLBFGS,
        groups: dict[int, list[int]],
        fof: list[int],
        widths: list[int],
        n_classes: int,
        means: list[np.ndarray],
        scales: list[np.ndarray],
        K: int,
        device: torch.device,
        comm: Comm,
        max_iter: int,
    ) -> None:
        self.solver, self.groups, self.fof, self.widths, self.C = solver, groups, fof, widths, n_classes
        self.means, self.scales, self.K, self.device, self.comm, self.max_iter = (
            means,
            scales,
            K,
            device,
            comm,
            max_iter,
        )
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
        cms, losses = grid_scores(
            [now[p].at(k) for p, k in pairs], val_source, self.C, self.fof, comm=self.comm, probes=[p for p, _ in pairs]
        )
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
            log.warning(
                "%d of %d L-BFGS problems (probe x C) stopped at --max-iter %d before reaching tol %g; raise "
                "--max-iter",
                bad,
                int(self.solved.sum()),
                self.max_iter,
                tol,
            )
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


def _unpack(
    thetas: dict[int, torch.Tensor],
    groups: dict[int, list[int]],
    n_probes: int,
    n_classes: int,
    means: list[np.ndarray],
    scales: list[np.ndarray],
    its: dict[int, torch.Tensor],
) -> list[LogisticFit]:
    C = n_classes
    fits: list[LogisticFit | None] = [None] * n_probes
    for d, js in groups.items():
        th = thetas[d].detach().cpu()
        K = th.shape[1]
        for gi, j in enumerate(js):
            fits[j] = LogisticFit(
                weights=th[gi, :, : d * C].reshape(K, d, C).numpy().copy(),
                bias=th[gi, :, d * C :].numpy().copy(),
                mean=means[j],
                scale=scales[j],
                iterations=its[d][gi].cpu().numpy().copy(),
                converged=np.zeros(K, dtype=bool),
                train_loss=np.zeros(K),
            )
    return [f for f in fits if f is not None]
