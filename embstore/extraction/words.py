"""Words and their subword tokens: the alignment, made at tokenize time from the fast tokenizer's character offsets,
and the pooling of a word's subword states, done on the device from each layer's hidden states.

**Alignment.** A word row's text is its words joined by single spaces (:class:`embstore.data.words.WordRow`), so
every word's character span is known. The text is tokenized exactly as :func:`embstore.extraction.encode.tokenize`
tokenizes it, with ``return_offsets_mapping``; every token whose offsets cover characters (special tokens cover
none) belongs to the first word that ends after the token's first character (a token that starts on the space
before a word, as some SentencePiece offsets do, belongs to that word). A word's tokens are consecutive, so a word is
the token range ``[start, stop)`` of its row's input ids. A word with no token, because ``--max-length`` cut its row
before it (counted as *truncated*) or because the tokenizer made nothing of it, has an empty range: it is stored
with zero states and marked ``cut``, never silently dropped.

**Pooling.** ``first``, ``last`` or ``mean`` of a word's subword states, for every stored layer: one gather (first,
last) or one ``index_add`` (mean) per pooling over the batch's flat (row x position) states, on the device, in
float32 (:func:`pool_words`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embstore.data.words import WORD_POOLINGS
from embstore.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from embstore.data.words import WordRow

__all__ = [
    "WORD_POOLINGS",
    "word_poolings_for",
    "WordAlignment",
    "align_words",
    "WordIndex",
    "batch_index",
    "pool_words",
]


def word_poolings_for(asked: Sequence[str] | None, word_data: bool) -> tuple[str, ...]:
    """The word poolings an extraction stores: ``asked`` (``--word-pooling``), or 'first' for word-level data when it
    was not given; () for sentence-level data, where asking for any is an error."""
    if not word_data:
        if asked:
            raise ConfigError(
                f"--word-pooling {','.join(asked)} needs word-level data: a CoNLL-U file (.conllu), or a JSONL/Parquet "
                "table with a 'tokens' list column; the data given holds sentences."
            )
        return ()
    return tuple(asked) if asked else ("first",)


@dataclass(frozen=True)
class WordAlignment:
    """Every word of one split, aligned to its row's tokens (rows in source order)."""

    spans: list[np.ndarray]
    """Per row, (n_words, 2) int32 [start, stop) positions of each word's tokens in the row's input ids
    (stop == start: the word has no token)."""
    truncated: np.ndarray
    """(total words,) bool: words that ``--max-length`` cut off."""
    empty: np.ndarray
    """(total words,) bool: words the tokenizer made no token of (not truncated)."""

    @property
    def cut(self) -> np.ndarray:
        """(total words,) bool: words without a token (their states are stored as zeros)."""
        return self.truncated | self.empty


