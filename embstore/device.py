"""The one device rule of every command (``embstore extract``/``plan``, ``heads sweep``/``train``/``predict``,
``heads finetune``, ``heads pretrain``).

``--device auto`` (or no ``--device``) picks CUDA when a CUDA GPU is visible, else the CPU; an explicit
``cuda``/``cuda:N`` without CUDA is a ConfigError (one line, exit code 2), never a silent fall-back to the CPU.
The compute dtype ``auto`` (:func:`resolve_compute_dtype`), ``--max-device-memory`` and the GPU group of a rank under
``--gpus-per-rank`` are decided here too. A leaf module: it imports nothing from embstore but the errors, so the
store, the probe engine and the backbone trainers all use it without an import cycle.
"""

from __future__ import annotations

import os
import re
import sys

from embstore.errors import ConfigError

__all__ = [
    "AUTO",
    "COMPUTE_DTYPES",
    "cuda_present",
    "resolve_device",
    "resolve_compute_dtype",
    "parse_device_memory",
    "rank_gpus",
    "rank_device_memory",
]

AUTO = "auto"
"""The device value (and the default, like None) that picks CUDA when present."""


def cuda_present() -> bool:
    """Whether a CUDA GPU is usable. torch is asked only when it is already imported or an NVIDIA driver is
    installed, so a machine without one never pays for importing torch here."""
    if "torch" not in sys.modules and not any(
        os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/nvidiactl")
    ):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(requested: str | None) -> str:
    """The device to run on: ``requested``, or with None / 'auto' CUDA when present, else 'cpu'.

    Raises ConfigError when ``requested`` names CUDA and no CUDA GPU is visible.
    """
    if requested is None or requested == AUTO:
        return "cuda" if cuda_present() else "cpu"
    if requested.startswith("cuda") and not cuda_present():
        raise ConfigError(
            f"--device {requested} asks for CUDA, but no CUDA GPU is visible; pass --device cpu, or "
            "--device auto to use CUDA only when present."
        )
    return requested


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What ``--compute-dtype`` accepts: the dtype the model's parameters have during the forward."""


def resolve_compute_dtype(requested: str, device: str) -> str:
    """The compute dtype ``requested`` means on ``device``: 'auto' is float32 on the CPU (a bf16 checkpoint is cast
    up) and bfloat16 on a CUDA GPU that supports it (else float32); anything else is itself."""
    if requested != AUTO:
        return requested
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def parse_device_memory(text: str) -> dict[int | str, int]:
    """``--max-device-memory`` ('0=20GiB,1=20GiB,cpu=64GiB') as accelerate's ``max_memory`` in bytes
    ({0: 21474836480, ..., 'cpu': ...}); a ConfigError naming the bad entry. Sizes are turned into bytes here, in
    either case ('20gb' is 20 GB), because accelerate reads a lower-case 'b' as bits and knows no 'B' or 'TB'."""
    out: dict[int | str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        found = _SIZE.fullmatch(size) if sep else None
        if found is None or not (key.isdigit() or key == "cpu"):
            raise ConfigError(
                f"The --max-device-memory entry {part!r} must be GPU=SIZE or cpu=SIZE with a size such as 20GiB or "
                "512MB, e.g. '0=20GiB,1=20GiB,cpu=64GiB'."
            )
        out[int(key) if key.isdigit() else key] = int(float(found.group(1)) * _UNITS[found.group(2).lower()])
    if not out:
        raise ConfigError("--max-device-memory is empty; give e.g. '0=20GiB,cpu=64GiB'.")
    return out


def rank_gpus(local_rank: int, per_rank: int, visible: int) -> list[int]:
    """The GPUs of one rank under ``--gpus-per-rank``: rank r of a machine gets GPUs r*K .. r*K + K - 1, so 8 GPUs
    run 2 ranks of a model mapped over 4; a ConfigError when the machine has too few."""
    first = local_rank * per_rank
    if first + per_rank > visible:
        raise ConfigError(
            f"--gpus-per-rank {per_rank} gives local rank {local_rank} GPUs {first}-{first + per_rank - 1}, but only "
            f"{visible} are visible; start at most {visible // max(1, per_rank)} ranks per machine or lower "
            "--gpus-per-rank."
        )
    return list(range(first, first + per_rank))


def rank_device_memory(
    group: list[int], budgets: dict[int | str, int] | None, totals: dict[int, int]
) -> dict[int | str, int]:
    """accelerate's ``max_memory`` for one rank's GPU ``group``: only its GPUs (so the map never reaches another
    rank's), each at the budget ``--max-device-memory`` gives its position in the group (0 = the group's first GPU),
    else at ``totals[gpu]``; the CPU budget passes through."""
    out: dict[int | str, int] = {}
    for pos, gpu in enumerate(group):
        out[gpu] = (budgets or {}).get(pos, totals[gpu])
    if budgets and "cpu" in budgets:
        out["cpu"] = budgets["cpu"]
    return out
