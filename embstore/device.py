"""The one device rule of every command (``embstore extract``/``plan``, ``heads sweep``/``train``/``predict``,
``heads finetune``, ``heads pretrain``).

``--device auto`` (or no ``--device``) picks CUDA when a CUDA GPU is visible, else the CPU; an explicit
``cuda``/``cuda:N`` without CUDA is a ConfigError (one line, exit code 2), never a silent fall-back to the CPU.
A leaf module: it imports nothing from embstore but the errors, so the store, the probe engine and the backbone
trainers all use it without an import cycle.
"""

from __future__ import annotations

import os
import sys

from embstore.errors import ConfigError

__all__ = ["AUTO", "cuda_present", "resolve_device"]

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
