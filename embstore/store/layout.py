"""The on-disk layout of a store. Only this module names groups, arrays and attributes.

A store (zarr v3 directory, or one HDF5 file with the same tree) holds::

    attrs["embstore"] = StoreMeta.to_dict(): {schema_version, complete, fingerprint, layout, provenance, ...}
    splits/<split>/row_ids                       (n,) int64   row index in the source file
    splits/<split>/labels                        (n,) int64   index into label_names (if labelled)
    splits/<split>/groups                        (n,) int64   index into group_names (with --group-col)
    splits/<split>/duration                      (n,) float32 seconds the model heard (audio)
    splits/<split>/augment/<field>               (n,) per row: copy (int16, 0 = original row),
                                                 speed, shift, snr_db (float32, NaN = not applied), and
                                                 pitch, shift_seconds, noise_std where those were used
    splits/<split>/<tower>/n_tokens              (n,) int32   tokens (audio: output frames) after truncation
    splits/<split>/<tower>/truncated             (n,) bool    (audio: cropped by --max-seconds)
    splits/<split>/<tower>/pooled/<pooling>      (n_layers, n, hidden)  chunks (1, chunk_rows, hidden)
    splits/<split>/<tower>/tokens/<layer>/offsets      (n + 1,) int64 into the flat token rows
    splits/<split>/<tower>/tokens/<layer>/c<chunk>     (tokens of that row chunk, hidden)
    splits/<split>/words/offsets                 (n + 1,) int64 into the flat word rows (word-level data)
    splits/<split>/words/cut                     (words,) bool  no token reached the model (truncated or empty)
    splits/<split>/words/head                    (words,) int32 1-based head within the row, 0 = root (if known)
    splits/<split>/words/labels/<name>           (words,) int32 index into words.labels[name]
    splits/<split>/words/form_bytes              (bytes,) uint8 the words' UTF-8 text, back to back
    splits/<split>/words/form_offsets            (words + 1,) int64 into form_bytes
    splits/<split>/<tower>/words/<pooling>/c<chunk>    (n_layers, words of that row chunk, hidden)
    progress/<split>/done                        (n_chunks,) uint8, one storage chunk per element
    progress/<split>/digest                      (n_chunks, 32) uint8 sha256 of each row chunk
    progress/<split>/layer_digest                (n_chunks, entries, 32) uint8 sha256 of each
                                                 (tower, pooling or 'tokens', layer) of each row chunk,
                                                 in ``StoreLayout.digest_entries()`` order: what lets a
                                                 reader verify just the layers it reads

Text stores have one tower 'text' (or 'a' and 'b'), audio stores one tower 'audio'.
Augmented audio rows share their source row's ``row_ids`` (and group), so they can be traced
and kept on their source's side of every split.
Word states (``--word-pooling``, schema version 2) are ragged per row as the token states are: row ``i``'s words
are ``offsets[i]:offsets[i + 1]`` of every per-word array, and the words of row chunk ``c`` are one array per
(pooling, chunk), chunked one layer at a time.
Rows are stored in extraction order (longest first); ``row_ids`` maps them back. The pooled
array is chunked one layer at a time, so reading one layer touches only that layer's chunks.
Row chunk ``c`` covers rows [c * chunk_rows, (c + 1) * chunk_rows) (chunk_rows per split, see
``SplitLayout.plan``): the unit of resume and
of multi-process work, aligned with the storage chunks so ranks never share a chunk.

The root attribute is written from a :class:`StoreMeta` (with its :class:`Provenance` and :class:`StoreLayout`)
and read back through one: no other module names its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from embstore.errors import StoreDamagedError, StoreMismatchError

__all__ = [
    "EMBSTORE_VERSION",
    "SCHEMA_VERSION",
    "ATTR_KEY",
    "SINGLE_TOWER",
    "PAIR_TOWERS",
    "StoreLayout",
    "SplitLayout",
    "StoreMeta",
    "Provenance",
    "WordsMeta",
    "READABLE_VERSIONS",
    "word_offsets_path",
    "word_cut_path",
    "word_head_path",
    "word_label_path",
    "word_form_bytes_path",
    "word_form_offsets_path",
    "word_chunk_path",
    "word_entry",
    "TextRecord",
    "row_ids_path",
    "labels_path",
    "groups_path",
    "duration_path",
    "augment_path",
    "AUDIO_TOWER",
    "AUGMENT_FIELDS",
    "n_tokens_path",
    "truncated_path",
    "pooled_path",
    "token_offsets_path",
    "token_chunk_path",
    "done_path",
    "digest_path",
    "layer_digest_path",
]

SCHEMA_VERSION = 2
"""2 added word states and word labels (``--word-pooling``); a version 1 store is a version 2 store without them."""
READABLE_VERSIONS = (1, 2)
"""Schema versions this embstore opens."""

EMBSTORE_VERSION = "0.1.0"
"""The version of embstore that writes stores (``embstore.__version__``), recorded in each store's provenance."""
ATTR_KEY = "embstore"
SINGLE_TOWER = "text"
PAIR_TOWERS = ("a", "b")
AUDIO_TOWER = "audio"
AUGMENT_FIELDS = ("copy", "speed", "shift", "snr_db", "pitch", "shift_seconds", "noise_std")
"""Per-row augmentation arrays; the last three are written only by stores whose augmentation used them."""
TOKEN_CHUNK_ROWS = 8192
WORD_CHUNK_ROWS = 8192


