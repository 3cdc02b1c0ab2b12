"""The anatomy map: where each model family keeps its parts. The forward stop, freezing, truncation, head pruning
and the families' defaults (causal or not) all read it, so there is one way to find a model's layers.

One numbering everywhere: 0 is what the first block receives (the embedding output for text; for speech the
projected conv features plus the convolutional position embedding, for Whisper the two convolutions over the log-mel
frames plus the position table), 1..L are the blocks. A stored state i is transformers' ``hidden_states[i]``: for
the speech encoders whose final norm (or SEW's upsampling) follows the last block, state L is the last block's
output before it (transformers 5 records it so), and fine-tuning pools that same tensor.

Each :class:`Family` names, relative to the *base* model (the bare encoder or decoder that a task wrapper holds,
found by :func:`base_of`):

- ``blocks``: the block list (index i holds layer i + 1; ALBERT's holds a few blocks that several layers share,
  ``layer_groups``);
- ``embeddings``: the modules and parameters of layer 0 (missing ones are skipped: a model may lack an optional
  projection);
- ``final_norm``: a norm applied after the last block, which belongs to layer L (transformers' ``hidden_states``
  include it in the top entry for the language models and Whisper, see ``final_norm_in_states``; not for the speech
  encoders); ``norm_by_config``: the speech encoders' layer norm, before the blocks (layer 0) or after them (layer L)
  by the config; ``after_top``: what follows the last block outside every stored state (SEW's upsampling), layer L;
- ``shared``: modules that every block uses (relative-position tables and their norms, T5's table that sits in the
  first block); freezing freezes them only when every block is frozen;
- ``after_block``: a module applied to one block's output outside the block (DeBERTa-v2's conv after block 1): it
  belongs to that layer, and the layer's stored state is its output;
- ``attention``: where a block's q/k/v and output projections are, for head pruning; ``no_prune`` says why heads
  cannot be removed from a family (grouped projections, one block or one position bias serving every layer);
- for speech: ``front_end`` (the conv feature encoder), ``squeeze`` (hidden states at a lower frame rate than the
  front end: SEW), ``padding`` (the parts a batch's padding reaches although the model is given an attention mask,
  which :mod:`embstore.backbones.padding` keeps it out of) and ``window`` (one fixed input window: Whisper).

One rule for every edit: a parameter belongs to the layers that run it (:func:`layer_parameters`), and freezing
freezes it only when all of them are frozen. A block's parameters belong to its layer (ALBERT's shared block to
every layer), the embeddings to layer 0, the final norm to layer L, the shared tables to 1..L.

A model whose family is not in the map still extracts (it runs whole: no forward stop, one line in the log says
so); surgery on it is refused in one line naming the family.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from embstore.errors import ConfigError

__all__ = [
    "Attention",
    "AttentionLayout",
    "Family",
    "FAMILIES",
    "after_block_modules",
    "attention",
    "base_of",
    "blocks",
    "block_linears",
    "embedding_modules",
    "encoder_layers",
    "batch_exact",
    "encoder_class_of",
    "family_of",
    "feature_encoder",
    "has_window",
    "top_state_module",
    "idle_modules",
    "padding_parts",
    "state_frames",
    "PaddingPart",
    "find_blocks",
    "causal_from_config",
    "is_causal",
    "is_speech",
    "keep_layers",
    "layer_blocks",
    "layer_parameters",
    "Projection",
    "projections",
    "set_blocks",
    "shared_modules",
    "state_norm",
    "top_state",
    "state_outputs",
    "top_modules",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AttentionLayout:
    """Where one block keeps its self-attention, as dotted paths relative to the block."""

    holder: str
    """The module holding the q/k/v projections (``attention.self`` in BERT)."""
    qkv: tuple[str, ...]
    """Attribute names of the q, k and v projections on ``holder``; or one name, of a fused projection whose output
    is q, then k, then v, each heads x head width (ModernBERT's Wqkv)."""
    out_holder: str
    """The module holding the output projection."""
    out: str
    """Attribute name of the output projection on ``out_holder``."""
    head_dim: str
    """Attribute of ``holder`` giving the width of one head."""
    head_counts: tuple[str, ...]
    """Attributes of ``holder`` that store the head count, set to the new count after pruning."""
    width: str | None = None
    """Attribute of ``holder`` storing heads x head width, updated with them (BERT's ``all_head_size``)."""
    extra: tuple[str, ...] = ()
    """Further projections on ``holder`` with one block of output rows per head, cut like q where the block has them
    (DeBERTa-v2's ``pos_key_proj``/``pos_query_proj``, absent with ``share_att_key``)."""
    head_params: tuple[str, ...] = ()
    """Parameters of ``holder`` with one row per head ((heads, head width): the conformer's relative position biases
    ``pos_bias_u``/``pos_bias_v``), cut to the kept heads where the block has them."""
    head_bias: tuple[int, str] | None = None
    """(position, name) of an argument of ``holder``'s forward carrying a (B, heads, T, T) score bias made outside
    the block for every head (MPNet's relative position bias, computed once by the encoder): pruning cuts it to the
    kept heads of that block (:mod:`embstore.backbones.pruned`)."""


BERT_ATTENTION = AttentionLayout(
    holder="attention.self",
    qkv=("query", "key", "value"),
    out_holder="attention.output",
    out="dense",
    head_dim="attention_head_size",
    head_counts=("num_attention_heads",),
    width="all_head_size",
)
SPEECH_ATTENTION = AttentionLayout(
    holder="attention",
    qkv=("q_proj", "k_proj", "v_proj"),
    out_holder="attention",
    out="out_proj",
    head_dim="head_dim",
    head_counts=("num_heads",),
)

WHISPER_ATTENTION = replace(SPEECH_ATTENTION, holder="self_attn", out_holder="self_attn")
CONFORMER_ATTENTION = AttentionLayout(
    holder="self_attn",
    qkv=("linear_q", "linear_k", "linear_v"),
    out_holder="self_attn",
    out="linear_out",
    head_dim="head_size",
    # num_heads is left as it is: the rotary embedding reads it to split the block's *input* (hidden width) into
    # heads, before q and k are projected, and the attention itself reshapes by head width
    head_counts=(),
    extra=("linear_pos",),
    head_params=("pos_bias_u", "pos_bias_v"),
)
DISTILBERT_ATTENTION = AttentionLayout(
    holder="attention",
    qkv=("q_lin", "k_lin", "v_lin"),
    out_holder="attention",
    out="out_lin",
    head_dim="attention_head_size",
    head_counts=("n_heads",),
)
MPNET_ATTENTION = AttentionLayout(
    holder="attention.attn",
    qkv=("q", "k", "v"),
    out_holder="attention.attn",
    out="o",
    head_dim="attention_head_size",
    head_counts=("num_attention_heads",),
    width="all_head_size",
    head_bias=(2, "position_bias"),
)
DEBERTA_V2_ATTENTION = AttentionLayout(
    holder="attention.self",
    qkv=("query_proj", "key_proj", "value_proj"),
    out_holder="attention.output",
    out="dense",
    head_dim="attention_head_size",
    head_counts=("num_attention_heads",),
    width="all_head_size",
    extra=("pos_key_proj", "pos_query_proj"),
)
MODERNBERT_ATTENTION = AttentionLayout(
    holder="attn",
    qkv=("Wqkv",),
    out_holder="attn",
    out="Wo",
    head_dim="head_dim",
    head_counts=(),  # its forward reads the head count off the projection's width
)

_GQA = (
    "its attention is grouped-query (several query heads share one key/value head), so removing a query head "
    "cannot be done by slicing q, k and v alike; use --freeze or --truncate instead"
)
_FUSED = "{name} fuses q, k and v into one projection, which head pruning does not slice; use --freeze or --truncate"


@dataclass(frozen=True, kw_only=True)
class PaddingPart:
    """A part of a speech model that the padding of a batch reaches although the model is given an attention mask,
    and how :mod:`embstore.backbones.padding` keeps the padding out of it, so that each clip of a batch gets the values
    it has alone."""

    path: str
    """Dotted path from the base; ``*`` stands for every entry of a module list (every block)."""
    fix: str
    """``own-frames``: the module runs again on each clip's own frames (a group norm, whose statistics run over time;
    a layer norm there normalises each frame and is left alone); ``zero-padding``: its input is zeroed past each
    clip's frames (a convolution over time, which on a clip alone sees zeros there); ``state-mask``: the attention
    mask it is given is rebuilt from each clip's own state frames (SEW pools the frame mask by its maximum, so a clip
    of an odd frame count attends one state more in a batch than alone, where its states round down)."""
    frames: str = "frames"
    """The frames its input runs at: ``first-conv`` (after the front end's first convolution), ``frames`` (the
    front end's output), ``states`` (the hidden states')."""


FIXES = ("own-frames", "zero-padding", "state-mask")
FRAME_KINDS = ("first-conv", "frames", "states")


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family: which ``config.model_type`` values it covers and where its parts are (module docstring)."""

    name: str
    model_types: tuple[str, ...]
    modality: str = "text"
    """'text' or 'audio'."""
    causal: bool = False
    """A decoder: each position sees only the ones before it (pooling defaults differ, ``cls`` is refused)."""
    blocks: str
    embeddings: tuple[str, ...] = ()
    final_norm: str | None = None
    final_norm_in_states: bool = False
    """transformers' top ``hidden_states`` entry is after ``final_norm`` (the language models tie it to
    ``last_hidden_state``); below the top, every stored layer is a block's raw output."""
    shared: tuple[str, ...] = ()
    attention: AttentionLayout | None = None
    no_prune: str | None = None
    """Why heads cannot be removed from this family (None with an ``attention`` layout)."""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    """Base-model attribute names a wrapper may hold the base under, besides ``base_model``."""
    layer_groups: str | None = None
    """The config attribute counting the blocks when several layers share one (ALBERT's ``num_hidden_groups``):
    layer i + 1 runs block ``int(i / (L / G))``, as transformers' AlbertTransformer does."""
    after_block: tuple[tuple[int, str], ...] = ()
    """(layer, path): a module applied to that layer's block output outside the block, where the model has one
    (DeBERTa-v2's conv, after block 1, with ``conv_kernel_size``); see the module docstring."""
    per_layer_config: tuple[str, ...] = ()
    """Config lists with one entry per layer (ModernBERT's ``layer_types``), cut with the blocks by truncation."""
    projections: tuple[str, ...] = ()
    """The attention and MLP projections of a block, as names relative to the block (a module matches a name it
    equals or ends with after a dot, as peft matches ``target_modules``): where LoRA adapters go by default
    (:func:`projections`). Empty: every linear layer of the block."""
    norm_by_config: str | None = None
    """A speech encoder's layer norm: applied before the first block in post-norm models (layer 0) and after the last
    in pre-norm ones (``config.do_stable_layer_norm``; layer L, outside the stored states)."""
    after_top: tuple[str, ...] = ()
    """Modules applied after the last block that no stored state runs (SEW's upsampling back to the conv frame rate,
    wav2vec2's adapter): they belong to layer L."""
    front_end: tuple[str, ...] = ()
    """A speech model's convolutional front end: what ``--freeze feature-encoder`` freezes."""
    squeeze: str | None = None
    """The config attribute by which the hidden states run at a lower frame rate than the front end (SEW's
    ``squeeze_factor``): a clip of F conv frames has F // squeeze states."""
    padding: tuple[PaddingPart, ...] = ()
    """The parts a batch's padding reaches although the model is given an attention mask (see :class:`PaddingPart`)."""
    window: bool = False
    """Every input is padded to one fixed window on its own (Whisper's 30 s of log-mel frames): no clip sees another's
    padding, and a longer clip must be cut."""
    never_run: tuple[str, ...] = ()
    """Modules transformers builds but never runs (the conformer's ``encoder.pos_conv_embed``): placed with the layer
    the map names (freezing reaches them), and frozen by a fine-tune, which no loss on them can train."""
    encoder_class: str | None = None
    """The transformers class the backbone is built as when the family's checkpoints hold a decoder too (Whisper's
    ``WhisperEncoder``): only its weights are read (:mod:`embstore.backbones.registry`)."""


