"""Exact batches for speech encoders: in a batch of clips of different lengths, each clip gets the values it has
alone, unpadded.

transformers' speech encoders take an attention mask, zero the padded frames before the position convolution and
mask them out of attention. Several parts see the padding all the same, and the anatomy map names them per family
(:attr:`embstore.backbones.anatomy.Family.padding`):

- the **group norm** of a group-norm front end (wav2vec2-base, HuBERT-base, WavLM-base, UniSpeech-SAT-base, SEW)
  normalises each channel over all of time, padding included: it is run again on each clip's own frames
  (``own-frames``). Its convolutions are unpadded (valid), so a clip's frames depend on its samples alone;
- a **convolution over frames** whose input is not zero at the padded frames (data2vec-audio's stacked position
  convs past the first, the conformer's depthwise conv): its input is zeroed past each clip's frames, which is what
  the convolution's own zero padding gives the clip alone (``zero-padding``);
- **SEW's squeezed mask**: SEW pools the frame mask by its maximum, so a clip of an odd frame count attends one
  squeezed state more in a batch than it has alone; the blocks are given the mask of each clip's own state frames
  (``state-mask``).

Inside :func:`exact_batches`, the model must be called with the sample-level ``attention_mask`` of right-padded
clips (extraction and fine-tuning always pass one, also to models whose feature extractor returns none: alone, a
clip is all real samples). The lengths are read from that mask; the fixes are forward hooks, removed on leaving.
Whisper needs none of this: every clip is padded to its 30-second window on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from embstore.backbones.anatomy import PaddingPart, base_of, padding_parts, state_frames

__all__ = ["exact_batches"]


class _Batch:
    """The lengths of the batch being run (input units), and the valid frames derived from them, by kind."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.lengths: torch.Tensor | None = None
        self._frames: dict[str, torch.Tensor] = {}

    def start(self, lengths: torch.Tensor | None) -> None:
        self.lengths, self._frames = lengths, {}

    def frames(self, kind: str) -> torch.Tensor | None:
        """(B,) valid frames of the batch's clips at ``kind`` (see :class:`PaddingPart`), on the CPU."""
        if self.lengths is None:
            return None
        if kind not in self._frames:
            self._frames[kind] = state_frames(self.model, self.lengths, kind)
        return self._frames[kind]


def _valid(frames: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """(B, width) bool: the real frames of each row."""
    return torch.arange(width, device=device)[None, :] < frames.to(device)[:, None]


def _own_frames(module: nn.Module, batch: _Batch) -> Any:
    """Forward hook: rows shorter than the batch recomputed on their own frames (input and output (B, C, T))."""

    def hook(_m: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        frames = batch.frames("first-conv")
        x = args[0]
        if frames is None or int(frames.min()) >= x.shape[-1]:
            return None
        rows = []
        for b, n in enumerate(frames.tolist()):
            if n >= x.shape[-1]:
                rows.append(output[b : b + 1])
            else:  # module.forward: the hooks (this one) stay out of the recomputation
                rows.append(torch.cat([module.forward(x[b : b + 1, :, :n]), output[b : b + 1, :, n:]], dim=-1))
        return torch.cat(rows)

    return hook


def _zero_padding(batch: _Batch, kind: str) -> Any:
    """Forward pre-hook: the input (B, C, T) zeroed past each row's frames."""

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        frames = batch.frames(kind)
        x = args[0]
        if frames is None or int(frames.min()) >= x.shape[-1]:
            return None
        keep = _valid(frames, x.shape[-1], x.device).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        return (x * keep, *args[1:])

    return hook


def _state_mask(base: Any, batch: _Batch) -> Any:
    """Forward pre-hook (with kwargs): the ``attention_mask`` given (a 2-D padding mask, or the 4-D one transformers
    made from it) replaced by the mask of each row's own state frames; the states are the first argument."""
    from transformers.masking_utils import create_bidirectional_mask

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        frames = batch.frames("states")
        states = args[0] if args else kwargs["hidden_states"]
        in_kwargs = "attention_mask" in kwargs
        given = kwargs["attention_mask"] if in_kwargs else (args[1] if len(args) > 1 else None)
        if frames is None or given is None:  # no padding in the batch
            return None
        own = _valid(frames, states.shape[1], states.device)  # (B, T')
        if given.dim() == 2:
            mask = own.to(given.dtype)
        else:
            mask = create_bidirectional_mask(config=base.config, inputs_embeds=states, attention_mask=own)
        if in_kwargs:
            return args, {**kwargs, "attention_mask": mask}
        return (args[0], mask, *args[2:]), kwargs

    return hook


@contextmanager
def exact_batches(model: nn.Module) -> Iterator[None]:
    """Within, a forward of the speech model ``model`` on right-padded clips with their sample-level
    ``attention_mask`` gives each clip the values it has alone (see the module docstring). A model whose family
    has no such parts (or that the map does not know) runs as it is."""
    parts: list[tuple[nn.Module, PaddingPart]] = padding_parts(model)
    if not parts:
        yield
        return
    batch = _Batch(model)
    base = base_of(model)

    def read_lengths(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        batch.start(None if mask is None else mask.detach().to("cpu", torch.long).sum(-1))

    handles = [model.register_forward_pre_hook(read_lengths, with_kwargs=True)]
    for module, part in parts:
        if part.fix == "own-frames":
            handles.append(module.register_forward_hook(_own_frames(module, batch)))
        elif part.fix == "zero-padding":
            handles.append(module.register_forward_pre_hook(_zero_padding(batch, part.frames)))
        else:
            handles.append(module.register_forward_pre_hook(_state_mask(base, batch), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        batch.start(None)