@dataclass(frozen=True, kw_only=True)
class SplitLayout:
    """Shape facts of one split."""

    n_rows: int
    """Stored rows."""
    chunk_rows: int
    """Rows per row chunk: the requested maximum evened out so the last chunk is not mostly empty."""
    n_tokens: dict[str, int]
    """Total tokens per tower (the flat length of per-token arrays)."""
    n_words: int = 0
    """Total words (word-level data; 0 otherwise)."""

    @classmethod
    def plan(cls, n_rows: int, max_chunk_rows: int, n_tokens: dict[str, int], n_words: int = 0) -> "SplitLayout":
        chunks = max(1, -(-n_rows // max_chunk_rows))
        return cls(n_rows=n_rows, chunk_rows=max(1, -(-n_rows // chunks)), n_tokens=n_tokens, n_words=n_words)

    @property
    def n_chunks(self) -> int:
        """Row chunks (work units)."""
        return max(1, -(-self.n_rows // self.chunk_rows))

    def rows(self, chunk: int) -> tuple[int, int]:
        """Row range [start, stop) of row chunk ``chunk``."""
        start = chunk * self.chunk_rows
        return start, min(self.n_rows, start + self.chunk_rows)


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """What arrays a store holds and how they are shaped."""

    layers: tuple[int, ...]
    """Stored layer indices (0 = embeddings)."""
    poolings: tuple[str, ...]
    hidden: int
    dtype: str
    """Storage dtype of hidden states, 'float16' or 'float32'."""
    towers: tuple[str, ...]
    """('text',) or ('a', 'b') in towers mode."""
    token_layers: tuple[int, ...]
    """Layers with per-token states."""
    chunk_rows: int
    """The requested maximum rows per chunk (each split evens it out)."""
    splits: dict[str, SplitLayout]
    word_poolings: tuple[str, ...] = ()
    """Word poolings stored (first, last, mean) for every layer of :attr:`layers`; () for none (and every store of
    schema version 1)."""

    def to_dict(self) -> dict[str, Any]:
        d = self._to_dict()
        if self.word_poolings:  # absent otherwise: a store without words reads back exactly as version 1 wrote it
            d["word_poolings"] = list(self.word_poolings)
            for name, sl in self.splits.items():
                d["splits"][name]["n_words"] = sl.n_words
        return d

    def _to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "poolings": list(self.poolings),
            "hidden": self.hidden,
            "dtype": self.dtype,
            "towers": list(self.towers),
            "token_layers": list(self.token_layers),
            "chunk_rows": self.chunk_rows,
            "splits": {
                k: {
                    "n_rows": v.n_rows,
                    "chunk_rows": v.chunk_rows,
                    "n_chunks": v.n_chunks,
                    "n_tokens": dict(v.n_tokens),
                }
                for k, v in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreLayout":
        return cls(
            layers=tuple(d["layers"]),
            poolings=tuple(d["poolings"]),
            hidden=int(d["hidden"]),
            dtype=d["dtype"],
            towers=tuple(d["towers"]),
            token_layers=tuple(d["token_layers"]),
            chunk_rows=int(d["chunk_rows"]),
            splits={
                k: SplitLayout(
                    n_rows=v["n_rows"],
                    chunk_rows=v["chunk_rows"],
                    n_tokens=dict(v["n_tokens"]),
                    n_words=int(v.get("n_words", 0)),
                )
                for k, v in d["splits"].items()
            },
            word_poolings=tuple(d.get("word_poolings") or ()),
        )

    def layer_position(self, layer: int) -> int:
        """Index of ``layer`` along the pooled arrays' first axis."""
        return self.layers.index(layer)

    def chunk_shape_pooled(self, split: str) -> tuple[int, int, int]:
        return (1, self.splits[split].chunk_rows, self.hidden)

    def digest_entries(self) -> list[tuple[str, str, int]]:
        """(tower, pooling or 'tokens', layer) of every per-layer checksum of a row chunk, in stored order."""
        out = [(t, p, layer) for t in self.towers for p in self.poolings for layer in self.layers]
        out += [(t, "tokens", layer) for t in self.towers for layer in self.token_layers]
        return out + [
            (t, word_entry(p), layer) for t in self.towers for p in self.word_poolings for layer in self.layers
        ]

    def data_paths(self, split: str) -> list[str]:
        """Every array written per row chunk, in the canonical order used for digests."""
        paths = []
        for tower in self.towers:
            paths += [pooled_path(split, tower, p) for p in self.poolings]
        return paths


def _other(d: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The keys of ``d`` that ``cls`` has no field for (kept as read, see :class:`StoreMeta`)."""
    known = {f.name for f in fields(cls)} - {"other"}
    return {k: v for k, v in d.items() if k not in known}


def _names(values: Any) -> tuple[Any, ...] | None:
    return None if values is None else tuple(values)


@dataclass(frozen=True, kw_only=True)
class TextRecord:
    """How each text became the model's input (:attr:`Provenance.text`): the template or chat template, and which
    tokens ``mean`` and ``max`` cover (``embstore.extraction.textspec.TextSpec``, plus the rendered prompt)."""

    template: str | None = None
    """--template, with ``{text}`` (and ``{text_pair}``), or None."""
    chat_template: bool = False
    """--chat-template: the tokenizer's own chat template, the text as the user turn."""
    system: str | None = None
    """--system: the system turn of the chat template, or None."""
    pool_tokens: str = "all"
    """--pool-tokens: 'text' (the row's own text tokens) or 'all' (every non-pad token)."""
    prompt: str | None = None
    """The prompt as rendered: the template, or the chat template with ``{text}`` where the user's text goes; None
    for the text alone."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "chat_template": self.chat_template,
            "system": self.system,
            "pool_tokens": self.pool_tokens,
            "prompt": self.prompt,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextRecord":
        return cls(
            template=d.get("template"),
            chat_template=bool(d.get("chat_template", False)),
            system=d.get("system"),
            pool_tokens=str(d.get("pool_tokens") or "all"),
            prompt=d.get("prompt"),
        )


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """How a store was made: the model, the data, the options and the tools (:attr:`StoreMeta.provenance`).

    Written when the store is created (plus :attr:`quantization` for int8 stores) and never changed after. Its
    fields are described; what is in the store id is :mod:`embstore.extraction.store_id`'s to say.
    """

    model: dict[str, Any]
    """The backbone's identity (:mod:`embstore.backbones.registry`, less its tokenizer): name, kind, path,
    weights_sha256, config, class, modality, and random_weights for a random-weights control."""
    tokenizer: dict[str, Any] | None
    """The tokenizer's (audio: feature extractor's) identity: class, path, files, sha256."""
    max_length: int | None
    """--max-length: the tokens each text was cut to (recorded for audio stores too, where it does nothing)."""
    poolings: tuple[str, ...]
    """The stored poolings, as in the layout."""
    dtype: str | None
    """--dtype: the storage dtype of the hidden states."""
    precision: str | None
    """How the model computed, as the store id holds it: the compute dtype ('float32', 'bfloat16', 'float16') or
    'int8-dynamic' (``precision_of``); stores written before --compute-dtype say 'float32' or 'bf16-autocast'."""
    device: str | None
    """The device the extraction ran on ('cpu', 'cuda', 'cuda:1', ...)."""
    sources: tuple[dict[str, Any], ...]
    """One record per source file: split ('all' for a file --holdout carved), path, sha256, format, columns, rows,
    holdout (audio adds audio_files and audio_sha256)."""
    text_col: str | None
    """--text-col."""
    text_pair_col: str | None
    """--text-pair-col: the second sentence of pairs, or None."""
    pair_mode: str | None
    """'joint' (one input of both sentences) or 'towers' (each sentence its own tower)."""
    label_col: str | None
    """--label-col, or None for an unlabelled store."""
    audio_col: str | None
    """--audio-col: set for audio stores, None for text."""
    group_col: str | None
    """--group-col (e.g. the speaker), or None."""
    max_seconds: float | None
    """--max-seconds: the audio each clip was cropped to, or None."""
    augment: dict[str, Any] | None
    """The audio augmentation (transforms, copies, classes, snr_db, seed), or None."""
    rows: dict[str, int]
    """Stored rows per split."""
    tool: dict[str, str]
    """The version of each package that wrote the store (embstore, torch, transformers, zarr, python)."""
    config: dict[str, Any]
    """The whole ``ExtractConfig.to_dict()`` of the extraction."""
    compute_dtype: str | None = None
    """The dtype the model's parameters actually had during the forward ('float32', 'bfloat16', 'float16'); None
    (and absent from the stored attribute) in stores written before it was recorded."""
    causal: bool | None = None
    """Whether the model is a decoder (causal attention: ``last,mean`` by default, ``cls`` refused); None in older
    stores."""
    top_layer: str | None = None
    """What the top stored layer is, in words (after the final norm for the language models); None in older
    stores."""
    text: TextRecord | None = None
    """Text stores: the template or chat template and the pooled tokens; None for audio and older stores."""
    quantization: dict[str, Any] | None = None
    """--quantize int8: the measured deviation from float32 of every stored array on the first batch; else None
    (and absent from the stored attribute)."""
    batching: str | dict[str, Any] | None = None
    """Audio stores: ``'exact'`` (each clip has its values alone, whatever shares its batch: a family the anatomy map
    knows), or the batching options that changed the values and are in the store id (batch_seconds, batch_size,
    chunk_rows, and ``why``: ``unmapped``, a speech model the map does not know, or ``int8``, --quantize int8). None
    for text (and absent from the stored attribute)."""
    preprocess: dict[str, Any] | None = None
    """--preprocess: the text-to-text function applied before tokenisation, ``{function: 'MODULE:NAME', sha256: of
    its module's source}`` (:func:`embstore.data.preprocess.preprocess_identity`); None (and absent from the stored
    attribute) when none was."""
    label_from_path: str | None = None
    """--label-from-path: the regular expression whose first group of each audio file's name is its label; None
    (and absent) when the labels came from a column."""
    other: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (a later version wrote them), kept as read and written back unchanged."""

    @property
    def model_name(self) -> str | None:
        """The ``--model`` the store was made with."""
        name = self.model.get("name")
        return None if name is None else str(name)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the keys in the order extraction has always written them, then :attr:`other`."""
        d: dict[str, Any] = {
            "model": dict(self.model),
            "tokenizer": self.tokenizer,
            "max_length": self.max_length,
            "poolings": list(self.poolings),
            "dtype": self.dtype,
            "precision": self.precision,
            "device": self.device,
            "sources": [dict(s) for s in self.sources],
            "text_col": self.text_col,
            "text_pair_col": self.text_pair_col,
            "pair_mode": self.pair_mode,
            "label_col": self.label_col,
            "audio_col": self.audio_col,
            "group_col": self.group_col,
            "max_seconds": self.max_seconds,
            "augment": self.augment,
            "rows": dict(self.rows),
            "tool": dict(self.tool),
            "config": dict(self.config),
        }
        for key, value in (
            ("compute_dtype", self.compute_dtype),
            ("causal", self.causal),
            ("top_layer", self.top_layer),
        ):
            if value is not None:
                d[key] = value
        if self.text is not None:
            d["text"] = self.text.to_dict()
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.batching is not None:
            d["batching"] = self.batching
        if self.preprocess is not None:  # only when used: a store made without them keeps the attribute it had
            d["preprocess"] = dict(self.preprocess)
        if self.label_from_path is not None:
            d["label_from_path"] = self.label_from_path
        return {**d, **self.other}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Provenance":
        """Read any schema-1 provenance: a key an older version did not write reads as None (or empty), which
        every reader takes as "not recorded"; an unknown key goes to :attr:`other`."""
        return cls(
            model=dict(d.get("model") or {}),
            tokenizer=d.get("tokenizer"),
            max_length=d.get("max_length"),
            poolings=tuple(d.get("poolings") or ()),
            dtype=d.get("dtype"),
            precision=d.get("precision"),
            device=d.get("device"),
            sources=tuple(dict(s) for s in d.get("sources") or ()),
            text_col=d.get("text_col"),
            text_pair_col=d.get("text_pair_col"),
            pair_mode=d.get("pair_mode"),
            label_col=d.get("label_col"),
            audio_col=d.get("audio_col"),
            group_col=d.get("group_col"),
            max_seconds=d.get("max_seconds"),
            augment=d.get("augment"),
            rows=dict(d.get("rows") or {}),
            tool=dict(d.get("tool") or {}),
            config=dict(d.get("config") or {}),
            compute_dtype=d.get("compute_dtype"),
            causal=d.get("causal"),
            top_layer=d.get("top_layer"),
            text=None if d.get("text") is None else TextRecord.from_dict(d["text"]),
            quantization=d.get("quantization"),
            batching=d.get("batching"),
            preprocess=d.get("preprocess"),
            label_from_path=d.get("label_from_path"),
            other=_other(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class WordsMeta:
    """What a store of word-level data knows about its words (:attr:`StoreMeta.words`)."""

    labels: dict[str, tuple[str, ...]]
    """Per-word label column -> its values, which ``splits/<split>/words/labels/<name>`` indexes."""
    heads: bool
    """Whether ``splits/<split>/words/head`` holds every word's dependency head."""
    cut: dict[str, int]
    """Words per split that no token reached (their states are zeros, ``words/cut`` marks them)."""
    truncated: dict[str, int]
    """Of those, the words --max-length cut off (the rest the tokenizer made no token of)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": {k: list(v) for k, v in self.labels.items()},
            "heads": self.heads,
            "cut": dict(self.cut),
            "truncated": dict(self.truncated),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WordsMeta":
        return cls(
            labels={k: tuple(v) for k, v in (d.get("labels") or {}).items()},
            heads=bool(d.get("heads")),
            cut=dict(d.get("cut") or {}),
            truncated=dict(d.get("truncated") or {}),
        )


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """The root attribute of a store (``attrs[ATTR_KEY]``): what it holds, whether it is complete, how it was made.

    Extraction builds one before the model runs (``complete=False``) and marks it complete last
    (:meth:`completed`); every reader parses the attribute with :meth:`from_dict`. Schema version 1 covers every
    store written so far: :meth:`from_dict` reads a store an older version wrote (a key it lacks reads as None or
    empty) and keeps the keys it does not know in :attr:`other`, so :meth:`to_dict` gives back the attribute it
    read and rewriting the metadata of a resumed store loses nothing.
    """

    schema_version: int = SCHEMA_VERSION
    """The version of this layout (:data:`SCHEMA_VERSION`); :meth:`from_dict` refuses any other."""
    complete: bool
    """Every row chunk is written and the store is final (the last write of an extraction)."""
    fingerprint: str
    """The store id: the sha256 of everything that decides its contents (:mod:`embstore.extraction.store_id`)."""
    modality: str = "text"
    """'text' or 'audio'."""
    group_names: tuple[str, ...] | None = None
    """Names of the groups (e.g. speakers) that ``splits/<split>/groups`` indexes, with --group-col; else None."""
    layout: StoreLayout
    """What arrays the store holds and how they are shaped."""
    label_names: tuple[str, ...] | None = None
    """Names of the classes that ``splits/<split>/labels`` indexes; None for an unlabelled store."""
    truncated: dict[str, int] = field(default_factory=dict)
    """Rows cut by --max-length (audio: cropped by --max-seconds) per split."""
    skipped_empty: dict[str, int] = field(default_factory=dict)
    """Rows dropped as empty (--skip-empty) per split."""
    created: str | None = None
    """When the store was created (ISO 8601, UTC, seconds)."""
    finished: str | None = None
    """When the store was marked complete; None until then."""
    provenance: Provenance
    """How the store was made."""
    augmented: dict[str, int] | None = None
    """Audio stores: augmented copies per split (absent from text stores)."""
    sampling_rate: int | None = None
    """Audio stores: the rate (Hz) the model heard (absent from text stores)."""
    words: WordsMeta | None = None
    """Stores of word-level data (``--word-pooling``): the word labels and cut words (absent otherwise)."""
    other: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (a later version wrote them), kept as read and written back unchanged."""

    def completed(self, finished: str) -> "StoreMeta":
        """This metadata marked complete at ``finished``."""
        return replace(self, complete=True, finished=finished)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (plain JSON), the keys in the order extraction has always written them."""
        d: dict[str, Any] = {
            "schema_version": self.schema_version,
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "modality": self.modality,
            "group_names": None if self.group_names is None else list(self.group_names),
            "layout": self.layout.to_dict(),
            "label_names": None if self.label_names is None else list(self.label_names),
            "truncated": dict(self.truncated),
            "skipped_empty": dict(self.skipped_empty),
            "created": self.created,
            "finished": self.finished,
            "provenance": self.provenance.to_dict(),
        }
        if self.augmented is not None:
            d["augmented"] = dict(self.augmented)
        if self.sampling_rate is not None:
            d["sampling_rate"] = self.sampling_rate
        if self.words is not None:
            d["words"] = self.words.to_dict()
        return {**d, **self.other}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "this store") -> "StoreMeta":
        """Parse a store's root attribute; ``source`` names the store in errors.

        Another schema version is :class:`StoreMismatchError`; an attribute without a fingerprint or layout is
        :class:`StoreDamagedError`.
        """
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise StoreMismatchError(
                f"{source} has store schema version {version}, this embstore reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-extract it with this version."
            )
        for key in ("fingerprint", "layout"):
            if not d.get(key):
                raise StoreDamagedError(
                    f"{source} has no {key!r} in its '{ATTR_KEY}' attribute; the store is damaged: delete it and "
                    f"re-extract."
                )
        return cls(
            schema_version=version,
            complete=bool(d.get("complete")),
            fingerprint=str(d["fingerprint"]),
            modality=str(d.get("modality") or "text"),
            group_names=_names(d.get("group_names")),
            layout=StoreLayout.from_dict(d["layout"]),
            label_names=_names(d.get("label_names")),
            truncated=dict(d.get("truncated") or {}),
            skipped_empty=dict(d.get("skipped_empty") or {}),
            created=d.get("created"),
            finished=d.get("finished"),
            provenance=Provenance.from_dict(d.get("provenance") or {}),
            augmented=None if d.get("augmented") is None else dict(d["augmented"]),
            sampling_rate=d.get("sampling_rate"),
            words=None if d.get("words") is None else WordsMeta.from_dict(d["words"]),
            other=_other(d, cls),
        )


def _split(split: str) -> str:
    return f"splits/{split}"


def row_ids_path(split: str) -> str:
    return f"{_split(split)}/row_ids"


def labels_path(split: str) -> str:
    return f"{_split(split)}/labels"


def groups_path(split: str) -> str:
    return f"{_split(split)}/groups"


def duration_path(split: str) -> str:
    return f"{_split(split)}/duration"


def augment_path(split: str, field: str) -> str:
    if field not in AUGMENT_FIELDS:
        raise KeyError(f"unknown augmentation field {field!r}; one of {AUGMENT_FIELDS}")
    return f"{_split(split)}/augment/{field}"


def n_tokens_path(split: str, tower: str) -> str:
    return f"{_split(split)}/{tower}/n_tokens"


def truncated_path(split: str, tower: str) -> str:
    return f"{_split(split)}/{tower}/truncated"


def pooled_path(split: str, tower: str, pooling: str) -> str:
    return f"{_split(split)}/{tower}/pooled/{pooling}"


def token_offsets_path(split: str, tower: str, layer: int) -> str:
    return f"{_split(split)}/{tower}/tokens/{layer}/offsets"


def token_chunk_path(split: str, tower: str, layer: int, chunk: int) -> str:
    return f"{_split(split)}/{tower}/tokens/{layer}/c{chunk:06d}"


def done_path(split: str) -> str:
    return f"progress/{split}/done"


def digest_path(split: str) -> str:
    return f"progress/{split}/digest"


def layer_digest_path(split: str) -> str:
    return f"progress/{split}/layer_digest"


def _words(split: str) -> str:
    return f"{_split(split)}/words"


def word_offsets_path(split: str) -> str:
    return f"{_words(split)}/offsets"


def word_cut_path(split: str) -> str:
    return f"{_words(split)}/cut"


def word_head_path(split: str) -> str:
    return f"{_words(split)}/head"


def word_label_path(split: str, name: str) -> str:
    return f"{_words(split)}/labels/{name}"


def word_form_bytes_path(split: str) -> str:
    return f"{_words(split)}/form_bytes"


def word_form_offsets_path(split: str) -> str:
    return f"{_words(split)}/form_offsets"


def word_entry(pooling: str) -> str:
    """The 'what' of a word pooling in ``digest_entries`` and in the chunk encoder's array names: 'words/first'."""
    return f"words/{pooling}"


def word_chunk_path(split: str, tower: str, pooling: str, chunk: int) -> str:
    return f"{_split(split)}/{tower}/words/{pooling}/c{chunk:06d}"
