"""Ridge regression along a penalty grid in one pass over the data (the structural probes' and place-and-time
probes' model: Hewitt & Manning 2019, Gurnee & Tegmark 2023; himalaya solves many penalties the same way).

For standardised features ``X`` (the fitting rows' mean and std, as ``StandardScaler``) and a centred target, the
solution of scikit-learn's ``Ridge(alpha)`` objective ``||y - X w - b||^2 + alpha ||w||^2`` is, with the
eigendecomposition ``X^T X = Q diag(lam) Q^T`` and ``c = Q^T X^T y``::

    w(alpha) = Q diag(1 / (lam + alpha)) c            b = mean(y) - mean(X) w

so the data are read once to accumulate ``X^T X`` and ``X^T y`` (in float64, block by block), one ``eigh`` gives
every penalty, and the validation predictions of every penalty come from one product ``(X_val Q) C`` with
``C = c / (lam + alpha)`` per column. Plain numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHAS", "RidgePath", "fit_ridge_path", "Blocks"]

ALPHAS = (1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5)
"""The default penalty grid (scikit-learn's ``alpha``; on standardised features, so it does not depend on scale)."""

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
"""A re-iterable source of (features (b, d) float32, targets (b,)) blocks of the rows."""


@dataclass
class RidgePath:
    """Every penalty's solution of one ridge problem."""

    alphas: np.ndarray
    """(A,) the penalties."""
    weights: np.ndarray
    """(A, d) weights on the inputs as given (the standardisation folded in)."""
    intercepts: np.ndarray
    """(A,) intercepts."""
    mean: np.ndarray
    """(d,) the fitting rows' feature means."""
    scale: np.ndarray
    """(d,) the fitting rows' feature standard deviations (1 where constant, or without standardising)."""

    def predict(self, X: np.ndarray, which: int | None = None) -> np.ndarray:
        """(n, A) predictions of every penalty, or (n,) of penalty ``which``."""
        X = np.asarray(X, dtype=np.float64)
        if which is not None:
            return X @ self.weights[which] + self.intercepts[which]
        return X @ self.weights.T + self.intercepts[None, :]


def _moments(blocks: Blocks, d: int) -> tuple[int, np.ndarray, np.ndarray, float]:
    """(rows, feature sums (d,), sums of squares (d,), target sum)."""
    n, s, ss, ys = 0, np.zeros(d), np.zeros(d), 0.0
    for X, y in blocks():
        X64 = X.astype(np.float64)
        n += len(X)
        s += X64.sum(0)
        ss += (X64 * X64).sum(0)
        ys += float(np.sum(y, dtype=np.float64))
    return n, s, ss, ys


def fit_ridge_path(blocks: Blocks, d: int, alphas: Sequence[float] = ALPHAS, *, standardize: bool = True) -> RidgePath:
    """Ridge along ``alphas`` (scikit-learn's ``Ridge(alpha, fit_intercept=True)`` on the standardised features, or
    on the raw ones without ``standardize``) from two passes over ``blocks``: one for the means and scales, one for
    ``X^T X`` and ``X^T y`` of the standardised, centred rows."""
    n, s, ss, ysum = _moments(blocks, d)
    if n == 0:
        raise ValueError("ridge needs at least one fitting row")
    mean = s / n
    var = np.maximum(ss / n - mean * mean, 0.0)
    scale = np.where(var > 1e-12 * np.maximum(1.0, mean * mean), np.sqrt(var), 1.0) if standardize else np.ones(d)
    y_mean = ysum / n
    xtx = np.zeros((d, d))
    xty = np.zeros(d)
    for X, y in blocks():
        Z = ((X.astype(np.float64) - mean) / scale).astype(np.float32)
        xtx += (Z.T @ Z).astype(np.float64)
        xty += Z.astype(np.float64).T @ (np.asarray(y, dtype=np.float64) - y_mean)
    lam, Q = np.linalg.eigh((xtx + xtx.T) / 2)
    lam = np.maximum(lam, 0.0)
    c = Q.T @ xty  # (d,)
    a = np.asarray(alphas, dtype=np.float64)
    coef = (c[None, :] / (lam[None, :] + a[:, None])) @ Q.T  # (A, d) on the standardised inputs
    weights = coef / scale[None, :]
    intercepts = y_mean - weights @ mean
    return RidgePath(alphas=a, weights=weights, intercepts=intercepts, mean=mean, scale=scale)
