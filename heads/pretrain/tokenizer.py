"""Tokenizers for pretraining from scratch: train a BERT WordPiece vocabulary on the corpus, or load one.

Training uses the ``tokenizers`` library (BERT's normaliser with optional lower-casing and
CJK-character splitting, BERT's pre-tokeniser, a WordPiece trainer) and wraps the result in a
transformers fast tokenizer, so ``save_pretrained`` writes a tokenizer.json that ``AutoTokenizer``
(and therefore ``embstore extract --model``) reads back unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embstore.errors import ConfigError, ModelNotFoundError
from heads.pretrain.config import SPECIAL_TOKENS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["check_special_tokens", "load_tokenizer", "train_wordpiece"]

log = logging.getLogger(__name__)


def train_wordpiece(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
    cjk_chars: bool = True,
    max_length: int = 512,
) -> Any:
    """A BERT WordPiece tokenizer trained on ``texts``; returns a transformers fast tokenizer.

    The special tokens get ids 0..4 ([PAD], [UNK], [CLS], [SEP], [MASK]). ``cjk_chars`` splits CJK
    ideographs into single characters, as BERT does; ``max_length`` becomes model_max_length.
    The vocabulary may exceed ``vocab_size`` slightly: the trainer keeps every character of the corpus.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # v5: an alias of BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=cjk_chars, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
        tokenize_chinese_chars=cjk_chars,
        model_max_length=max_length,
    )
    log.info("trained a WordPiece vocabulary of %d tokens", len(fast))
    if len(fast) <= len(SPECIAL_TOKENS):
        raise ConfigError(
            f"The trained vocabulary holds only the {len(SPECIAL_TOKENS)} special tokens: the corpus has no "
            "text to learn from; check --text-col and the data file."
        )
    return fast


def load_tokenizer(path: str) -> Any:
    """A fast tokenizer from a directory (tokenizer.json / model directory) or a tokenizer.json file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path).expanduser()
    tok: Any
    try:
        if p.is_file() and p.suffix == ".json":
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        elif p.is_dir():
            tok = AutoTokenizer.from_pretrained(p)
        else:
            raise ModelNotFoundError(
                f"--tokenizer {path} is neither a directory nor a tokenizer.json file; pass a "
                "tokenizer directory (e.g. a previous run's DIR/model) or omit it to train one."
            )
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"Cannot load a tokenizer from {p}: {str(exc).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelNotFoundError(
            f"The tokenizer in {p} is not a fast tokenizer (no tokenizer.json); embstore needs one."
        )
    check_special_tokens(tok, str(p))
    return tok


def check_special_tokens(tok: PreTrainedTokenizerBase, origin: str) -> None:
    """Masked-LM pretraining needs [MASK], [CLS]-like, [SEP]-like and padding tokens; say which one is missing."""
    missing = [
        name
        for name in ("mask_token", "cls_token", "sep_token", "pad_token")
        if getattr(tok, f"{name}_id", None) is None
    ]
    if missing:
        raise ConfigError(
            f"The tokenizer from {origin} has no {', '.join(missing)}; masked-LM pretraining needs "
            "mask, cls, sep and pad tokens. Use a BERT-style tokenizer or omit --tokenizer to train one."
        )
