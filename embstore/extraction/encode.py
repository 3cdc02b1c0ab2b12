"""The hot loop: tokenize, sort by length, batch under a token budget, run the frozen model (up
to the last layer asked for, :mod:`embstore.extraction.forward`), pool every chosen layer, and hand finished
row chunks to a background writer."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embstore.errors import EmbstoreError, ForwardError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from embstore.extraction.textspec import TextSpec

__all__ = [
    "Encoded",
    "tokenize",
    "length_order",
    "make_batches",
    "pad_batch",
    "pad_mask",
    "ChunkJob",
    "ChunkBuffers",
    "ChunkEncoder",
]


@dataclass(frozen=True)
class Encoded:
    """Token ids of one tower of one split, in source order."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    lengths: np.ndarray
    """(n,) int32 tokens after truncation."""
    truncated: np.ndarray
    """(n,) bool: longer than max_length before truncation (with a template: cut inside the text)."""
    text_mask: list[np.ndarray] | None = None
    """Per row (tokens,) bool, its own text tokens, with ``--pool-tokens text`` (:mod:`embstore.extraction.textspec`);
    None: mean and max cover every token."""

    def rows(
        self, index: Sequence[int] | np.ndarray
    ) -> tuple[list[list[int]], list[list[int]] | None, list[np.ndarray] | None]:
        """(ids, type ids, text masks) of rows ``index``, in that order: one tower of a :class:`ChunkJob`."""
        return (
            [self.ids[i] for i in index],
            None if self.type_ids is None else [self.type_ids[i] for i in index],
            None if self.text_mask is None else [self.text_mask[i] for i in index],
        )


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    spec: TextSpec | None = None,
) -> Encoded:
    """Tokenize with truncation as ``spec`` says (template, chat template, which tokens are text; None: the text
    alone, every token pooled), counting truncations (:func:`embstore.extraction.textspec.tokenize_text`)."""
    from embstore.extraction.textspec import TextSpec, tokenize_text

    out = tokenize_text(tokenizer, spec or TextSpec(), texts, pairs, max_length)
    lengths = np.fromiter((len(x) for x in out.ids), dtype=np.int32, count=len(out.ids))
    return Encoded(
        ids=out.ids, type_ids=out.type_ids, lengths=lengths, truncated=out.truncated, text_mask=out.text_mask
    )


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Longest first (an out-of-memory batch fails at once), ties by source position; deterministic."""
    return np.lexsort((np.arange(len(lengths)), -lengths.astype(np.int64)))


def make_batches(lengths: np.ndarray, batch_size: int, token_budget: int) -> list[tuple[int, int]]:
    """Split consecutive rows into [start, stop) batches whose padded size (rows x longest
    row) stays within ``token_budget`` and ``batch_size`` (a single row may exceed the budget).
    Sorted longest first, the first row of each batch sets its width; unsorted rows still fit."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        width = max(1, int(lengths[start]))
        stop = start + 1
        while stop < n and stop - start < batch_size:
            wider = max(width, int(lengths[stop]))
            if (stop - start + 1) * wider > token_budget:
                break
            width, stop = wider, stop + 1
        out.append((start, stop))
        start = stop
    return out


def pad_mask(masks: Sequence[np.ndarray], width: int) -> np.ndarray:
    """(B, width) bool: each row's text-token mask, right-padded with False."""
    out = np.zeros((len(masks), width), dtype=bool)
    for i, m in enumerate(masks):
        out[i, : len(m)] = m
    return out


