"""The resident loader (``--loader resident``): its crops against torchvision's RandomResizedCrop, its views against
the torch loader's in distribution (statistics of the views, two-sample KS at alpha = 0.001, with a negative control
that the same test must reject), bit-identical resume at (epoch, start_batch), the same views for any rank split,
determinism per seed, the memory rule of ``--loader auto``, and a real pretraining epoch in this process (``--no-ray``)
and on Ray (slow)."""

from __future__ import annotations

import dataclasses
import glob
import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from simclr_dist.data import resident as resident_mod
from simclr_dist.data import torch_loader as torch_loader_mod
from simclr_dist.data.datasets import TensorImageDataset
from simclr_dist.data.ffcv.gpu_augment import BatchedViewAugment
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from simclr_dist.data.resident import (
    ATTEMPTS,
    RESIDENT_MAX_BYTES,
    ResidentPretrainLoader,
    crop_boxes,
    resident_bytes,
    resident_fits,
    resized_crops,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KS_C = 1.95  # two-sample Kolmogorov-Smirnov critical value factor at alpha = 0.001


def spec(backend: str = "resident", *, rank: int = 0, world: int = 1, batch: int = 32, **kw) -> LoaderSpec:
    base = dict(dataset="digits", split="train", root=None, image_size=16, augment=None, jitter_strength=None,
                batch_size=batch, rank=rank, world_size=world, seed=3, backend=backend, device="cpu")
    return LoaderSpec(**{**base, **kw})


def batches(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch, start_batch=start)
    return list(loader)


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    return float((torch.searchsorted(a, grid, right=True) / len(a)
                  - torch.searchsorted(b, grid, right=True) / len(b)).abs().max())


def ks_limit(n: int, m: int) -> float:
    return KS_C * math.sqrt((n + m) / (n * m))


# ---------------------------------------------------------------------------- the crop
@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.08, 1.0)), (28, 28, (0.2, 1.0)), (10, 40, (0.5, 1.0))])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    """Sides, corner and area of 6,000 batched boxes against 6,000 of torchvision's ``get_params`` (the 10x40
    image makes most attempts fail: its centre fallback must be as frequent as torchvision's)."""
    n = 6000
    torch.manual_seed(0)
    img = torch.zeros(1, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    g = torch.Generator().manual_seed(1)
    ours = crop_boxes(torch.rand(n, 2 * ATTEMPTS + 2, generator=g, dtype=torch.float64), height, width, scale)
    assert ours.dtype == torch.long and ours.shape == (n, 4)
    top, left, h, w = ours.unbind(1)
    assert ((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)).all()
    limit = ks_limit(n, n)
    for k, name in enumerate(("top", "left", "h", "w")):
        assert ks(ours[:, k], ref[:, k]) < limit, name
    assert ks(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]) < limit
    full = lambda b: float(((b[:, 2] == height) & (b[:, 3] == min(width, round(height * 4 / 3)))).double().mean())  # noqa: E731
    assert abs(full(ours) - full(ref)) < 0.03


def test_crop_boxes_reject_a_wrong_scale():
    """The same comparison detects a crop drawn at another scale range (the KS test has the power to fail)."""
    n, g = 6000, torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)])
    wrong = crop_boxes(torch.rand(n, 2 * ATTEMPTS + 2, generator=g, dtype=torch.float64), 32, 32, (0.2, 1.0))
    assert ks(wrong[:, 2] * wrong[:, 3], ref[:, 2] * ref[:, 3]) > ks_limit(n, n)


