"""The resident two-view loader: a dataset that fits in memory is held once as one uint8 tensor (on the training
device when that is a GPU) and every view is made by batched tensor ops, crop included.

Why: the torch loader makes each view per sample on the CPU (about 4 ms per sample and core at 32 px,
docs/performance.md section 2), and the FFCV loader needs a ``.beton`` and a numba compilation per process. The
in-memory datasets (digits, Fashion-MNIST, CIFAR-10/100, STL-10) need no decoding at all, so the whole recipe can
run as a handful of batched ops on the device, with no CPU work per sample and no worker processes.

The recipe is the torch loader's (:func:`simclr_dist.data.augment.build_view_transform`), equal in distribution:

- crop: torchvision ``RandomResizedCrop``'s box, drawn for a whole batch at once (:func:`crop_boxes`: 10
  attempts of area ~ U(scale) x image, log aspect ratio ~ U(log 3/4, log 4/3), integer sides by rounding, the
  first attempt that fits, else the centre fallback; the corner uniform over the positions that fit), then the
  box resized to S x S by bilinear interpolation clamped at the box's edges and rounded to uint8
  (:func:`resized_crops`, two batched matmuls). That is what torchvision's antialiased bilinear gives when it enlarges, and the
  images are held at the training size, so a crop is never shrunk;
- flip, colour jitter, grayscale, blur and the Figure-5 extras: the FFCV loader's batched ops
  (:class:`simclr_dist.data.ffcv.gpu_augment.BatchedViewAugment`, each checked against torchvision).

Order and random draws, so that a resumed epoch and any rank split give the same views:

- order: ``DistributedSampler``'s permutation of (seed, epoch), every ``world``-th sample from ``rank``: the same
  samples in the same batches as the torch loader;
- draws: one generator per batch seeded from (seed, epoch, batch) only (:func:`global_batch_seed`), with every
  draw made for the global batch (``batch_size * world`` samples) and sliced to this rank's rows
  ``rank::world``, which are the global positions of its samples. So batch b is the same whether the epoch
  starts at 0 or at b, and W ranks x B samples get bit for bit the views of one rank x W*B samples.

Where the images live (:func:`resident_fits`, :data:`RESIDENT_MAX_BYTES`, :data:`DEVICE_SHARE`): ``--loader auto``
picks this loader for an in-memory dataset whose split takes at most 3 GiB as uint8 at the training size. On a
CPU worker that costs nothing extra (the torch loader holds the same tensor). On a GPU the tensor moves to the
card when it takes at most a quarter of the card's free memory; otherwise it stays in pinned host memory and
each batch's source images are copied (B x C x S x S bytes) before the same batched ops run on the card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from simclr_dist.data.augment import AugmentConfig, default_augment
from simclr_dist.data.datasets import TensorImageDataset, dataset_info, load_dataset
from simclr_dist.data.epoch_order import mix64
from simclr_dist.data.ffcv.gpu_augment import BatchedViewAugment
from simclr_dist.data.splits import fixed_subset_indices
from simclr_dist.data.device import training_device

# Datasets load_dataset holds as one uint8 tensor, and their splits' sizes (for the rule, without loading them).
SPLIT_IMAGES: dict[str, dict[str, int]] = {
    "digits": {"train": 1437, "test": 360, "all": 1797},
    "fashion-mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "stl10": {"unlabeled": 100_000, "train": 5_000, "test": 8_000, "train+unlabeled": 105_000},
}
GREY = frozenset({"digits", "fashion-mnist"})  # held with one channel: a third of the bytes
RESIDENT_MAX_BYTES = 3 * 2**30  # STL-10 unlabeled at 96 px (2.6 GiB) fits; ImageNet-size sets never do
DEVICE_SHARE = 0.25  # on a GPU: the images go on the card when they take at most this share of its free memory
ATTEMPTS = 10  # torchvision RandomResizedCrop's tries before the centre fallback
RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect-ratio range (the recipe's)
Part = tuple[int, int]  # (rank, world): this rank's rows rank::world of a global batch


def resident_bytes(dataset: str, split: str, image_size: int) -> int | None:
    """uint8 bytes this loader holds for ``dataset``/``split`` at ``image_size`` (None: not an in-memory set)."""
    sizes = SPLIT_IMAGES.get(dataset, {})
    if split not in sizes:
        return None
    return sizes[split] * (1 if dataset in GREY else 3) * image_size * image_size


def resident_fits(dataset: str, split: str, image_size: int) -> bool:
    """``--loader auto``'s rule: an in-memory dataset whose split takes at most ``RESIDENT_MAX_BYTES`` as uint8."""
    n = resident_bytes(dataset, split, image_size)
    return n is not None and n <= RESIDENT_MAX_BYTES


