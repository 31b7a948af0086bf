"""The torch backend of the pretraining loader: ``DistributedSampler`` + ``DataLoader`` over a two-view dataset.

Every view is made per sample on the CPU (torchvision v2 ops in DataLoader workers): simple, works for every
dataset, and the reference the FFCV backend is checked against. Interface: :mod:`simclr_dist.data.loader`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from simclr_dist.data.augment import TwoViewDataset, TwoViewTransform, build_view_transform, default_augment
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.data.epoch_order import ResumableSampler, SeededItems, mix64
from simclr_dist.data.splits import fixed_subset


def _seed_worker(worker_id: int) -> None:
    # DataLoader gives each worker torch seed base_seed + id; derive numpy/python seeds from it too.
    import random

    import numpy as np
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class TorchPretrainLoader:
    """DistributedSampler + DataLoader over a two-view dataset; augmentation on the CPU per sample."""

    def __init__(self, spec: Any):  # a simclr_dist.data.loader.LoaderSpec
        info = dataset_info(spec.dataset)
        base = fixed_subset(load_dataset(spec.dataset, spec.split, root=spec.root, image_size=spec.image_size),
                            spec.subset)  # --train-subset: a fixed class-balanced subset (0: the whole split)
        aug = default_augment(info, spec.augment, image_size=spec.image_size, jitter_strength=spec.jitter_strength)
        self.augment = aug
        self.augment2 = aug if spec.augment2 is None else default_augment(
            info, spec.augment2, image_size=spec.image_size, jitter_strength=spec.jitter_strength)
        self.spec = spec
        self.dataset = TwoViewDataset(base, TwoViewTransform(build_view_transform(aug), build_view_transform(self.augment2)))
        if len(self.dataset) < spec.batch_size * spec.world_size:
            raise ValueError(f"{spec.dataset}/{spec.split}: {len(self.dataset)} images is fewer than one global batch "
                             f"({spec.batch_size * spec.world_size}); lower --batch-size")
        self.sampler = ResumableSampler(self.dataset, num_replicas=spec.world_size, rank=spec.rank, seed=spec.seed,
                                        batch_size=spec.batch_size)
        self.generator = torch.Generator()
        self.loader = DataLoader(SeededItems(self.dataset), batch_size=spec.batch_size, sampler=self.sampler,
                                 drop_last=True,
                                 num_workers=spec.num_workers, pin_memory=spec.pin_memory,
                                 persistent_workers=False, worker_init_fn=_seed_worker, generator=self.generator)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Epoch ``epoch``'s batches from ``start_batch`` on; each sample's views come from its own seed
        (:mod:`simclr_dist.data.epoch_order`), so batch k is the same whether the epoch starts at 0 or at k."""
        self.sampler.set_epoch(epoch, start_batch)
        self.generator.manual_seed(mix64(self.spec.seed, self.spec.rank, epoch) >> 1)  # DataLoader workers' seeds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)
