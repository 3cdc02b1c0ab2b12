"""The edits only fine-tuning makes to a backbone: freezing, truncation, head importance and prune specs.

Layer numbers follow embstore everywhere: 0 is the embedding output (for speech: the conv feature encoder, its
projection and the position embedding, :mod:`embstore.backbones.anatomy`), 1..L the encoder layers. The physical
head removal and the saved format that extraction reloads live in :mod:`embstore.backbones.pruned`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from embstore.backbones.anatomy import (
    attention,
    base_of,
    feature_encoder,
    is_speech,
    keep_layers,
    layer_blocks,
    layer_parameters,
)
from embstore.backbones.pruned import heads_per_layer, pruned_heads, set_pruned_record
from embstore.errors import ConfigError, LayerSpecError
from embstore.layers import parse_layers
from heads.finetune.config import FEATURE_ENCODER, FREEZE_SPEC

__all__ = [
    "FEATURE_ENCODER",
    "parse_freeze",
    "split_feature_encoder",
    "freeze",
    "freeze_feature_encoder",
    "count_parameters",
    "check_prunable",
    "truncate",
    "parse_prune_spec",
    "head_importance",
    "heads_to_prune",
]

log = logging.getLogger(__name__)


def _base(model: nn.Module) -> Any:
    """The base encoder, BERT family or speech (:func:`embstore.backbones.anatomy.base_of`)."""
    return base_of(model)


def parse_freeze(spec: str, n_layers: int) -> set[int]:
    """Layers to freeze for ``spec`` on a model with ``n_layers`` encoder layers (0 = embeddings).

    Accepts 'none', 'embeddings' (= {0}), 'all' (0..L), 'all-but-last' (0..L-1), 'all-but-embeddings-and-last'
    (1..L-1: the embeddings and the last layer train) and any
    embstore layer spec over 0..L ('0-8', '0,3', '-3--1'); 'embeddings' may appear in a list.
    'feature-encoder' is not a layer: see :func:`split_feature_encoder`.
    """
    text = spec.strip().lower()
    if text == "none":
        return set()
    if text == "all":
        return set(range(n_layers + 1))
    if text == "all-but-last":
        return set(range(n_layers))
    if text == "all-but-embeddings-and-last":
        return set(range(1, n_layers))
    if not text:
        raise ConfigError(f"The 'freeze' option is empty; use {FREEZE_SPEC}.")
    parts = ["0" if p.strip() == "embeddings" else p for p in text.split(",")]
    return set(parse_layers(",".join(parts), range(n_layers + 1), option="freeze"))


def split_feature_encoder(spec: str) -> tuple[bool, str]:
    """(whether ``spec`` names 'feature-encoder', the rest of the spec for :func:`parse_freeze`, 'none' if empty):
    'feature-encoder,10-12' freezes the conv front end and layers 10-12."""
    parts = [p.strip() for p in spec.strip().lower().split(",")]
    rest = [p for p in parts if p != FEATURE_ENCODER]
    return len(rest) < len(parts), ",".join(rest) or "none"


def freeze_feature_encoder(model: nn.Module) -> None:
    """Freeze a speech model's convolutional front end as ``freeze_feature_encoder()`` of transformers does: its
    parameters and its ``_requires_grad`` flag, so no activation of it is kept for the backward pass (Whisper: its two
    convolutions over the log-mel frames)."""
    for encoder in feature_encoder(_base(model)):
        part: Any = encoder
        if hasattr(part, "_freeze_parameters"):
            part._freeze_parameters()
        else:  # Whisper's conv1 and conv2
            part.requires_grad_(False)


def freeze(model: nn.Module, layers: Iterable[int]) -> None:
    """Set requires_grad=False on the parameters of the chosen layers (0 = the embeddings; for speech the feature
    encoder, its projection and the position embedding; 1..L the encoder layers) by the anatomy map's one rule
    (:func:`embstore.backbones.anatomy.layer_parameters`): a parameter is frozen when every layer that runs it is.
    The final norm freezes with layer L, what a model applies to a block's output outside it (DeBERTa-v2's conv)
    with that layer, and the tables every block reads (relative positions) and ALBERT's one shared block only once
    every layer 1..L is frozen.

    Only freezes: other parameters keep their flag (the pooler and any task head stay as
    they are), so call ``model.requires_grad_(True)`` first to start from a trainable model.
    """
    base = _base(model)
    n = len(layer_blocks(base))
    chosen = set(layers)
    bad = sorted(i for i in chosen if not 0 <= i <= n)
    if bad:
        raise LayerSpecError(
            f"Cannot freeze layers {bad}: the model has layers [0, {n}] (0 = embeddings); "
            f"pass indices in that range (see parse_freeze)."
        )
    partly: set[int] = set()
    for param, users in layer_parameters(base):
        if users <= chosen:
            param.requires_grad_(False)
        elif users & chosen:
            partly |= users - chosen
    if 0 in chosen and is_speech(base):
        freeze_feature_encoder(base)
    if partly:
        log.info(
            "--freeze %s leaves parameters that layers %s also run trainable (shared tables, or a block several "
            "layers share); they freeze once every layer that runs them is frozen",
            ",".join(map(str, sorted(chosen))),
            ",".join(map(str, sorted(partly))),
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- truncation


def truncate(model: nn.Module, k: int) -> None:
    """Keep encoder layers 1..k and physically delete the rest; config.num_hidden_layers = k (ALBERT: k passes of
    its shared block, :func:`embstore.backbones.anatomy.keep_layers`).

    k = 0 is refused: in transformers 5 a BERT without encoder layers returns no
    ``hidden_states`` at all (they are captured by hooks on the layers), which breaks
    extraction; keep at least one layer.
    """
    base = _base(model)
    n = len(layer_blocks(base))
    if not 1 <= k <= n:
        extra = (
            " (0, embeddings only, is not supported: transformers 5 then returns no hidden states)" if k == 0 else ""
        )
        raise LayerSpecError(
            f"Cannot truncate to {k} layers: keep between 1 and {n} encoder layers{extra}; pass k in [1, {n}]."
        )
    keep_layers(base, k)
    record = pruned_heads(base)
    if record:  # removed layers no longer have heads to re-prune on reload
        set_pruned_record(base, {layer: heads for layer, heads in record.items() if layer <= k})


def check_prunable(model: nn.Module) -> None:
    """Refuse, in one line with the reason, a model whose attention heads cannot be removed (before any training)."""
    base = _base(model)
    for block in dict.fromkeys(layer_blocks(base)):
        attention(block, base)


# --------------------------------------------------------------------------- prune specs and head importance


def parse_prune_spec(spec: str, n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """Parse '11:0,3;10:5' into {11: [0, 3], 10: [5]} (layers 1..L, heads 0..H-1)."""
    out: dict[int, set[int]] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        layer_text, sep, heads_text = part.partition(":")
        try:
            layer = int(layer_text)
            heads = [int(h) for h in heads_text.split(",") if h.strip()]
        except ValueError:
            heads = []
        if not sep or not heads:
            raise ConfigError(
                f"Cannot read the prune spec {spec!r} at {part!r}: write 'LAYER:HEAD,HEAD;LAYER:HEAD', e.g. "
                f"'11:0,3;10:5'."
            )
        if not 1 <= layer <= n_layers:
            raise LayerSpecError(
                f"The prune spec {spec!r} names layer {layer}, but attention layers are [1, {n_layers}]; "
                f"use a layer in that range (0 is the embeddings, which have no heads)."
            )
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ConfigError(
                f"The prune spec {spec!r} names head {bad[0]} of layer {layer}, but heads are [0, {n_heads - 1}]; "
                f"use a head in that range."
            )
        out.setdefault(layer, set()).update(heads)
    for layer, removed in out.items():
        if len(removed) >= n_heads:
            raise ConfigError(f"cannot remove all {n_heads} heads of layer {layer}; keep at least one")
    return {layer: sorted(heads) for layer, heads in sorted(out.items())}


def head_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor],
) -> torch.Tensor:
    """Head importance of Michel et al. (2019): sum over batches of |d loss / d gate|.

    A gate of ones per head multiplies each head's context before the attention output
    dense. Returns (L, H) indexed by original head index, L2-normalised per layer; heads
    already pruned away are NaN. The model runs in eval mode; its .grad fields are untouched.
    """
    base = _base(model)
    layers_ = layer_blocks(base)
    n_heads = heads_per_layer(base)
    record = pruned_heads(base)
    kept = [[h for h in range(n_heads) if h not in record.get(i + 1, [])] for i in range(len(layers_))]
    device = next(model.parameters()).device
    gates = [torch.ones(len(k), device=device, requires_grad=True) for k in kept]
    totals = [torch.zeros(len(k), device=device) for k in kept]

    def make_hook(gate: torch.Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            context = args[0]  # (B, T, heads * d)
            split = context.view(*context.shape[:-1], gate.numel(), -1)  # (B, T, heads, d)
            return ((split * gate[:, None]).view_as(context), *args[1:])

        return hook

    outs = [attention(block, base).out for block in layers_]  # a WavLM layer is refused here, before any hook is set
    handles = [out.register_forward_pre_hook(make_hook(g)) for out, g in zip(outs, gates)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total += grad.detach().abs()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = torch.full((len(layers_), n_heads), math.nan, device=device)
    for i, (k, total) in enumerate(zip(kept, totals)):
        # Per-layer L2 normalisation as in the paper's code (1e-20 keeps all-zero layers at 0).
        out[i, k] = total / (total.norm(p=2) + 1e-20)
    return out.cpu()


def heads_to_prune(importance: torch.Tensor, fraction: float, min_heads_per_layer: int = 1) -> dict[int, list[int]]:
    """The globally least important heads, up to ``fraction`` of the present heads.

    ``importance`` is (L, H) from :func:`head_importance` (NaN = already removed). Keeps
    at least ``min_heads_per_layer`` heads in every layer. Returns {layer 1..L: [heads]}.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(
            f"The pruning fraction must be in [0, 1); got {fraction}. Use e.g. 0.2 to remove 20% of heads."
        )
    if min_heads_per_layer < 1:
        raise ConfigError(f"min_heads_per_layer must be at least 1; got {min_heads_per_layer}.")
    present = ~torch.isnan(importance)  # (L, H)
    budget = int(fraction * int(present.sum()))
    left = present.sum(dim=1).tolist()  # heads still present per layer
    chosen: dict[int, list[int]] = {}
    order = torch.argsort(torch.where(present, importance, math.inf).flatten(), stable=True)
    n_heads = importance.shape[1]
    for flat in order.tolist()[: int(present.sum())]:
        if budget == 0:
            break
        layer, head = divmod(flat, n_heads)
        if left[layer] <= min_heads_per_layer:
            continue
        left[layer] -= 1
        budget -= 1
        chosen.setdefault(layer + 1, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}
