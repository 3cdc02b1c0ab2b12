"""What text the model reads and which of its tokens are pooled: the one text spec that extraction, ``heads
predict`` and fine-tuning share.

:class:`TextSpec` holds

- ``template``: a prompt around the text, ``'Review: {text}\\nSentiment:'`` (pairs use ``{text}`` and
  ``{text_pair}``; ``{{`` and ``}}`` are literal braces);
- ``chat_template``: the tokenizer's own chat template, the text as the user turn (after an optional ``system``
  turn) and the generation prompt added, so ``last`` reads the position where the model would begin its answer;
- ``pool_tokens``: which tokens ``mean`` and ``max`` cover: ``all`` (every non-pad token) or ``text`` (the row's
  own text tokens: no BOS, EOS, CLS, SEP or template tokens).

A chat template is rendered once with a sentinel for the text, which turns it into a plain template
(:meth:`TextSpec.prompt`): the text is inserted verbatim where the chat template puts the user's content, and the
rendered prompt is what provenance records. Text tokens are found from the tokenizer's offsets: a token is text when
its characters overlap the text's characters in the rendered string and the tokenizer did not add it (its special
tokens mask). With a template, a row too long for ``max_length`` is cut inside its text (the longest field first),
never in the template, so ``last`` still reads the template's last token.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from embstore.errors import ConfigError, DataError

__all__ = ["TextSpec", "PoolTokens", "POOL_TOKENS", "Tokenized", "tokenize_text", "FIELDS"]

PoolTokens = Literal["text", "all"]
POOL_TOKENS: tuple[str, ...] = ("text", "all")
FIELDS = ("text", "text_pair")
_SENTINEL = "\u2063EMBSTORE\u2063TEXT\u2063"
"""Stands for the text while a chat template is rendered (invisible separators: no template rewrites them)."""


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    """The prompt around each text and the tokens ``mean``/``max`` cover (module docstring)."""

    template: str | None = None
    """A prompt with ``{text}`` (and ``{text_pair}``); None: the text alone."""
    chat_template: bool = False
    """Wrap the text in the tokenizer's chat template as the user turn, with the generation prompt."""
    system: str | None = None
    """The system turn of ``chat_template`` (None: none)."""
    pool_tokens: PoolTokens = "all"
    """'text': mean and max over the row's own text tokens only; 'all': over every non-pad token."""

    def __post_init__(self) -> None:
        if self.template is not None and self.chat_template:
            raise ConfigError("Pass either --template or --chat-template, not both (a chat template is a template).")
        if self.system is not None and not self.chat_template:
            raise ConfigError("--system is the system turn of --chat-template; pass --chat-template too.")
        if self.template is not None:
            fields = template_fields(self.template)
            if "text" not in fields:
                raise ConfigError(
                    f"The --template {self.template!r} has no {{text}}: write where the text goes, e.g. "
                    "'Review: {text}\\nSentiment:'."
                )

    @property
    def plain(self) -> bool:
        """No prompt: the text is tokenized as it is (the encoders' default)."""
        return self.template is None and not self.chat_template

    def check_columns(self, pairs: bool, towers: bool) -> None:
        """Refuse a template that does not fit the columns: ``{text_pair}`` needs a pair column encoded jointly, and a
        joint pair needs ``{text_pair}`` (a chat template takes one text)."""
        if self.plain:
            return
        if self.chat_template:
            if pairs and not towers:
                raise ConfigError(
                    "--chat-template puts one text in the user turn; for sentence pairs pass --template with {text} "
                    "and {text_pair}, or --towers."
                )
            return
        has_pair = "text_pair" in template_fields(self.template or "")
        if has_pair and (not pairs or towers):
            raise ConfigError(
                f"The --template {self.template!r} places {{text_pair}}, which needs --text-pair-col encoded jointly "
                "(not --towers); drop {text_pair} or give the pair column."
            )
        if pairs and not towers and not has_pair:
            raise ConfigError(
                f"With --text-pair-col the --template {self.template!r} must place {{text_pair}} too, e.g. "
                "'{text}\\nQuestion: {text_pair}'."
            )

    def prompt(self, tokenizer: Any) -> str | None:
        """The template in effect: ``template``, or the chat template rendered around ``{text}``; None when plain."""
        if not self.chat_template:
            return self.template
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"--chat-template applies the tokenizer's own chat template, and this tokenizer "
                f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has none; pass --template "
                "'PROMPT {text}' instead."
            )
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": "user", "content": _SENTINEL}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(rendered, str) or rendered.count(_SENTINEL) != 1:
            raise ConfigError(
                "The tokenizer's chat template does not place the user's message exactly once; pass --template "
                "'PROMPT {text}' instead."
            )
        return rendered.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{text}")

    def record(self, tokenizer: Any) -> dict[str, Any]:
        """What provenance records (the ``text`` entry): these fields and the rendered ``prompt``."""
        return {**self.to_dict(), "prompt": self.prompt(tokenizer)}

    def id_content(self) -> dict[str, Any] | None:
        """What the store id holds of this spec: None for the plain ``all`` spec (so the encoders' ids stay as they
        were), else every field (a chat template's text is in the tokenizer files, which the id hashes too)."""
        if self.plain and self.pool_tokens == "all":
            return None
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TextSpec:
        """Inverse of :meth:`to_dict` (extra keys such as a recorded ``prompt`` are ignored); None: the default."""
        if not d:
            return cls()
        return cls(**{k: d[k] for k in ("template", "chat_template", "system", "pool_tokens") if k in d})


