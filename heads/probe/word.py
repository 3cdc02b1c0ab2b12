"""Word and edge tasks: every word (or every dependent-head pair) of a store of word-level data is one example.

:class:`ExampleStore` is a read-only view of a store whose rows are the examples of one task, with the
:class:`embstore.store.reader.Store` interface a sweep reads (rows, labels, groups, row ids, pooled features,
layout), so every part of a sweep works on it unchanged: the feature bank, the L-BFGS C path, the stacked heads,
validation selection, intervals, McNemar against the best, Holm, ``--control STORE`` and ``predictions.npz``.

* ``--task word``: example = a word; features = its state (``(n, layers, hidden)``), label = a stored word label.
* ``--task edge``: example = a word and its head (the root, which has no state, is not an edge); features =
  ``[h_dep, h_head, h_dep * h_head]`` (``(n, layers, 3 * hidden)``), label = the dependent's word label.

The "poolings" of the view are the store's word poolings. Its groups are the sentences: every carve and fold keeps a
sentence's words on one side. Words no token reached (``cut``) are left out, and so are evaluation words whose label
never occurs in the training split (no probe could learn it); both are counted in the run's notes.

**Control tasks** (Hewitt & Liang 2019): :func:`control_labels` gives every word type (lower-cased form; for edges
the pair of the dependent's and the head's types) one label drawn once, by a seeded hash of the type, from the
empirical label distribution of the training examples. The same probe, carve and C grid are trained on those labels
(:func:`heads.probe.sweep.run_sweep`), and selectivity = accuracy - control accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.errors import ConfigError
from embstore.layers import parse_layers
from embstore.store import layout as L
from embstore.store.reader import Store

__all__ = [
    "TASKS",
    "CLASSIFICATION_TASKS",
    "ID_STRIDE",
    "Examples",
    "ExampleStore",
    "word_examples",
    "edge_examples",
    "control_labels",
    "type_hash",
]

TASKS = ("sentence", "word", "edge", "arc", "regression")
"""What ``heads sweep --task`` takes."""
CLASSIFICATION_TASKS = ("sentence", "word", "edge")
"""Tasks whose examples are classified by the sweep's own heads (arc and regression have their own probes)."""
ID_STRIDE = 1 << 16
"""An example's id is ``sentence row id * ID_STRIDE + word position`` (a sentence has fewer words than this)."""
_CHUNK = 8192


@dataclass(frozen=True)
class Examples:
    """The examples of one split: which words they read and their labels."""

    dep: np.ndarray
    """(n,) int64 the example's word (the dependent, for edges): an index into the split's words."""
    head: np.ndarray | None
    """(n,) int64 the head word of an edge example; None for word examples."""
    y: np.ndarray
    """(n,) int64 label index into the view's label names."""
    sentence: np.ndarray
    """(n,) int64 the sentence's source row id (its group)."""
    position: np.ndarray
    """(n,) int64 the word's 0-based position in its sentence."""
    head_position: np.ndarray | None = None
    """(n,) int64 the head's position (edges)."""
    types: list[str] | None = None
    """The control task's key of each example: the lower-cased word type (edges: 'dep<TAB>head')."""

    def __len__(self) -> int:
        return len(self.dep)

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 unique example ids: sentence row id * ID_STRIDE + position."""
        return self.sentence * ID_STRIDE + self.position

    def take(self, keep: np.ndarray) -> "Examples":
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return Examples(
            dep=self.dep[keep],
            head=pick(self.head),
            y=self.y[keep],
            sentence=self.sentence[keep],
            position=self.position[keep],
            head_position=pick(self.head_position),
            types=None if self.types is None else [self.types[i] for i in np.flatnonzero(keep)],
        )


def _label_values(store: Store, split: str, label: str) -> tuple[np.ndarray, list[str]]:
    names = store.word_label_names
    if label not in names:
        raise ConfigError(
            f"--label {label!r} is not a word label of {store.path}; its word labels are {', '.join(names) or 'none'}."
        )
    return store.word_labels(split, label), names[label]


def word_examples(store: Store, split: str, label: str) -> tuple[Examples, list[str]]:
    """Every word of ``split`` that a token reached, labelled by word label ``label``; (examples, label values)."""
    y, values = _label_values(store, split, label)
    sentence_rows = store.word_sentence(split)
    ids = store.row_ids(split)[sentence_rows]
    forms = store.word_forms(split)
    keep = ~store.word_cut(split)
    ex = Examples(
        dep=np.arange(len(y), dtype=np.int64),
        head=None,
        y=y,
        sentence=ids.astype(np.int64),
        position=store.word_position(split),
        types=[f.lower() for f in forms],
    )
    return ex.take(keep), values


def edge_examples(store: Store, split: str, label: str) -> tuple[Examples, list[str]]:
    """Every (word, its head) pair of ``split`` whose words a token reached (root attachments have no head word),
    labelled by the dependent's word label ``label``; (examples, label values)."""
    if not store.has_word_heads:
        raise ConfigError(
            f"--task edge needs every word's dependency head, and {store.path} stores none; extract a CoNLL-U file "
            "or a word table with a 'head' column."
        )
    y, values = _label_values(store, split, label)
    heads = store.word_heads(split)
    offsets = store.word_offsets(split)
    sentence_rows = store.word_sentence(split)
    position = store.word_position(split)
    cut = store.word_cut(split)
    forms = [f.lower() for f in store.word_forms(split)]
    dep = np.flatnonzero(heads > 0)
    head = offsets[sentence_rows[dep]] + heads[dep] - 1
    keep = ~cut[dep] & ~cut[head]
    dep, head = dep[keep], head[keep]
    ex = Examples(
        dep=dep.astype(np.int64),
        head=head.astype(np.int64),
        y=y[dep],
        sentence=store.row_ids(split)[sentence_rows[dep]].astype(np.int64),
        position=position[dep],
        head_position=position[head],
        types=[f"{forms[d]}\t{forms[h]}" for d, h in zip(dep, head)],
    )
    return ex, values


