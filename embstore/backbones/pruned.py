"""The pruned-model format: physical head removal and the save/reload of an edited backbone.

Heads are numbered from 0 and always by their *original* index: pruning is recorded in
``config.embstore_pruned_heads`` ({"layer": [heads]}, string keys so it round-trips through config.json), and a
later call maps original indices onto the surviving rows, as the old transformers ``pruned_heads`` did
(transformers 5 dropped ``prune_heads``, so it is re-implemented here with ``prune_linear_layer``). A saved
directory is rebuilt by :func:`load_model`, which :func:`embstore.backbones.registry.load_backbone` calls, so a
pruned or truncated fine-tune extracts like any other model. The edits that only fine-tuning makes (freezing,
head importance, prune specs) live in :mod:`heads.finetune.surgery`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from embstore.backbones.anatomy import Attention, attention, base_of, encoder_class_of, layer_blocks
from embstore.errors import ConfigError, LayerSpecError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PRUNED_HEADS_KEY",
    "heads_per_layer",
    "pruned_heads",
    "set_pruned_record",
    "prune_heads",
    "save_model",
    "load_model",
]

PRUNED_HEADS_KEY = "embstore_pruned_heads"
"""config attribute holding the removed heads, {"layer (1..L)": [original head indices]}."""


def heads_per_layer(model: nn.Module) -> int:
    """Heads per layer before any pruning (the config value; pruning never changes it)."""
    return int(base_of(model).config.num_attention_heads)


def pruned_heads(model: nn.Module) -> dict[int, list[int]]:
    """Heads removed so far, {layer 1..L: sorted original head indices}."""
    raw = getattr(base_of(model).config, PRUNED_HEADS_KEY, None) or {}
    return {int(layer): sorted(int(h) for h in heads) for layer, heads in raw.items()}


def set_pruned_record(base: Any, record: Mapping[int, Iterable[int]]) -> None:
    """Write the removed-heads record (layers without removed heads are left out)."""
    base.config.embstore_pruned_heads = {str(layer): sorted(heads) for layer, heads in sorted(record.items()) if heads}


def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> None:
    """Physically remove attention heads, {layer 1..L: [original head indices]}.

    Shrinks query/key/value (output rows; a fused q|k|v projection in each of its three parts; DeBERTa-v2's and the
    conformer's position projections alike; the conformer's per-head position biases by row) and the attention
    output (input columns), updates the attention module's head
    count, cuts a per-head score bias made outside the block to the kept heads (MPNet), and accumulates the removed
    original indices in ``config.embstore_pruned_heads``. Heads already removed are skipped. A family whose heads
    cannot be cut is refused (:func:`embstore.backbones.anatomy.attention`) before any weight changes.
    """
    from transformers.pytorch_utils import prune_linear_layer

    base = base_of(model)
    layers_ = layer_blocks(base)
    n_heads = heads_per_layer(base)
    record = pruned_heads(base)
    plan: dict[int, tuple[list[int], list[int]]] = {}
    # Validate everything before touching any weight, so an error leaves the model intact.
    for layer, given in heads.items():
        chosen = set(given)
        if not 1 <= layer <= len(layers_):
            raise LayerSpecError(f"Cannot prune heads of layer {layer}: attention layers are [1, {len(layers_)}].")
        bad = sorted(h for h in chosen if not 0 <= h < n_heads)
        if bad:
            raise ConfigError(f"Cannot prune head {bad[0]} of layer {layer}: heads are [0, {n_heads - 1}].")
        done = set(record.get(layer, []))
        kept = [h for h in range(n_heads) if h not in done]  # original index of each current head
        if not kept or set(kept) <= chosen:
            raise ConfigError(f"cannot remove all {n_heads} heads of layer {layer}; keep at least one")
        plan[layer] = (kept, sorted(chosen - done))
    parts = {layer: attention(layers_[layer - 1], base) for layer, (_, remove) in plan.items() if remove}
    for layer, (kept, remove) in plan.items():
        if not remove:
            continue
        att = parts[layer]
        positions = [kept.index(h) for h in remove]  # current rows of the heads to drop
        mask = torch.ones(len(kept), att.head_dim, dtype=torch.bool)
        mask[positions] = False
        index = cast(torch.LongTensor, torch.arange(len(kept) * att.head_dim)[mask.view(-1)])
        width = len(kept) * att.head_dim
        # a fused projection holds q, k and v one after the other, each heads x head width
        fused = cast(torch.LongTensor, torch.cat([index + part * width for part in range(3)]))
        for name in att.qkv:
            setattr(
                att.holder, name, prune_linear_layer(getattr(att.holder, name), index if len(att.qkv) > 1 else fused)
            )
        for name in att.extra:
            setattr(att.holder, name, prune_linear_layer(getattr(att.holder, name), index))
        rows = [i for i in range(len(kept)) if i not in positions]  # the current rows of the kept heads
        for name in att.head_params:
            old = getattr(att.holder, name)
            setattr(att.holder, name, nn.Parameter(old.detach()[rows].clone(), requires_grad=old.requires_grad))
        setattr(att.out_holder, att.out_name, prune_linear_layer(att.out, index, dim=1))
        att.set_heads(len(kept) - len(remove))
        _cut_head_bias(att, [h for h in kept if h not in remove])
        record[layer] = sorted(set(record.get(layer, [])) | set(remove))
    set_pruned_record(base, record)


_KEPT = "_embstore_kept_heads"
"""Attribute of an attention module whose score bias is cut by :func:`_cut_bias_hook`: its heads' original
indices (the bias it is given has one entry per original head)."""


def _cut_bias_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """Forward pre-hook: the (B, heads, T, T) bias argument cut to the module's kept heads."""
    position, name = getattr(module, "_embstore_head_bias")
    kept = getattr(module, _KEPT)
    if name in kwargs and kwargs[name] is not None:
        kwargs = {**kwargs, name: kwargs[name][:, kept]}
    elif len(args) > position and args[position] is not None:
        args = (*args[:position], args[position][:, kept], *args[position + 1 :])
    else:
        return None
    return args, kwargs


