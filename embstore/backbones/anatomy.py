"""Where the parts of an encoder sit, for the forward stop, :mod:`embstore.backbones.pruned` and
:mod:`heads.finetune.surgery`: BERT-family text encoders and speech encoders.

Two families, one numbering (0 = what the first transformer layer receives, 1..L the transformer layers):

- **BERT family** (BERT, RoBERTa, ELECTRA...): ``.embeddings`` is layer 0, ``.encoder.layer`` holds 1..L, and each
  layer's attention is ``attention.self.query/key/value`` with the output projection ``attention.output.dense``.
- **Speech** (HuBERT, wav2vec2, WavLM, data2vec-audio...): layer 0 is the convolutional feature encoder
  (``.feature_extractor``), its projection (``.feature_projection``), the convolutional position embedding
  (``.encoder.pos_conv_embed``), the learnt mask embedding of SpecAugment and, in post-norm models, the encoder's
  layer norm (applied before layer 1); ``.encoder.layers`` holds 1..L, and each layer's attention is
  ``attention.q_proj/k_proj/v_proj`` with the output projection ``attention.out_proj``. In pre-norm
  ("stable layer norm") models the encoder's layer norm follows layer L and belongs to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from embstore.errors import ConfigError

__all__ = [
    "Attention",
    "attention",
    "base_of",
    "blocks",
    "embedding_modules",
    "encoder_layers",
    "find_blocks",
    "feature_encoder",
    "is_speech",
    "set_blocks",
    "top_modules",
]


def _is_bert(cand: Any) -> bool:
    return isinstance(getattr(getattr(cand, "encoder", None), "layer", None), nn.ModuleList) and hasattr(
        cand, "embeddings"
    )


def _is_speech(cand: Any) -> bool:
    return isinstance(getattr(getattr(cand, "encoder", None), "layers", None), nn.ModuleList) and hasattr(
        cand, "feature_extractor"
    )


def base_of(model: nn.Module) -> Any:
    """The base encoder: a BERT-like one (``.embeddings`` and ``.encoder.layer``) or a speech one
    (``.feature_extractor`` and ``.encoder.layers``), or the one a wrapper holds as .bert/.base_model.

    Typed Any: its submodules are reached by attribute, which nn.Module cannot type."""
    for cand in (model, getattr(model, "bert", None), getattr(model, "base_model", None)):
        if isinstance(cand, nn.Module) and (_is_bert(cand) or _is_speech(cand)):
            return cand
    raise ConfigError(
        f"Model surgery supports BERT-family encoders (BERT, RoBERTa, ELECTRA: a model with .embeddings and "
        f".encoder.layer) and speech encoders (HuBERT, wav2vec2, WavLM: .feature_extractor and .encoder.layers), or "
        f"a model wrapping one as .bert/.base_model; got {type(model).__name__}. Use such a model."
    )


def is_speech(base: Any) -> bool:
    """Whether ``base`` (from :func:`base_of`) is a speech encoder."""
    return _is_speech(base)


def blocks(base: Any) -> nn.ModuleList:
    """The transformer layers 1..L (index i holds layer i + 1)."""
    return base.encoder.layers if _is_speech(base) else base.encoder.layer


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers 1..L of ``model`` (or of the base it wraps) as a list (index i holds layer i + 1)."""
    return list(blocks(base_of(model)))


def find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The transformer layers of ``model`` in order, or None for an architecture the map does not know (which then
    runs whole: see :func:`embstore.extraction.forward.hidden_states`). The same lookup as surgery's, so extraction,
    freezing, truncation and pruning agree on where a model's layers are."""
    try:
        layers = blocks(base_of(model))
    except ConfigError:
        return None
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return layers if n is None or len(layers) == n else None


def set_blocks(base: Any, layers: nn.ModuleList) -> None:
    """Replace the transformer layers (truncation)."""
    if _is_speech(base):
        base.encoder.layers = layers
    else:
        base.encoder.layer = layers


