"""Speech backbones (HuBERT, wav2vec2, WavLM, data2vec-audio, the conformer, SEW, Whisper's encoder...): plan the
rows of an audio split (including augmented copies) and encode row chunks of waveforms into pooled and per-frame
states.

Hidden state 0 is what the transformer receives (the projected conv features plus the convolutional position
embedding; for Whisper the two convolutions over the log-mel frames plus the position table); 1..L are the
transformer layers. Pooling is over each clip's own frames, masked by its frame count (the model's own arithmetic
on its length: :meth:`embstore.backbones.registry.Backbone.frames`), so padded frames never enter a mean or max.

**Exact at any batch size.** Each clip goes through the feature extractor alone (its normalisation sees no other
clip), is right-padded, and the model is always given the sample-level attention mask, also when its feature
extractor returns none (alone, a clip is all real samples); :func:`embstore.backbones.padding.exact_batches` keeps
the padding out of the parts that would still see it (a group-norm front end, stacked or depthwise convolutions,
SEW's squeezed mask). So a clip's stored values are the ones it has alone, whatever shares its batch. Whisper pads
every clip to its own 30-second window, which no other clip touches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embstore.backbones.registry import window_samples
from embstore.data.audio import load_waveform
from embstore.data.augment import AugmentParams, AugmentSpec, apply, augmented_length, draw_copies, planned_copies
from embstore.data.tables import SplitData
from embstore.errors import DataError
from embstore.extraction.encode import ChunkBuffers, ChunkEncoder, ChunkJob, Prepared, make_batches

if TYPE_CHECKING:
    from torch import nn

__all__ = ["AudioItem", "AudioRows", "plan_audio_split", "AudioChunkEncoder", "AUDIO_TOWER"]

AUDIO_TOWER = "audio"


@dataclass(frozen=True)
class AudioItem:
    """One stored row: a file, how to load it, and the augmentation applied (None: original)."""

    path: str
    samples: int
    """Samples after resampling, augmentation and cropping: what the model sees."""
    augment: AugmentParams | None = None


@dataclass(frozen=True)
class AudioRows:
    """The rows of one audio split in source order (originals, then augmented copies)."""

    items: list[AudioItem]
    source: np.ndarray
    """(n,) int64 position of each row's source row among the split's originals."""
    samples: np.ndarray
    """(n,) int64 samples the model sees."""
    frames: np.ndarray
    """(n,) int64 output frames."""
    cropped: np.ndarray
    """(n,) bool: longer than --max-seconds before cropping."""


def plan_audio_split(
    sd: SplitData,
    *,
    rate: int,
    frames_of: Callable[[np.ndarray], np.ndarray],
    max_seconds: float | None,
    augment: AugmentSpec | None,
    label_names: list[str] | None,
) -> AudioRows:
    """Every row's length in samples and frames from file headers alone; augmented copies appended."""
    full = sd.clip_lengths(rate)
    paths = list(sd.audio or ())  # clip_lengths refused a split without audio
    max_samples = int(round(max_seconds * rate)) if max_seconds is not None else None
    items = [
        AudioItem(path=p, samples=int(min(n, max_samples) if max_samples is not None else n))
        for p, n in zip(paths, full)
    ]
    source = list(range(len(items)))
    cropped = [max_samples is not None and int(n) > max_samples for n in full]
    if augment is not None:
        for params in draw_copies(augment, planned_copies(augment, sd.labels, label_names), sd.row_ids):
            n_full = augmented_length(int(full[params.source]), params, None)
            items.append(
                AudioItem(
                    path=paths[params.source],
                    samples=augmented_length(int(full[params.source]), params, max_samples),
                    augment=params,
                )
            )
            source.append(params.source)
            cropped.append(max_samples is not None and n_full > max_samples)
    samples = np.array([it.samples for it in items], dtype=np.int64)
    frames = frames_of(samples)
    short = np.flatnonzero(frames < 1)  # whole clips were checked (usable_rows); this is the crop or an augmenter
    if len(short):
        shown = ", ".join(items[i].path for i in short[:3]) + (", ..." if len(short) > 3 else "")
        how = " or ".join(
            ([f"cropped to --max-seconds {max_seconds:g}"] if max_seconds is not None else [])
            + (["augmented"] if augment is not None else [])
        )
        raise DataError(
            f"{len(short)} audio rows of split {sd.name!r} give the model no frame once {how} ({shown}); "
            "raise --max-seconds or use a milder --augment."
        )
    return AudioRows(
        items=items,
        source=np.array(source, dtype=np.int64),
        samples=samples,
        frames=frames,
        cropped=np.array(cropped, dtype=bool),
    )


