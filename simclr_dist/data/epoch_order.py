"""Resumable epochs: what a rank's batch ``b`` of epoch ``e`` holds, and which random draws make its views, depend
only on (seed, epoch, rank, b), never on the batches before it.

Why: a checkpoint taken mid-epoch must resume at the *next* batch of the *same* epoch and see exactly the batches an
uninterrupted run sees (``loader.set_epoch(epoch, start_batch=k)``). A loader that draws augmentations from one
stream per epoch would have to replay batches 0..k-1 to get there; here nothing has to be replayed:

- the order is ``DistributedSampler``'s (a permutation of (seed, epoch), every world_size-th from rank), started at
  position ``k * batch_size`` (:class:`ResumableSampler`);
- per-sample augmentation (the torch path) runs under a torch seed of (seed, epoch, sample) (:class:`SeededItems`);
- batched augmentation (the FFCV path) reseeds its generator from (seed, rank, epoch, batch) (:func:`batch_seed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

_M64 = 0xFFFFFFFFFFFFFFFF


def mix64(*xs: int) -> int:
    """splitmix64 over the arguments: a well-spread 64-bit value from (seed, epoch, ...)."""
    z = 0x9E3779B97F4A7C15
    for x in xs:
        z = (z ^ (x & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        z ^= z >> 31
    return z


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of sample ``index``'s views in ``epoch``: the same on any rank, at any position."""
    return mix64(seed, epoch, index, 0x5A) >> 1


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The seed of a rank's batched augmentation draws for batch ``batch`` of ``epoch``."""
    return mix64(seed, rank, epoch, batch, 0xB7) >> 1


class ResumableSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True, drop_last=True)``'s order for this rank, from batch ``start_batch`` on,
    as ``(index, sample seed)`` pairs for :class:`SeededItems`. ``len()`` stays the whole epoch's, so the loader's
    length (steps per epoch) does not depend on where an epoch was resumed."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order = list(super().__iter__())[self.start_batch * self.batch_size:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in order])


class SeededItems(Dataset):
    """``base[index]`` under ``torch.manual_seed(sample seed)``, for items requested as ``(index, seed)``: the views
    of a sample are a function of its seed alone, whichever process or position draws them. The caller's torch
    RNG state is restored afterwards (it may be the training process, with ``num_workers=0``)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]
