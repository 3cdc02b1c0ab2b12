"""The device side of the hot loop: run a frozen encoder only as far as the last layer asked for,
pool every requested layer in one masked reduction, cast to the storage dtype on the device, and
copy each batch to the host once (on CUDA into pinned memory, on a side stream, without blocking
the next forward).

Layer numbers follow embstore: hidden state 0 is what the first transformer layer receives (the
embedding output for text), hidden state i the output of layer i. When the highest layer needed
is below the top, forward hooks on the encoder's own layer list record the states and stop the
forward after that layer: nothing is copied or changed in the model, and the states are the
very tensors ``output_hidden_states`` would have returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from embstore.backbones.anatomy import find_blocks, state_outputs
from embstore.extraction.words import WordIndex, pool_words

__all__ = ["hidden_states", "pool_layers", "BatchForward", "Launched"]


class _Stop(Exception):
    """Raised by a forward hook once the last needed layer has run."""


def hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor], last: int) -> list[torch.Tensor]:
    """Hidden states 0..``last`` of one batch, each (B, T, H).

    Below the top layer the forward stops right after layer ``last`` (embeddings only for 0);
    at the top, or for an encoder whose layer list is unknown, the whole model runs with
    ``output_hidden_states`` as before.
    """
    layers = find_blocks(model)
    if layers is None or last >= len(layers):
        return list(model(**inputs, output_hidden_states=True).hidden_states[: last + 1])
    states: list[torch.Tensor] = []

    def first(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if states:  # a block shared by every layer (ALBERT) runs again
            return
        states.append(args[0] if args else kwargs["hidden_states"])  # what transformers records as state 0
        if last == 0:
            raise _Stop

    def after(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        states.append(output[0] if isinstance(output, tuple) else output)
        if len(states) > last:
            raise _Stop

    # state i is the output of layer i's block, or of what follows it outside the block (DeBERTa-v2's conv); a
    # shared block is hooked once and records each of its runs
    outputs = dict.fromkeys(state_outputs(model)[:last])
    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [m.register_forward_hook(after) for m in outputs]
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(states) != last + 1:
        raise RuntimeError(
            f"{type(model).__name__} ran {len(states) - 1} of its layers instead of {last}; "
            "its layers are not called once each in order, so it cannot stop early"
        )
    return states


def pool_layers(
    hidden: Sequence[torch.Tensor], layers: Sequence[int], poolings: Sequence[str], mask: torch.Tensor
) -> torch.Tensor:
    """(P, k, B, H) float32: every pooling of every chosen layer, in one masked reduction each.

    ``mask`` (B, T) bool marks each row's real positions (tokens or frames)."""
    stacked = torch.stack([hidden[i].float() for i in layers])  # (k, B, T, H)
    if not poolings:
        return stacked.new_empty((0, *stacked.shape[:2], stacked.shape[3]))
    out = []
    for p in poolings:
        if p == "cls":
            out.append(stacked[:, :, 0])
        elif p == "mean":
            weights = (mask / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1).float()  # (B, 1, T)
            out.append(torch.matmul(weights, stacked).squeeze(2))  # (k, B, H)
        elif p == "max":
            out.append(stacked.masked_fill(~mask[None, :, :, None], float("-inf")).amax(2))
        else:
            raise ValueError(f"unknown pooling {p!r}")
    return torch.stack(out)


@dataclass
class Launched:
    """One batch whose results are on their way to the host."""

    host: torch.Tensor
    """Flat storage-dtype buffer: pooled (P, k, B, H), then per-token (token layers, tokens, H)."""
    event: Any
    """CUDA event recorded after the copy (None on CPU)."""
    pooled_shape: tuple[int, int, int, int]
    n_tokens: int
    words_shape: tuple[int, ...] | None = None
    """(word poolings, k, words, H) of the word states after the per-token ones (``--word-pooling``), or None."""

    def result(
        self, poolings: Sequence[str], token_layers: Sequence[int]
    ) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
        """Pooled (pooling -> (k, B, H)) and flat per-token (layer -> (tokens, H)) host arrays, views of ``host``."""
        if self.event is not None:
            self.event.synchronize()
        flat = self.host.numpy()
        n_pooled = int(np.prod(self.pooled_shape))
        pooled = flat[:n_pooled].reshape(self.pooled_shape)
        hidden = self.pooled_shape[-1]
        tokens = flat[n_pooled : n_pooled + len(token_layers) * self.n_tokens * hidden]
        tokens = tokens.reshape(len(token_layers), self.n_tokens, hidden)
        return (
            {p: pooled[j] for j, p in enumerate(poolings)},
            {layer: tokens[j] for j, layer in enumerate(token_layers)},
        )

    def words(self, poolings: Sequence[str]) -> dict[str, np.ndarray]:
        """Word states (pooling -> (k, words, H)) as host views, after :meth:`result` (which waits for the copy)."""
        if self.words_shape is None:
            return {}
        size = int(np.prod(self.words_shape))
        flat = self.host.numpy()
        block = flat[len(flat) - size :].reshape(self.words_shape) if size else flat[:0].reshape(self.words_shape)
        return {p: block[j] for j, p in enumerate(poolings)}