def load_item(item: AudioItem, rate: int, max_samples: int | None) -> np.ndarray:
    """The waveform the model sees for one row: (samples,) float32 at ``rate``."""
    if item.augment is None:
        x = load_waveform(item.path, rate, max_samples)
    else:
        x = apply(load_waveform(item.path, rate, None), item.augment, max_samples, rate)
    if len(x) != item.samples:
        raise DataError(
            f"{item.path} now has {len(x)} samples at {rate} Hz where its header promised {item.samples}; the file "
            f"changed during extraction: re-run to make a new store."
        )
    return x


class AudioChunkEncoder(ChunkEncoder):
    """Encodes row chunks of audio: load, resample, augment, run each clip through the feature extractor alone and
    pad (the next batches in a prefetch thread), run the model with the padding kept out of every clip, pool over
    each clip's own frames."""

    def __init__(
        self,
        model: nn.Module,
        feature_extractor: Any,
        frames_of: Callable[[np.ndarray], np.ndarray],
        *,
        max_samples: int | None,
        batch_seconds: float,
        **kw: Any,
    ) -> None:
        super().__init__(model, 0, **kw)
        self.fe = feature_extractor
        self.rate = int(feature_extractor.sampling_rate)
        self.frames_of = frames_of
        self.max_samples = max_samples
        self.sample_budget = max(1, int(batch_seconds * self.rate))
        self.input_name = str((getattr(feature_extractor, "model_input_names", None) or ["input_values"])[0])
        """'input_values' (waveforms) or 'input_features' (Whisper's log-mel frames)."""
        self.window = window_samples(feature_extractor)
        """Whisper: the window every clip is padded to on its own, in samples (its model takes no mask)."""

    def batch(self, waves: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The model inputs of one batch: each clip through the feature extractor alone, right-padded, with the
        sample-level attention mask (none for a fixed-window model, whose clips are each padded to the window)."""
        alone = [
            np.asarray(self.fe(w, sampling_rate=self.rate, return_tensors="np")[self.input_name][0], dtype=np.float32)
            for w in waves
        ]
        if self.window is not None:
            return {self.input_name: np.stack(alone)}
        width = max(len(x) for x in alone)
        values = np.full((len(alone), width), float(getattr(self.fe, "padding_value", 0.0)), dtype=np.float32)
        mask = np.zeros((len(alone), width), dtype=np.int64)
        for i, x in enumerate(alone):
            values[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return {self.input_name: values, "attention_mask": mask}

    def exactness(self) -> AbstractContextManager[None]:
        """The context the batches run in: the padding kept out of every clip (see the module docstring)."""
        from embstore.backbones.padding import exact_batches

        return exact_batches(self.model)

    def first_batch(self, job: ChunkJob) -> ChunkJob:
        items: list[AudioItem] = job.towers[AUDIO_TOWER]
        stop = make_batches(
            np.array([it.samples for it in items], dtype=np.int64), self.batch_size, self.sample_budget
        )[0][1]
        return ChunkJob(split=job.split, chunk=job.chunk, towers={AUDIO_TOWER: items[:stop]})

    def encode(
        self, job: ChunkJob, paths: Callable[[str, str, int | None], str], on_rows: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        items: list[AudioItem] = job.towers[AUDIO_TOWER]
        n = len(items)
        lengths = np.array([it.samples for it in items], dtype=np.int64)
        frames = self.frames_of(lengths)
        offsets = np.concatenate([[0], np.cumsum(frames)])
        buf = ChunkBuffers(len(self.layers), n, offsets, self.np_dtype)

        def prepare(start: int, stop: int) -> Prepared:
            """Decode, resample and pad one batch (in the prefetch thread, while the model runs)."""
            waves = [load_item(it, self.rate, self.max_samples) for it in items[start:stop]]
            return self.forward.stage(self.batch(waves)), frames[start:stop], None

        where = f"row chunk {job.chunk} of split {job.split!r}"
        with self.exactness():
            self._run(
                job.split,
                make_batches(lengths, self.batch_size, self.sample_budget),
                prepare,
                buf,
                on_rows,
                where=where,
            )
        return buf.named(lambda what, layer: paths(AUDIO_TOWER, what, layer))
