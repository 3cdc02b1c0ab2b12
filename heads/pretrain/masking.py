"""Pretraining batches: the tokenised corpus, pair objectives and BERT's 80/10/10 masking.

The corpus is kept as token ids *without* special tokens, one list per sentence, so a batch can
reorder (``swap_augment``), swap (sentence-order prediction) or replace (next-sentence prediction)
the second sentence before [CLS] A [SEP] B [SEP] is built and truncated. Randomness is seeded per
(seed, epoch, batch index), so a run resumed mid-epoch draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE", "Corpus", "PretrainCollator", "mask_tokens", "tokenize_corpus"]

IGNORE = -100
"""Label of positions that are not predicted (cross_entropy's ignore_index)."""


@dataclass(frozen=True)
class Corpus:
    """Token ids of each row's first (and second) sentence, without special tokens."""

    a: list[list[int]]
    b: list[list[int]] | None
    words_a: list[list[int]] | None = None
    """Word index of each token of ``a`` (whole-word masking), else None."""
    words_b: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.a)


def tokenize_corpus(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None, *, whole_word: bool = False
) -> Corpus:
    """Tokenise each sentence once (no special tokens); with ``whole_word`` keep each token's word index."""

    def encode(batch: list[str]) -> tuple[list[list[int]], list[list[int]] | None]:
        # No truncation here (a batch truncates after joining the pair), so no length warning either.
        enc = tokenizer(
            batch, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
        )
        ids = [list(x) for x in enc["input_ids"]]
        if not whole_word:
            return ids, None
        return ids, [[-1 if w is None else int(w) for w in enc.word_ids(i)] for i in range(len(ids))]

    a, wa = encode(texts)
    b, wb = encode(pairs) if pairs is not None else (None, None)
    return Corpus(a=a, b=b, words_a=wa, words_b=wb)


def mask_tokens(
    input_ids: torch.Tensor,
    candidates: torch.Tensor,
    *,
    mask_prob: float,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    word_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) ``input_ids``: returns (inputs, labels), both (B, T) int64.

    Each candidate position (``candidates``: (B, T) bool, False for special tokens and padding) is
    selected with probability ``mask_prob``; with ``word_ids`` ((B, T), -1 outside words) the draw is
    per word and covers all its pieces. Selected positions keep their id as label (others get
    IGNORE) and become [MASK] 80% of the time, a uniformly random token 10%, and stay unchanged 10%.
    """
    if word_ids is None:
        selected = (torch.rand(input_ids.shape, generator=generator) < mask_prob) & candidates
    else:
        n_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
        draw = torch.rand((input_ids.shape[0], max(n_words, 1)), generator=generator) < mask_prob  # (B, words)
        selected = draw.gather(1, word_ids.clamp(min=0)) & candidates & (word_ids >= 0)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    r = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[selected & (r < 0.8)] = mask_id
    random_pos = selected & (r >= 0.8) & (r < 0.9)
    inputs[random_pos] = torch.randint(vocab_size, (int(random_pos.sum()),), generator=generator)
    return inputs, labels


class PretrainCollator:
    """Turns (row, order) items into a masked batch: input_ids, attention_mask, token_type_ids, labels
    (and pair_labels with a pair objective). ``order`` 1 swaps the two sentences (swap augmentation).

    Pair labels: sop 1 = the two sentences were swapped; nsp 1 = the second one comes from a random row.
    """

    def __init__(
        self,
        corpus: Corpus,
        *,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        mask_id: int,
        vocab_size: int,
        max_length: int,
        mask_prob: float,
        whole_word: bool = False,
        pair_objective: str | None = None,
        seed: int = 0,
    ) -> None:
        self.corpus = corpus
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = cls_id, sep_id, pad_id, mask_id
        self.vocab_size, self.max_length, self.mask_prob = vocab_size, max_length, mask_prob
        self.whole_word, self.pair_objective, self.seed = whole_word, pair_objective, seed
        self.epoch, self.batch = 0, 0

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Restart the random stream at (epoch, batch index); called at each epoch start and on resume."""
        self.epoch, self.batch = epoch, batch

    def _generator(self) -> torch.Generator:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.batch)
        self.batch += 1
        return gen

    def _sentences(
        self, row: int, order: int
    ) -> tuple[list[int], list[int] | None, list[int] | None, list[int] | None]:
        c = self.corpus
        a, wa = c.a[row], None if c.words_a is None else c.words_a[row]
        if c.b is None:
            return a, None, wa, None
        b, wb = c.b[row], None if c.words_b is None else c.words_b[row]
        return (b, a, wb, wa) if order else (a, b, wa, wb)

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        gen = self._generator()
        rows, types, words, pair_labels = [], [], [], []
        coin = torch.rand(len(items), generator=gen).tolist()
        others = torch.randint(max(len(self.corpus) - 1, 1), (len(items),), generator=gen).tolist()
        for (row, order), flip, other in zip(items, coin, others):
            a, b, wa, wb = self._sentences(row, order)
            label = 0
            if b is not None and self.pair_objective == "sop" and flip < 0.5:
                a, b, wa, wb, label = b, a, wb, wa, 1
            elif b is not None and self.pair_objective == "nsp" and flip < 0.5 and len(self.corpus) > 1:
                j = other + (other >= row)  # any row but this one
                b, wb, label = self._sentences(j, order)[1], self._sentences(j, order)[3], 1
            ids, tt, ww = self._join(a, b, wa, wb)
            rows.append(ids)
            types.append(tt)
            words.append(ww)
            pair_labels.append(label)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        token_types = torch.zeros((len(rows), width), dtype=torch.long)
        word_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        candidates = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, t, w) in enumerate(zip(rows, types, words)):
            n = len(r)
            input_ids[i, :n], token_types[i, :n], word_ids[i, :n], mask[i, :n] = (
                torch.tensor(r),
                torch.tensor(t),
                torch.tensor(w),
                1,
            )
            candidates[i, :n] = torch.tensor([x not in (self.cls_id, self.sep_id, self.pad_id) for x in r])
        inputs, labels = mask_tokens(
            input_ids,
            candidates,
            mask_prob=self.mask_prob,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            generator=gen,
            word_ids=word_ids if self.whole_word else None,
        )
        batch = {"input_ids": inputs, "attention_mask": mask, "token_type_ids": token_types, "labels": labels}
        if self.pair_objective is not None:
            batch["pair_labels"] = torch.tensor(pair_labels, dtype=torch.long)
        return batch

    def _join(
        self, a: list[int], b: list[int] | None, wa: list[int] | None, wb: list[int] | None
    ) -> tuple[list[int], list[int], list[int]]:
        """[CLS] a [SEP] (b [SEP]) truncated longest-first to max_length; (ids, token types, word ids)."""
        room = self.max_length - (3 if b is not None else 2)
        la, lb = len(a), 0 if b is None else len(b)
        while la + lb > room:  # longest-first, as tokenizers' truncation does
            if la >= lb:
                la -= 1
            else:
                lb -= 1
        wa_ = (wa or [-1] * len(a))[:la]
        ids = [self.cls_id, *a[:la], self.sep_id]
        tt = [0] * len(ids)
        ww = [-1, *wa_, -1]
        if b is not None:
            shift = max(wa_, default=-1) + 1  # the second sentence's words get their own indices
            ids += [*b[:lb], self.sep_id]
            tt += [1] * (lb + 1)
            ww += [w + shift if w >= 0 else -1 for w in (wb or [-1] * len(b))[:lb]] + [-1]
        return ids, tt, ww
