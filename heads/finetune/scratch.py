"""``heads finetune --model scratch:gru`` (``scratch:lstm``, ``scratch:rnn``): a recurrent classifier trained from
nothing on the training rows, the "no pretraining" row beside the probes and the fine-tunes.

- :class:`Vocabulary`: words of the training rows (never the evaluation rows) seen at least ``--vocab-min-count``
  times. The tokenizer is one documented rule (:func:`words`): lower-case (``--lowercase``, the default), delete
  every punctuation character (anything that is not a letter, digit, underscore or white space: ``U.S.`` becomes
  ``us``, ``don't`` becomes ``dont``), split at white space. Id 0 pads, id 1 is every word outside the vocabulary.
  It is called like a Hugging Face tokenizer (``input_ids`` cut to ``max_length`` words), so the loop's batching
  and ``heads predict`` read it unchanged, and it is saved as ``model/vocabulary.json``.
- :class:`RecurrentEncoder`: a trainable embedding (``--embedding-dim``) and a GRU, LSTM or tanh RNN
  (``--rnn-layers``, ``--rnn-hidden``, ``--bidirectional``) over packed sequences, so padding never enters a state
  and a row's logits do not depend on its batch. It saves as ``model/scratch.json`` + ``model/model.safetensors``.
- :class:`ScratchClassifier`: ``--aggregate`` mean or max over the words, or the last state of each direction, then
  the classifier: linear, or the study's MLP (``--classifier mlp --classifier-hidden H``): tanh, Linear, dropout,
  tanh, Linear.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embstore.errors import ConfigError
from heads.finetune.config import SCRATCH, FinetuneConfig
from heads.finetune.model import Classifier

__all__ = [
    "PUNCTUATION",
    "RecurrentEncoder",
    "ScratchClassifier",
    "ScratchSpec",
    "Vocabulary",
    "is_scratch_dir",
    "load_scratch",
    "scratch_backbone",
    "words",
]

PUNCTUATION = re.compile(r"[^\w\s]")
"""What :func:`words` deletes: every character that is not a letter, digit, underscore or white space."""
VOCAB_FILE, SPEC_FILE, WEIGHTS_FILE = "vocabulary.json", "scratch.json", "model.safetensors"
PAD, UNK = 0, 1


def words(text: str, lowercase: bool = True) -> list[str]:
    """The words of ``text``: lower-cased (``lowercase``), punctuation deleted (:data:`PUNCTUATION`), split at
    white space."""
    return PUNCTUATION.sub("", text.lower() if lowercase else text).split()


class Vocabulary:
    """Word ids: 0 pads, 1 is an unknown word, 2.. the kept words, most frequent first (ties alphabetical)."""

    pad_token_id = PAD

    def __init__(self, vocab: Sequence[str], *, lowercase: bool, min_count: int) -> None:
        self.words = list(vocab)
        self.lowercase, self.min_count = lowercase, min_count
        self.index = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int, lowercase: bool) -> "Vocabulary":
        """The words of ``texts`` seen at least ``min_count`` times; an empty result is refused naming the option."""
        counts: Counter[str] = Counter()
        n = 0
        for text in texts:
            counts.update(words(text, lowercase))
            n += 1
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not kept:
            top = max(counts.values(), default=0)
            raise ConfigError(
                f"The vocabulary of the {n} training rows is empty: no word occurs {min_count} times "
                f"(--vocab-min-count {min_count}; the most frequent word occurs {top} times); lower "
                "--vocab-min-count or train on more rows."
            )
        return cls(kept, lowercase=lowercase, min_count=min_count)

    def __len__(self) -> int:
        """Ids in use: the words plus padding and unknown."""
        return len(self.words) + 2

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of the first ``max_length`` words of ``text`` (one unknown id for a text with no word)."""
        ids = [self.index.get(w, UNK) for w in words(text, self.lowercase)][:max_length] or [UNK]
        return ids

    def __call__(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        truncation: bool = True,
        max_length: int | None = None,
        **_: Any,
    ) -> dict[str, list[list[int]]]:
        """The Hugging Face tokenizer call the loop and ``heads predict`` make (``input_ids`` only)."""
        if pairs is not None:
            raise ConfigError("A scratch: model reads one text per row; drop --text-pair-col.")
        return {"input_ids": [self.encode(t, max_length if truncation else None) for t in texts]}

    def to_dict(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase, "min_count": self.min_count, "words": self.words}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        return cls(d["words"], lowercase=bool(d["lowercase"]), min_count=int(d["min_count"]))

    def save_pretrained(self, directory: str | Path) -> None:
        """``directory``/vocabulary.json (the name ``save_model`` calls on a tokenizer)."""
        (Path(directory) / VOCAB_FILE).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabulary":
        return cls.from_dict(json.loads((Path(directory) / VOCAB_FILE).read_text()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ScratchSpec:
    """The architecture of a :class:`RecurrentEncoder`; saved as model/scratch.json."""

    core: str
    """gru, lstm or rnn."""
    vocab_size: int
    embedding_dim: int
    rnn_layers: int
    rnn_hidden: int
    bidirectional: bool
    gradient_checkpointing: bool = False

    @property
    def hidden_size(self) -> int:
        """Width of a state: the hidden size times the directions (what the classifier reads)."""
        return self.rnn_hidden * (2 if self.bidirectional else 1)


class RecurrentEncoder(nn.Module):
    """Embedding + GRU/LSTM/RNN over packed sequences: (B, T) ids and mask -> (B, T, H) states and (B, H) last
    states (of each direction: forward at the last word, backward at the first)."""

    def __init__(self, spec: ScratchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.config = spec  # the classifier reads config.hidden_size, as on a Hugging Face model
        self.embedding = nn.Embedding(spec.vocab_size, spec.embedding_dim, padding_idx=PAD)
        core = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[spec.core]
        self.rnn = core(
            spec.embedding_dim,
            spec.rnn_hidden,
            num_layers=spec.rnn_layers,
            batch_first=True,
            bidirectional=spec.bidirectional,
        )

    def _run(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, H)
        h_n = h[0] if isinstance(h, tuple) else h  # (layers x directions, B, hidden); LSTM: (h, c)
        dirs = 2 if self.spec.bidirectional else 1
        last = h_n.view(self.spec.rnn_layers, dirs, x.shape[0], self.spec.rnn_hidden)[-1]  # (dirs, B, hidden)
        return states, last.transpose(0, 1).reshape(x.shape[0], -1)  # (B, T, H), (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = attention_mask.sum(1).clamp(min=1)  # (B,)
        x = self.embedding(input_ids)  # (B, T, E)
        if self.spec.gradient_checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            out: tuple[torch.Tensor, torch.Tensor] = checkpoint(self._run, x, lengths, use_reentrant=False)
            return out
        return self._run(x, lengths)

    def save_pretrained(self, directory: str | Path, safe_serialization: bool = True) -> None:
        """scratch.json + model.safetensors in ``directory`` (what ``save_model`` calls)."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / SPEC_FILE).write_text(json.dumps({**asdict(self.spec), "gradient_checkpointing": False}, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_FILE))


class ScratchClassifier(Classifier):
    """A :class:`RecurrentEncoder`, an aggregation of its states over time (``pooling``: mean, max or last) and the
    classifier: linear, or the study's MLP per hidden size H: tanh, Linear(., H), dropout; then tanh, Linear."""

    def __init__(
        self,
        encoder: nn.Module,
        n_classes: int,
        *,
        pooling: str = "mean",
        classifier: str = "linear",
        hidden: tuple[int, ...] = (256,),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(encoder, n_classes, pooling=pooling, classifier="linear")
        if classifier == "mlp":
            width = int(getattr(encoder, "config").hidden_size)
            layers: list[nn.Module] = []
            for h in hidden:
                layers += [nn.Tanh(), nn.Linear(width, h), nn.Dropout(dropout)]
                width = h
            self.head = nn.Sequential(*layers, nn.Tanh(), nn.Linear(width, n_classes))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) word ids and mask -> (B, C) logits."""
        states, last = self.encoder(input_ids, attention_mask)  # (B, T, H), (B, H)
        mask = attention_mask.unsqueeze(-1).bool()  # (B, T, 1)
        if self.pooling == "last":
            pooled = last
        elif self.pooling == "max":
            pooled = states.masked_fill(~mask, float("-inf")).max(1).values
        else:
            m = mask.to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(pooled)


@dataclass(frozen=True)
class ScratchBackbone:
    """What run_finetune reads of a backbone, for a model built from the training rows."""

    name: str
    model: RecurrentEncoder
    tokenizer: Vocabulary
    identity: dict[str, Any]
    modality: str = "text"


def scratch_backbone(config: FinetuneConfig, texts: Iterable[str]) -> ScratchBackbone:
    """The vocabulary of ``texts`` (the training rows) and a freshly initialised encoder (seeded by the run's seed);
    its identity hashes the vocabulary, architecture and seed (the initial weights follow from them)."""
    vocab = Vocabulary.build(texts, min_count=config.vocab_min_count, lowercase=config.lowercase)
    spec = ScratchSpec(
        core=config.model[len(SCRATCH) :],
        vocab_size=len(vocab),
        embedding_dim=config.embedding_dim,
        rnn_layers=config.rnn_layers,
        rnn_hidden=config.rnn_hidden,
        bidirectional=config.bidirectional,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.source.seed)
        model = RecurrentEncoder(spec)
    record = {"spec": asdict(spec), "vocabulary": vocab.to_dict(), "seed": config.source.seed}
    sha = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    identity = {
        "name": config.model,
        "kind": "scratch",
        "config": {"model_type": f"scratch-{spec.core}", **asdict(spec)},
        "vocabulary_size": len(vocab.words),
        "weights_sha256": sha,
    }
    return ScratchBackbone(config.model, model, vocab, identity)


def is_scratch_dir(directory: str | Path) -> bool:
    """Whether ``directory`` (a run's model/) holds a scratch model."""
    return (Path(directory) / SPEC_FILE).is_file()


def load_scratch(directory: str | Path, device: str) -> tuple[RecurrentEncoder, Vocabulary]:
    """The encoder (eval mode, on ``device``) and vocabulary saved in ``directory``."""
    from safetensors.torch import load_file

    path = Path(directory)
    spec = ScratchSpec(**json.loads((path / SPEC_FILE).read_text()))
    model = RecurrentEncoder(spec)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.eval().to(device), Vocabulary.load(path)
