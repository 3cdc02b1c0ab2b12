"""Byte-level BPE tokenizers for the random decoders (``random:tiny-gpt2``, ``tiny-llama``, ``tiny-qwen2``,
``tiny-neox`` and any ``random:`` config of a decoder family), trained offline and deterministically with the
``tokenizers`` package on a small corpus written here, so nothing is downloaded.

Each family's tokenizer keeps that family's real conventions, which are what extraction must cope with:

========  =================================  ==============  ============  ============  ==============
family    special tokens (ids 0..)           BOS added       pad token     padding side  chat template
========  =================================  ==============  ============  ============  ==============
gpt2      <|endoftext|>                      no              none          right         none
neox      <|endoftext|>, <|padding|>         no              none          right         none
llama     <unk>, <s>, </s>                   yes (<s>)       none          left          none
qwen2     <|endoftext|>, <|im_start|>,       no              <|endoftext|> right         ChatML
          <|im_end|>
========  =================================  ==============  ============  ============  ==============

(embstore pads batches itself, on the right, so the tokenizer's padding side and a missing pad token must change
nothing: tests/test_llm.py checks it.)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Convention", "CONVENTIONS", "convention_for", "decoder_tokenizer", "tokenizer_sha256", "VOCAB_SIZE"]

VOCAB_SIZE = 512
"""Target vocabulary (256 byte symbols, the special tokens, then merges); the random decoders' ``vocab_size``."""

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen2's chat markup (ChatML), without Qwen2's default system turn."""


@dataclass(frozen=True)
class Convention:
    """One family's tokenizer conventions."""

    specials: tuple[str, ...]
    """Special tokens, given ids 0, 1, ... in this order."""
    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None
    add_bos: bool
    """The post-processor puts ``bos`` before every text (Llama, Mistral, Gemma)."""
    padding_side: str
    chat_template: str | None = None

    def ids(self) -> dict[str, int | None]:
        """bos/eos/pad token ids, for the model config."""
        index = {t: i for i, t in enumerate(self.specials)}
        return {
            "bos_token_id": None if self.bos is None else index[self.bos],
            "eos_token_id": None if self.eos is None else index[self.eos],
            "pad_token_id": None if self.pad is None else index[self.pad],
        }


_EOT = "<|endoftext|>"
CONVENTIONS: dict[str, Convention] = {
    "gpt2": Convention(specials=(_EOT,), bos=_EOT, eos=_EOT, unk=_EOT, pad=None, add_bos=False, padding_side="right"),
    "neox": Convention(
        specials=(_EOT, "<|padding|>"), bos=_EOT, eos=_EOT, unk=_EOT, pad=None, add_bos=False, padding_side="right"
    ),
    "llama": Convention(
        specials=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        pad=None,
        add_bos=True,
        padding_side="left",
    ),
    "qwen2": Convention(
        specials=(_EOT, "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        unk=None,
        pad=_EOT,
        add_bos=False,
        padding_side="right",
        chat_template=CHATML,
    ),
}

_BY_MODEL_TYPE = {
    "gpt2": "gpt2",
    "gpt_neox": "neox",
    "qwen2": "qwen2",
    "qwen3": "qwen2",
    **{
        t: "llama"
        for t in ("llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite")
    },
    **{t: "gpt2" for t in ("opt", "phi", "stablelm", "gptj", "gpt_neo", "codegen", "bloom", "falcon", "starcoder2")},
    "cohere": "llama",
}


def convention_for(model_type: str) -> str | None:
    """The convention name for a random model of ``model_type``, or None for the encoders (which use MiniLM's
    WordPiece tokenizer)."""
    return _BY_MODEL_TYPE.get(model_type)


# A fixed corpus: common English words and short sentences of the kinds the tests and benchmarks use.
_CORPUS = """
the a an of to in and or but is was are were be been being have has had do does did not no yes
this that these those it its he she they we you i me him her them us my your our their his
one two three four five six seven eight nine ten first last next new old good bad great small large
model layer token store chunk probe head sweep vector batch text label word sentence review movie film
the striker scored twice in the final minute
stocks fell sharply after the central bank raised rates
a new telescope images distant galaxies in infrared light
parliament passed the budget after a long night of debate
the goalkeeper saved a penalty to win the cup
the company reported record quarterly profit
researchers trained a neural network on protein structures
elections were held across the country on sunday
the tennis champion retired after twenty years
oil prices climbed for the third straight week
engineers launched a satellite to study the climate
the prime minister met foreign leaders at the summit
this movie was wonderful and the acting was superb
the film was boring and far too long
i loved every minute of it
i hated the ending and the music was awful
review: sentiment: positive negative neutral answer question user assistant system
what is the capital of france? paris is the capital of france.
news sport business science world technology health politics weather
""".split("\n")


def _corpus() -> list[str]:
    lines = [line.strip() for line in _CORPUS if line.strip()]
    return lines + [line.capitalize() + "." for line in lines]


@functools.lru_cache(maxsize=None)
def _trained(name: str) -> Any:
    """The trained ``tokenizers.Tokenizer`` of convention ``name`` (post-processor included); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    conv = CONVENTIONS[name]
    tok = Tokenizer(models.BPE(unk_token=conv.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(conv.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if conv.add_bos and conv.bos is not None:
        bos = (conv.bos, conv.specials.index(conv.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{conv.bos} $A", pair=f"{conv.bos} $A {conv.bos} $B:1", special_tokens=[bos]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_sha256(name: str) -> str:
    """sha256 of convention ``name``'s trained tokenizer and its conventions (its identity in the store id)."""
    payload = _trained(name).to_str() + json.dumps(asdict(CONVENTIONS[name]), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def decoder_tokenizer(name: str) -> Any:
    """A fresh transformers fast tokenizer (``PreTrainedTokenizerFast``) of convention ``name``."""
    from transformers import PreTrainedTokenizerFast

    conv = CONVENTIONS[name]
    kw = {k: v for k, v in (("bos_token", conv.bos), ("eos_token", conv.eos), ("unk_token", conv.unk)) if v}
    if conv.pad is not None:
        kw["pad_token"] = conv.pad
    trained = _trained(name)
    return PreTrainedTokenizerFast(
        tokenizer_object=type(trained).from_str(trained.to_str()),  # a copy: callers may change truncation
        padding_side=conv.padding_side,
        chat_template=conv.chat_template,
        model_input_names=["input_ids", "attention_mask"],  # as the decoders' own tokenizers: no token type ids
        **kw,
    )
