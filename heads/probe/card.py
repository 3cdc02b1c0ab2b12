"""``HeadCard``: what a saved head needs to label new inputs (its features, its backbone, its label names).

A sweep writes one with its best head (``best_head/head.json``); :func:`heads.probe.predict.load_head` and
``heads predict`` read only the card, never the store. It is kept in head.json under ``"extra"``, the key heads
were saved with before the card existed, so heads saved before and after it read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from embstore.errors import ConfigError
from embstore.layers import format_layers
from embstore.store import layout as L
from heads.probe.specs import Combo

if TYPE_CHECKING:
    from embstore.store.reader import Store

__all__ = ["HeadCard"]

_REQUIRED = ("layers", "combine", "pooling", "head", "model")
"""What a card cannot do without: the features (layers, combine, pooling, head) and the backbone (model)."""


@dataclass(frozen=True, kw_only=True)
class HeadCard:
    """The description saved with a head: which stored features it reads and how the store made them."""

    layers: tuple[int, ...]
    """The store layers the head reads (0 = embeddings)."""
    combine: str
    """How those layers become the head's input: single, concat, sum, mean, mix, or the head's own (see ``Combo``)."""
    pooling: str
    """The stored pooling the head reads, or 'tokens' for per-token heads."""
    head: str
    """The head kind (linear, mlp, ...)."""
    model: dict[str, Any]
    """The store's backbone identity (``Provenance.model``): name, weights_sha256, modality, ..."""
    label_names: tuple[str, ...] | None = None
    """Names of the classes the head's outputs stand for; None: the outputs are named by index."""
    towers: tuple[str, ...] = (L.SINGLE_TOWER,)
    """The store's towers: ('text',), ('a', 'b') for --towers pairs, or ('audio',)."""
    dtype: str = "float16"
    """The store's dtype: new inputs are encoded to it before the head sees them, as the store's rows were."""
    max_length: int | None = None
    """The store's --max-length (text); None when not recorded."""
    pair_mode: str | None = None
    """The store's pair mode ('joint' or 'towers'), or None."""
    text_pair_col: str | None = None
    """The store's second-sentence column: set when the head reads sentence pairs."""
    max_seconds: float | None = None
    """The store's --max-seconds (audio): new clips are cropped the same way."""
    precision: str | None = None
    """How the store's model computed ('int8-dynamic' makes new inputs go through int8 layers too)."""
    compute_dtype: str | None = None
    """The dtype the store's model computed in (``Provenance.compute_dtype``): new inputs are encoded in it too;
    None for stores from before it was recorded (float32)."""
    text: L.TextRecord | None = None
    """The store's template or chat template and pooled tokens (``Provenance.text``): new texts are put into the
    same prompt; None: the text alone, every token pooled."""
    store: str | None = None
    """The store the head was trained on (its path as given to the sweep)."""
    store_id: str | None = None
    """That store's fingerprint."""
    seed: int | None = None
    """The seed of the saved run."""
    fold: int | None = None
    """The fold of the saved run (--folds), else None."""
    chosen_on: str | None = None
    """What chose this head among the sweep's ('validation macro-F1')."""
    other: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know, kept as read and written back unchanged."""

    @property
    def combo(self) -> Combo:
        """The configuration the head was trained as."""
        return Combo(self.layers, self.combine, self.pooling, self.head)

    @property
    def modality(self) -> str:
        """'audio' when the head was trained on a speech model's store, else 'text'."""
        return str(self.model.get("modality") or "text")

    @property
    def needs_pairs(self) -> bool:
        """Whether every input is a sentence pair (two towers, or one input of both sentences)."""
        return len(self.towers) == 2 or bool(self.text_pair_col)

    @classmethod
    def for_store(cls, combo: Combo, store: "Store", store_path: str, *, seed: int, fold: int | None) -> "HeadCard":
        """The card of a head trained as ``combo`` on ``store`` (opened from ``store_path``)."""
        prov = store.provenance
        return cls(
            layers=combo.layers,
            combine=combo.combine,
            pooling=combo.pooling,
            head=combo.head,
            model=dict(prov.model),
            label_names=None if store.label_names is None else tuple(store.label_names),
            towers=tuple(store.towers),
            dtype=store.layout.dtype,
            max_length=prov.max_length,
            pair_mode=prov.pair_mode,
            text_pair_col=prov.text_pair_col,
            max_seconds=prov.max_seconds,
            precision=prov.precision,
            compute_dtype=prov.compute_dtype,
            text=prov.text,
            store=store_path,
            store_id=store.fingerprint,
            seed=seed,
            fold=fold,
            chosen_on="validation macro-F1",
        )

    def to_dict(self) -> dict[str, Any]:
        """The saved form, in the key order sweeps have always written (``layers_label`` is for people reading it)."""
        out: dict[str, Any] = {
            "layers": list(self.layers),
            "layers_label": format_layers(self.layers),
            "combine": self.combine,
            "pooling": self.pooling,
            "head": self.head,
            "store": self.store,
            "store_id": self.store_id,
            "label_names": None if self.label_names is None else list(self.label_names),
            "model": dict(self.model),
            "max_length": self.max_length,
            "pair_mode": self.pair_mode,
            "text_pair_col": self.text_pair_col,
            "towers": list(self.towers),
            "dtype": self.dtype,
            "max_seconds": self.max_seconds,
            "precision": self.precision,
        }
        if self.compute_dtype is not None:  # absent from cards of stores that did not record it, as before
            out["compute_dtype"] = self.compute_dtype
        if self.text is not None:
            out["text"] = self.text.to_dict()
        out.update({"seed": self.seed, "fold": self.fold, "chosen_on": self.chosen_on})
        return {**out, **self.other}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HeadCard":
        """Read a saved card. Keys an older sweep did not write take their defaults (towers ('text',), dtype
        float16); a card without the features or the backbone is :class:`ConfigError`."""
        missing = [k for k in _REQUIRED if not d.get(k)]
        if missing:
            raise ConfigError(
                f"The head card lacks {', '.join(missing)}, which a head needs to label new inputs; save the head "
                "with 'heads sweep' or 'heads train'."
            )
        known = {f.name for f in fields(cls)} | {"layers_label"}
        names = d.get("label_names")
        return cls(
            layers=tuple(int(x) for x in d["layers"]),
            combine=str(d["combine"]),
            pooling=str(d["pooling"]),
            head=str(d["head"]),
            model=dict(d["model"]),
            label_names=None if names is None else tuple(names),
            towers=tuple(d.get("towers") or (L.SINGLE_TOWER,)),
            dtype=str(d.get("dtype") or "float16"),
            max_length=d.get("max_length"),
            pair_mode=d.get("pair_mode"),
            text_pair_col=d.get("text_pair_col"),
            max_seconds=d.get("max_seconds"),
            precision=d.get("precision"),
            compute_dtype=d.get("compute_dtype"),
            text=None if d.get("text") is None else L.TextRecord.from_dict(d["text"]),
            store=d.get("store"),
            store_id=d.get("store_id"),
            seed=d.get("seed"),
            fold=d.get("fold"),
            chosen_on=d.get("chosen_on"),
            other={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_saved(cls, extra: Mapping[str, Any]) -> "HeadCard | None":
        """The card in a head.json's ``"extra"``, or None when the head was saved without one (by
        ``HeadClassifier.save`` outside a sweep, which may have put notes of its own there)."""
        if not all(extra.get(k) for k in _REQUIRED):
            return None
        return cls.from_dict(extra)