def type_hash(key: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends on ``key`` and ``seed`` alone (blake2b)."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def control_labels(types: Sequence[str], distribution: np.ndarray, seed: int) -> np.ndarray:
    """(n,) int64 the control label of every example: each type's label is drawn once from ``distribution`` (the
    (classes,) empirical label distribution of the training examples) by :func:`type_hash` of the type, so it is a
    function of the type alone (and the seed)."""
    cdf = np.cumsum(np.asarray(distribution, dtype=np.float64))
    cdf /= cdf[-1]
    drawn: dict[str, int] = {}
    out = np.empty(len(types), dtype=np.int64)
    for i, t in enumerate(types):
        if t not in drawn:
            drawn[t] = min(int(np.searchsorted(cdf, type_hash(t, seed), side="right")), len(cdf) - 1)
        out[i] = drawn[t]
    return out


class _Layout:
    """The part of :class:`embstore.store.layout.StoreLayout` a sweep reads, for the examples."""

    def __init__(self, base: L.StoreLayout, rows: dict[str, int], poolings: tuple[str, ...]) -> None:
        self.dtype = base.dtype
        self.layers = base.layers
        self.poolings = poolings
        self.towers = base.towers
        self.token_layers: tuple[int, ...] = ()
        self.hidden = base.hidden
        self.splits = {
            s: L.SplitLayout.plan(n, _CHUNK, n_tokens={}) if n else L.SplitLayout(n_rows=0, chunk_rows=1, n_tokens={})
            for s, n in rows.items()
        }

    def layer_position(self, layer: int) -> int:
        return self.layers.index(layer)


class ExampleStore:
    """A store seen as the examples of one word or edge task (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        task: str,
        label: str,
        examples: dict[str, Examples],
        label_names: list[str],
        notes: list[str],
    ) -> None:
        self.base, self.task, self.label = store, task, label
        self.examples = examples
        self._label_names = label_names
        self.notes = notes
        self.path = store.path
        self.fingerprint = store.fingerprint
        self.provenance = dataclasses.replace(store.provenance, group_col="sentence")
        self.meta = store.meta
        self.modality = store.modality
        self.layout = _Layout(store.layout, {s: len(e) for s, e in examples.items()}, tuple(store.word_poolings))
        width = 3 if task == "edge" else 1
        self.hidden = store.hidden * width
        self._states: dict[tuple[str, str], np.ndarray] = {}

    @classmethod
    def open(cls, store: Store, task: str, label: str, splits: Sequence[str], train_split: str) -> "ExampleStore":
        """The examples of ``task`` over ``label`` in ``splits``; label values are those of the training split."""
        if task not in ("word", "edge"):
            raise ConfigError(f"ExampleStore takes --task word or edge; got {task!r}.")
        if not store.word_poolings:
            raise ConfigError(
                f"--task {task} needs word states, and {store.path} has none; extract word-level data (a CoNLL-U "
                "file, or a table with a 'tokens' list column) with embstore extract --word-pooling first."
            )
        make = word_examples if task == "word" else edge_examples
        if train_split not in store.splits and len(store.splits) == 1:
            train_split = store.splits[0]  # a one-split store: the sweep carves it
        if train_split not in store.splits:
            raise ConfigError(
                f"--train-split {train_split!r} is not in {store.path}; its splits are {', '.join(store.splits)}."
            )
        found: dict[str, Examples] = {}
        values: list[str] = []
        for split in dict.fromkeys([train_split, *splits]):
            if split not in store.splits:
                continue
            found[split], values = make(store, split, label)
        train = found[train_split]
        present = np.unique(train.y)
        remap = np.full(len(values), -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        notes = []
        cut = {s: int(store.word_cut(s).sum()) for s in found}
        if any(cut.values()):
            notes.append(
                "words no token reached (cut off by --max-length at extraction) were left out: "
                + ", ".join(f"{n} of split {s}" for s, n in cut.items())
            )
        for split, ex in found.items():
            y = remap[ex.y]
            unseen = y < 0
            if unseen.any():
                notes.append(
                    f"{int(unseen.sum())} example(s) of split {split!r} have a {label} value no training example "
                    f"has ({', '.join(sorted({values[v] for v in ex.y[unseen]})[:8])}); they were left out"
                )
            found[split] = dataclasses.replace(ex.take(~unseen), y=y[~unseen])
        return cls(store, task, label, found, [values[v] for v in present], notes)

    # -- the Store interface a sweep reads ------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return list(self.examples)

    @property
    def layers(self) -> list[int]:
        return list(self.base.layers)

    @property
    def poolings(self) -> list[str]:
        return list(self.base.word_poolings)

    @property
    def towers(self) -> list[str]:
        return list(self.base.towers)

    @property
    def token_layers(self) -> list[int]:
        return []

    @property
    def label_names(self) -> list[str]:
        return list(self._label_names)

    @property
    def group_names(self) -> None:
        return None

    def _ex(self, split: str) -> Examples:
        if split not in self.examples:
            raise ConfigError(f"Split {split!r} is not in {self.path}; its splits are {', '.join(self.splits)}.")
        return self.examples[split]

    def n_rows(self, split: str) -> int:
        return len(self._ex(split))

    def labels(self, split: str) -> np.ndarray:
        return self._ex(split).y

    def row_ids(self, split: str) -> np.ndarray:
        return self._ex(split).ids

    def groups(self, split: str) -> np.ndarray:
        """(n,) every example's sentence: no carve cuts through one."""
        return self._ex(split).sentence

    def augmented(self, split: str) -> np.ndarray:
        return np.zeros(self.n_rows(split), dtype=bool)

    def durations(self, split: str) -> None:
        """Word-level data is text: no seconds of audio."""
        return None

    def n_tokens(self, split: str, tower: str | None = None) -> np.ndarray:
        """(n,) tokens of each example's sentence after truncation (the lengths data.png draws)."""
        ids = self.base.row_ids(split)
        order = np.argsort(ids, kind="stable")
        at = order[np.searchsorted(ids, self._ex(split).sentence, sorter=order)]
        return self.base.n_tokens(split, tower)[at]

    def _word_states(self, split: str, pooling: str) -> np.ndarray:
        """(n_words, layers, hidden) of the split's words, read once per (split, pooling)."""
        key = (split, pooling)
        if key not in self._states:
            if pooling not in self.base.word_poolings:
                raise ConfigError(
                    f"Pooling {pooling!r} is not a word pooling of {self.path}; it stores "
                    f"{', '.join(self.base.word_poolings)}."
                )
            self._states[key] = self.base.word_states(split, pooling=pooling)
        return self._states[key]

    def pooled(
        self, split: str, pooling: str, layers: str | Sequence[int] | None = None, tower: str | None = None
    ) -> np.ndarray:
        """The examples' features ``(n, len(layers), hidden)`` (edges: ``3 * hidden`` wide) in the stored dtype."""
        return self.pooled_rows(split, pooling, 0, self.n_rows(split), layers, tower)

    def pooled_rows(
        self,
        split: str,
        pooling: str,
        start: int,
        stop: int,
        layers: str | Sequence[int] | None = None,
        tower: str | None = None,
    ) -> np.ndarray:
        ex = self._ex(split)
        chosen = self.layers if layers is None else parse_layers(layers, self.layers)
        pos = [self.base.layout.layer_position(x) for x in chosen]
        states = self._word_states(split, pooling)
        dep = states[ex.dep[start:stop]][:, pos]  # (rows, k, hidden)
        if ex.head is None:
            return dep
        head = states[ex.head[start:stop]][:, pos]
        product = (dep.astype(np.float32) * head.astype(np.float32)).astype(dep.dtype)
        return np.concatenate([dep, head, product], axis=2)

    def tokens(self, split: str, layer: int, tower: str | None = None) -> Any:
        raise ConfigError(f"--task {self.task} reads word states; the token heads (rnn, gru, lstm) do not apply.")

    def prediction_ids(self, split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The ids ``predictions.npz`` keeps of the examples at ``rows``: sentence (source row id), word position,
        and for edges the head's position."""
        ex = self._ex(split)
        out = {"sentence_id": ex.sentence[rows], "word_id": ex.position[rows]}
        if ex.head_position is not None:
            out["head_id"] = ex.head_position[rows]
        return out

    def control_task_labels(self, train_rows: np.ndarray | None, train_split: str, seed: int) -> dict[str, np.ndarray]:
        """Every split's control-task labels, drawn from the label distribution of the training examples
        (``train_rows`` of ``train_split``; None: all of them)."""
        y = self._ex(train_split).y
        dist = np.bincount(y if train_rows is None else y[train_rows], minlength=len(self._label_names))
        dist = dist.astype(np.float64)
        return {s: control_labels(ex.types or [], dist, seed) for s, ex in self.examples.items()}

    def close(self) -> None:
        self.base.close()
