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