def align_words(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[WordRow], ids: Sequence[list[int]], max_length: int
) -> WordAlignment:
    """Align the words of ``rows`` to their tokens; ``ids`` are the rows' input ids as
    :func:`embstore.extraction.encode.tokenize` made them (the alignment tokenizes the same texts the same way and
    checks it got the same ids)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"Word states need a fast tokenizer (its character offsets align words to subwords); "
            f"{type(tokenizer).__name__} is not one. Use a model whose tokenizer.json is present."
        )
    texts = [r.text for r in rows]
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_attention_mask=False,
        return_offsets_mapping=True,
    )
    spans, truncated, empty = [], [], []
    for i, (row, offsets) in enumerate(zip(rows, enc["offset_mapping"])):
        if list(enc["input_ids"][i]) != list(ids[i]):
            raise RuntimeError(f"row {i}: the offsets' tokenization differs from the stored one; this is a bug")
        word_span, t, e = _row_spans(row, np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
        spans.append(word_span)
        truncated.append(t)
        empty.append(e)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=bool)  # noqa: E731
    return WordAlignment(spans=spans, truncated=cat(truncated), empty=cat(empty))


def _row_spans(row: WordRow, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_words, 2) token ranges of one row's words from its tokens' (T, 2) character offsets, and which words are
    truncated and which empty."""
    chars = row.spans  # (n_words, 2)
    n = len(chars)
    first = np.full(n, -1, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    real = np.flatnonzero(offsets[:, 1] > offsets[:, 0])  # special tokens cover no characters
    if len(real):
        word = np.searchsorted(chars[:, 1], offsets[real, 0], side="right")  # the first word ending after it starts
        inside = word < n
        for t, w in zip(real[inside], word[inside]):
            if first[w] < 0:
                first[w] = t
            last[w] = t
    has = first >= 0
    # a word past the last word with a token lost its tokens to truncation; one before it was tokenized to nothing
    reached = int(np.flatnonzero(has).max()) if has.any() else -1
    truncated = ~has & (np.arange(n) > reached)
    if reached >= 0 and offsets[last[reached], 1] < chars[reached, 1]:
        truncated[reached], has[reached] = True, False  # truncation cut through it: some of its tokens are gone
    out = np.zeros((n, 2), dtype=np.int32)
    out[has, 0], out[has, 1] = first[has], last[has] + 1
    return out, truncated, ~has & ~truncated


@dataclass(frozen=True)
class WordIndex:
    """Where the words of one padded batch sit in its flat (row x position) states."""

    first: np.ndarray
    """(W,) int64 flat position of each word's first token (0 for a cut word)."""
    last: np.ndarray
    """(W,) int64 flat position of each word's last token (0 for a cut word)."""
    member_pos: np.ndarray
    """(M,) int64 flat position of every token of every word."""
    member_word: np.ndarray
    """(M,) int64 the word each of those tokens belongs to."""
    counts: np.ndarray
    """(W,) float32 tokens per word (0: cut)."""

    @property
    def n_words(self) -> int:
        return len(self.first)


def batch_index(spans: Sequence[np.ndarray], width: int) -> WordIndex:
    """The :class:`WordIndex` of a batch whose rows (``spans[b]``: (n_words, 2) token ranges) are padded to
    ``width`` positions."""
    starts, stops, bases = [], [], []
    for b, s in enumerate(spans):
        starts.append(s[:, 0].astype(np.int64))
        stops.append(s[:, 1].astype(np.int64))
        bases.append(np.full(len(s), b * width, dtype=np.int64))
    start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    stop = np.concatenate(stops) if stops else np.zeros(0, np.int64)
    base = np.concatenate(bases) if bases else np.zeros(0, np.int64)
    counts = stop - start
    has = counts > 0
    first = np.where(has, base + start, 0)
    last = np.where(has, base + stop - 1, 0)
    member_word = np.repeat(np.arange(len(start)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    member_pos = np.repeat(base + start, counts) + within
    return WordIndex(first, last, member_pos, member_word, counts.astype(np.float32))


def pool_words(
    hidden: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    layers: Sequence[int],
    poolings: Sequence[str],
    index: dict[str, Any],
) -> torch.Tensor:
    """(P, k, W, H) float32: every word pooling of every chosen layer of one batch.

    ``hidden[i]`` (B, T, H) are the batch's hidden states; ``index`` holds :class:`WordIndex`'s arrays as tensors on
    their device (``first``, ``last``, ``member_pos``, ``member_word``, ``counts``). Cut words come out as zeros.
    """
    import torch

    counts = index["counts"]
    n_words = counts.shape[0]
    keep = (counts > 0).float()[None, :, None]  # (1, W, 1)
    out = []
    for p in poolings:
        per_layer = []
        for i in layers:
            flat = hidden[i].reshape(-1, hidden[i].shape[-1]).float()  # (B*T, H)
            if p in ("first", "last"):
                per_layer.append(flat.index_select(0, index[p]))
            elif p == "mean":
                total = torch.zeros((n_words, flat.shape[1]), dtype=flat.dtype, device=flat.device)
                total.index_add_(0, index["member_word"], flat.index_select(0, index["member_pos"]))
                per_layer.append(total / counts.clamp(min=1)[:, None])
            else:
                raise ValueError(f"unknown word pooling {p!r}")
        out.append(torch.stack(per_layer) * keep)  # (k, W, H)
    return torch.stack(out)