def global_batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of every draw of global batch ``batch`` of ``epoch``: no rank in it (each rank slices its rows)."""
    return mix64(seed, epoch, batch, 0x2E5) >> 1


def uniform_draw(g: torch.Generator, part: Part, n: int, k: int, device: torch.device) -> Tensor:
    """(n, k) float64 uniform draws: rows ``rank::world`` of a draw for ``n * world`` samples."""
    rank, world = part
    return torch.rand((n * world, k), generator=g, device=device, dtype=torch.float64)[rank::world]


def crop_boxes(u: Tensor, height: int, width: int, scale: tuple[float, float]) -> Tensor:
    """torchvision ``RandomResizedCrop.get_params`` for a batch: ``(top, left, h, w)`` as a long ``(n, 4)``.

    ``u``: ``(n, 2 * ATTEMPTS + 2)`` uniforms in [0, 1) (areas, log ratios, then the corner's two). The same
    algorithm as torchvision's loop, vectorised: attempt t's sides are ``round(sqrt(area * r))`` and
    ``round(sqrt(area / r))`` (half to even, as Python's ``round``); the first attempt with both sides within the
    image wins; with none, the whole image clipped to the ratio range, centred. The corner is uniform over the
    positions that fit (``randint(0, H - h + 1)``)."""
    area = u[:, :ATTEMPTS] * (scale[1] - scale[0]) + scale[0]  # (n, A) fractions of the image
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = torch.exp(u[:, ATTEMPTS:2 * ATTEMPTS] * (hi - lo) + lo)  # (n, A)
    target = area * (height * width)
    w = torch.sqrt(target * ratio).round()  # (n, A)
    h = torch.sqrt(target / ratio).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first attempt that fits (argmax: first of ties)
    found = ok.any(1)
    w, h = w.gather(1, first).squeeze(1).long(), h.gather(1, first).squeeze(1).long()  # (n,)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        fw, fh = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        fw, fh = int(round(height * RATIO[1])), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, (u[:, -2] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (u[:, -1] * (width - w + 1)).long(), (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def _taps(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source rows (or columns) of a bilinear resize of ``[start, start + length)`` to ``size``, per sample:
    (first tap, second tap, weight of the second), each ``(n, size)``; ``F.interpolate(align_corners=False)``'s
    arithmetic, clamped to the box (so a box edge repeats, it never blends in the pixels outside the box)."""
    scale = length.to(torch.float32) / size  # (n,)
    out = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    pos = (out[None] * scale[:, None] - 0.5).clamp_(min=0)  # (n, size)
    first = pos.floor()
    frac = pos - first
    first = torch.minimum(first.long(), (length - 1)[:, None])
    second = torch.minimum(first + 1, (length - 1)[:, None])
    return start[:, None] + first, start[:, None] + second, frac


def _interp_matrix(start: Tensor, length: Tensor, size: int, in_size: int) -> Tensor:
    """(n, size, in_size) matrices M with ``M @ v`` = the bilinear resize of ``v[start:start + length]`` to ``size``
    (two non-zero weights a row, from :func:`_taps`)."""
    t0, t1, frac = _taps(start, length, size)  # (n, size) each
    m = torch.zeros(len(start), size, in_size, device=start.device)
    m.scatter_add_(2, t0[..., None], (1 - frac)[..., None])
    return m.scatter_add_(2, t1[..., None], frac[..., None])


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Each image's box ``(top, left, h, w)`` resized to ``size`` x ``size``: uint8 ``(n, C, H, W)`` -> uint8
    ``(n, C, size, size)``. Bilinear as two batched matmuls with per-sample interpolation matrices (no per-sample
    kernel launch; measured 1.2-2.3x faster than gathers and lerps on the CPU, as for ``gaussian_blur``), columns
    first with the intermediate rounded, as torchvision's uint8 kernel does: within 2 grey levels of
    ``TF.resized_crop(antialias=True)`` and equal on about 96% of the pixels."""
    n, _, h, w = images.shape
    top, left, bh, bw = boxes.unbind(1)
    x = images.to(torch.float32)
    cols = (x @ _interp_matrix(left, bw, size, w).transpose(1, 2)[:, None]).round_()  # (n, C, H, size)
    rows = _interp_matrix(top, bh, size, h)[:, None] @ cols  # (n, C, size, size)
    return rows.round_().clamp_(0, 255).to(torch.uint8)


def grey_channels(images: Tensor) -> bool:
    """Whether all three channels are one (a stride-0 expansion, or equal copies)."""
    return images.stride(1) == 0 or (torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]))


class ResidentPretrainLoader:
    """``len()``, ``set_epoch(epoch, start_batch)`` and iteration over ``(view1, view2, label)`` like the other
    loaders: views float32 ``(B, 3, S, S)`` on ``self.device``, labels int64 ``(B,)`` on the CPU."""

    def __init__(self, spec: Any):  # a simclr_dist.data.loader.LoaderSpec
        info = dataset_info(spec.dataset)
        base = load_dataset(spec.dataset, spec.split, root=spec.root, image_size=spec.image_size)
        if not isinstance(base, TensorImageDataset):
            raise ValueError(f"--loader resident holds a dataset as one tensor; {spec.dataset} is read from files "
                             "(choose --loader torch or ffcv)")
        images, targets = base.images, base.targets
        subset = fixed_subset_indices(targets.numpy(), spec.subset) if spec.subset else None
        if subset is not None:  # --train-subset: the torch loader's subset, in its order
            index = torch.as_tensor(subset, dtype=torch.long)
            images, targets = images[index], targets[index]
        if images.shape[-1] != images.shape[-2] or images.shape[-1] != spec.image_size:
            raise ValueError(f"{spec.dataset}: images are {tuple(images.shape[-2:])}, expected "
                             f"{spec.image_size} x {spec.image_size} (load_dataset resizes in-memory sets)")
        if len(images) < spec.batch_size * spec.world_size:
            raise ValueError(f"{spec.dataset}/{spec.split}: {len(images)} images is fewer than one global batch "
                             f"({spec.batch_size * spec.world_size}); lower --batch-size")
        self.spec, self.device = spec, training_device(spec)
        self.grey = grey_channels(images)
        held = (images[:, :1] if self.grey else images).contiguous()  # (N, C, S, S) uint8, C = 1 or 3
        self.on_device = self.device.type == "cpu" or self._fits_on(self.device, held.numel())
        if self.on_device:
            self.images = held.to(self.device)
        else:  # pinned host memory; each batch's sources are copied to the card
            self.images = held.pin_memory() if torch.cuda.is_available() else held
        self.targets = targets.long()
        self.augment = default_augment(info, spec.augment, image_size=spec.image_size,
                                       jitter_strength=spec.jitter_strength)
        self.augment2 = self.augment if spec.augment2 is None else default_augment(
            info, spec.augment2, image_size=spec.image_size, jitter_strength=spec.jitter_strength)
        self.views = BatchedViewAugment(self.augment, self.device)
        self.views2 = self.views if spec.augment2 is None else BatchedViewAugment(self.augment2, self.device)
        self.generator = torch.Generator(device=self.device)
        self.sampler = DistributedSampler(range(len(self.images)), num_replicas=spec.world_size, rank=spec.rank,
                                          shuffle=True, seed=spec.seed, drop_last=True)
        self.epoch, self.start_batch = 0, 0

    @staticmethod
    def _fits_on(device: torch.device, nbytes: int) -> bool:
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= DEVICE_SHARE * free

    def __repr__(self) -> str:
        where = "on the device" if self.on_device else "in pinned host memory"
        return (f"{type(self).__name__}({self.spec.dataset}/{self.spec.split}, {tuple(self.images.shape)} uint8 "
                f"{where}, device={self.device})")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Epoch ``epoch``'s batches from ``start_batch`` on (a resumed epoch), until the next call."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.sampler) // self.spec.batch_size

    def order(self, epoch: int) -> Tensor:
        """This rank's sample indices of ``epoch``: ``DistributedSampler``'s, cut to whole batches, long ``(L*B,)``."""
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler)[:len(self) * self.spec.batch_size], dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        epoch, first, b_size = self.epoch, self.start_batch, self.spec.batch_size
        order = self.order(epoch)
        order_dev = order.to(self.device) if self.on_device else order
        for b in range(first, len(self)):
            rows = slice(b * b_size, (b + 1) * b_size)
            v1, v2 = self.views_of(order_dev[rows], epoch, b)
            yield v1, v2, self.targets[order[rows]]

    def views_of(self, index: Tensor, epoch: int, batch: int) -> tuple[Tensor, Tensor]:
        """The two views of samples ``index`` (this rank's part of global batch ``batch`` of ``epoch``): float32
        ``(B, 3, S, S)`` each, on ``self.device``."""
        s = self.spec
        src = self.images.index_select(0, index)  # (B, C, S, S) uint8
        if not self.on_device:
            src = src.to(self.device, non_blocking=True)
        g, part = self.generator.manual_seed(global_batch_seed(s.seed, epoch, batch)), (s.rank, s.world_size)
        return self._view(src, g, part, self.augment, self.views), self._view(src, g, part, self.augment2, self.views2)

    def _view(self, src: Tensor, g: torch.Generator, part: Part, cfg: AugmentConfig,
              ops: Callable[[Tensor, torch.Generator, Part], Tensor]) -> Tensor:
        if "crop" in cfg.components:
            size = src.shape[-1]
            boxes = crop_boxes(uniform_draw(g, part, len(src), 2 * ATTEMPTS + 2, self.device), size, size, cfg.crop_scale)
            src = resized_crops(src, boxes, cfg.image_size)
        # without crop: Resize(S) + CenterCrop(S) of an S x S image, the identity
        return ops(src.expand(-1, 3, -1, -1) if self.grey else src, g, part)
