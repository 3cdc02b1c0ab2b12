"""Speech rows for ``heads finetune``: clips read, augmented and cropped on the fly, in batches bounded by duration.

The readers and augmenters are the extraction side's (:func:`embstore.data.audio.load_waveform`, resampling to the
model's rate; :mod:`embstore.data.augment`). What fine-tuning adds:

- **Training clips** are read whole, augmented (``--augment``: parameters drawn from a generator seeded by
  (seed, epoch, row), so each epoch sees new noise and a resumed run draws what an uninterrupted one does), then cut
  to a random window of ``--max-seconds`` (offset seeded the same way). **Evaluation** reads every clip whole.
- **Batches by duration** (:class:`ClipBatches`): rows of similar length are batched together, at most
  ``batch_size`` rows and ``--batch-seconds`` of padded audio (rows x longest clip) each, so a 30-second clip never
  shares a batch with seven others. The training order is drawn anew each epoch; the number of batches is the same
  every epoch (the learning-rate schedule counts on it).
- **Too short or unusable clips** (:func:`embstore.data.audio.usable_rows`, the rule extraction applies too): a
  clip shorter than the conv front end's receptive field gives no frame; it is named with the minimum, or dropped
  and counted with ``--skip-bad``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from embstore.data.audio import load_waveform
from embstore.data.augment import AugmentSpec, apply, balance_copies, draw_copies
from embstore.data.tables import SplitData
from embstore.errors import DataError
from embstore.extraction.encode import make_batches
from heads.protocol.schedule import EpochSampler

__all__ = ["ClipBatches", "Clips", "collate_clips", "balanced_rows"]

log = logging.getLogger(__name__)
Key = tuple[int, int]
"""(row position in the split, epoch): what :class:`ClipBatches` yields and :class:`Clips` reads."""


class Clips(Dataset[tuple[np.ndarray, int]]):
    """Waveforms at the model's rate and their labels; training clips augmented and cut per (row, epoch).

    ``rows`` are positions in ``split``; an item is read by (index into ``rows``, epoch)."""

    def __init__(
        self,
        split: SplitData,
        rows: np.ndarray,
        labels: np.ndarray,
        rate: int,
        *,
        seed: int,
        max_samples: int | None = None,
        augment: Callable[[int], AugmentSpec | None] | None = None,
        copies: np.ndarray | None = None,
    ) -> None:
        if split.audio is None:
            raise DataError(f"Split {split.name!r} holds text, but the model takes audio; pass --audio-col COLUMN.")
        self.paths = [split.audio[i] for i in rows]
        self.row_ids = np.asarray(split.row_ids)[rows]
        self.labels, self.rate, self.seed = labels, rate, seed
        self.max_samples, self.augment = max_samples, augment
        self.copies = copies
        """(n,) copy number of each item (0: the original clip, read as it is; k > 0: an augmented copy), or None:
        every item is augmented (when ``augment`` is given)."""
        self.lengths = split.clip_lengths(rate)[rows]
        """(n,) int64 samples of each whole clip."""

    def __len__(self) -> int:
        return len(self.paths)

    def seen_lengths(self) -> np.ndarray:
        """(n,) int64 samples the model sees per row (cut to ``max_samples`` in training)."""
        return self.lengths if self.max_samples is None else np.minimum(self.lengths, self.max_samples)

    def __getitem__(self, key: Key) -> tuple[np.ndarray, int]:
        i, epoch = key
        x = load_waveform(self.paths[i], self.rate)  # (samples,) float32
        spec = None if self.augment is None else self.augment(epoch)
        copy = 1 if self.copies is None else int(self.copies[i])
        if spec is not None and copy > 0:
            # seeded by (seed, epoch), the row id and the copy number
            params = draw_copies(spec, [(i, copy)], self.row_ids)[0]
            x = apply(x, params, None, self.rate)
        if self.max_samples is not None and len(x) > self.max_samples:
            rng = np.random.default_rng([self.seed, epoch, int(self.row_ids[i]), 1])
            start = int(rng.integers(0, len(x) - self.max_samples + 1))
            x = x[start : start + self.max_samples]
        return x, int(self.labels[i])


def balanced_rows(rows: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, copy numbers): the fitting ``rows`` (copy 0), then the copies (:func:`embstore.data.augment.
    balance_copies`) that bring every class of ``labels`` (the rows' labels) to the majority class's count."""
    extra = balance_copies(labels, n_classes)
    pos = np.array([p for p, _ in extra], dtype=np.int64)
    return (
        np.concatenate([rows, rows[pos]]).astype(np.int64),
        np.concatenate([np.zeros(len(rows), dtype=np.int64), np.array([c for _, c in extra], dtype=np.int64)]),
    )