def template_fields(template: str) -> list[str]:
    """The fields a template names, in order; a ConfigError for any other field or a broken brace."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"The --template {template!r} cannot be read ({exc}); write literal braces as {{{{ and }}}}."
        ) from None
    names = [name for _lit, name, _spec, _conv in parsed if name is not None]
    bad = [n for n in names if n not in FIELDS]
    if bad:
        raise ConfigError(
            f"The --template {template!r} names {{{bad[0]}}}; it may name only {{text}} and {{text_pair}} (write "
            "literal braces as {{ and }})."
        )
    return names


def _pieces(template: str) -> list[tuple[str, str | None]]:
    """(literal, field or None) parts of a template, braces unescaped."""
    return [(lit, name) for lit, name, _spec, _conv in string.Formatter().parse(template)]


@dataclass(frozen=True)
class Tokenized:
    """Token ids of rows, their token type ids (plain pairs only), which tokens are text, and truncation."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    text_mask: list[np.ndarray] | None
    """Per row (tokens,) bool: its own text tokens (only computed for ``pool_tokens='text'``)."""
    truncated: np.ndarray


def _render(pieces: list[tuple[str, str | None]], values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """The rendered prompt and the [start, stop) characters of each field in it."""
    out, spans, at = [], {}, 0
    for lit, name in pieces:
        out.append(lit)
        at += len(lit)
        if name is not None:
            v = values[name]
            spans[name] = (at, at + len(v))
            out.append(v)
            at += len(v)
    return "".join(out), spans


def _text_mask(offsets: list[tuple[int, int]], special: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    """(tokens,) bool: tokens the tokenizer did not add whose characters overlap a field's characters."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = (np.asarray(special, dtype=bool) == 0) & (off[:, 1] > off[:, 0])
    inside = np.zeros(len(off), dtype=bool)
    for lo, hi in spans:
        inside |= (off[:, 0] < hi) & (off[:, 1] > lo)
    return mask & inside


def tokenize_text(
    tokenizer: Any,
    spec: TextSpec,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
) -> Tokenized:
    """Tokenize rows the way ``spec`` says, truncated to ``max_length`` tokens (see the module docstring).

    Plain rows go through the tokenizer as they are (pairs as a pair); with a template each row is rendered to one
    string first. Every row keeps at least one text token: a row with none is a DataError."""
    prompt = spec.prompt(tokenizer)
    if prompt is None:
        return _plain(tokenizer, texts, pairs, max_length, want_mask=spec.pool_tokens == "text")
    pieces = _pieces(prompt)
    add_special = not spec.chat_template  # a rendered chat template holds its own special tokens (as transformers)
    fields = [name for _lit, name in pieces if name is not None]
    rows = [{"text": t, "text_pair": "" if pairs is None else pairs[i]} for i, t in enumerate(texts)]
    ids: list[list[int]] = [[] for _ in rows]
    masks: list[np.ndarray] = [np.zeros(0, dtype=bool) for _ in rows]
    truncated = np.zeros(len(rows), dtype=bool)
    todo = list(range(len(rows)))
    for _round in range(8):  # each round cuts the rows still too long; one round nearly always suffices
        if not todo:
            break
        rendered = [_render(pieces, rows[i]) for i in todo]
        enc = tokenizer(
            [r for r, _ in rendered],
            add_special_tokens=add_special,
            truncation=False,
            return_attention_mask=False,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            verbose=False,
        )
        again = []
        for j, i in enumerate(todo):
            spans = rendered[j][1]
            mask = _text_mask(enc["offset_mapping"][j], enc["special_tokens_mask"][j], [spans[f] for f in fields])
            over = len(enc["input_ids"][j]) - max_length
            if over <= 0:
                ids[i], masks[i] = list(enc["input_ids"][j]), mask
                continue
            truncated[i] = True
            rows[i] = _cut(rows[i], fields, spans, enc["offset_mapping"][j], mask, over, prompt, max_length)
            again.append(i)
        todo = again
    if todo:
        raise DataError(
            f"{len(todo)} rows could not be cut to --max-length {max_length} inside their text (the tokenizer merges "
            "tokens across the template's edges); raise --max-length."
        )
    empty = [i for i, m in enumerate(masks) if not m.any()]
    if empty:
        raise DataError(
            f"{len(empty)} rows have no text token inside the template (row {empty[0]}: {texts[empty[0]]!r}); drop "
            "empty texts (--skip-empty) or raise --max-length."
        )
    return Tokenized(
        ids=ids, type_ids=None, text_mask=masks if spec.pool_tokens == "text" else None, truncated=truncated
    )


def _cut(
    row: dict[str, str],
    fields: list[str],
    spans: dict[str, tuple[int, int]],
    offsets: list[tuple[int, int]],
    mask: np.ndarray,
    over: int,
    prompt: str,
    max_length: int,
) -> dict[str, str]:
    """``row`` with ``over`` text tokens dropped from the ends of its fields, the longest field first (as the
    tokenizers' 'longest_first')."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    per_field = {f: np.flatnonzero(mask & (off[:, 0] < spans[f][1]) & (off[:, 1] > spans[f][0])) for f in fields}
    keep = {f: len(t) for f, t in per_field.items()}
    for _ in range(over):
        longest = max(keep, key=lambda f: keep[f])
        if keep[longest] <= 1:
            raise ConfigError(
                f"The template {prompt!r} alone takes about {len(mask) - int(mask.sum())} of the --max-length "
                f"{max_length} tokens, which leaves no room for the text; raise --max-length or shorten the template."
            )
        keep[longest] -= 1
    out = dict(row)
    for f, toks in per_field.items():
        if keep[f] < len(toks):
            cut_at = int(off[toks[keep[f]], 0]) - spans[f][0]  # the first dropped token's first character
            out[f] = row[f][: max(0, cut_at)]
    return out


def _plain(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int, want_mask: bool) -> Tokenized:
    """The text alone (no template): truncation by the tokenizer; truncations counted by re-tokenizing only rows
    that hit the cap."""
    enc = tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_attention_mask=False,
        # a model whose tokenizer does not feed token type ids (GPT-2, Llama) must not get them for pairs either
        return_token_type_ids=pairs is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", ()),
        return_special_tokens_mask=want_mask,
    )
    ids = enc["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    truncated = np.zeros(len(ids), dtype=bool)
    at_cap = np.flatnonzero(lengths >= max_length)
    if len(at_cap):
        full = tokenizer(
            [texts[i] for i in at_cap],
            None if pairs is None else [pairs[i] for i in at_cap],
            truncation=False,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        truncated[at_cap] = np.array([len(x) > max_length for x in full], dtype=bool)
    masks = None
    if want_mask:
        masks = [np.asarray(m, dtype=np.int8) == 0 for m in enc["special_tokens_mask"]]
        empty = [i for i, m in enumerate(masks) if not m.any()]
        if empty:
            raise DataError(
                f"{len(empty)} rows have no text token, only special ones (row {empty[0]}: {texts[empty[0]]!r}); drop "
                "empty texts (--skip-empty) or pass --pool-tokens all."
            )
    type_ids = enc.get("token_type_ids") if pairs is not None else None
    return Tokenized(ids=ids, type_ids=type_ids, text_mask=masks, truncated=truncated)
