"""Training checkpoints without pickle (tensors in safetensors, everything else in JSON), and their identity.

``accelerate.save_state`` writes the optimizer, scheduler and RNG states with ``torch.save``
(pickle), and the pretraining loop used to save the model that way too because of its tied
decoder weights. Here the same state is written as ``*.safetensors`` + ``*.json``:

    model.safetensors      the unwrapped model; tied tensors stored once (safetensors.torch.save_model)
    optimizer.safetensors  every tensor of the optimizer state (and of the scheduler / scaler, if any)
    training_state.json    the rest of those states (param groups, schedule counters), accelerate's step
    rng_<rank>.safetensors / rng_<rank>.json   each process's torch (CUDA), numpy and python RNG states

and loaded back into freshly built objects of the same shapes. Beside them each trainer keeps its own JSON state
(epoch, steps, history...) with :func:`write_state`; its ``fingerprint`` (:func:`fingerprint` of the config minus
the options that may change on resume) lets :func:`read_checkpoint` refuse, naming the differing options, to resume
from a checkpoint made with another configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embstore.errors import ConfigError

__all__ = [
    "save_training_state",
    "load_training_state",
    "fingerprint",
    "read_checkpoint",
    "write_state",
    "MODEL_FILE",
    "STATE_FILE",
]

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)
MODEL_FILE, TENSORS_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "training_state.json"
_TENSOR = "__tensor__"


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready copy of ``obj`` whose tensors are moved into ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{key}.k{i}", tensors), _flatten(v, f"{key}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        return {
            "__tuple__" if isinstance(obj, tuple) else "__list__": [
                _flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)
            ]
        }
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickle (at {key})")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def _save(state: Any, directory: Path, tensors_file: str, state_file: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "s", tensors)
    save_file(tensors, str(directory / tensors_file))
    (directory / state_file).write_text(json.dumps(tree))


def _load(directory: Path, tensors_file: str, state_file: str) -> Any:
    from safetensors.torch import load_file

    return _unflatten(json.loads((directory / state_file).read_text()), load_file(str(directory / tensors_file)))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_training_state(
    acc: Accelerator,
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Write the model, optimizer, scheduler, gradient scaler, accelerate's step and every process's
    RNG states to ``directory`` (call it on every process; the main one writes the shared files)."""
    from safetensors.torch import save_model

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        save_model(acc.unwrap_model(model), str(path / MODEL_FILE))
        scaler = getattr(acc, "scaler", None)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "step": int(acc.step),
        }
        _save(state, path, TENSORS_FILE, STATE_FILE)
    rank = acc.process_index
    _save(_rng_state(), path, f"rng_{rank}.safetensors", f"rng_{rank}.json")


def load_training_state(
    acc: Accelerator,
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore what :func:`save_training_state` wrote into objects built the same way."""
    from safetensors.torch import load_model

    path = Path(directory)
    if not (path / STATE_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise ConfigError(
            f"{path} holds no checkpoint in embstore's safetensors format ({MODEL_FILE} + {STATE_FILE}; "
            "older versions wrote pickle files, which are not loaded); rerun without --resume or with a new --out."
        )
    load_model(acc.unwrap_model(model), str(path / MODEL_FILE), strict=True)
    state = _load(path, TENSORS_FILE, STATE_FILE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    acc.step = int(state["step"])
    rank = acc.process_index
    if not (path / f"rng_{rank}.json").is_file():
        log.info("no RNG state for process %d in %s; continuing with the current one", rank, path)
        return
    rng = _load(path, f"rng_{rank}.safetensors", f"rng_{rank}.json")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def fingerprint(config: Mapping[str, Any], *extra: str) -> str:
    """sha256 of a config dict (already stripped of the options that may change on resume) and ``extra`` strings."""
    return hashlib.sha256(json.dumps([dict(config), *extra], sort_keys=True, default=str).encode()).hexdigest()


def read_checkpoint(ckpt: Path, state_file: str, expected: str, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON state in ``ckpt/state_file`` if its fingerprint is ``expected``; None when there is no checkpoint.

    ``config`` is this run's fingerprinted config dict; a mismatch raises ConfigError naming the differing options.
    """
    path = ckpt / state_file
    if not path.is_file():
        log.info("resume: no checkpoint in %s, starting from scratch", ckpt)
        return None
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"The checkpoint state {path} is not valid JSON ({exc.msg}); rerun without --resume or with a new --out."
        ) from None
    if state.get("fingerprint") != expected:
        old = state.get("config", {})
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k)) or ["model weights"]
        raise ConfigError(
            f"The checkpoint in {ckpt} was made with another configuration or model (checkpoint fingerprint "
            f"{str(state.get('fingerprint'))[:12]}, this run {expected[:12]}; differing: {', '.join(diff)}). "
            "Rerun with the checkpoint's options, without --resume, or with a new --out."
        )
    return state


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """Write a trainer's JSON checkpoint state (its epoch, steps, history, ``fingerprint`` and ``config``) in one
    replace, so a run killed while writing leaves the previous state whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(state), indent=2, default=str))
    os.replace(tmp, path)
