"""Pooling one layer's hidden states as soon as the forward produces them (see :mod:`embstore.extraction.forward`).

A pooling reduces a layer's (B, T, H) states to (B, H), in float32:

- ``cls``: position 0 (an encoder's [CLS]; refused for causal models, where position 0 has seen only itself);
- ``last``: each row's last non-pad position (from its length: embstore pads on the right), the position a causal
  model reads everything before it from; with a template, the template's last token;
- ``mean`` and ``max``: over the positions :class:`Masks` says they cover: every non-pad token (``--pool-tokens
  all``) or only the row's own text tokens (``text``: no BOS/EOS/CLS/SEP or template tokens).

States in float32 are reduced as they are (the mean is one batched matmul, bit for bit what it always was); states in
a lower compute dtype (bfloat16, float16) are cast to float32 a few rows at a time, so no float32 copy of a whole
layer is ever made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["POOLINGS", "Masks", "pool_state", "pool_layers", "FLOAT32_ROWS_BYTES"]

POOLINGS = ("cls", "last", "mean", "max")

FLOAT32_ROWS_BYTES = 32 << 20
"""Most bytes of float32 copies of low-precision states made at once by the mean."""


@dataclass(frozen=True)
class Masks:
    """Where each row's poolings look, on one device."""

    pool: torch.Tensor
    """(B, T) bool: the positions ``mean`` and ``max`` cover."""
    weights: torch.Tensor
    """(B, 1, T) float32: ``pool`` divided by its count (the mean as one matmul)."""
    last: torch.Tensor
    """(B,) int64: each row's last real position."""

    @classmethod
    def build(cls, real: torch.Tensor, pool: torch.Tensor | None = None) -> Masks:
        """From ``real`` (B, T) bool, each row's real (non-pad) positions, and ``pool`` (B, T) bool, the positions
        mean and max cover (None: every real one)."""
        covered = real if pool is None else pool
        weights = (covered / covered.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1).float()
        last = (real.sum(1) - 1).clamp(min=0).long()
        return cls(pool=covered, weights=weights, last=last)

    def to(self, device: torch.device) -> Masks:
        if self.pool.device == device:
            return self
        return Masks(pool=self.pool.to(device), weights=self.weights.to(device), last=self.last.to(device))


def _mean(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, H) float32 masked mean of ``h`` (B, T, H)."""
    if h.dtype == torch.float32:
        return torch.matmul(weights, h).squeeze(1)
    batch, width, size = h.shape
    step = max(1, FLOAT32_ROWS_BYTES // max(1, width * size * 4))
    out = torch.empty((batch, size), dtype=torch.float32, device=h.device)
    for s in range(0, batch, step):  # float32 only a few rows at a time
        out[s : s + step] = torch.matmul(weights[s : s + step], h[s : s + step].float()).squeeze(1)
    return out


def pool_state(h: torch.Tensor, poolings: Sequence[str], masks: Masks) -> torch.Tensor:
    """(P, B, H) float32: every pooling of one layer's states ``h`` (B, T, H), in ``masks``' device."""
    batch, _width, size = h.shape
    out = []
    for p in poolings:
        if p == "cls":
            out.append(h[:, 0].float())
        elif p == "last":
            out.append(h[torch.arange(batch, device=h.device), masks.last].float())
        elif p == "mean":
            out.append(_mean(h, masks.weights))
        elif p == "max":
            out.append(h.masked_fill(~masks.pool[:, :, None], float("-inf")).amax(1).float())
        else:
            raise ValueError(f"unknown pooling {p!r}")
    if not out:
        return torch.empty((0, batch, size), dtype=torch.float32, device=h.device)
    return torch.stack(out)


def pool_layers(
    hidden: Sequence[torch.Tensor], layers: Sequence[int], poolings: Sequence[str], mask: torch.Tensor
) -> torch.Tensor:
    """(P, k, B, H) float32: every pooling of every chosen layer of ``hidden`` (states already computed).

    ``mask`` (B, T) bool marks each row's real positions (tokens or frames). The extraction pools each layer as it
    is produced instead (:class:`embstore.extraction.forward.BatchForward`); this is the same reduction."""
    masks = Masks.build(mask)
    batch, _, size = hidden[0].shape
    if not layers:
        return torch.empty((len(poolings), 0, batch, size), dtype=torch.float32)
    return torch.stack([pool_state(hidden[i], poolings, masks) for i in layers], dim=1)
