"""LoRA for every backbone, through peft: adapters on the blocks ``--freeze`` leaves trainable, their merge and the
saved adapter.

- :func:`add_adapters` injects peft LoRA layers (``peft.inject_adapter_in_model``: the backbone stays the same
  module, so pooling, surgery and the anatomy map see it as before) on the block projections chosen by
  ``--lora-targets`` (default: the anatomy map's attention and MLP projections,
  :func:`embstore.backbones.anatomy.projections`) of every block not frozen; peft then leaves only the adapters
  trainable. The classifier is outside the backbone and trains fully.
- :func:`merged` is a copy of a classifier with every adapter folded into its base weight (peft's ``merge``) and the
  LoRA layers replaced by their base layers: a plain backbone of the original architecture, which ``model/`` saves so
  ``embstore extract --model RUN/model`` and ``heads predict --run`` read it unchanged.
- :func:`save_adapter` writes ``RUN/adapter/`` in peft's format (``adapter_config.json`` and
  ``adapter_model.safetensors``, keys as ``PeftModel.save_pretrained`` writes them), loadable with
  ``PeftModel.from_pretrained`` on the backbone after the same surgery.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from embstore.backbones.anatomy import base_of, projections
from heads.finetune.config import FinetuneConfig

__all__ = ["ADAPTER", "ADAPTER_DIR", "add_adapters", "has_adapters", "merged", "save_adapter"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
ADAPTER = "default"
"""peft's adapter name."""
ADAPTER_DIR = "adapter"
"""The run's adapter directory (beside model/, whose *.safetensors are all read as backbone weights)."""
_PEFT_PREFIX = "base_model.model."
"""Where ``PeftModel`` keeps the wrapped model: its saved keys start with this."""


def add_adapters(encoder: nn.Module, config: FinetuneConfig, frozen: set[int]) -> list[str]:
    """Inject LoRA adapters of rank ``config.lora`` into ``encoder`` (in place) on the chosen projections of every
    block that runs a layer outside ``frozen`` (a shared block gets one adapter when any layer that runs it trains).
    Every other backbone weight is frozen. Returns the adapted module names (relative to ``encoder``); a
    ``--lora-targets`` entry that names no module is a ConfigError listing the blocks' linear layers."""
    from peft import LoraConfig, inject_adapter_in_model

    patterns = None if config.lora_targets is None else tuple(t.strip() for t in config.lora_targets.split(",") if t)
    chosen = projections(base_of(encoder), patterns)
    ids = {id(p.module) for p in chosen if not p.layers <= frozen}
    names = [name for name, module in encoder.named_modules() if id(module) in ids]
    if not names:
        raise _every_block_frozen(config)
    lora = LoraConfig(
        r=int(config.lora or 0),
        lora_alpha=config.lora_alpha_,
        lora_dropout=config.lora_dropout,
        target_modules=names,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation depends on the seed alone
        torch.manual_seed(config.source.seed)
        inject_adapter_in_model(lora, encoder, adapter_name=ADAPTER)
    log.info("LoRA rank %d (alpha %g) on %d modules", lora.r, lora.lora_alpha, len(names))
    return names


def _every_block_frozen(config: FinetuneConfig) -> Exception:
    from embstore.errors import ConfigError

    return ConfigError(
        f"--freeze {config.freeze} leaves no block for --lora adapters; freeze fewer layers (e.g. 0-4), or drop "
        "--freeze."
    )


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merged(model: M) -> M:
    """A copy of ``model`` with every LoRA adapter merged into its base weight and the LoRA layers replaced by those
    base layers (what ``LoraModel.merge_and_unload`` does, on a model peft does not wrap). ``model`` is unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    tuned = [(name, m) for name, m in out.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in tuned:
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        for m in out.modules():
            if attr in m.__dict__:
                delattr(m, attr)
    return out


def save_adapter(encoder: nn.Module, out: Path, base_model: str, names: list[str]) -> Path:
    """``out`` as ``PeftModel.save_pretrained`` writes it: adapter_config.json and adapter_model.safetensors (the
    adapters alone, keys under ``base_model.model.``). ``base_model``: the --model the adapters sit on."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(encoder, adapter_name=ADAPTER)
    save_file(
        {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(out / "adapter_model.safetensors"),
    )
    cfg: Any = getattr(encoder, "peft_config")[ADAPTER]
    cfg.base_model_name_or_path = base_model
    cfg.save_pretrained(str(out))
    (out / "adapted_modules.json").write_text(json.dumps(names, indent=1))
    return out