def _stable(base: Any) -> bool:
    """Pre-norm speech encoder: its encoder layer norm follows the last layer."""
    return bool(getattr(base.config, "do_stable_layer_norm", False))


def embedding_modules(base: Any) -> list[nn.Module]:
    """The modules of layer 0 (see the module docstring); the SpecAugment mask embedding, a bare parameter of the
    base, is frozen by :func:`heads.finetune.surgery.freeze` alongside them."""
    if not _is_speech(base):
        return [base.embeddings]
    encoder = base.encoder
    mods = [base.feature_extractor, base.feature_projection, encoder.pos_conv_embed]
    if not _stable(base) and isinstance(getattr(encoder, "layer_norm", None), nn.Module):
        mods.append(encoder.layer_norm)
    return mods


def top_modules(base: Any) -> list[nn.Module]:
    """Modules that belong to layer L (a pre-norm speech encoder's final layer norm)."""
    if _is_speech(base) and _stable(base) and isinstance(getattr(base.encoder, "layer_norm", None), nn.Module):
        return [base.encoder.layer_norm]
    return []


def feature_encoder(base: Any) -> nn.Module:
    """A speech encoder's convolutional feature encoder (what ``freeze_feature_encoder()`` freezes)."""
    if not _is_speech(base):
        raise ConfigError(
            f"'feature-encoder' names the convolutional front end of a speech model (HuBERT, wav2vec2, "
            f"WavLM); {type(base).__name__} is a text model. Use 'embeddings' or layer numbers."
        )
    return base.feature_extractor


@dataclass(frozen=True)
class Attention:
    """One layer's self-attention: the module holding the q/k/v projections, their attribute names, the module
    holding the output projection and its attribute name, and the width of one head."""

    holder: Any
    qkv: tuple[str, str, str]
    out_holder: Any
    out_name: str
    head_dim: int

    @property
    def out(self) -> nn.Linear:
        return getattr(self.out_holder, self.out_name)

    def set_heads(self, n: int) -> None:
        """Record the new head count where the layer's forward reads it."""
        if self.qkv[0] == "query":  # BERT: reshapes with attention_head_size and -1, keep every count consistent
            self.holder.num_attention_heads = n
            self.holder.all_head_size = n * self.head_dim
        else:  # HuBERT/wav2vec2: reshapes with head_dim and -1
            self.holder.num_heads = n


def attention(layer: nn.Module) -> Attention:
    """The self-attention parts of one transformer layer; a ConfigError for layouts head surgery cannot change."""
    att: Any = getattr(layer, "attention", None)
    self_attn = getattr(att, "self", None)
    dense = getattr(getattr(att, "output", None), "dense", None)
    if (
        self_attn is not None
        and isinstance(dense, nn.Linear)
        and all(isinstance(getattr(self_attn, n, None), nn.Linear) for n in ("query", "key", "value"))
    ):
        return Attention(self_attn, ("query", "key", "value"), att.output, "dense", int(self_attn.attention_head_size))
    if att is not None and hasattr(att, "gru_rel_pos_const"):
        raise ConfigError(
            f"{type(layer).__name__} is a WavLM layer: its gated relative position bias splits the layer input by head "
            "and one bias is shared by every layer, so heads cannot be removed from it physically; use --freeze or "
            "--truncate with WavLM, or head pruning with HuBERT or wav2vec2."
        )
    if att is not None and all(
        isinstance(getattr(att, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "out_proj")
    ):
        return Attention(att, ("q_proj", "k_proj", "v_proj"), att, "out_proj", int(att.head_dim))
    raise ConfigError(
        f"{type(layer).__name__} has neither BERT-style attention (attention.self.query/key/value and "
        f"attention.output.dense) nor HuBERT-style attention (attention.q_proj/k_proj/v_proj/out_proj); head pruning "
        f"supports BERT, RoBERTa, ELECTRA, HuBERT and wav2vec2 layers."
    )
