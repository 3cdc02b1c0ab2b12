"""``heads sweep --task arc``: which word is each word's head, scored as attachment accuracy over the sentence's
candidates (every other word a token reached, and the root).

The probe scores a candidate head ``j`` of a dependent ``i`` with a linear function of the edge features
``[h_i, h_j, h_i * h_j]``: the ``h_i`` term is the same for every candidate, so it drops out, and the score is
``u . h_j + v . (h_i * h_j)``; the root (which has no state) scores ``w . h_i + b``. A softmax over the candidates
gives the probability of each head, trained by cross-entropy over the training dependents with scikit-learn's L2
scaling (``||theta||^2 / (2 C n)``, the intercept unpenalised), on standardised states, for every C of the grid at
once by the batched L-BFGS of :mod:`heads.probe.lbfgs` (each C its own problem). The objective is convex. C is
chosen on the validation sentences' attachment accuracy; ties: the smaller C.

Sentences are padded into buckets of similar length, so a pass costs about sum(length^2) x hidden per C.

**Control task** (Hewitt & Liang 2019's dependency control): every word type (lower-cased) gets one relative head
offset, drawn once by a seeded hash of the type from the training dependents' offsets (head position - own
position, or "root"); a word's control head is itself plus its type's offset, or the root when that falls outside
the sentence (or on a word no token reached). The same probe, carve and C grid are trained on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embstore.errors import ConfigError
from embstore.store.reader import Store, open_store
from heads.probe.lbfgs import BatchedLBFGS
from heads.probe.scored_setup import combos_for, split_roles_of, validation_rows
from heads.probe.specs import Combo
from heads.probe.word import ID_STRIDE, type_hash
from heads.report import rundir
from heads.report.scored import ScoredRun, write_scored_run

__all__ = ["ArcData", "arc_data", "offset_distribution", "control_heads", "fit_arc_probes", "run_arcs", "ROOT"]

ROOT = -1
"""The head position of the root."""
_CELLS = 1 << 22
"""Most (C x sentence x dependent x candidate) scores of one bucket."""


@dataclass
class ArcData:
    """The sentences of one split: their words (indices into the split's word states) and gold heads."""

    offsets: np.ndarray
    """(n_sentences + 1,) word offsets."""
    heads: np.ndarray
    """(n_words,) int64 gold head position within the sentence, ROOT (-1) for the root."""
    cut: np.ndarray
    """(n_words,) bool: no token reached the word (not a candidate, not a dependent)."""
    sentence_ids: np.ndarray
    """(n_sentences,) source row id of each sentence."""
    types: list[str]
    """(n_words,) lower-cased forms (the control task's keys)."""

    def dependents(self, sentences: np.ndarray) -> np.ndarray:
        """The scored words of ``sentences``: every word a token reached whose head is the root or such a word."""
        out = []
        for s in sentences:
            lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
            for w in range(lo, hi):
                h = self.heads[w]
                if not self.cut[w] and (h == ROOT or not self.cut[lo + h]):
                    out.append(w)
        return np.asarray(out, dtype=np.int64)


def arc_data(store: Store, split: str) -> ArcData:
    if not store.word_poolings:
        raise ConfigError(
            f"--task arc needs word states, and {store.path} has none; extract word-level data with embstore "
            "extract --word-pooling first."
        )
    if not store.has_word_heads:
        raise ConfigError(f"--task arc needs dependency heads, and {store.path} stores none; extract a CoNLL-U file.")
    return ArcData(
        offsets=store.word_offsets(split),
        heads=store.word_heads(split) - 1,
        cut=store.word_cut(split),
        sentence_ids=store.row_ids(split).astype(np.int64),
        types=[f.lower() for f in store.word_forms(split)],
    )


_ROOT_OFFSET = np.iinfo(np.int64).min
"""The offset that stands for "the root"."""


def offset_distribution(data: ArcData, sentences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, their cumulative distribution) over the dependents of ``sentences`` (head position - own
    position; :data:`_ROOT_OFFSET` for the root)."""
    deps = data.dependents(sentences)
    sent_of = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    pos = np.arange(len(data.heads)) - data.offsets[sent_of]
    offsets = np.where(data.heads[deps] == ROOT, _ROOT_OFFSET, data.heads[deps] - pos[deps])
    values, counts = np.unique(offsets, return_counts=True)
    return values, np.cumsum(counts) / counts.sum()


def control_heads(data: ArcData, distribution: tuple[np.ndarray, np.ndarray], seed: int) -> np.ndarray:
    """(n_words,) every word's control-task head (see the module docstring): its type's offset, drawn once from
    ``distribution`` (:func:`offset_distribution` of the training sentences) by a seeded hash of the type."""
    values, cdf = distribution
    sent_of = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    pos = np.arange(len(data.heads)) - data.offsets[sent_of]
    drawn: dict[str, int] = {}
    out = np.full(len(data.heads), ROOT, dtype=np.int64)
    for w, t in enumerate(data.types):
        if t not in drawn:
            drawn[t] = int(values[min(int(np.searchsorted(cdf, type_hash(t, seed), side="right")), len(values) - 1)])
        o = drawn[t]
        lo = int(data.offsets[sent_of[w]])
        n = int(data.offsets[sent_of[w] + 1]) - lo
        target = int(pos[w]) + o if o != _ROOT_OFFSET else -1
        if 0 <= target < n and target != pos[w] and not data.cut[lo + target]:
            out[w] = target
    return out


class _Buckets:
    """Sentences padded into buckets of similar length: standardised states (B, L, d), candidate masks, and the
    dependents' rows and gold candidate index (L for the root)."""

    def __init__(
        self,
        states: np.ndarray,
        data: ArcData,
        sentences: np.ndarray,
        gold: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        k: int,
    ) -> None:
        lengths = np.diff(data.offsets)[sentences]
        order = sentences[np.argsort(-lengths, kind="stable")]
        self.parts: list[dict[str, torch.Tensor]] = []
        self.words: list[np.ndarray] = []  # per bucket, (B, L) word index or -1
        self.n_deps = 0
        start = 0
        while start < len(order):
            L = int(np.diff(data.offsets)[order[start]])
            B = max(1, min(len(order) - start, _CELLS // max(1, k * L * max(L, states.shape[1]))))
            chosen = order[start : start + B]
            start += B
            words = np.full((len(chosen), L), -1, dtype=np.int64)
            for b, s in enumerate(chosen):
                lo, hi = int(data.offsets[s]), int(data.offsets[s + 1])
                words[b, : hi - lo] = np.arange(lo, hi)
            real = words >= 0
            cand = real & ~data.cut[np.where(real, words, 0)]
            X = np.zeros((len(chosen), L, states.shape[1]), dtype=np.float32)
            X[real] = (states[words[real]].astype(np.float32) - mean) / scale
            target = np.full(words.shape, -100, dtype=np.int64)  # ignored by cross_entropy
            for b, s in enumerate(chosen):
                lo, hi = int(data.offsets[s]), int(data.offsets[s + 1])
                for w in range(lo, hi):
                    h = gold[w]
                    if data.cut[w] or (h != ROOT and data.cut[lo + h]):
                        continue
                    target[b, w - lo] = L if h == ROOT else h
            self.n_deps += int((target >= 0).sum())
            self.parts.append(
                {"X": torch.from_numpy(X), "cand": torch.from_numpy(cand), "target": torch.from_numpy(target)}
            )
            self.words.append(words)

    @staticmethod
    def logits(theta: torch.Tensor, part: dict[str, torch.Tensor], d: int) -> torch.Tensor:
        """(K, B, L, L + 1) scores of every candidate (the root last) for every C's parameters ``theta`` (K, 3d+1)."""
        X = part["X"]
        u, v, w, b = theta[:, :d], theta[:, d : 2 * d], theta[:, 2 * d : 3 * d], theta[:, 3 * d]
        words = torch.einsum("bld,kd,bmd->kblm", X, v, X) + torch.einsum("kd,bmd->kbm", u, X)[:, :, None, :]
        words = words.masked_fill(~part["cand"][None, :, None, :], float("-inf"))
        eye = torch.eye(X.shape[1], dtype=torch.bool)
        words = words.masked_fill(eye[None, None], float("-inf"))  # a word is not its own head
        root = torch.einsum("kd,bld->kbl", w, X) + b[:, None, None]
        return torch.cat([words, root[..., None]], dim=-1)


def fit_arc_probes(
    train: _Buckets, d: int, c_grid: Sequence[float], max_iter: int, tol: float
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(theta (K, 3d + 1), iterations (K,), converged (K,)) for every C, by the batched L-BFGS."""
    K = len(c_grid)
    n = max(1, train.n_deps)
    inv_c = torch.tensor([1.0 / float(c) for c in c_grid], dtype=torch.float32)
    penal = torch.ones(3 * d + 1)
    penal[-1] = 0.0  # the root intercept is not penalised

    def objective(
        thetas: dict[int, torch.Tensor], active: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        D = 3 * d + 1
        theta = thetas[D][0].detach().clone().requires_grad_(True)  # (K, D)
        data = torch.zeros(K)
        for part in train.parts:
            logits = _Buckets.logits(theta, part, d)  # (K, B, L, L+1)
            target = part["target"]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(K, -1, logits.shape[-1]).transpose(1, 2),
                target.reshape(1, -1).expand(K, -1),
                ignore_index=-100,
                reduction="none",
            ).sum(1)
            data = data + ce
        data = data / n
        reg = 0.5 * inv_c / n * ((theta * theta) * penal).sum(1)
        f = data + reg
        (grad,) = torch.autograd.grad(f.sum(), theta)
        return {D: f.detach()[None]}, {D: data.detach()[None]}, {D: grad[None]}

    D = 3 * d + 1
    thetas = {D: torch.zeros(1, K, D)}
    solver = BatchedLBFGS(objective, thetas, history=10)
    its, conv = solver.run(max_iter, tol)
    return thetas[D][0], its[D][0].numpy(), conv[D][0].numpy()


def _predict(theta: torch.Tensor, buckets: _Buckets, d: int) -> dict[int, np.ndarray]:
    """word -> (K,) predicted head position (ROOT for the root) of every dependent of ``buckets``."""
    out: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for part, words in zip(buckets.parts, buckets.words):
            best = _Buckets.logits(theta, part, d).argmax(-1).numpy()  # (K, B, L)
            L = words.shape[1]
            target = part["target"].numpy()
            for b, li in zip(*np.nonzero(target >= 0)):
                pred = best[:, b, li]
                out[int(words[b, li])] = np.where(pred == L, ROOT, pred)
    return out


def _stats(
    states: np.ndarray, data: ArcData, sentences: np.ndarray, standardize: bool
) -> tuple[np.ndarray, np.ndarray]:
    words = np.concatenate([np.arange(data.offsets[s], data.offsets[s + 1]) for s in sentences])
    words = words[~data.cut[words]]
    x = states[words].astype(np.float64)
    if not standardize:
        return np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    std = x.std(0)
    return x.mean(0).astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def _probe(
    states_tr: np.ndarray,
    states_ev: np.ndarray,
    tr: ArcData,
    ev: ArcData,
    fit: np.ndarray,
    val: np.ndarray,
    ev_sent: np.ndarray,
    gold_tr: np.ndarray,
    gold_ev: np.ndarray,
    cfg: Any,
) -> tuple[np.ndarray, np.ndarray, float, int, list[dict[str, Any]]]:
    """Train along the C grid on ``fit`` sentences, choose C on ``val``; (eval dependents, their predicted heads,
    validation accuracy, chosen C index, history)."""
    d = states_tr.shape[1]
    K = len(cfg.c_grid)
    mean, scale = _stats(states_tr, tr, fit, cfg.standardize)
    theta, its, conv = fit_arc_probes(
        _Buckets(states_tr, tr, fit, gold_tr, mean, scale, K), d, cfg.c_grid, cfg.max_iter, cfg.tol
    )
    val_pred = _predict(theta, _Buckets(states_tr, tr, val, gold_tr, mean, scale, K), d)
    words = np.array(sorted(val_pred), dtype=np.int64)
    acc = (np.stack([val_pred[w] for w in words]) == gold_tr[words][:, None]).mean(0) if len(words) else np.zeros(K)
    k = int(np.argmax(acc))  # ties: the smaller C
    ev_pred = _predict(theta[k : k + 1], _Buckets(states_ev, ev, ev_sent, gold_ev, mean, scale, 1), d)
    deps = np.array(sorted(ev_pred), dtype=np.int64)
    history = [
        {"C": float(c), "val_uas": float(a), "iterations": int(i), "converged": bool(v)}
        for c, a, i, v in zip(cfg.c_grid, acc, its, conv)
    ]
    return deps, np.array([int(ev_pred[w][0]) for w in deps], dtype=np.int64), float(acc[k]), k, history


def run_arcs(config: Any, path: str) -> tuple[Path, dict[str, Any], int]:
    """Train and score every arc configuration of ``config`` (a :class:`heads.probe.sweep.SweepConfig`)."""
    from embstore import __version__

    t0 = time.perf_counter()
    if config.folds:
        raise ConfigError("--task arc scores the evaluation split; --folds is not supported for it yet.")
    if config.heads != ("linear",):
        raise ConfigError(
            f"--task arc trains its own linear arc scorer; leave --head out (got {','.join(config.heads)})."
        )
    cfg = config.head
    store = open_store(path, verify=config.verify)
    data = {s: arc_data(store, s) for s in store.splits}
    n_sent = {s: len(d.offsets) - 1 for s, d in data.items()}
    roles = split_roles_of(
        store.splits,
        n_sent,
        config.train_split,
        config.eval_split,
        config.holdout,
        cfg.seed,
        {s: d.sentence_ids for s, d in data.items()},
        {s: d.sentence_ids for s, d in data.items()},
        path,
    )
    tr, ev = data[roles.train_split], data[roles.eval_split]
    poolings = config.pooling or tuple(store.word_poolings)
    missing = [p for p in poolings if p not in store.word_poolings]
    if missing:
        raise ConfigError(
            f"Pooling {','.join(missing)} is not a word pooling of {path}; it stores {', '.join(store.word_poolings)}."
        )
    combos = combos_for(config.layers, config.combine, poolings, store.layers, "arc")
    control = None
    if config.control_task:
        dist = offset_distribution(tr, roles.train_rows)
        control = (control_heads(tr, dist, cfg.seed), None if ev is tr else control_heads(ev, dist, cfg.seed))
    runs: list[ScoredRun] = []
    states: dict[tuple[str, str], np.ndarray] = {}

    def features(split: str, combo: Combo) -> np.ndarray:
        key = (split, combo.pooling)
        if key not in states:
            states[key] = store.word_states(split, pooling=combo.pooling)
        pos = [store.layout.layer_position(x) for x in combo.layers]
        block = states[key][:, pos]
        if combo.combine == "concat":
            return block.reshape(len(block), -1)
        if combo.combine in ("sum", "mean"):
            x = block.astype(np.float32)
            return x.sum(1) if combo.combine == "sum" else x.mean(1)
        return block[:, 0]

    for seed in range(config.seeds):
        ids = tr.sentence_ids
        fit, val = validation_rows(roles.train_rows, cfg.validation_fraction, seed, ids, ids)
        for combo in combos:
            c0 = time.perf_counter()
            s_tr, s_ev = features(roles.train_split, combo), features(roles.eval_split, combo)
            deps, pred, val_acc, k, history = _probe(
                s_tr, s_ev, tr, ev, fit, val, roles.eval_rows, tr.heads, ev.heads, cfg
            )
            run = ScoredRun(
                key=combo.key,
                seed=seed,
                rows=deps,
                y=ev.heads[deps],
                pred=pred,
                val_score=val_acc,
                hyper={"C": float(cfg.c_grid[k])},
                params=3 * s_tr.shape[1] + 1,
                history=history,
                ids=_ids(ev, deps),
            )
            if control is not None:
                ctrl_tr = control[0]
                ctrl_ev = ctrl_tr if control[1] is None else control[1]
                c_deps, c_pred, c_val, _, _ = _probe(
                    s_tr, s_ev, tr, ev, fit, val, roles.eval_rows, ctrl_tr, ctrl_ev, cfg
                )
                at = {int(w): i for i, w in enumerate(c_deps)}
                # the control's dependents are those whose control head a token reached: score the task's rows
                keep = np.array([int(w) in at for w in deps])
                run.rows, run.y, run.pred = deps[keep], run.y[keep], run.pred[keep]
                run.ids = {n: v[keep] for n, v in run.ids.items()}
                run.control_pred = c_pred[[at[int(w)] for w in run.rows]]
                run.control_y = ctrl_ev[run.rows]
                run.val_control = c_val
            run.seconds = time.perf_counter() - c0
            runs.append(run)
    meta = {
        "kind": "sweep",
        "store": path,
        "store_fingerprint": store.fingerprint,
        "model": store.provenance.model_name,
        "config": config.to_dict(),
        "task": {
            "task": "arc",
            "label": "head",
            "definition": "every word a token reached is a dependent; its candidates are the other such words of its "
            "sentence and the root; scored by attachment accuracy (unlabelled)",
            "word_pooling": list(poolings),
            "probe": "a linear scorer of the edge features [h_dep, h_head, h_dep * h_head] (the root: a linear "
            "function of h_dep), softmax over the candidates, L2 along the C grid "
            + ", ".join(f"{c:g}" for c in cfg.c_grid)
            + " (batched L-BFGS), C chosen on validation attachment accuracy",
            "control_task": None
            if control is None
            else {
                "definition": "every word type (lower-cased) gets one relative head offset, drawn by a seeded hash of "
                "the type from the training dependents' offsets (or the root); outside the sentence: the root",
                "citation": "Hewitt & Liang (2019), Designing and Interpreting Probes with Control Tasks, EMNLP",
            },
        },
        "train_split": roles.train_split,
        "eval_split": roles.eval_split,
        "train_rows": int(len(tr.dependents(roles.train_rows))),
        "eval_rows": int(len(runs[0].rows)) if runs else 0,
        "validation": f"a seeded {cfg.validation_fraction:g} carve of the training sentences",
        "notes": [],
        "embstore": __version__,
    }
    run_dir = rundir.run_dir(config.out, f"sweep-{Path(path).stem[:40]}")
    t_train = time.perf_counter() - t0
    rows, best, _ = write_scored_run(run_dir, meta, "attachment", runs, seed=cfg.seed, ci=config.ci)
    import json

    from heads.report.rundir import RUN_FILE

    written = json.loads((run_dir / RUN_FILE).read_text())
    written["timings"] = {"train_s": round(t_train, 4), "total_s": round(time.perf_counter() - t0, 4)}
    (run_dir / RUN_FILE).write_text(json.dumps(written, indent=2, default=str) + "\n")
    b = next(r for r in rows if r.key == best)
    best_out = {
        "layers": best[0],
        "combine": best[1],
        "pooling": best[2],
        "head": best[3],
        "metric": "attachment accuracy",
        "value": b.value,
        "value_lo": b.value_lo,
        "value_hi": b.value_hi,
        "val_value": b.val_value,
    }
    return run_dir, best_out, len(rows)


def _ids(data: ArcData, words: np.ndarray) -> dict[str, np.ndarray]:
    sent_of = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    pos = np.arange(len(data.heads)) - data.offsets[sent_of]
    return {
        "sentence_id": data.sentence_ids[sent_of[words]],
        "word_id": pos[words],
        "row_id": data.sentence_ids[sent_of[words]] * ID_STRIDE + pos[words],
    }
