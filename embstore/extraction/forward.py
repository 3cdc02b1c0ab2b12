"""The device side of the hot loop: run a frozen model only as far as the last layer asked for, pool each layer
as the forward produces it (:mod:`embstore.extraction.pooling`), cast to the storage dtype on the device, check
that every value is finite there, and copy each batch to the host once (on CUDA into pinned memory, on a side
stream, without blocking the next forward).

Layer numbers follow embstore: hidden state 0 is what the first block receives (the embedding output for text),
hidden state i the output of block i, and the top state L what transformers' ``hidden_states`` holds there (after
the final norm in the language models, see :func:`embstore.backbones.anatomy.state_norm`). Forward hooks on the
model's own blocks (found in the anatomy map) hand each state to the pooling as it is produced and stop the forward
after the last one needed: nothing in the model is copied or changed, the states are the very tensors
``output_hidden_states`` would have returned, and no more than one layer's states are held for pooling at a time.
A family the map does not know runs whole with ``output_hidden_states`` (one line in the log says so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from embstore.backbones.anatomy import find_blocks, state_norm, state_outputs
from embstore.extraction.pooling import Masks, pool_layers, pool_state
from embstore.extraction.words import WordIndex, pool_words

__all__ = ["run_states", "hidden_states", "pool_layers", "BatchForward", "Launched", "input_device"]


class _Stop(Exception):
    """Raised by a forward hook once the last needed state has been handed on."""


def run_states(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    wanted: Sequence[int],
    on_state: Callable[[int, torch.Tensor], None],
) -> None:
    """Run ``model`` on one batch and call ``on_state(i, states_i)`` for every ``i`` in ``wanted``, in order, as
    state i is produced (each (B, T, H), on the device of the block that made it); the forward stops after the
    highest. A family the anatomy map does not know runs whole with ``output_hidden_states``."""
    want = sorted(set(wanted))
    last = want[-1]
    blocks = find_blocks(model)
    if blocks is None:
        states = model(**inputs, output_hidden_states=True).hidden_states
        for i in want:
            on_state(i, states[i])
        return
    n = len(blocks)
    norm = state_norm(model) if last == n else None
    # state i (1..L) is the output of layer i's block, or of what follows it outside the block (DeBERTa-v2's conv),
    # or, for the top state of the language models, of the final norm; a block shared by every layer (ALBERT) is
    # hooked once and hands on each of its runs
    outs = state_outputs(model)[: min(last, n)]
    if norm is not None:
        outs[n - 1] = norm
    seen: list[int] = []

    def deliver(i: int, h: torch.Tensor) -> None:
        seen.append(i)
        if i in want:
            on_state(i, h)
        if i == last:
            raise _Stop

    def first(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if seen:  # a block shared by every layer (ALBERT) runs again
            return
        deliver(0, args[0] if args else kwargs["hidden_states"])  # what transformers records as state 0

    def after(module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        i = len(seen)
        if i == 0 or i > len(outs) or outs[i - 1] is not module:
            raise RuntimeError(
                f"{type(model).__name__} produced hidden state {i} out of order (after states {seen}); its blocks are "
                "not called once each in order, so it cannot be pooled layer by layer"
            )
        deliver(i, output[0] if isinstance(output, tuple) else output)

    handles = [blocks[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [m.register_forward_hook(after) for m in dict.fromkeys(outs)]
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(seen) != last + 1:
        raise RuntimeError(
            f"{type(model).__name__} ran {len(seen) - 1} of its layers instead of {last}; "
            "its layers are not called once each in order, so it cannot stop early"
        )


def hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor], last: int) -> list[torch.Tensor]:
    """Hidden states 0..``last`` of one batch, each (B, T, H), from a forward that stops after layer ``last``
    (:func:`run_states`; this keeps them all, the extraction pools each instead)."""
    states: list[torch.Tensor] = []
    run_states(model, inputs, range(last + 1), lambda _i, h: states.append(h))
    return states


def input_device(model: nn.Module, device: str) -> torch.device:
    """Where a batch goes in: ``device``, or for a model dispatched over devices by a device map
    (``hf_device_map``) the first accelerator of the map (accelerate runs cpu- and disk-offloaded blocks there too),
    else the CPU."""
    mapped = getattr(model, "hf_device_map", None)
    if not mapped:
        return torch.device(device)
    for where in mapped.values():
        if isinstance(where, int):
            return torch.device("cuda", where)
        if str(where) not in ("cpu", "disk", "meta"):
            return torch.device(str(where))
    return torch.device("cpu")


@dataclass(frozen=True)
class Bad:
    """A non-finite value found on the device in one batch: which array, and the largest |value| before the cast."""

    what: str
    """A pooling, or 'tokens' (per-token states)."""
    layer: int
    largest: float
    """Largest |value| in compute precision (inf or nan when the model itself produced them)."""

    @property
    def from_model(self) -> bool:
        """The model yielded inf/NaN (else a finite value overflowed the storage dtype)."""
        return not np.isfinite(self.largest)


@dataclass
class Launched:
    """One batch whose results are on their way to the host."""

    host: torch.Tensor
    """Flat storage-dtype buffer: pooled (P, k, B, H), then per-token (token layers, tokens, H)."""
    checks: torch.Tensor
    """(2, P * k + token layers [+ Pw * k]) float32: the largest |value| of each (pooling, layer), token layer and
    (word pooling, layer) in compute precision, and 1 where the cast to the storage dtype holds a non-finite value."""
    event: Any
    """CUDA event recorded after the copy (None on CPU)."""
    pooled_shape: tuple[int, int, int, int]
    n_tokens: int
    words_shape: tuple[int, ...] | None = None
    """(word poolings, k, words, H) of the word states after the per-token ones (``--word-pooling``), or None."""

    def _wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def bad(
        self,
        poolings: Sequence[str],
        layers: Sequence[int],
        token_layers: Sequence[int],
        word_poolings: Sequence[str] = (),
    ) -> Bad | None:
        """The first array of this batch that holds a non-finite value once cast, or None when all are finite."""
        self._wait()
        checks = self.checks.numpy()
        names = [(p, layer) for p in poolings for layer in layers] + [("tokens", layer) for layer in token_layers]
        if self.words_shape is not None:
            names += [(f"word {p}", layer) for p in word_poolings for layer in layers]
        for j in np.flatnonzero(checks[1] > 0):
            return Bad(what=names[j][0], layer=names[j][1], largest=float(checks[0, j]))
        return None

    def result(
        self, poolings: Sequence[str], token_layers: Sequence[int]
    ) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
        """Pooled (pooling -> (k, B, H)) and flat per-token (layer -> (tokens, H)) host arrays, views of ``host``."""
        self._wait()
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
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self.next = 0
        self.pin = pin

    def slot(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next slot's buffers, grown (with a margin) to hold ``tensors``, as views of their sizes."""
        i, self.next = self.next, (self.next + 1) % len(self.buffers)
        out = {}
        for name, t in tensors.items():
            buf = self.buffers[i].get(name)
            if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
                buf = self.buffers[i][name] = torch.empty(
                    t.numel() + t.numel() // 4, dtype=t.dtype, pin_memory=self.pin
                )
            out[name] = buf[: t.numel()].view(t.shape)
        return out

    def copy(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        host = self.slot(tensors)
        for name, t in tensors.items():
            host[name].copy_(t)
        return host, None


class _PinnedRing(_HostRing):
    """CUDA: pinned buffers, filled on a side stream so the copy overlaps the next forward."""

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        super().__init__(slots, pin=True)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        host = self.slot(tensors)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the results are computed
        with torch.cuda.stream(self.stream):
            for name, t in tensors.items():
                host[name].copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in tensors.values():
            t.record_stream(self.stream)  # keep the allocator from reusing their memory before the copy ends
        return host, done


class _Batch:
    """The device buffers of one batch, made when its first state arrives (which gives the width of its states)."""

    def __init__(
        self,
        fwd: BatchForward,
        h: torch.Tensor,
        lengths: np.ndarray,
        pool_mask: np.ndarray | None,
        words: WordIndex | None = None,
    ) -> None:
        batch, width, size = h.shape
        dev = fwd.device
        self.fwd, self.size = fwd, size
        real = torch.arange(width, device=dev)[None, :] < fwd.up(lengths)[:, None]  # (B, T)
        pool = None if pool_mask is None else fwd.up(pool_mask[:, :width])
        self.masks = {dev: Masks.build(real, pool)}
        self.pooled = torch.empty((len(fwd.poolings), len(fwd.layers), batch, size), dtype=torch.float32, device=dev)
        self.n_tokens = int(lengths.sum()) if fwd.token_layers else 0
        # word states (--word-pooling): (Pw, k, W, H) float32, pooled per layer as its state arrives
        self.word_index: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.words: torch.Tensor | None = None
        if fwd.word_poolings and words is not None:
            self.word_index[dev] = {
                "first": fwd.up(words.first),
                "last": fwd.up(words.last),
                "member_pos": fwd.up(words.member_pos),
                "member_word": fwd.up(words.member_word),
                "counts": fwd.up(words.counts),
            }
            n_words = int(self.word_index[dev]["counts"].shape[0])
            self.words = torch.zeros(
                (len(fwd.word_poolings), len(fwd.layers), n_words, size), dtype=torch.float32, device=dev
            )
        self.words_shape = None if self.words is None else tuple(self.words.shape)
        n_pooled, n_tok = self.pooled.numel(), len(fwd.token_layers) * self.n_tokens * size
        n_words_flat = 0 if self.words is None else self.words.numel()
        self.flat = torch.empty(n_pooled + n_tok + n_words_flat, dtype=fwd.dtype, device=dev)
        self.tokens = self.flat[n_pooled : n_pooled + n_tok].view(len(fwd.token_layers), self.n_tokens, size)
        n_checks = self.pooled.shape[0] * self.pooled.shape[1] + len(fwd.token_layers)
        n_checks += 0 if self.words is None else self.words.shape[0] * self.words.shape[1]
        self.checks = torch.zeros((2, n_checks), device=dev)
        self.index: dict[torch.device, torch.Tensor] = {}
        if fwd.token_layers:
            # rows are right-padded, so the real positions in row order are the flat ragged layout
            where = np.flatnonzero((np.arange(width)[None, :] < lengths[:, None]).reshape(-1))
            self.index[dev] = fwd.up(where)

    def _on(self, cache: dict[torch.device, Any], device: torch.device) -> Any:
        if device not in cache:
            first = next(iter(cache.values()))
            cache[device] = first.to(device)
        return cache[device]

    def take(self, i: int, h: torch.Tensor) -> None:
        """Pool state ``i`` (B, T, H) and copy its per-token rows, on the device ``h`` is on (a device map may
        spread the blocks over several)."""
        fwd, dev = self.fwd, self.fwd.device
        if i in fwd.layer_pos:
            pooled = pool_state(h, fwd.poolings, self._on(self.masks, h.device))  # (P, B, H) float32
            self.pooled[:, fwd.layer_pos[i]] = pooled.to(dev, non_blocking=True)
            if self.words is not None:
                if h.device not in self.word_index:
                    self.word_index[h.device] = {k: v.to(h.device) for k, v in self.word_index[dev].items()}
                words = pool_words({i: h}, [i], fwd.word_poolings, self.word_index[h.device])  # (Pw, 1, W, H)
                self.words[:, fwd.layer_pos[i]] = words[:, 0].to(dev, non_blocking=True)
        if i in fwd.token_pos:
            j = fwd.token_pos[i]
            rows = h.reshape(-1, self.size).index_select(0, self._on(self.index, h.device))  # (tokens, H)
            self.tokens[j].copy_(rows, non_blocking=True)  # the cast to the storage dtype
            self.checks[0, self.pooled.shape[0] * self.pooled.shape[1] + j] = rows.abs().amax().float().to(dev)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat storage-dtype buffer and the checks (see :class:`Launched`)."""
        p, k = self.pooled.shape[:2]
        cast = self.flat[: self.pooled.numel()].view(self.pooled.shape)
        cast.copy_(self.pooled)  # the cast to the storage dtype, on the device
        if p * k:
            self.checks[0, : p * k] = self.pooled.abs().amax(dim=(2, 3)).reshape(-1)
            self.checks[1, : p * k] = (~torch.isfinite(cast)).any(dim=3).any(dim=2).reshape(-1).float()
        if self.n_tokens:
            self.checks[1, p * k : p * k + len(self.tokens)] = (
                (~torch.isfinite(self.tokens)).reshape(len(self.tokens), -1).any(dim=1).float()
            )
        if self.words is not None:
            tail = self.flat[self.flat.numel() - self.words.numel() :].view(self.words.shape)
            tail.copy_(self.words)  # the cast to the storage dtype
            start = p * k + len(self.tokens)
            if self.words.numel():
                self.checks[0, start:] = self.words.abs().amax(dim=(2, 3)).reshape(-1)
            self.checks[1, start:] = (~torch.isfinite(tail)).any(dim=3).any(dim=2).reshape(-1).float()
        return self.flat, self.checks


class BatchForward:
    """Runs padded batches through the model up to the last layer needed and pools each layer on the device as the
    forward produces it."""

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
        self.layer_pos = {layer: j for j, layer in enumerate(self.layers)}
        self.token_pos = {layer: j for j, layer in enumerate(self.token_layers)}
        self.wanted = sorted({*self.layers, *self.token_layers})
        self.dtype = getattr(torch, dtype)
        self.device = input_device(model, device)
        self.on_cuda = self.device.type == "cuda"
        self.ring: _HostRing | None = _PinnedRing(self.device) if self.on_cuda else None

    def stage(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Host tensors of one padded batch, pinned on CUDA so they go up without blocking (any thread)."""
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        return {k: v.pin_memory() for k, v in tensors.items()} if self.on_cuda else tensors

    def up(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the input device."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.pin_memory().to(self.device, non_blocking=True) if self.on_cuda else t

    def launch(
        self,
        inputs: dict[str, torch.Tensor],
        lengths: np.ndarray,
        pool_mask: np.ndarray | None = None,
        words: WordIndex | None = None,
    ) -> Launched:
        """Forward, pool, cast, check and start the copy to the host of one batch; ``lengths`` (B,) are the real
        positions of each row in the model's output (tokens, or frames for audio), ``pool_mask`` (B, T) bool the
        positions ``mean`` and ``max`` cover (None: every real one), ``words`` where the batch's words sit, for their
        states (:func:`embstore.extraction.words.pool_words`)."""
        lens = lengths.astype(np.int64)
        with torch.inference_mode():
            state: list[_Batch] = []

            def on_state(i: int, h: torch.Tensor) -> None:
                if not state:
                    state.append(_Batch(self, h, lens, pool_mask, words))
                state[0].take(i, h)

            run_states(
                self.model, {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}, self.wanted, on_state
            )
            flat, checks = state[0].finish()
            shape = tuple(state[0].pooled.shape)
            n_tokens = state[0].n_tokens
            words_shape = state[0].words_shape
            if self.ring is None:  # CPU: flat already is the host array
                return Launched(
                    host=flat,
                    checks=checks,
                    event=None,
                    pooled_shape=shape,  # type: ignore[arg-type]
                    n_tokens=n_tokens,
                    words_shape=words_shape,
                )
            host, event = self.ring.copy({"flat": flat, "checks": checks})  # returns at once; the next forward runs
        return Launched(
            host=host["flat"],
            checks=host["checks"],
            event=event,
            pooled_shape=shape,  # type: ignore[arg-type]
            n_tokens=n_tokens,
            words_shape=words_shape,
        )
