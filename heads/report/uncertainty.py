"""How sure an answer is: bootstrap intervals over the evaluation rows, paired tests against the best, Holm.

Everything is plain numpy (plus ``scipy.special`` for the binomial tail), vectorised over resamples and models:

* :func:`bootstrap_scores` scores many prediction vectors of the same rows on the same resamples. A resample is a
  row of counts (how often each evaluation row is drawn; ``n`` draws with replacement), drawn from one seeded
  generator block by block, so every model sees the very same resamples and differences between models are
  paired. Accuracy and macro-F1 of all models on all resamples come from one matrix product per block:
  ``counts (resamples, rows) @ indicators (rows, columns)``, the columns being each class's support and, per
  model, its hits, true positives and predictions per class.
* :func:`percentile_interval` is the 95% percentile interval of such a distribution.
* :func:`mcnemar_p` is the exact McNemar test on correctness (a two-sided binomial test of the discordant pairs,
  equal to ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``); :func:`holm` is Holm's step-down correction.

Macro-F1 follows :func:`heads.report.metrics.metrics_from_confusion`: every class counts, a class with no support
and no prediction in a resample scores 0 (zero_division=0), so an interval is of the very metric the table shows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["N_RESAMPLES", "LEVEL", "resample_counts", "bootstrap_scores", "percentile_interval", "mcnemar_p", "holm"]

N_RESAMPLES = 2000
"""Bootstrap resamples per interval."""
LEVEL = 0.95
"""Coverage of every interval; also 1 - the significance level of the paired tests (0.05)."""
_CELLS = 8_000_000
"""Most (resample x row) counts held at once: blocks of resamples are cut to this size."""


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(seed) if isinstance(seed, Sequence) else int(seed)))


def resample_counts(n: int, n_resamples: int = N_RESAMPLES, seed: int | Sequence[int] = 0) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples of ``n`` rows, each (block, n) float32: how often each row is drawn.

    The same ``seed`` gives the same resamples (block boundaries do not change them: each resample is ``n`` draws
    from one generator, in order)."""
    rng = _rng(seed)
    per_block = max(1, min(n_resamples, _CELLS // max(1, n)))
    for start in range(0, n_resamples, per_block):
        b = min(per_block, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (np.arange(b, dtype=np.int64)[:, None] * n + idx).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float32)


def bootstrap_scores(
    y: np.ndarray, preds: np.ndarray, n_classes: int, *, n_resamples: int = N_RESAMPLES, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of every model on every resample: two (models, n_resamples) float64 arrays.

    ``y`` (n,) true labels; ``preds`` (models, n) predicted labels of the same rows, in the same order.
    """
    y = np.asarray(y, dtype=np.int64)
    preds = np.atleast_2d(np.asarray(preds, dtype=np.int64))
    m, n = preds.shape
    K = n_classes
    if n == 0:
        nan = np.full((m, n_resamples), np.nan)
        return nan, nan.copy()
    eye = np.eye(K, dtype=np.float32)
    support = eye[y]  # (n, K)
    # columns per model: hits (1), true positives per class (K), predictions per class (K)
    width = 2 * K + 1
    group = max(1, min(m, (_CELLS // max(1, n)) // width))
    acc = np.empty((m, n_resamples))
    f1 = np.empty((m, n_resamples))
    done = 0
    for counts in resample_counts(n, n_resamples, seed):
        b = len(counts)
        sup = counts @ support  # (b, K)
        for g in range(0, m, group):
            p = preds[g : g + group]
            onehot = eye[p]  # (models, n, K)
            hit = (p == y[None, :]).astype(np.float32)[..., None]  # (models, n, 1)
            cols = np.concatenate([hit, onehot * support[None], onehot], axis=2)  # (models, n, width)
            s = counts @ cols.transpose(1, 0, 2).reshape(n, -1)  # (b, models * width)
            s = s.reshape(b, len(p), width).astype(np.float64)
            acc[g : g + group, done : done + b] = (s[..., 0] / n).T
            tp, predicted = s[..., 1 : K + 1], s[..., K + 1 :]
            denom = predicted + sup[:, None, :]
            per_class = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
            f1[g : g + group, done : done + b] = per_class.mean(-1).T
        done += b
    return acc, f1


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the ``level`` percentile interval along the last axis (linear interpolation, numpy's default)."""
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100.0 - tail], axis=-1)
    return lo, hi


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, int, int]:
    """(p, b, c): exact McNemar test of two classifiers' correctness on the same rows.

    ``b`` rows only ``a`` gets right, ``c`` rows only ``b`` gets right; p is the two-sided binomial test of b
    successes in b + c trials at 0.5 (1 when b + c = 0). The binomial at 0.5 is symmetric, so the two-sided p
    (scipy's: every outcome no more likely than the observed one) is twice the smaller tail, at most 1.
    """
    from scipy.special import bdtr

    a = np.asarray(correct_a, dtype=bool)
    other = np.asarray(correct_b, dtype=bool)
    b = int((a & ~other).sum())
    c = int((~a & other).sum())
    if b + c == 0:
        return 1.0, b, c
    k = min(b, c)
    return float(min(1.0, 2.0 * bdtr(k, b + c, 0.5))), b, c


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted
