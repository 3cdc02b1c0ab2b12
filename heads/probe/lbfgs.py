"""L-BFGS on many independent problems at once, each with its own curvature history, step and convergence.

The problems are the rows of parameter tensors ``thetas[d]`` shaped (G, K, D) (for the probes: configuration x C,
D weights of a width-d probe); one call of the objective evaluates every active problem in one data pass. A run
works on the problems it was asked to solve only (``only``), gathered into compact (A, D) tensors, so a run over one
C of a path costs what its problems cost, not what the whole grid would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BatchedLBFGS", "Objective"]

Objective = Callable[
    [dict[int, torch.Tensor], dict[int, torch.Tensor]],
    tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]],
]
"""(parameters, active problems) -> (objective, data term, gradient), each per width d."""


class BatchedLBFGS:
    """L-BFGS on many independent problems at once: per-problem two-loop recursion, step and convergence.

    ``thetas[d]`` is (G, K, D) for width d; every problem (g, k) has its own history of the last ``history``
    (s, y) pairs, its own backtracking Armijo step (a step not accepted at once is halved, one evaluation pass for
    all problems still searching) and stops when its largest gradient entry is at most ``tol``.
    """

    def __init__(self, objective: Objective, thetas: dict[int, torch.Tensor], *, history: int) -> None:
        self.objective, self.thetas, self.m = objective, thetas, history

    def _evaluate(
        self, where: dict[int, torch.Tensor], x: dict[int, torch.Tensor], which: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Objective and gradient at the compact points ``x`` (A_d, D) of the problems ``where`` (G, K) marks; only
        the ones ``which`` (A_d,) marks are computed (the others come back as 0)."""
        mask = {d: torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device) for d, t in self.thetas.items()}
        for d, w in where.items():
            self.thetas[d][w] = x[d]
            mask[d][w] = which[d]
        f, _, g = self.objective(self.thetas, mask)
        return {d: f[d][w] for d, w in where.items()}, {d: g[d][w] for d, w in where.items()}

    def run(
        self, max_iter: int, tol: float, only: dict[int, torch.Tensor] | None = None
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Iterate from ``thetas`` (updated in place) until every problem (or every one in ``only``) has its largest
        gradient entry at most ``tol``; returns the iterations each took and whether it got there, (G, K) each."""
        th = self.thetas
        dev = next(iter(th.values())).device
        where = only or {d: torch.ones(t.shape[:2], dtype=torch.bool, device=dev) for d, t in th.items()}
        where = {d: w for d, w in where.items() if bool(w.any())}
        x = {d: th[d][w].clone() for d, w in where.items()}  # (A_d, D) compact
        everyone = {d: torch.ones(len(v), dtype=torch.bool, device=dev) for d, v in x.items()}
        f, g = self._evaluate(where, x, everyone)
        done = {d: g[d].abs().amax(-1) <= tol for d in x}
        its = {d: torch.zeros(len(v), dtype=torch.long, device=dev) for d, v in x.items()}
        hist: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {d: [] for d in x}
        for _ in range(max_iter):
            if all(bool(done[d].all()) for d in x):
                break
            p, gp = {}, {}
            for d in x:
                p[d] = self._direction(g[d], hist[d]).masked_fill_(done[d][:, None], 0.0)
                gp[d] = (g[d] * p[d]).sum(-1)
                uphill = (gp[d] >= 0) & ~done[d]  # not a descent direction (numerical trouble): steepest descent
                if bool(uphill.any()):
                    p[d] = torch.where(uphill[:, None], -g[d], p[d])
                    gp[d] = (g[d] * p[d]).sum(-1)
                    hist[d] = []
            pending = {d: ~done[d] for d in x}
            step = {d: torch.ones(len(v), device=dev) for d, v in x.items()}
            new_x = {d: v.clone() for d, v in x.items()}
            new_f = {d: v.clone() for d, v in f.items()}
            new_g = {d: v.clone() for d, v in g.items()}
            for _ls in range(20):
                trial = {d: x[d] + step[d][:, None] * p[d] for d in x}
                ft, gt = self._evaluate(where, trial, pending)
                for d in x:
                    # Armijo, with a float32-noise allowance so a converged problem is not stuck halving forever
                    ok = pending[d] & (ft[d] <= f[d] + 1e-4 * step[d].double() * gp[d].double() + 1e-7 * f[d].abs())
                    new_x[d][ok], new_f[d][ok], new_g[d][ok] = trial[d][ok], ft[d][ok], gt[d][ok]
                    pending[d] = pending[d] & ~ok
                    step[d] = torch.where(pending[d], step[d] * 0.5, step[d])
                if not any(bool(pending[d].any()) for d in x):
                    break
            for d in x:
                hist[d].append(self._pair(new_x[d] - x[d], new_g[d] - g[d]))
                if len(hist[d]) > self.m:
                    hist[d].pop(0)
                its[d] += (~done[d]).long()
                stuck = pending[d]  # no decrease found along the direction: as far as float32 goes
                x[d], f[d], g[d] = new_x[d], new_f[d], new_g[d]
                done[d] = done[d] | stuck | (g[d].abs().amax(-1) <= tol)
        for d, w in where.items():
            th[d][w] = x[d]
        full_its = {d: torch.zeros(t.shape[:2], dtype=torch.long, device=dev) for d, t in th.items()}
        converged = {d: torch.zeros(t.shape[:2], dtype=torch.bool, device=dev) for d, t in th.items()}
        for d, w in where.items():
            full_its[d][w] = its[d]
            converged[d][w] = g[d].abs().amax(-1) <= tol
        return full_its, converged

    @staticmethod
    def _pair(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A curvature pair per problem, zeroed (skipped) where s.y is not safely positive."""
        sy = (s * y).sum(-1, keepdim=True)
        good = sy > 1e-10 * (y * y).sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.where(good, s, 0.0), torch.where(good, y, 0.0), torch.where(good, 1.0 / sy.clamp_min(1e-30), 0.0)

    @staticmethod
    def _direction(g: torch.Tensor, hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """-H g by the two-loop recursion, per problem (inner products over the last dim)."""
        q = -g
        alphas = []
        for s, y, rho in reversed(hist):
            a = rho * (s * q).sum(-1, keepdim=True)
            alphas.append(a)
            q = q - a * y
        if hist:
            s, y, rho = hist[-1]
            yy = (y * y).sum(-1, keepdim=True)
            gamma = torch.where(yy > 0, (s * y).sum(-1, keepdim=True) / yy.clamp_min(1e-30), 0.0)
        else:
            gamma = torch.zeros_like(g[..., :1])
        # no curvature pair yet: a first step of length 1 / max(1, |g|_1) as torch's L-BFGS takes
        first = 1.0 / g.abs().sum(-1, keepdim=True).clamp_min(1.0)
        q = q * torch.where(gamma > 0, gamma, first)
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            q = q + s * (a - rho * (y * q).sum(-1, keepdim=True))
        return q