class _HostRing:
    """A ring of host buffers that batches are copied into, reused two batches later: the caller
    must have read batch i (``Launched.result``) before it launches batch i + 2, which
    :class:`embstore.extraction.encode.ChunkEncoder` does by reading each batch right after launching the next."""

    def __init__(self, slots: int = 2, pin: bool = False) -> None:
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.next = 0
        self.pin = pin

    def slot(self, flat: torch.Tensor) -> torch.Tensor:
        """The next buffer, grown (with a margin) to hold ``flat``, as a view of ``flat``'s size."""
        i, self.next = self.next, (self.next + 1) % len(self.buffers)
        buf = self.buffers[i]
        if buf is None or buf.numel() < flat.numel() or buf.dtype != flat.dtype:
            buf = self.buffers[i] = torch.empty(flat.numel() + flat.numel() // 4, dtype=flat.dtype, pin_memory=self.pin)
        return buf[: flat.numel()]

    def copy(self, flat: torch.Tensor) -> tuple[torch.Tensor, Any]:
        host = self.slot(flat)
        host.copy_(flat)
        return host, None


class _PinnedRing(_HostRing):
    """CUDA: pinned buffers, filled on a side stream so the copy overlaps the next forward."""

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        super().__init__(slots, pin=True)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, flat: torch.Tensor) -> tuple[torch.Tensor, Any]:
        host = self.slot(flat)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the results are computed
        with torch.cuda.stream(self.stream):
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        flat.record_stream(self.stream)  # keep the allocator from reusing flat's memory before the copy ends
        return host, done


class BatchForward:
    """Runs padded batches through the model up to the last layer needed and pools them on the device."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[int],
        token_layers: Sequence[int],
        poolings: Sequence[str],
        dtype: str,
        device: str,
        word_poolings: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.layers, self.token_layers, self.poolings = list(layers), list(token_layers), list(poolings)
        self.word_poolings = list(word_poolings)
        self.last = max([*self.layers, *self.token_layers])
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.ring: _HostRing | None = _PinnedRing(self.device) if self.on_cuda else None

    def stage(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Host tensors of one padded batch, pinned on CUDA so they go up without blocking (any thread)."""
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        return {k: v.pin_memory() for k, v in tensors.items()} if self.on_cuda else tensors

    def _up(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t.pin_memory().to(self.device, non_blocking=True) if self.on_cuda else t

    def launch(self, inputs: dict[str, torch.Tensor], lengths: np.ndarray, words: WordIndex | None = None) -> Launched:
        """Forward, pool, cast and start the copy to the host of one batch; ``lengths`` (B,) are the
        real positions of each row in the model's output (tokens, or frames for audio); ``words`` where the batch's
        words sit, for their states (:func:`embstore.extraction.words.pool_words`)."""
        with torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_cuda):
                hidden = hidden_states(
                    self.model, {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}, self.last
                )
            # pooling runs in float32 (outside autocast, which would do the mean in bf16)
            batch, width, size = hidden[0].shape
            lens = lengths.astype(np.int64)
            mask = torch.arange(width, device=self.device)[None, :] < self._up(lens)[:, None]  # (B, T)
            pooled = pool_layers(hidden, self.layers, self.poolings, mask)  # (P, k, B, H)
            n_tokens = int(lens.sum()) if self.token_layers else 0
            word_states = self._words(hidden, words)  # (Pw, k, W, H) or None
            flat = torch.empty(
                pooled.numel()
                + len(self.token_layers) * n_tokens * size
                + (0 if word_states is None else word_states.numel()),
                dtype=self.dtype,
                device=self.device,
            )
            flat[: pooled.numel()].view(pooled.shape).copy_(pooled)  # the cast to the storage dtype, on the device
            if self.token_layers:
                # rows are right-padded, so the real positions in row order are the flat ragged layout
                where = np.flatnonzero((np.arange(width)[None, :] < lens[:, None]).reshape(-1))
                index = self._up(where)
                n_flat = len(self.token_layers) * n_tokens * size
                tokens = flat[pooled.numel() : pooled.numel() + n_flat].view(len(self.token_layers), n_tokens, size)
                for j, layer in enumerate(self.token_layers):
                    tokens[j].copy_(hidden[layer].reshape(batch * width, size).index_select(0, index).float())
            words_shape: tuple[int, ...] | None = None
            if word_states is not None:
                words_shape = tuple(word_states.shape)
                flat[flat.numel() - word_states.numel() :].view(word_states.shape).copy_(word_states)
            shape = (len(self.poolings), len(self.layers), batch, size)
            if self.ring is None:  # CPU: flat already is the host array
                return Launched(host=flat, event=None, pooled_shape=shape, n_tokens=n_tokens, words_shape=words_shape)
            host, event = self.ring.copy(flat)  # returns at once; the next forward is launched while it copies
        return Launched(host=host, event=event, pooled_shape=shape, n_tokens=n_tokens, words_shape=words_shape)

    def _words(self, hidden: Sequence[torch.Tensor], words: WordIndex | None) -> torch.Tensor | None:
        """(Pw, k, W, H) float32 word states of the batch (``--word-pooling``), or None."""
        if not self.word_poolings or words is None:
            return None
        index = {
            "first": self._up(words.first),
            "last": self._up(words.last),
            "member_pos": self._up(words.member_pos),
            "member_word": self._up(words.member_word),
            "counts": self._up(words.counts),
        }
        return pool_words(hidden, self.layers, self.word_poolings, index)
