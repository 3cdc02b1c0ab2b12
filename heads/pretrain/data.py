"""What a pretraining run starts from: the corpus (training and held-out rows) and the tokenizer."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import ConfigError, DataError
from heads.pretrain.config import PretrainConfig
from heads.pretrain.tokenizer import load_tokenizer, train_wordpiece

__all__ = ["CorpusProvenance", "PretrainData", "load_corpus"]

log = logging.getLogger(__name__)
_EVAL_SPLITS = ("validation", "dev", "test")


@dataclass(frozen=True, kw_only=True)
class CorpusProvenance:
    """Where a pretraining run's corpus and tokenizer came from (``run.json["corpus"]``)."""

    sources: list[dict[str, Any]]
    """One record per source file (as a store's provenance has them): split, path, sha256, columns, rows."""
    tokenizer: str
    """How the tokenizer was made: 'trained WordPiece', or where it was loaded from."""
    tokenizer_sha256: str
    """The sha256 of the tokenizer's JSON: part of the run's fingerprint, with the sources' sha256."""
    vocab_size: int
    """Tokens in the vocabulary."""
    train_rows: int
    """Training rows (texts, or pairs)."""
    eval_rows: int
    """Held-out rows, scored for perplexity."""
    eval_from: str
    """Where the held-out rows come from: a split, or the carve that made them."""
    pairs: bool
    """Whether the rows are sentence pairs."""
    eval_set: dict[str, Any]
    """The held-out rows' evaluation-set record (:mod:`heads.evalset`)."""

    @property
    def sources_sha256(self) -> list[str]:
        """The sha256 of each source file, in order."""
        return [str(s["sha256"]) for s in self.sources]

    def to_dict(self) -> dict[str, Any]:
        """What run.json records (``sources_sha256`` beside the sources, for people reading it)."""
        return {
            "sources": self.sources,
            "sources_sha256": self.sources_sha256,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "eval_from": self.eval_from,
            "pairs": self.pairs,
            "eval_set": self.eval_set,
        }


@dataclass(frozen=True)
class PretrainData:
    """Training and held-out sentences (second sentences for pairs), the tokenizer, and their provenance."""

    tokenizer: Any
    train_texts: list[str]
    train_pairs: list[str] | None
    eval_texts: list[str]
    eval_pairs: list[str] | None
    provenance: CorpusProvenance
    """Where the corpus and tokenizer came from."""


def _split_roles(config: PretrainConfig, splits: dict[str, Any]) -> tuple[Any, Any | None, str]:
    """(training split, held-out split or None to carve, description of the held-out rows)."""
    names = list(splits)
    if config.source.data is not None:
        return (
            splits[names[0]],
            None,
            f"{config.heldout_fraction:.0%} of the rows, carved with seed {config.source.seed}",
        )
    if config.train_split not in splits:
        raise ConfigError(
            f"The training split {config.train_split!r} is not in the data; its splits are "
            f"{', '.join(names)}. Pass --train-split NAME or name a split train=FILE."
        )
    if config.eval_split is not None:
        if config.eval_split not in splits:
            raise ConfigError(
                f"The held-out split {config.eval_split!r} is not in the data; its splits are "
                f"{', '.join(names)}. Pass --eval-split with one of them or omit it to carve rows."
            )
        return splits[config.train_split], splits[config.eval_split], f"split {config.eval_split!r}"
    ev = next((s for s in _EVAL_SPLITS if s in splits and s != config.train_split), None)
    if ev is None:
        return (
            splits[config.train_split],
            None,
            f"{config.heldout_fraction:.0%} of the training rows (seed {config.source.seed})",
        )
    return splits[config.train_split], splits[ev], f"split {ev!r}"


def load_corpus(config: PretrainConfig, saved_tokenizer: Path | None = None) -> PretrainData:
    """Read the corpus, pick or carve the held-out rows and train (or load) the tokenizer.

    ``saved_tokenizer``: a resumed run's checkpoint tokenizer, used instead of training a new one when present.
    The provenance's ``eval_set`` identifies the held-out rows (:mod:`heads.evalset`).
    """
    from heads.evalset import eval_set, source_sha256

    ds = config.source.load()
    train, held, eval_from = _split_roles(config, ds.splits)
    texts, pairs = list(train.texts), None if train.pairs is None else list(train.pairs)
    if held is not None:
        ev_texts, ev_pairs = list(held.texts), None if held.pairs is None else list(held.pairs)
        scored = eval_set(source_sha256(ds.sources, held.name), held.row_ids)
    else:
        if len(texts) < 2:
            raise DataError(
                f"The corpus has {len(texts)} row; holding rows out for perplexity needs at least 2. "
                "Give more text or a held-out file with --split validation=FILE."
            )
        order = np.random.default_rng(config.source.seed).permutation(len(texts))
        n_eval = min(len(texts) - 1, max(1, round(config.heldout_fraction * len(texts))))
        ev_idx, tr_idx = sorted(order[:n_eval].tolist()), sorted(order[n_eval:].tolist())
        scored = eval_set(source_sha256(ds.sources, train.name), train.row_ids[ev_idx])
        ev_texts, texts = [texts[i] for i in ev_idx], [texts[i] for i in tr_idx]
        ev_pairs = None if pairs is None else [pairs[i] for i in ev_idx]
        pairs = None if pairs is None else [pairs[i] for i in tr_idx]
    if not any(t.strip() for t in texts):
        raise DataError("The training corpus is empty (no non-blank text); check --text-col and the data file.")

    if config.tokenizer is not None:
        tok, how = load_tokenizer(config.tokenizer), f"loaded from {config.tokenizer}"
    elif saved_tokenizer is not None and saved_tokenizer.is_dir():
        tok, how = load_tokenizer(str(saved_tokenizer)), f"trained WordPiece (reloaded from {saved_tokenizer})"
    else:
        tok = train_wordpiece(
            texts + (pairs or []),
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            lowercase=config.lowercase,
            cjk_chars=config.cjk_chars,
            max_length=config.max_length,
        )
        how = "trained WordPiece"
    tok.model_max_length = config.max_length
    tok_json = tok.backend_tokenizer.to_str()
    provenance = CorpusProvenance(
        sources=ds.sources,
        tokenizer=how,
        tokenizer_sha256=hashlib.sha256(tok_json.encode()).hexdigest(),
        vocab_size=len(tok),
        train_rows=len(texts),
        eval_rows=len(ev_texts),
        eval_from=eval_from,
        pairs=pairs is not None,
        eval_set=scored,
    )
    log.info(
        "corpus: %d training rows, %d held-out rows (%s); vocabulary %d (%s)",
        len(texts),
        len(ev_texts),
        eval_from,
        len(tok),
        how,
    )
    return PretrainData(
        tokenizer=tok,
        train_texts=texts,
        train_pairs=pairs,
        eval_texts=ev_texts,
        eval_pairs=ev_pairs,
        provenance=provenance,
    )