_DECODER_EMBED = ("embed_tokens",)
_BERT_PROJECTIONS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
_T5_PROJECTIONS = (
    "SelfAttention.q",
    "SelfAttention.k",
    "SelfAttention.v",
    "SelfAttention.o",
    "wi",
    "wo",
    "wi_0",
    "wi_1",
)
_DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SPEECH_EMBED = ("feature_extractor", "feature_projection", "encoder.pos_conv_embed", "masked_spec_embed")
_FRONT_END = ("feature_extractor",)
# the group norm of a group-norm front end (wav2vec2-base, HuBERT-base, WavLM-base): per channel over all of time
_GROUP_NORM = PaddingPart(path="feature_extractor.conv_layers.0.layer_norm", fix="own-frames", frames="first-conv")
FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "ernie", "data2vec-text", "xlm-roberta-xl"),
        blocks="encoder.layer",
        embeddings=("embeddings",),
        attention=BERT_ATTENTION,
        projections=_BERT_PROJECTIONS,
    ),
    Family(
        name="electra",
        model_types=("electra",),
        blocks="encoder.layer",
        embeddings=("embeddings", "embeddings_project"),
        attention=BERT_ATTENTION,
        projections=_BERT_PROJECTIONS,
    ),
    Family(
        name="albert",
        model_types=("albert",),
        blocks="encoder.albert_layer_groups",
        layer_groups="num_hidden_groups",
        # the projection from the embedding width to the hidden width runs before the first block: layer 0
        embeddings=("embeddings", "encoder.embedding_hidden_mapping_in"),
        no_prune=(
            "ALBERT runs one shared block for every layer, so a head cannot leave one layer without leaving them "
            "all; use --freeze or --truncate"
        ),
        projections=("query", "key", "value", "attention.dense", "ffn", "ffn_output"),
    ),
    Family(
        name="mpnet",
        model_types=("mpnet",),
        blocks="encoder.layer",
        embeddings=("embeddings",),
        shared=("encoder.relative_attention_bias",),
        attention=MPNET_ATTENTION,
        projections=("attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"),
    ),
    Family(
        name="deberta",
        model_types=("deberta",),
        blocks="encoder.layer",
        embeddings=("embeddings",),
        shared=("encoder.rel_embeddings",),
        no_prune=(
            "DeBERTa (v1) fuses q, k and v into in_proj with per-head biases (and may mix heads: talking_head), "
            "which head pruning does not slice; use --freeze or --truncate (DeBERTa-v2 and v3 prune)"
        ),
        projections=("in_proj", "attention.output.dense", "intermediate.dense", "output.dense"),
    ),
    Family(
        name="deberta-v2",
        model_types=("deberta-v2",),
        blocks="encoder.layer",
        embeddings=("embeddings",),
        shared=("encoder.rel_embeddings", "encoder.LayerNorm"),
        after_block=((1, "encoder.conv"),),
        attention=DEBERTA_V2_ATTENTION,
        projections=(
            "query_proj",
            "key_proj",
            "value_proj",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
    ),
    Family(
        name="distilbert",
        model_types=("distilbert",),
        blocks="transformer.layer",
        embeddings=("embeddings",),
        attention=DISTILBERT_ATTENTION,
        projections=("q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2"),
    ),
    Family(
        name="modernbert",
        model_types=("modernbert",),
        blocks="layers",
        embeddings=("embeddings",),
        final_norm="final_norm",
        final_norm_in_states=True,
        per_layer_config=("layer_types",),
        attention=MODERNBERT_ATTENTION,
        projections=("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"),
    ),
    Family(
        name="t5-encoder",
        model_types=("t5", "mt5"),
        blocks="encoder.block",
        embeddings=("shared",),
        final_norm="encoder.final_layer_norm",
        final_norm_in_states=True,
        # the relative position table sits in the first block but every block adds the bias it makes
        shared=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",),
        no_prune=(
            "T5's relative position bias is made for every head by the first block and added to every block's "
            "scores, so one block cannot lose a head; use --freeze or --truncate"
        ),
        projections=_T5_PROJECTIONS,
    ),
    Family(
        name="umt5-encoder",
        model_types=("umt5",),
        blocks="encoder.block",
        embeddings=("shared",),
        final_norm="encoder.final_layer_norm",
        final_norm_in_states=True,
        no_prune=(
            "UMT5's attention (a position table in every block) is not mapped for head pruning; use --freeze or "
            "--truncate"
        ),
        projections=_T5_PROJECTIONS,
    ),
    Family(
        name="gpt2",
        model_types=("gpt2", "gptj", "gpt_neo", "codegen"),
        causal=True,
        blocks="h",
        embeddings=("wte", "wpe"),
        final_norm="ln_f",
        final_norm_in_states=True,
        no_prune=_FUSED.format(name="GPT-2 (c_attn)"),
        projections=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ),
    Family(
        name="gpt-neox",
        model_types=("gpt_neox",),
        causal=True,
        blocks="layers",
        embeddings=("embed_in",),
        final_norm="final_layer_norm",
        final_norm_in_states=True,
        no_prune=_FUSED.format(name="GPT-NeoX (query_key_value)"),
        projections=("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    Family(
        name="llama",
        model_types=(
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "phi3",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "starcoder2",
            "cohere",
        ),
        causal=True,
        blocks="layers",
        embeddings=_DECODER_EMBED,
        final_norm="norm",
        final_norm_in_states=True,
        per_layer_config=("layer_types",),  # Qwen2, Gemma2...: one attention kind per layer
        no_prune=_GQA,
        projections=_DECODER_PROJECTIONS,
    ),
    Family(
        name="phi",
        model_types=("phi",),
        causal=True,
        blocks="layers",
        embeddings=_DECODER_EMBED,
        final_norm="final_layernorm",
        final_norm_in_states=True,
        no_prune=_GQA,
        projections=("q_proj", "k_proj", "v_proj", "self_attn.dense", "fc1", "fc2"),
    ),
    Family(
        name="bloom",
        model_types=("bloom", "falcon"),
        causal=True,
        blocks="h",
        embeddings=("word_embeddings", "word_embeddings_layernorm"),
        final_norm="ln_f",
        final_norm_in_states=True,
        no_prune=_FUSED.format(name="BLOOM and Falcon (query_key_value)"),
    ),
    Family(
        name="opt",
        model_types=("opt",),
        causal=True,
        blocks="decoder.layers",
        embeddings=("decoder.embed_tokens", "decoder.embed_positions", "decoder.project_in"),
        final_norm="decoder.final_layer_norm",
        final_norm_in_states=True,
        no_prune="OPT's attention is not mapped for head pruning yet; use --freeze or --truncate",
        projections=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    ),
    # Speech. Layer 0 is what the first block receives; the conv front end, its projection, the position convs and
    # SpecAugment's mask embedding belong to it. Every family but Whisper takes an attention mask, and extraction
    # always gives one; the parts the padding still reaches are the families' ``padding``.
    Family(
        name="wav2vec2",
        model_types=("wav2vec2", "hubert", "unispeech", "unispeech-sat"),
        modality="audio",
        blocks="encoder.layers",
        embeddings=_SPEECH_EMBED,
        norm_by_config="encoder.layer_norm",
        after_top=("adapter",),
        front_end=_FRONT_END,
        padding=(_GROUP_NORM,),
        attention=SPEECH_ATTENTION,
        projections=("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"),
    ),
    Family(
        name="wavlm",
        model_types=("wavlm",),
        modality="audio",
        blocks="encoder.layers",
        embeddings=_SPEECH_EMBED,
        norm_by_config="encoder.layer_norm",
        after_top=("adapter",),
        front_end=_FRONT_END,
        # the relative position table sits in the first block's attention but every block adds the bias it makes
        shared=("encoder.layers.0.attention.rel_attn_embed",),
        padding=(_GROUP_NORM,),
        no_prune=(
            "WavLM's gated relative position bias splits the layer input by head and one bias is shared by every "
            "layer, so heads cannot be removed from it physically; use --freeze or --truncate"
        ),
    ),
    Family(
        name="data2vec-audio",
        model_types=("data2vec-audio",),
        modality="audio",
        blocks="encoder.layers",
        # post-norm only (it has no stable-layer-norm variant): the encoder's layer norm runs before the first block
        embeddings=(*_SPEECH_EMBED, "encoder.layer_norm"),
        after_top=("adapter",),
        front_end=_FRONT_END,
        # its front end is layer-normed (per frame); its position embedding is a stack of convolutions, each of
        # which would see the previous one's output at the padded frames
        padding=(PaddingPart(path="encoder.pos_conv_embed.layers.*.conv", fix="zero-padding"),),
        attention=SPEECH_ATTENTION,
    ),
    Family(
        name="wav2vec2-conformer",
        model_types=("wav2vec2-conformer",),
        modality="audio",
        blocks="encoder.layers",
        # encoder.pos_conv_embed is built but never run by transformers' conformer: frozen with layer 0 all the same
        embeddings=_SPEECH_EMBED,
        final_norm="encoder.layer_norm",
        after_top=("adapter",),
        never_run=("encoder.pos_conv_embed",),
        front_end=_FRONT_END,
        padding=(_GROUP_NORM, PaddingPart(path="encoder.layers.*.conv_module.depthwise_conv", fix="zero-padding")),
        attention=CONFORMER_ATTENTION,
    ),
    Family(
        name="sew",
        model_types=("sew",),
        modality="audio",
        blocks="encoder.layers",
        # the front end's layer norm and projection, then the encoder pools to the squeezed rate, adds the strided
        # position conv and normalises: all before the first block
        embeddings=(
            "feature_extractor",
            "layer_norm",
            "feature_projection",
            "encoder.pos_conv_embed",
            "encoder.layer_norm",
            "masked_spec_embed",
        ),
        after_top=("encoder.upsample",),
        front_end=_FRONT_END,
        squeeze="squeeze_factor",
        padding=(_GROUP_NORM, PaddingPart(path="encoder.layers.*", fix="state-mask", frames="states")),
        attention=SPEECH_ATTENTION,
    ),
    Family(
        name="sew-d",
        model_types=("sew-d",),
        modality="audio",
        blocks="encoder.encoder.layer",
        embeddings=(
            "feature_extractor",
            "layer_norm",
            "feature_projection",
            "encoder.pos_conv_embed",
            "masked_spec_embed",
        ),
        shared=("encoder.encoder.rel_embeddings", "encoder.encoder.LayerNorm"),
        after_top=("encoder.upsample",),
        front_end=_FRONT_END,
        squeeze="squeeze_factor",
        padding=(_GROUP_NORM, PaddingPart(path="encoder.encoder", fix="state-mask", frames="states")),
        attention=DEBERTA_V2_ATTENTION,
    ),
    Family(
        name="whisper-encoder",
        model_types=("whisper",),
        modality="audio",
        blocks="layers",
        # two convolutions over the log-mel frames (the second halves the rate) plus the fixed position table
        embeddings=("conv1", "conv2", "embed_positions"),
        final_norm="layer_norm",
        final_norm_in_states=True,
        front_end=("conv1", "conv2"),
        window=True,
        encoder_class="WhisperEncoder",
        attention=WHISPER_ATTENTION,
    ),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def _nn() -> Any:
    """torch.nn, imported when a model is looked at (the map itself, and :func:`causal_from_config`, need no torch)."""
    from torch import nn

    return nn


def _get(root: Any, path: str) -> Any:
    """``root.a.b`` for ``path`` 'a.b', or None where a part is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(root: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get(root, head) if head else root, last, value)


def _structural(cand: Any) -> Family | None:
    """A family by structure, for model types the map does not list: BERT-like or speech-like layouts."""
    if isinstance(_get(cand, "encoder.layer"), _nn().ModuleList) and hasattr(cand, "embeddings"):
        return FAMILIES[0]
    if isinstance(_get(cand, "encoder.layers"), _nn().ModuleList) and hasattr(cand, "feature_extractor"):
        return _BY_TYPE["hubert"]
    return None


def _model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _candidates(model: Any) -> list[Any]:
    """``model`` and the bases it may wrap (``base_model``, then the usual attribute names)."""
    out = [model]
    for name in ("base_model", "bert", "model", "transformer", "encoder"):
        cand = getattr(model, name, None)
        if isinstance(cand, _nn().Module) and all(cand is not c for c in out):
            out.append(cand)
    return out


def _resolve(model: Any) -> tuple[Any, Family] | None:
    """(base, family): the first candidate whose family's block list is where the map says."""
    for cand in _candidates(model):
        fam = _BY_TYPE.get(_model_type(cand)) or _structural(cand)
        if fam is not None and isinstance(_get(cand, fam.blocks), _nn().ModuleList):
            return cand, fam
    return None


def family_of(model: nn.Module) -> Family | None:
    """The map's entry for ``model`` (or the base it wraps), None for a family the map does not know."""
    found = _resolve(model)
    return None if found is None else found[1]


def base_of(model: nn.Module) -> Any:
    """The base model (the bare encoder or decoder) of ``model``, which may be a task wrapper of it; a ConfigError
    naming the family when the map does not know it.

    Typed Any: its submodules are reached by attribute, which nn.Module cannot type."""
    found = _resolve(model)
    if found is None:
        kind = _model_type(model) or type(model).__name__
        known = ", ".join(sorted({f.name for f in FAMILIES}))
        raise ConfigError(
            f"Model surgery does not know the {kind!r} family ({type(model).__name__}): the anatomy map covers "
            f"{known}. Use a model of one of these families, or extract without surgery."
        )
    return found[0]


def _family(base: Any) -> Family:
    found = _resolve(base)
    if found is None:  # pragma: no cover - callers pass what base_of returned
        raise ConfigError(f"{type(base).__name__} is not a base model of the anatomy map")
    return found[1]


def is_speech(base: Any) -> bool:
    """Whether ``base`` (from :func:`base_of`) is a speech encoder."""
    return _family(base).modality == "audio"


def causal_from_config(config: Mapping[str, Any]) -> bool:
    """Whether a config (``config.json`` as a dict) is a decoder's: its model type is a causal family of the map,
    or it says ``is_decoder`` or names a ``*ForCausalLM`` architecture. Reads no weights and needs no torch, so a
    store id can depend on it."""
    fam = _BY_TYPE.get(str(config.get("model_type") or ""))
    if fam is not None:
        return fam.causal
    archs = config.get("architectures") or []
    return bool(config.get("is_decoder", False)) or any(str(a).endswith("ForCausalLM") for a in archs)


def is_causal(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder (its family is causal, or its config says ``is_decoder`` or a ``*ForCausalLM``
    architecture), for families the map does not know too."""
    fam = family_of(model)
    if fam is not None:
        return fam.causal
    config = getattr(model, "config", None)
    return causal_from_config(
        {"is_decoder": getattr(config, "is_decoder", False), "architectures": getattr(config, "architectures", None)}
    )


def blocks(base: Any) -> nn.ModuleList:
    """The block list: blocks 1..L (index i holds layer i + 1), or the few blocks that ALBERT's layers share (see
    :func:`layer_blocks` for the block each layer runs)."""
    return _get(base, _family(base).blocks)


def set_blocks(base: Any, layers: nn.ModuleList) -> None:
    """Replace the block list."""
    _set(base, _family(base).blocks, layers)


def _group_of(i: int, n_layers: int, n_groups: int) -> int:
    """The block layer i + 1 runs when ``n_groups`` blocks serve ``n_layers`` layers (transformers' formula)."""
    return int(i / (n_layers / n_groups))


def layer_blocks(base: Any) -> list[nn.Module]:
    """The block each layer 1..L runs (index i for layer i + 1): the block list itself, except where several layers
    share a block (ALBERT), which then appears once per layer that runs it."""
    fam, mods = _family(base), blocks(base)
    if fam.layer_groups is None:
        return list(mods)
    inner = int(getattr(base.config, "inner_group_num", 1))
    if inner != 1:
        raise ConfigError(
            f"This {fam.name} model runs {inner} blocks per layer (inner_group_num {inner}), which embstore's "
            "layer numbering (one state per layer) cannot number; use a model with inner_group_num 1 (every "
            "released ALBERT)."
        )
    n = int(base.config.num_hidden_layers)
    return [mods[_group_of(i, n, len(mods))] for i in range(n)]


def _kept_groups(mods: nn.ModuleList, runs: list[nn.Module], k: int) -> int | None:
    """How many of the shared blocks ``mods`` a model of ``k`` layers needs so that its layers run the blocks
    ``runs[:k]`` do in the longer model (None: no count does)."""
    return next(
        (g for g in range(1, len(mods) + 1) if all(mods[_group_of(i, k, g)] is runs[i] for i in range(k))), None
    )


def keep_layers(base: Any, k: int) -> None:
    """Keep layers 1..k and delete the blocks no kept layer runs; the config follows (num_hidden_layers, ALBERT's
    group count, the per-layer config lists). ``k`` must be in [1, L] (the caller checks)."""
    fam, mods = _family(base), blocks(base)
    if fam.layer_groups is not None:  # the kept layers must run the same blocks in the shorter model
        runs = layer_blocks(base)
        groups = _kept_groups(mods, runs, k)
        if groups is None:
            can = [j for j in range(1, len(runs) + 1) if _kept_groups(mods, runs, j) is not None]
            raise ConfigError(
                f"Cannot truncate this {fam.name} model to {k} layers: its {len(mods)} shared blocks serve "
                f"{len(runs)} layers, and a {k}-layer model would run them in another order; truncate to one of "
                f"{', '.join(map(str, can))}."
            )
        set_blocks(base, _nn().ModuleList(list(mods)[:groups]))
        setattr(base.config, fam.layer_groups, groups)
    else:
        set_blocks(base, _nn().ModuleList(list(mods)[:k]))
    for name in fam.per_layer_config:
        value = getattr(base.config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(base.config, name, list(value)[:k])
    base.config.num_hidden_layers = k


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The block each layer 1..L of ``model`` (or of the base it wraps) runs (index i for layer i + 1)."""
    return layer_blocks(base_of(model))


_unknown_logged: set[str] = set()


def find_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The block each layer of ``model`` runs, in order (ALBERT's shared block once per layer), or None for a
    family the map does not know (which then runs whole: see :func:`embstore.extraction.forward.run_states`; one
    line in the log says it cannot stop early)."""
    found = _resolve(model)
    layers = None if found is None else layer_blocks(found[0])
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers is not None and (n is None or len(layers) == n):
        return layers
    kind = _model_type(model) or type(model).__name__
    if kind not in _unknown_logged:
        _unknown_logged.add(kind)
        log.warning(
            "%s: the anatomy map does not know this family, so it cannot stop early: the forward runs every block and "
            "keeps every layer's states until they are pooled",
            kind,
        )
    return None


def state_norm(model: nn.Module) -> nn.Module | None:
    """The module whose output is the top hidden state L, where that is not the last block's output: the final norm
    of the families with ``final_norm_in_states`` (transformers ties their top ``hidden_states`` entry to
    ``last_hidden_state``: the language models and Whisper's encoder); None elsewhere (the other speech encoders' top
    entry is their last block's output, before a pre-norm encoder's layer norm)."""
    found = _resolve(model)
    if found is None or not found[1].final_norm_in_states:
        return None
    top = top_modules(found[0])
    return top[0] if top else None


def top_state(model: nn.Module) -> str:
    """What the top stored layer L is, in words, for provenance: transformers' top ``hidden_states`` entry, which for
    the language models is after the final norm (the layers below are the raw residual stream)."""
    norm = state_norm(model)
    if norm is not None:
        return "after the final norm, as transformers' hidden_states (the layers below it are the raw residual stream)"
    if _resolve(model) is None:
        return "transformers' top hidden_states entry (a family the anatomy map does not know)"
    return "the last block's output, as transformers' hidden_states"


def after_block_modules(base: Any) -> dict[int, nn.Module]:
    """{layer: module} applied to that layer's block output outside the block, those the model has."""
    parts = {layer: _get(base, path) for layer, path in _family(base).after_block}
    return {layer: m for layer, m in parts.items() if isinstance(m, _nn().Module)}


def state_outputs(model: nn.Module) -> list[nn.Module]:
    """The module whose output is each stored state 1..L of ``model`` (index i for state i + 1): the layer's block,
    or what the model applies to the block's output outside it (DeBERTa-v2's conv for state 1). A shared block
    appears once per layer. ``model`` must be of a family the map knows (:func:`find_blocks` is not None)."""
    found = _resolve(model)
    if found is None:  # pragma: no cover - callers check find_blocks first
        raise ConfigError(f"{type(model).__name__} is not of a family the anatomy map knows")
    outs = layer_blocks(found[0])
    for layer, module in after_block_modules(found[0]).items():
        if layer <= len(outs):
            outs[layer - 1] = module
    return outs


def _norm_by_config(base: Any) -> tuple[nn.Module | None, bool]:
    """(the family's ``norm_by_config`` module or None, whether it follows the last block: a pre-norm model)."""
    fam = _family(base)
    norm = _get(base, fam.norm_by_config) if fam.norm_by_config else None
    return (norm if isinstance(norm, nn.Module) else None), bool(getattr(base.config, "do_stable_layer_norm", False))


def _parts(base: Any, paths: tuple[str, ...]) -> list[nn.Module | nn.Parameter]:
    return [p for p in (_get(base, path) for path in paths) if isinstance(p, (nn.Module, nn.Parameter))]


def embedding_modules(base: Any) -> list[nn.Module | nn.Parameter]:
    """The modules and parameters of layer 0 (see the module docstring), those the model has."""
    parts = _parts(base, _family(base).embeddings)
    norm, stable = _norm_by_config(base)
    return parts + ([norm] if norm is not None and not stable else [])


def top_state_module(model: nn.Module) -> nn.Module | None:
    """The module whose input is a speech model's top stored state (``hidden_states[L]``) where its output is not
    that state: a pre-norm encoder's final norm, the conformer's, SEW's upsampling, a wav2vec2 adapter (the first of
    them the forward runs). None where ``last_hidden_state`` is the top state (post-norm encoders, Whisper, whose
    final norm is in its states). Fine-tuning reads the top state from it with a forward pre-hook: unlike
    ``hidden_states``, which transformers records by hooks on the blocks, it is there when layerdrop skips blocks."""
    parts = _after_states(model)
    return parts[0] if parts else None


def _after_states(model: nn.Module) -> list[nn.Module]:
    """The modules that run after the top stored state, in the order the forward runs them (module docstring)."""
    found = _resolve(model)
    if found is None or found[1].modality != "audio":  # text pools last_hidden_state, its final norm included
        return []
    base, fam = found
    norm, stable = _norm_by_config(base)
    first = [norm] if norm is not None and stable else []
    own = (fam.final_norm,) if fam.final_norm and not fam.final_norm_in_states else ()
    return first + [p for p in _parts(base, own + fam.after_top) if isinstance(p, nn.Module)]


def idle_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of a speech model that no loss on its top stored state reaches: what runs after that state (from
    :func:`top_state_module` on: a pre-norm encoder's final norm, the conformer's, SEW's upsampling, a wav2vec2
    adapter) and what transformers builds but never runs (the family's ``never_run``). A fine-tune freezes them as it
    freezes a text model's pooler."""
    found = _resolve(model)
    idle = _parts(found[0], found[1].never_run) if found is not None and found[1].modality == "audio" else []
    return _after_states(model) + [m for m in idle if isinstance(m, nn.Module)]


def top_modules(base: Any) -> list[nn.Module]:
    """Modules that belong to layer L: the final norm (a pre-norm speech encoder's layer norm) and what follows the
    last block outside every stored state (SEW's upsampling)."""
    fam = _family(base)
    norm, stable = _norm_by_config(base)
    parts = _parts(base, ((fam.final_norm,) if fam.final_norm else ()) + fam.after_top)
    return [p for p in parts if isinstance(p, nn.Module)] + ([norm] if norm is not None and stable else [])


def shared_modules(base: Any) -> list[nn.Module | nn.Parameter]:
    """Modules that every block uses (frozen only when every block is)."""
    return [
        p for p in (_get(base, path) for path in _family(base).shared) if isinstance(p, (_nn().Module, _nn().Parameter))
    ]


def _params(part: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    from torch import nn

    return [part] if isinstance(part, nn.Parameter) else list(part.parameters())


def layer_parameters(base: Any) -> list[tuple[nn.Parameter, frozenset[int]]]:
    """Every parameter the map places, with the layers that run it (0 = embeddings): a block's belong to the
    layers that run the block (every layer, for ALBERT's one shared block), what follows a block outside it to that
    layer, the final norm to layer L, and the shared tables to 1..L (T5's, although it sits in the first block).
    Parameters the map does not place (a pooler, a task head) are left out. Freezing reads this: a parameter is
    frozen only when every layer that runs it is."""
    users: dict[int, tuple[nn.Parameter, set[int]]] = {}

    def add(part: nn.Module | nn.Parameter, layers: set[int]) -> None:
        for p in _params(part):
            users.setdefault(id(p), (p, set()))[1].update(layers)

    runs = layer_blocks(base)
    n = len(runs)
    for part in embedding_modules(base):
        add(part, {0})
    for i, block in enumerate(runs, 1):
        add(block, {i})
    for layer, module in after_block_modules(base).items():
        add(module, {layer})
    for module in top_modules(base):
        add(module, {n})
    every = set(range(1, n + 1))
    for part in shared_modules(base):
        for p in _params(part):
            users[id(p)] = (p, set(every))
    return [(p, frozenset(layers)) for p, layers in users.values()]


def _is_projection(module: nn.Module) -> bool:
    """A linear layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, pattern: str) -> bool:
    """peft's rule for ``target_modules``: the name is the pattern, or ends with it after a dot."""
    return name == pattern or name.endswith("." + pattern)


@dataclass(frozen=True)
class Projection:
    """One linear layer inside a block: its name relative to the block, the module, and the layers that run it
    (every layer for ALBERT's shared block)."""

    name: str
    module: nn.Module
    layers: frozenset[int]


def block_linears(base: Any) -> list[Projection]:
    """Every linear layer of the blocks (each module once, with the layers 1..L that run it), in block order."""
    found: dict[int, tuple[str, nn.Module, set[int]]] = {}
    for i, block in enumerate(layer_blocks(base), 1):
        for name, module in block.named_modules():
            if name and _is_projection(module):
                found.setdefault(id(module), (name, module, set()))[2].add(i)
    return [Projection(name, module, frozenset(layers)) for name, module, layers in found.values()]


def projections(base: Any, patterns: tuple[str, ...] | None = None) -> list[Projection]:
    """The block linears matching ``patterns`` (block-relative names, matched as peft matches ``target_modules``);
    None: the family's attention and MLP projections (``Family.projections``; every linear layer of the blocks for
    a family that lists none). A pattern that matches nothing is a ConfigError listing the block's linears."""
    linears = block_linears(base)
    chosen = _family(base).projections if patterns is None else patterns
    if not chosen:
        return linears
    unmatched = [p for p in chosen if not any(_matches(x.name, p) for x in linears)]
    if unmatched and patterns is not None:
        names = ", ".join(dict.fromkeys(x.name for x in linears))
        raise ConfigError(
            f"--lora-targets {','.join(unmatched)} names no module of this {_family(base).name} model's blocks; "
            f"its blocks' linear layers are {names} (a target matches a name or its end after a dot)."
        )
    return [x for x in linears if any(_matches(x.name, p) for p in chosen)]


def feature_encoder(base: Any) -> list[nn.Module]:
    """A speech encoder's convolutional front end (what ``freeze_feature_encoder()`` freezes; Whisper's two
    convolutions over the log-mel frames)."""
    if not is_speech(base):
        raise ConfigError(
            f"'feature-encoder' names the convolutional front end of a speech model (HuBERT, wav2vec2, "
            f"WavLM, Whisper); {type(base).__name__} is a text model. Use 'embeddings' or layer numbers."
        )
    return [m for m in _parts(base, _family(base).front_end) if isinstance(m, nn.Module)]


# --------------------------------------------------------------------------- speech: frames, padding, window


def batch_exact(model_type: str) -> bool:
    """Whether extraction gives every clip of a speech model of ``model_type`` the values it has alone, in any batch:
    the map knows its family, so :mod:`embstore.backbones.padding` keeps the padding out of every part it reaches."""
    fam = _BY_TYPE.get(model_type)
    return fam is not None and fam.modality == "audio"


def _output_lengths(base: Any, lengths: torch.Tensor) -> torch.Tensor:
    """The front end's frames for inputs of ``lengths`` (the model's own arithmetic; a wav2vec2 adapter, which runs
    after the blocks, left out)."""
    fn = base._get_feat_extract_output_lengths
    if "add_adapter" in inspect.signature(fn).parameters:
        return fn(lengths, add_adapter=False)
    return fn(lengths)


def state_frames(model: nn.Module, lengths: torch.Tensor, kind: str = "states") -> torch.Tensor:
    """(B,) int64 frames of a speech model's inputs of ``lengths`` (the model's input units: samples, or log-mel frames
    for Whisper): ``states``, the hidden states' frames (the front end's, divided by SEW's squeeze and rounded down);
    ``frames``, the front end's output; ``first-conv``, after its first convolution."""
    found = _resolve(model)
    base, fam = found if found is not None else (model, None)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if kind == "first-conv":
        config: Any = base.config
        return torch.div(lengths - int(config.conv_kernel[0]), int(config.conv_stride[0]), rounding_mode="floor") + 1
    frames = _output_lengths(base, lengths).to(torch.long)
    if kind == "states" and fam is not None and fam.squeeze is not None:
        frames = torch.div(frames, int(getattr(base.config, fam.squeeze)), rounding_mode="floor")
    return frames


def padding_parts(model: nn.Module) -> list[tuple[nn.Module, PaddingPart]]:
    """The modules of ``model`` a batch's padding reaches, each with its part of the map (``*`` expanded over the
    module list it stands for; parts the model lacks skipped; an ``own-frames`` part only where it is a group norm)."""
    found = _resolve(model)
    if found is None:
        return []
    base, fam = found
    out: list[tuple[nn.Module, PaddingPart]] = []
    for part in fam.padding:
        head, star, tail = part.path.partition(".*")
        if star:
            holder = _get(base, head)
            mods = (
                [_get(m, tail.lstrip(".")) if tail else m for m in holder] if isinstance(holder, nn.ModuleList) else []
            )
        else:
            mods = [_get(base, part.path)]
        for m in mods:
            if isinstance(m, nn.Module) and (part.fix != "own-frames" or isinstance(m, nn.GroupNorm)):
                out.append((m, part))
    return out


def encoder_class_of(model_type: str) -> Any:
    """The class of the family's ``encoder_class`` for ``model_type`` (imported from transformers' modeling module of
    that type, where it is not exported at the top), or None."""
    import importlib

    fam = _BY_TYPE.get(model_type)
    if fam is None or fam.encoder_class is None:
        return None
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
    return getattr(module, fam.encoder_class, None) or getattr(
        importlib.import_module(f"{module.__name__}.modeling_{model_type_to_module_name(model_type)}"),
        fam.encoder_class,
    )


def has_window(model: nn.Module) -> bool:
    """Whether every input of ``model`` is padded to one fixed window on its own (Whisper)."""
    fam = family_of(model)
    return fam is not None and fam.window


@dataclass(frozen=True)
class Attention:
    """One layer's self-attention: the module holding the q/k/v projections, their attribute names, the module
    holding the output projection and its attribute name, the width of one head, and where the head count is."""

    holder: Any
    qkv: tuple[str, ...]
    """Three projections, or one fused q|k|v projection (``AttentionLayout.qkv``)."""
    out_holder: Any
    out_name: str
    head_dim: int
    layout: AttentionLayout
    extra: tuple[str, ...] = ()
    """The ``layout.extra`` projections this block has."""
    head_params: tuple[str, ...] = ()
    """The ``layout.head_params`` parameters this block has."""

    @property
    def out(self) -> nn.Linear:
        return getattr(self.out_holder, self.out_name)

    def set_heads(self, n: int) -> None:
        """Record the new head count where the layer's forward reads it."""
        for name in self.layout.head_counts:
            setattr(self.holder, name, n)
        if self.layout.width is not None:
            setattr(self.holder, self.layout.width, n * self.head_dim)


def attention(layer: nn.Module, base: Any = None) -> Attention:
    """The self-attention parts of one block of ``base`` (found from the block itself when None); a ConfigError
    naming the reason for families head surgery cannot change."""
    att: Any = getattr(layer, "attention", None)
    if att is not None and hasattr(att, "gru_rel_pos_const"):
        raise ConfigError(
            f"{type(layer).__name__} is a WavLM layer: its gated relative position bias splits the layer input by head "
            "and one bias is shared by every layer, so heads cannot be removed from it physically; use --freeze or "
            "--truncate with WavLM, or head pruning with HuBERT or wav2vec2."
        )
    fam = _family(base) if base is not None else None
    if fam is not None and fam.attention is None:
        raise ConfigError(f"Cannot remove attention heads from a {fam.name} model: {fam.no_prune}.")
    layouts = [fam.attention] if fam is not None and fam.attention is not None else [BERT_ATTENTION, SPEECH_ATTENTION]
    for lay in layouts:
        holder, out_holder = _get(layer, lay.holder), _get(layer, lay.out_holder)
        if (
            holder is not None
            and all(isinstance(getattr(holder, n, None), _nn().Linear) for n in lay.qkv)
            and isinstance(getattr(out_holder, lay.out, None), _nn().Linear)
        ):
            extra = tuple(n for n in lay.extra if isinstance(getattr(holder, n, None), nn.Linear))
            params = tuple(n for n in lay.head_params if isinstance(getattr(holder, n, None), nn.Parameter))
            head_dim = int(getattr(holder, lay.head_dim))
            return Attention(holder, lay.qkv, out_holder, lay.out, head_dim, lay, extra, params)
    if fam is not None and fam.attention is not None:
        lay = fam.attention
        raise ConfigError(
            f"{type(layer).__name__} does not hold the {fam.name} attention the anatomy map names ({lay.holder}."
            f"{'/'.join(lay.qkv)} and {lay.out_holder}.{lay.out}); head pruning cannot cut it."
        )
    raise ConfigError(
        f"{type(layer).__name__} has neither BERT-style attention (attention.self.query/key/value and "
        f"attention.output.dense) nor HuBERT-style attention (attention.q_proj/k_proj/v_proj/out_proj); head pruning "
        f"supports the families of the anatomy map whose attention it names."
    )