def _cut_head_bias(att: Attention, kept: list[int]) -> None:
    """Where the layout names a per-head bias made outside the block, have the block's attention cut it to
    ``kept`` (original head indices) on every call; the hook is set once and reads the current heads."""
    if att.layout.head_bias is None:
        return
    if not hasattr(att.holder, _KEPT):
        att.holder.register_forward_pre_hook(_cut_bias_hook, with_kwargs=True)
    setattr(att.holder, "_embstore_head_bias", att.layout.head_bias)
    setattr(att.holder, _KEPT, list(kept))


def save_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, directory: str | Path) -> Path:
    """Write a Hugging Face directory (config.json with num_hidden_layers and the pruning record,
    safetensors weights, tokenizer files) that :func:`load_model` and ``load_backbone`` read."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cast(Any, model).save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_model(directory: str | Path) -> nn.Module:
    """Rebuild a (pruned, truncated) model saved by :func:`save_model`.

    The model is built from config.json, the recorded pruning is re-applied so the shapes
    match, then the safetensors weights are loaded strictly. Returned in eval mode.
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    path = Path(directory)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not (path / "config.json").is_file() or not files:
        raise ModelNotFoundError(
            f"{path} is not a saved model directory (config.json + *.safetensors); save one with save_model."
        )
    config = AutoConfig.from_pretrained(path)
    record = {int(k): list(v) for k, v in (getattr(config, PRUNED_HEADS_KEY, None) or {}).items()}
    setattr(config, PRUNED_HEADS_KEY, {})  # prune_heads rebuilds the record as it applies it
    # The saved class (e.g. a classifier wrapper) so its keys match; AutoModel otherwise.
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    speech = encoder_class_of(str(config.model_type))
    cls = speech if cls is None and speech is not None and speech.__name__ == arch else cls  # WhisperEncoder
    model: nn.Module = cls(config) if cls is not None else AutoModel.from_config(config)
    prune_heads(model, record)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=True)
    return model.eval()