def test_resized_crops_match_torchvision_resized_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    boxes = crop_boxes(torch.rand(48, 2 * ATTEMPTS + 2, generator=g, dtype=torch.float64), 32, 32, (0.08, 1.0))
    out = resized_crops(x, boxes, 32)
    assert out.shape == (48, 3, 32, 32) and out.dtype == torch.uint8
    diffs = torch.stack([(out[i].int() - TF.resized_crop(x[i], *boxes[i].tolist(), [32, 32], antialias=True).int())
                         .abs() for i in range(48)])
    assert diffs.max() <= 2 and diffs.float().mean() < 0.1  # rounding of torchvision's fixed-point uint8 kernel
    whole = torch.tensor([[0, 0, 32, 32]] * 48)
    assert torch.equal(resized_crops(x, whole, 32), x)  # the whole image at its own size: the identity


# ---------------------------------------------------------------------------- equal in distribution
def view_statistics(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-view summaries that each augmentation moves: brightness (mean), contrast (std), blur and crop scale
    (mean neighbour differences), colour vs grey (channel spread), flip and crop position (horizontal centre of
    mass of the brightness above the view's minimum)."""
    lum = v - v.amin((1, 2, 3), keepdim=True)
    cols = lum.mean((1, 2))  # (n, W)
    mass = cols.sum(1).clamp(min=1e-12)
    return {"mean": v.mean((1, 2, 3)), "std": v.std((1, 2, 3)), "dx": v.diff(dim=-1).abs().mean((1, 2, 3)),
            "dy": v.diff(dim=-2).abs().mean((1, 2, 3)), "spread": (v.amax(1) - v.amin(1)).mean((1, 2)),
            "centre_x": (cols * torch.arange(v.shape[-1])).sum(1) / mass}


def collect(loader, epoch: int) -> dict[str, torch.Tensor]:
    loader.set_epoch(epoch)
    parts: dict[str, list[torch.Tensor]] = {}
    for v1, v2, _ in loader:
        for v in (v1, v2):
            for k, s in view_statistics(v).items():
                parts.setdefault(k, []).append(s)
    return {k: torch.cat(p) for k, p in parts.items()}


def worst_ks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float, float]:
    """(statistic, KS / critical value, KS) of the statistic that differs most; ratio < 1 passes."""
    return max(((k, ks(a[k], b[k]) / ks_limit(len(a[k]), len(b[k])), ks(a[k], b[k])) for k in a),
               key=lambda t: t[1])


def smooth_colour_images(n: int, size: int, seed: int = 0) -> TensorImageDataset:
    """Colour images with structure at several scales (random 4x4 colours upscaled + fine noise), 10 classes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = (0.85 * x + 0.15 * torch.rand(n, 3, size, size, generator=g)).mul(255).round().to(torch.uint8)
    return TensorImageDataset(x, torch.arange(n) % 10, [str(c) for c in range(10)])


@pytest.fixture
def colour_cifar(monkeypatch):
    """``cifar10`` (the CIFAR recipe's defaults and statistics) served from synthetic colour images to both loaders."""
    data = smooth_colour_images(1024, 24)
    fake = lambda name, split, root=None, image_size=None, **kw: data  # noqa: E731
    monkeypatch.setattr(resident_mod, "load_dataset", fake)
    monkeypatch.setattr(torch_loader_mod, "load_dataset", fake)
    return data


@pytest.mark.parametrize("case", ["digits default recipe", "colour crop,flip,color,gray,blur"])
def test_views_equal_in_distribution_to_the_torch_loader(case, request):
    """Six statistics of 2,048-2,816 views of each loader (the same samples: both read the same order) pass a two-sample
    KS test; a resident loader with another recipe (jitter strength 1.0 instead of 0.5, crop scale from 0.6) fails
    the same test against the same torch views, so the test can tell recipes apart."""
    if case.startswith("colour"):
        request.getfixturevalue("colour_cifar")
        kw = dict(dataset="cifar10", root="unused", image_size=24, augment="crop,flip,color,gray,blur", batch=128)
    else:
        kw = dict(batch=128)
    torch_views = collect(build_pretrain_loader(spec("torch", **kw)), epoch=1)
    resident = build_pretrain_loader(spec(**kw))
    assert isinstance(resident, ResidentPretrainLoader)
    ours = collect(resident, epoch=1)
    assert len(ours["mean"]) == len(torch_views["mean"]) >= 2048
    name, ratio, stat = worst_ks(ours, torch_views)
    assert ratio < 1, f"{case}: {name} differs (KS {stat:.3f})"
    other = ResidentPretrainLoader(spec(**kw, jitter_strength=1.0))
    other.augment = other.augment2 = dataclasses.replace(other.augment, crop_scale=(0.6, 1.0))
    other.views = other.views2 = BatchedViewAugment(other.augment, "cpu")
    name, ratio, stat = worst_ks(collect(other, epoch=1), torch_views)
    assert ratio > 1.5, f"{case}: another recipe passed ({name}: KS {stat:.3f})"


# ---------------------------------------------------------------------------- order, resume, ranks, seeds
def torch_order(loader, epoch: int) -> list[int]:
    """The sample indices the torch loader reads in ``epoch`` (its sampler's, cut to whole batches)."""
    loader.sampler.set_epoch(epoch)
    return [i for i, _ in loader.sampler][:len(loader) * loader.spec.batch_size]


def test_reads_the_torch_loaders_order_and_labels():
    ours, ref = build_pretrain_loader(spec(rank=1, world=2)), build_pretrain_loader(spec("torch", rank=1, world=2))
    assert len(ours) == len(ref) == 1437 // 2 // 32
    for epoch in (0, 4):
        assert ours.order(epoch).tolist() == torch_order(ref, epoch)
        assert torch.equal(batches(ours, epoch)[-1][2], batches(ref, epoch, start=len(ref) - 1)[0][2])


def test_epoch_started_at_batch_k_gives_the_same_batches():
    loader = build_pretrain_loader(spec(world=2, rank=1, batch=16))
    steps = len(loader)
    full = batches(loader, epoch=2)
    assert len(full) == steps == 1437 // 2 // 16
    for k in (5, steps - 1):
        resumed = batches(loader, epoch=2, start=k)
        assert len(resumed) == steps - k and len(loader) == steps
        for a, b in zip(full[k:], resumed):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    again = batches(loader, epoch=2)  # iterating again without set_epoch repeats it (like the torch loader)
    assert all(torch.equal(x, y) for x, y in zip(full[3], again[3]))
    assert not torch.equal(batches(loader, epoch=3, start=5)[0][0], full[5][0])  # another epoch: other views


@pytest.mark.parametrize("augment", [None, "crop,flip,color,gray,blur,rotate,noise,cutout"])
def test_ranks_split_a_global_batch_into_the_same_views(augment):
    """W = 2 ranks x 16 per batch give exactly the views of one rank x 32: rank r's sample k is row k * W + r of the
    single-rank batch, with the same crop, flip, jitter, grey and blur draws."""
    one = batches(build_pretrain_loader(spec(batch=32, augment=augment)), epoch=1)
    ranks = [batches(build_pretrain_loader(spec(batch=16, world=2, rank=r, augment=augment)), epoch=1)
             for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 1437 // 32
    for b in (0, 7, len(one) - 1):
        for r in (0, 1):
            for got, want in zip(ranks[r][b], one[b]):
                torch.testing.assert_close(got, want[r::2], atol=1e-5, rtol=0)
            assert torch.equal(ranks[r][b][2], one[b][2][r::2])


def test_views_are_a_function_of_the_seed():
    a, b = (batches(build_pretrain_loader(spec(augment="crop,color,gray")), epoch=0)[:3] for _ in range(2))
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    c = batches(build_pretrain_loader(spec(augment="crop,color,gray", seed=4)), epoch=0)[0]
    assert not torch.equal(c[2], a[0][2]) and not torch.equal(c[0], a[0][0])
    v1, v2, _ = a[0]
    assert not torch.equal(v1, v2)  # two independent views of each sample


def test_train_subset_and_grey_images_held_once():
    """--train-subset: the torch loader's subset in its order; a grey dataset is held with one channel."""
    ours, ref = build_pretrain_loader(spec(subset=600)), build_pretrain_loader(spec("torch", subset=600))
    assert len(ours) == len(ref) < 1437 // 32
    assert ours.order(1).tolist() == torch_order(ref, 1)
    assert torch.equal(ours.targets, torch.as_tensor(ref.dataset.base.targets))  # the subset's labels, in order
    assert ours.grey and ours.images.shape[1:] == (1, 16, 16) and ours.images.dtype == torch.uint8
    v1, _, _ = next(iter(ours))
    assert v1.shape == (32, 3, 16, 16) and torch.equal(v1[:, 0], v1[:, 2])  # grey in, grey out (no hue on grey)


def test_too_small_and_file_datasets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_pretrain_loader(spec(split="test", batch=256, world=2))
    (tmp_path / "train" / "c0").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c0" / "a.png")
    with pytest.raises(ValueError, match="read from files"):
        build_pretrain_loader(spec(dataset="imagefolder", root=str(tmp_path)))


# ---------------------------------------------------------------------------- --loader auto
def test_memory_rule():
    assert resident_bytes("fashion-mnist", "train", 28) == 60_000 * 28 * 28  # grey: one channel
    assert resident_bytes("cifar10", "train", 32) == 50_000 * 3 * 32 * 32
    assert resident_bytes("imagenet", "train", 224) is None and not resident_fits("imagenet", "train", 224)
    assert resident_fits("stl10", "unlabeled", 96) and resident_fits("stl10", "train+unlabeled", 96)
    assert not resident_fits("stl10", "unlabeled", 128)  # 4.9 GB
    assert resident_bytes("stl10", "train+unlabeled", 96) <= RESIDENT_MAX_BYTES < resident_bytes("stl10", "unlabeled", 128)
    for name in ("digits", "fashion-mnist", "cifar10", "cifar100"):
        assert resident_fits(name, "train", 32)


# ---------------------------------------------------------------------------- end to end
def test_pretraining_epoch_in_process_through_the_resident_loader(tmp_path):
    """``--no-ray --loader resident``: one digits epoch trains (finite loss, every step), and the same command run
    again gives the same loss to the last bit (order, crops and ops are all seeded)."""
    from simclr_dist import pretrain
    from simclr_dist.config import parse_config

    def run(name: str) -> dict:
        return pretrain.run(parse_config([
            "--no-ray", "--threads", "1", "--loader", "resident", "--dataset", "digits", "--image-size", "16",
            "--width", "0.125", "--batch-size", "64", "--storage-path", str(tmp_path / "runs"), "--name", name,
            "--knn-every", "-1", "--log-every", "5", "--epochs", "1"]))

    a, b = run("a"), run("b")
    [h] = a["history"]
    assert a["config"]["loader"] == "resident" and (h["epoch"], h["step"]) == (1, 1437 // 64)
    assert 0 < h["loss"] < 10 and h["data_wait_s"] >= 0
    assert [x["loss"] for x in b["history"]] == [h["loss"]]


@pytest.mark.ray
@pytest.mark.slow  # a Ray worker group: 25-60 s here
def test_pretraining_epoch_on_ray_through_the_resident_loader(ray_cluster, tiny_args, tmp_path):
    from simclr_dist import pretrain
    from simclr_dist.config import parse_config

    summary = pretrain.run(parse_config(tiny_args("resident", "--loader", "resident", "--epochs", "1")))
    [h] = summary["history"]
    assert summary["config"]["loader"] == "resident"
    assert (h["epoch"], h["step"]) == (1, 1437 // 64)
    assert 0 < h["loss"] < 10 and h["data_wait_s"] >= 0
    assert glob.glob(str(tmp_path / "runs" / "resident" / "checkpoint_*"))
