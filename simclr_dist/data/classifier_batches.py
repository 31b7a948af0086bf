"""The classifiers' resident batches: a labelled subset held once as one uint8 tensor (on the training device when
that is a GPU), each training batch augmented by a few batched tensor ops there, with no per-sample Python.

Why: the classifier loop's torch path (:func:`simclr_dist.run.train.classify_loop.classifier_transform` in a
DataLoader) builds every image on the CPU, one sample at a time; on a GPU that per-sample work, not the network,
sets the pace of a small-image classifier (a ResNet-18 step on 256 Fashion-MNIST images is milliseconds on an
H200). The in-memory datasets need no decoding, so the whole recipe can run on the card.

The recipe is the torch path's, equal in distribution:

- ``padcrop[,flip]`` (the supervised recipe): ``RandomCrop(S, padding=S // 8)`` pads with zeros and crops at a
  corner uniform over the ``(2p + 1)^2`` positions; here the same zero padding and a per-sample corner
  ``(top, left)`` uniform on ``[0, 2p]^2`` (:func:`pad_crop`: one gather), then a horizontal flip with p = 0.5,
  ``/ 255`` and the normalisation by the same float32 ops as torchvision's ``ToDtype(scale=True)`` and
  ``Normalize`` (so for the same corner and flip the output is bit for bit the torch path's);
- SimCLR components (``--augment simclr``, ``crop``, ...): the resident pretraining loader's batched ops
  (:func:`simclr_dist.data.resident.crop_boxes` / ``resized_crops`` for the crop, then
  :class:`simclr_dist.data.ffcv.gpu_augment.BatchedViewAugment`), one view per sample.

Order and draws, so that a resumed run and any rank split give the same batches:

- order: the torch path's ``DistributedSampler`` permutation of (seed, epoch), every ``world``-th sample from
  ``rank``, cut into the DataLoader's batches (the last partial batch kept or dropped as the loop asks): the same
  samples in the same batches as the torch path;
- draws: one generator per batch seeded from (seed, epoch, batch) only
  (:func:`simclr_dist.data.resident.global_batch_seed`), every draw made for the global batch and sliced to this
  rank's rows ``rank::world``. So a run resumed at epoch e draws what an uninterrupted run drew there. The draws
  come from the generator of the training device: a CUDA run and a CPU run of the same seed see other (equally
  distributed) augmentations, as they do other sums.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from simclr_dist.data.augment import PADCROP, default_augment
from simclr_dist.data.datasets import TensorImageDataset, dataset_info
from simclr_dist.data.ffcv.gpu_augment import BatchedViewAugment
from simclr_dist.data.resident import ATTEMPTS, grey_channels, uniform_draw, crop_boxes, global_batch_seed, resized_crops


def loader_kind(choice: str, device: torch.device, dataset: Dataset, image_size: int) -> str:
    """The loader a classifier run uses: ``torch`` or ``resident``. ``auto``: resident on a CUDA device when the
    dataset is held in memory at the training size, else torch (so a CPU run keeps the torch path). ``resident``
    on a dataset read from files is a one-line ValueError."""
    if choice == "torch":
        return "torch"
    held = isinstance(dataset, TensorImageDataset) and tuple(dataset.images.shape[-2:]) == (image_size, image_size)
    if choice == "resident":
        if not held:
            raise ValueError("--classifier-loader resident holds an in-memory dataset at the training size as one "
                             "tensor; this one is read from files (or held at another size): choose torch or auto")
        return "resident"
    if choice != "auto":
        raise ValueError(f"--classifier-loader: unknown loader {choice!r}; choose from auto, torch, resident")
    return "resident" if held and torch.device(device).type == "cuda" else "torch"


def pad_crop(images: Tensor, top: Tensor, left: Tensor, pad: int) -> Tensor:
    """``RandomCrop(S, padding=pad)`` with the corners given: uint8 ``(n, C, S, S)`` zero-padded to
    ``S + 2 pad`` and cropped back to ``S`` at ``(top, left)`` (long ``(n,)`` each, in ``[0, 2 pad]``);
    uint8 ``(n, C, S, S)``. One gather, no per-sample kernel."""
    n, _, s, _ = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))  # (n, C, S + 2p, S + 2p), zeros as RandomCrop's fill=0
    span = torch.arange(s, device=images.device)
    rows = (top[:, None] + span)[:, :, None]  # (n, S, 1)
    cols = (left[:, None] + span)[:, None, :]  # (n, 1, S)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (n, S, S, C) -> (n, C, S, S)


def padcrop_params(g: torch.Generator, part: tuple[int, int], n: int, pad: int, device: torch.device
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(top, left, flip) of ``n`` samples, drawn from ``g`` for the global batch and sliced to ``part``'s rows:
    corners uniform on ``[0, 2 pad]`` (long ``(n,)`` each, as ``RandomCrop``'s ``randint(0, 2 pad + 1)``) and a
    flip with p = 0.5 (bool ``(n,)``; used with ``flip`` only)."""
    u = uniform_draw(g, part, n, 3, device)  # (n, 3) float64 in [0, 1)
    top, left = (u[:, :2] * (2 * pad + 1)).long().unbind(1)
    return top, left, u[:, 2] < 0.5


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``(n, 3, S, S)`` -> float32 ``(n, 3, S, S)``: torchvision's ``ToDtype(float32, scale=True)`` then
    ``Normalize(mean, std)``, the same float32 operations in the same order. ``mean``/``std``: ``(1, 3, 1, 1)``."""
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class ResidentClassifierBatches:
    """``len()`` (steps per epoch), ``set_epoch(epoch)`` and iteration over ``(x, y)``: x float32 ``(B, 3, S, S)``
    normalised, y int64 ``(B,)``, both on ``device``: the torch path's batches for this rank, augmented here.

    ``images``: uint8 ``(N, C, S, S)``, the samples the loop trains on (its ``fit`` indices, in that order: the
    sampler's positions index them); ``targets``: ``(N,)``. ``components``: the canonical classifier recipe
    (``padcrop[,flip]`` or SimCLR components, "none" for nothing)."""

    def __init__(self, images: Tensor, targets: Tensor, *, components: str, dataset: str, image_size: int,
                 mean: Sequence[float], std: Sequence[float], batch_size: int, drop_last: bool, seed: int,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[-2:]) != (image_size, image_size):
            raise ValueError(f"resident classifier batches: images must be uint8 (N, C, {image_size}, {image_size}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.grey = images.shape[1] == 1 or grey_channels(images)
        held = images[:, :1] if self.grey and images.shape[1] == 3 else images
        self.images = held.contiguous().to(self.device)  # (N, C, S, S) uint8, C = 1 or 3
        self.targets = targets.long().to(self.device)  # (N,)
        self.parts = [c for c in components.split(",") if c and c != "none"]
        self.size, self.seed, self.rank, self.world = image_size, seed, rank, world
        self.batch_size, self.drop_last = batch_size, drop_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.views = None
        if PADCROP not in self.parts:  # SimCLR components: the resident pretraining loader's ops, one view
            aug = default_augment(dataset_info(dataset), self.parts, image_size=image_size)
            self.aug = dataclasses.replace(aug, mean=tuple(mean), std=tuple(std))
            self.views = BatchedViewAugment(self.aug, self.device)
        self.sampler = DistributedSampler(range(len(self.images)), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed)
        self.generator = torch.Generator(device=self.device)
        self.epoch = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({tuple(self.images.shape)} uint8 on {self.device}, "
                f"{','.join(self.parts) or 'none'}, batch {self.batch_size})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        share = len(self.sampler)
        return share // self.batch_size if self.drop_last else math.ceil(share / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """This rank's positions of ``epoch``, in the torch path's order: long ``(len(sampler),)``."""
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, b_size = self.epoch, self.batch_size
        order = self.order(epoch).to(self.device)
        for b in range(len(self)):
            index = order[b * b_size:(b + 1) * b_size]  # (B,)
            yield self.batch(index, epoch, b), self.targets.index_select(0, index)

    def batch(self, index: Tensor, epoch: int, batch: int) -> Tensor:
        """The augmented images of positions ``index`` (this rank's part of global batch ``batch`` of ``epoch``):
        float32 ``(B, 3, S, S)`` on the device."""
        src = self.images.index_select(0, index)  # (B, C, S, S) uint8
        g = self.generator.manual_seed(global_batch_seed(self.seed, epoch, batch))
        part = (self.rank, self.world)
        if self.views is not None:
            if "crop" in self.aug.components:
                boxes = crop_boxes(uniform_draw(g, part, len(src), 2 * ATTEMPTS + 2, self.device), self.size, self.size,
                                   self.aug.crop_scale)
                src = resized_crops(src, boxes, self.size)
            return self.views(src.expand(-1, 3, -1, -1) if self.grey else src, g, part)
        pad = self.size // 8
        top, left, flip = padcrop_params(g, part, len(src), pad, self.device)
        x = pad_crop(src, top, left, pad)
        if "flip" in self.parts:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return normalise(x.expand(-1, 3, -1, -1) if self.grey else x, self.mean, self.std)