class ClipBatches(Sampler[list[Key]]):
    """Batches of (row, epoch) keys of similar length: at most ``batch_size`` rows and ``budget`` padded samples.

    With ``shuffle`` the rows are ordered longest first with ties broken by a permutation seeded by (seed, epoch),
    and the batches come in a seeded order; the batch count does not depend on the epoch. Without it (evaluation),
    longest first, epoch 0. accelerate sets the epoch through ``.sampler`` (an :class:`EpochSampler`)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, budget: int, *, seed: int, shuffle: bool) -> None:
        self.lengths, self.batch_size, self.budget, self.shuffle = np.asarray(lengths), batch_size, budget, shuffle
        self.sampler = EpochSampler(len(lengths), seed)
        self._count = len(make_batches(np.sort(self.lengths)[::-1], batch_size, budget))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[list[Key]]:
        epoch = self.sampler.epoch if self.shuffle else 0
        rng = np.random.default_rng([self.sampler.seed, epoch])
        ties = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = np.lexsort((ties, -self.lengths))  # longest first
        batches = [order[a:b] for a, b in make_batches(self.lengths[order], self.batch_size, self.budget)]
        for k in rng.permutation(len(batches)) if self.shuffle else range(len(batches)):
            yield [(int(i), epoch) for i in batches[k]]


def collate_clips(
    feature_extractor: Any, min_width: int = 0
) -> Callable[[list[tuple[np.ndarray, int]]], dict[str, torch.Tensor]]:
    """A DataLoader collate_fn that batches clips as extraction does (``AudioChunkEncoder.batch``): each clip
    through the feature extractor alone, right-padded, with the sample-level attention mask (none for Whisper, whose
    clips are each padded to its window); each clip's length in the model's input units (samples, or Whisper's
    log-mel frames) and the labels. Batches narrower than ``min_width`` samples are padded to it (SpecAugment's time
    masks need a batch of at least ``mask_time_length`` frames)."""
    from embstore.backbones.registry import input_lengths, window_samples

    rate = int(feature_extractor.sampling_rate)
    name = str((getattr(feature_extractor, "model_input_names", None) or ["input_values"])[0])
    window = window_samples(feature_extractor)
    pad = float(getattr(feature_extractor, "padding_value", 0.0))

    def fn(rows: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        alone = [
            np.asarray(feature_extractor(r[0], sampling_rate=rate, return_tensors="np")[name][0], dtype=np.float32)
            for r in rows
        ]
        batch = {
            "lengths": torch.from_numpy(input_lengths(feature_extractor, [len(r[0]) for r in rows])),
            "labels": torch.tensor([r[1] for r in rows], dtype=torch.long),
        }
        if window is not None:
            batch[name] = torch.from_numpy(np.stack(alone))
            return batch
        width = max(min_width, max(len(x) for x in alone))
        values = np.full((len(alone), width), pad, dtype=np.float32)
        mask = np.zeros((len(alone), width), dtype=np.int64)
        for i, x in enumerate(alone):
            values[i, : len(x)] = x
            mask[i, : len(x)] = 1
        batch[name], batch["attention_mask"] = torch.from_numpy(values), torch.from_numpy(mask)
        return batch

    return fn
