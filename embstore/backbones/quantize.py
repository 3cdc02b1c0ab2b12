"""Opt-in ``--quantize int8`` for CPU extraction: dynamic int8 quantisation of the backbone's
Linear layers (int8 weights, activations quantised per batch on the fly), and the measured
deviation of the stored states from float32 on the first batch, recorded in provenance.

It is not a default: int8 changes the stored values (on MiniLM a mean relative L2 deviation per
row of 2-24% for CLS and 20-35% for mean pooling, layer 0 untouched), and the CLS probes of the
lower layers lose 10-22 accuracy points on ag_news while mean pooling stays within about a point
(``benchmarks/quantize.py``, BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embstore.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["check_quantize_device", "quantize_int8", "is_quantized", "relative_deviation", "measure_int8"]

log = logging.getLogger(__name__)
METHOD = "torch.ao.quantization.quantize_dynamic: nn.Linear -> qint8 weights (per tensor), dynamic activations"
_MARK = "_embstore_quantized"


def check_quantize_device(quantize: str, device: str | None) -> None:
    """Refuse ``--quantize int8`` on CUDA: the dynamic int8 kernels are CPU kernels."""
    if quantize != "none" and device is not None and device.startswith("cuda"):
        raise ConfigError(
            f"--quantize {quantize} is for CPU extraction (dynamic int8 kernels run on the CPU; on CUDA the "
            f"forward already runs in bfloat16 with --compute-dtype auto); got --device {device}: pass --device cpu "
            "or drop --quantize."
        )


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, _MARK, False))


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise every nn.Linear of ``model`` to dynamic int8, in place (idempotent); returns it."""
    if is_quantized(model):
        return model
    import torch

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ConfigError(
            f"--quantize int8 uses torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
            "no longer has; use torch<=2.13 for it or drop --quantize."
        ) from None
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"  # the x86 kernels; qnnpack elsewhere
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency here); torch 2.13 still
        # ships it, with the eager fbgemm kernels the issue measured, and a later torch is caught above.
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    setattr(model, _MARK, True)
    return model


def relative_deviation(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over rows of ||other - reference|| / ||reference|| (rows along the last axis but one)."""
    ref = reference.astype(np.float64)
    diff = np.linalg.norm(other.astype(np.float64) - ref, axis=-1)
    norm = np.linalg.norm(ref, axis=-1)
    return float(np.mean(diff / np.maximum(norm, 1e-12))) if diff.size else 0.0


def measure_int8(
    model: nn.Module, encode: Callable[[], dict[tuple[str, str, int | None], np.ndarray]], layers: Sequence[int]
) -> dict[str, Any]:
    """Encode the first batch in float32, quantise ``model`` in place, encode it again, and return
    the provenance record: the mean relative L2 deviation per row of every stored array.

    ``encode()`` returns the batch's arrays keyed by (tower, pooling or 'tokens', token layer or
    None); pooled arrays are (layers, rows, hidden) over ``layers``, per-token ones (tokens, hidden)."""
    reference = encode()
    quantize_int8(model)
    quantized = encode()
    towers = {tower for tower, _, _ in reference}
    deviation: dict[str, dict[str, float]] = {}
    rows = 0
    for key, ref in reference.items():
        tower, what, layer = key
        name = what if len(towers) == 1 else f"{tower}:{what}"
        if layer is None:  # pooled (k, B, H): one figure per layer
            rows = max(rows, ref.shape[1])
            per_layer = {str(i): relative_deviation(ref[k], quantized[key][k]) for k, i in enumerate(layers)}
        else:
            per_layer = {str(layer): relative_deviation(ref, quantized[key])}
        deviation.setdefault(name, {}).update(per_layer)
    worst = max(((v, name, layer) for name, d in deviation.items() for layer, v in d.items()), default=None)
    if worst is not None:
        log.info("int8: largest mean relative deviation from float32 on the first batch: %.3f (%s, layer %s)", *worst)
    return {"mode": "int8", "method": METHOD, "first_batch_rows": rows, "mean_relative_l2_deviation_per_row": deviation}
