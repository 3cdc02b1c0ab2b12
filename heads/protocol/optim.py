"""The AdamW builder every product trains with: probe heads, fine-tuning and pretraining."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adamw"]


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """torch's AdamW over parameter ``groups`` (as :func:`param_groups` makes them), with the fused kernel (one
    kernel per step, not a loop over tensors) where this torch build has it: what the Trainer's default
    ``optim="adamw_torch_fused"`` uses. Same updates as the unfused one up to float rounding."""
    groups = [{k: v for k, v in g.items() if k != "head"} for g in groups]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)