def pad_batch(ids: Sequence[list[int]], type_ids: Sequence[list[int]] | None, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest row: input_ids, attention_mask (and token_type_ids), int64 (B, T)."""
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if type_ids is not None:
        tt = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(type_ids):
            tt[i, : len(row)] = row
        out["token_type_ids"] = tt
    return out


def _where(job: ChunkJob, tower: str) -> str:
    """The row chunk of ``job`` (and its tower, when a pair is encoded as two), as errors name it."""
    towers = f", tower {tower!r}" if len(job.towers) > 1 else ""
    return f"row chunk {job.chunk} of split {job.split!r}{towers}"


Prepared = tuple[dict[str, Any], np.ndarray, "np.ndarray | None"]
"""One batch ready for the forward: staged inputs, (B,) output lengths, (B, T) pooled-token mask or None."""


@dataclass(frozen=True)
class ChunkJob:
    """One row chunk to encode: for each tower, the ids of its rows in stored order."""

    split: str
    chunk: int
    towers: dict[str, Any]
    """Text: tower -> (token ids, token type ids or None, text masks or None), see :meth:`Encoded.rows`. Audio:
    'audio' -> list of AudioItem."""
    words: list[np.ndarray] | None = None
    """Word-level rows (``--word-pooling``): per row of the (single) text tower, its words' (n_words, 2) token
    ranges (:class:`embstore.extraction.words.WordAlignment`)."""

    @property
    def n_rows(self) -> int:
        first = next(iter(self.towers.values()))
        return len(first[0]) if isinstance(first, tuple) else len(first)


class ChunkBuffers:
    """The arrays of one row chunk, filled batch by batch: pooled (k, n, hidden) per pooling and
    flat per-token (total tokens, hidden) per token layer, rows at ``offsets``."""

    def __init__(self, n_layers: int, n_rows: int, offsets: np.ndarray, dtype: np.dtype) -> None:
        self.n_layers, self.n_rows, self.offsets, self.dtype = n_layers, n_rows, offsets, dtype
        self.pooled: dict[str, np.ndarray] = {}
        self.tokens: dict[int, np.ndarray] = {}
        self.words: dict[str, np.ndarray] = {}
        self.word_offsets: np.ndarray | None = None
        """(n_rows + 1,) word offsets of the chunk's rows, when it stores word states."""

    def put(self, start: int, stop: int, pooled: dict[str, np.ndarray], tokens: dict[int, np.ndarray]) -> None:
        """Store one batch's outputs for rows [start, stop)."""
        for p, v in pooled.items():
            if p not in self.pooled:
                self.pooled[p] = np.empty((self.n_layers, self.n_rows, v.shape[2]), dtype=self.dtype)
            self.pooled[p][:, start:stop] = v
        for layer, v in tokens.items():
            if layer not in self.tokens:
                self.tokens[layer] = np.empty((int(self.offsets[-1]), v.shape[1]), dtype=self.dtype)
            self.tokens[layer][self.offsets[start] : self.offsets[stop]] = v

    def put_words(self, start: int, stop: int, words: dict[str, np.ndarray]) -> None:
        """Store one batch's word states (pooling -> (k, words, hidden)) for rows [start, stop)."""
        assert self.word_offsets is not None  # set by the encoder before the batches run
        lo, hi = int(self.word_offsets[start]), int(self.word_offsets[stop])
        for p, v in words.items():
            if p not in self.words:
                self.words[p] = np.zeros((self.n_layers, int(self.word_offsets[-1]), v.shape[2]), dtype=self.dtype)
            self.words[p][:, lo:hi] = v

    def named(self, name: Callable[[str, int | None], str]) -> dict[str, np.ndarray]:
        """The arrays keyed by ``name(pooling, None)``, ``name('tokens', layer)`` and ``name('words/<pooling>',
        None)``."""
        out = {name(p, None): v for p, v in self.pooled.items()}
        out.update({name("tokens", layer): v for layer, v in self.tokens.items()})
        out.update({name(f"words/{p}", None): v for p, v in self.words.items()})
        return out


class ChunkEncoder:
    """Runs the model over row chunks and yields, per chunk, the arrays the writer stores.

    The forward stops at the highest layer in ``layers`` and ``token_layers``. Within a chunk the
    next batches are padded (or decoded, for audio) in a prefetch thread while the current one
    runs, and batch i is read back only after batch i + 1 was launched, so on CUDA the copy to
    the host overlaps the next forward (see :mod:`embstore.extraction.forward`)."""

    prefetch = 2
    """Batches prepared ahead of the one running."""

    def __init__(
        self,
        model: nn.Module,
        pad_id: int,
        *,
        layers: Sequence[int],
        token_layers: Sequence[int],
        poolings: Sequence[str],
        dtype: str,
        batch_size: int,
        token_budget: int,
        device: str,
        word_poolings: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        from embstore.extraction.forward import BatchForward

        self.model = model
        self.name = name or type(model).__name__
        """The model as errors name it (its ``--model``)."""
        self.pad_id = pad_id
        self.layers = list(layers)
        self.token_layers = list(token_layers)
        self.poolings = list(poolings)
        self.np_dtype = np.dtype(dtype)
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.device = device
        self.word_poolings = list(word_poolings)
        self.forward = BatchForward(
            model,
            layers=self.layers,
            token_layers=self.token_layers,
            poolings=self.poolings,
            dtype=dtype,
            device=device,
            word_poolings=self.word_poolings,
        )
        import inspect

        self.uses_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters

    def _run(
        self,
        split: str,
        spans: Sequence[tuple[int, int]],
        prepare: Callable[[int, int], Prepared],
        buf: ChunkBuffers,
        on_rows: Callable[[int], None] | None,
        words_of: Callable[[int, int], Any] | None = None,
        where: str = "",
    ) -> None:
        """Encode the batches ``spans`` ([start, stop) rows) of ``split`` into ``buf``.

        ``prepare(start, stop)`` returns (staged input tensors, (B,) output lengths, (B, T) pooled-token mask or
        None); it runs in a prefetch thread, ``prefetch`` batches ahead, as does ``words_of(start, stop)``, the
        batch's :class:`embstore.extraction.words.WordIndex` when word states are stored. A batch holding a non-finite
        value once cast to the storage dtype stops the extraction before anything of its row chunk is written
        (:class:`embstore.errors.NonFiniteValuesError`). An exception in the model's forward becomes one
        :class:`ForwardError` naming the model and the batch (``where``: the row chunk)."""
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        from embstore.extraction.forward import Launched

        todo = iter(spans)
        ahead: deque[tuple[tuple[int, int], Future[Prepared], Future[Any] | None]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embstore-prefetch") as pool:

            def refill() -> None:
                while len(ahead) < self.prefetch:
                    span = next(todo, None)
                    if span is None:
                        return
                    ahead.append(
                        (span, pool.submit(prepare, *span), None if words_of is None else pool.submit(words_of, *span))
                    )

            def land(span: tuple[int, int], launched: Launched) -> None:
                bad = launched.bad(self.poolings, self.layers, self.token_layers, self.word_poolings)
                if bad is not None:
                    raise self._non_finite(split, bad)
                buf.put(*span, *launched.result(self.poolings, self.token_layers))
                if launched.words_shape is not None:
                    buf.put_words(*span, launched.words(self.word_poolings))
                if on_rows is not None:
                    on_rows(span[1] - span[0])

            refill()
            waiting: tuple[tuple[int, int], Launched] | None = None
            while ahead:
                span, future, words = ahead.popleft()
                refill()
                inputs, lengths, pool_mask = future.result()
                index = None if words is None else words.result()
                try:
                    launched = self.forward.launch(inputs, lengths, pool_mask, index)
                except EmbstoreError:
                    raise
                except Exception as exc:  # a model bug or an out-of-memory: one line, never a traceback
                    raise self._forward_error(exc, span, inputs, where) from exc
                if waiting is not None:
                    land(*waiting)
                waiting = (span, launched)
            if waiting is not None:
                land(*waiting)

    def _non_finite(self, split: str, bad: Any) -> Exception:
        """The one-line error for a non-finite value (:class:`embstore.extraction.forward.Bad`) in ``split``."""
        from embstore.errors import NonFiniteValuesError

        what = (
            f"per-token states of layer {bad.layer}"
            if bad.what == "tokens"
            else f"layer {bad.layer}, pooling {bad.what}"
        )
        compute = str(next(self.model.parameters()).dtype).replace("torch.", "")
        if bad.from_model:
            fix = (
                f"pass --compute-dtype float32 (it overflowed in {compute})"
                if compute != "float32"
                else "its float32 weights give inf or NaN: check the checkpoint, or store lower --layers"
            )
            return NonFiniteValuesError(
                f"Split {split!r}, {what}: the model produced inf or NaN (computing in {compute}), so it would be "
                f"stored as such; nothing of this row chunk was written and the store is left incomplete: {fix}."
            )
        top = float(np.finfo(self.np_dtype).max)
        return NonFiniteValuesError(
            f"Split {split!r}, {what}: a value of |x| = {bad.largest:.6g} does not fit the storage dtype "
            f"{self.np_dtype.name} (largest {top:.6g}), so it would be stored as inf; nothing of this row chunk was "
            "written and the store is left incomplete: pass --dtype float32."
        )

    def _forward_error(self, exc: Exception, span: tuple[int, int], inputs: dict[str, Any], where: str) -> ForwardError:
        shape = tuple(next(iter(inputs.values())).shape)
        unit = "tokens" if "input_ids" in inputs else "samples"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        hint = (
            "lower --batch-size or --token-budget"
            if "out of memory" in first.lower()
            else "fix the cause (the model or its inputs)"
        )
        return ForwardError(
            f"{self.name} failed in its forward on rows {span[0]}-{span[1] - 1} of {where or 'a row chunk'} (a batch "
            f"of {shape[0]} rows x {shape[-1]} {unit}): {type(exc).__name__}: {first}. Nothing of that row chunk "
            f"was stored and the store is not complete; {hint}, then re-run the same command to resume."
        )

    def _text_batch(
        self, ids: Sequence[list[int]], type_ids: Sequence[list[int]] | None, masks: Sequence[np.ndarray] | None
    ) -> Prepared:
        batch = pad_batch(ids, type_ids if self.uses_type_ids else None, self.pad_id)
        pool = None if masks is None else pad_mask(masks, batch["input_ids"].shape[1])
        return self.forward.stage(batch), batch["attention_mask"].sum(1), pool

    def first_batch(self, job: ChunkJob) -> ChunkJob:
        """``job`` cut to the rows of its first forward batch (of its first tower)."""
        ids = next(iter(job.towers.values()))[0]
        stop = make_batches(
            np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), self.batch_size, self.token_budget
        )[0][1]
        return ChunkJob(
            split=job.split,
            chunk=job.chunk,
            towers={t: tuple(None if part is None else part[:stop] for part in rows) for t, rows in job.towers.items()},
        )

    def encode(
        self, job: ChunkJob, paths: Callable[[str, str, int | None], str], on_rows: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """All arrays of one row chunk, keyed by store path (see ``chunk_selections``).

        ``paths(tower, pooling_or_'tokens', layer)`` names each array.
        """
        out: dict[str, np.ndarray] = {}
        for tower, (ids, type_ids, masks) in job.towers.items():
            n = len(ids)
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            buf = ChunkBuffers(len(self.layers), n, offsets, self.np_dtype)

            def prepare(
                start: int,
                stop: int,
                _ids: list[list[int]] = ids,
                _tt: list[list[int]] | None = type_ids,
                _m: list[np.ndarray] | None = masks,
            ) -> Prepared:
                return self._text_batch(
                    _ids[start:stop], None if _tt is None else _tt[start:stop], None if _m is None else _m[start:stop]
                )

            words_of = None
            if job.words is not None and self.word_poolings:
                buf.word_offsets = np.concatenate([[0], np.cumsum([len(w) for w in job.words])]).astype(np.int64)
                words_of = functools.partial(_word_index, job.words, lengths)
            self._run(
                job.split,
                make_batches(lengths, self.batch_size, self.token_budget),
                prepare,
                buf,
                on_rows if tower == next(iter(job.towers)) else None,
                words_of,
                _where(job, tower),
            )
            out.update(buf.named(functools.partial(paths, tower)))
        return out


def _word_index(words: list[np.ndarray], lengths: np.ndarray, start: int, stop: int) -> Any:
    """The WordIndex of the batch of rows [start, stop), padded to its longest row (as :func:`pad_batch` pads it)."""
    from embstore.extraction.words import batch_index

    return batch_index(words[start:stop], int(lengths[start:stop].max()))
