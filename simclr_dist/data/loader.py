"""One loader interface for pretraining, whatever the backend: the spec, the protocol, the factory.

A loader yields ``(view1, view2, label)`` batches of float tensors ``(B, 3, S, S)`` and has ``set_epoch(epoch)``
(which fixes that epoch's order and augmentation draws from the seed, so an epoch replayed after a resume is the
same epoch) and ``len()`` (batches per epoch, equal on every rank because the last partial batch is dropped).
Backends: :mod:`simclr_dist.data.torch_loader` (per-sample CPU augmentation in DataLoader workers),
:mod:`simclr_dist.data.ffcv.loader` (compiled decode + crops, the rest batched on the device) and
:mod:`simclr_dist.data.resident` (an in-memory dataset held as one tensor, every view batched on the device). They
take a ``LoaderSpec`` but do not import this module (it imports them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LoaderSpec:
    dataset: str
    split: str
    root: str | None
    image_size: int
    augment: str | None
    jitter_strength: float | None
    batch_size: int          # per worker
    rank: int
    world_size: int
    seed: int
    num_workers: int = 0     # torch: DataLoader processes; ffcv: decode threads (0 = the CPUs Ray gave the worker);
    #                          resident: unused (its ops run in the training process, on its device)
    pin_memory: bool = False
    backend: str = "torch"       # "torch" | "ffcv" | "resident" (the resolved --loader)
    beton: str | None = None     # .beton path, list or glob (ffcv)
    device: str | None = None    # where ffcv's/resident's batched augmentation runs; None: the Ray Train device
    scaled_decode: bool = True   # ffcv: reduced-scale JPEG decode when both crops allow it (data/ffcv/decode.py)
    resample: str = "linear"     # ffcv: crop resize kernel, linear | area (data/ffcv/decode.py)
    augment2: str | None = None  # the second view's components; None: drawn like the first (paper Figure 5: crop)
    subset: int = 0              # pretrain on data.splits.fixed_subset_indices(labels, subset) of the split (0: all)


class PretrainLoader(Protocol):
    """What the pretraining loop needs of a loader."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def build_pretrain_loader(spec: LoaderSpec) -> PretrainLoader:
    """``TorchPretrainLoader``, ``FFCVPretrainLoader`` or ``ResidentPretrainLoader`` (same interface) by
    ``spec.backend``."""
    if spec.backend == "ffcv":
        from simclr_dist.data.ffcv.loader import FFCVPretrainLoader
        return FFCVPretrainLoader(spec)
    if spec.backend == "resident":
        from simclr_dist.data.resident import ResidentPretrainLoader
        return ResidentPretrainLoader(spec)
    if spec.backend != "torch":
        raise ValueError(f"unknown loader backend {spec.backend!r}; choose torch, ffcv or resident")
    from simclr_dist.data.torch_loader import TorchPretrainLoader
    return TorchPretrainLoader(spec)
