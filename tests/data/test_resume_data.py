"""Resumable epochs of both loaders (no Ray): ``set_epoch(epoch, start_batch=k)`` yields exactly batches k.. of a
full pass of that epoch (same samples, same views, bit for bit), and ``len()`` stays the whole epoch's."""

from __future__ import annotations

import pytest
import torch

from simclr_dist.data.epoch_order import ResumableSampler
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec(backend: str, rank: int, **kw) -> LoaderSpec:
    return LoaderSpec(dataset="digits", split="train", root=None, image_size=16, augment=None, jitter_strength=None,
                      batch_size=32, rank=rank, world_size=2, seed=3, backend=backend, device="cpu", **kw)


def batches(loader, epoch: int, start: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch, start_batch=start)
    out = []
    for b in loader:
        out.append(b)
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("backend, workers", [("torch", 0), ("torch", 2), ("ffcv", 1)])
def test_epoch_started_at_batch_k_gives_the_same_batches(backend, workers):
    loader = build_pretrain_loader(spec(backend, rank=1, num_workers=workers))
    steps = len(loader)
    assert steps == 1437 // 2 // 32
    full = batches(loader, epoch=2, start=0, count=steps)
    assert len(full) == steps
    for k in (5, steps - 1):
        resumed = batches(loader, epoch=2, start=k, count=steps)
        assert len(resumed) == steps - k and len(loader) == steps
        for a, b in zip(full[k:], resumed):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = batches(loader, epoch=3, start=5, count=1)[0]  # another epoch: other samples and views
    assert not torch.equal(other[0], full[5][0])


def test_sampler_matches_distributed_sampler_order():
    from torch.utils.data import DistributedSampler

    data = list(range(103))
    for rank in (0, 1):
        ref = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7, drop_last=True)
        ours = ResumableSampler(data, num_replicas=2, rank=rank, seed=7, batch_size=10)
        ref.set_epoch(4)
        ours.set_epoch(4, start_batch=3)
        assert [i for i, _ in ours] == list(ref)[30:] and len(ours) == len(ref)
        seeds = dict(iter(ours))
        ours.set_epoch(4, start_batch=0)
        assert {i: s for i, s in ours if i in seeds} == seeds  # a sample's seed does not depend on the start


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_train_subset_is_what_both_loaders_pretrain_on(backend):
    """--train-subset 600: an epoch of either loader reads exactly the fixed class-balanced subset's images (both
    ranks together, each once), not the whole split."""
    import numpy as np

    from simclr_dist.data.datasets import load_dataset
    from simclr_dist.data.splits import fixed_subset_indices

    targets = torch.as_tensor(load_dataset("digits", "train", image_size=16).targets)
    idx = fixed_subset_indices(targets.numpy(), 600)
    want = torch.bincount(targets[torch.as_tensor(idx)], minlength=10)
    loaders = [build_pretrain_loader(spec(backend, rank=r, subset=600, num_workers=1 if backend == "ffcv" else 0))
               for r in (0, 1)]
    assert {len(ld) for ld in loaders} == {len(idx) // 2 // 32} and len(idx) < len(targets)
    seen = torch.cat([torch.cat([b[2] for b in batches(ld, epoch=1, start=0, count=len(ld))]) for ld in loaders])
    assert len(seen) == len(idx) // 64 * 64
    # the labels of every image read, per class: within one dropped tail batch of the subset's, far from the split's
    assert int((want - torch.bincount(seen, minlength=10)).clamp(min=0).sum()) <= len(idx) - len(seen)
    assert int(torch.bincount(seen, minlength=10).sum()) == len(seen) and np.all(want.numpy() > 0)
