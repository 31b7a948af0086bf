"""FFCV data path: conversion (shards, atomic writes, corrupt images), the two-view loader (rank sharding, replay,
views, components), the batched augmentations against torchvision, preflight errors, and a 2-worker Ray epoch.

Each FFCV ``Loader`` pays a numba compilation (~10-20 s here), so the loader tests share one module-scoped
loader; component behaviour is tested by swapping its tensor-augmentation stage, which needs no recompilation.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from simclr_dist import pretrain
from simclr_dist.config import ConfigError, parse_config
from simclr_dist.data.augment import AugmentConfig
from simclr_dist.data.ffcv.beton import BetonError, check_beton, inspect_beton, resolve_betons
from simclr_dist.data.ffcv.convert import ConvertError, ConvertSpec, convert, embedded_beton
from simclr_dist.data.ffcv.loader import rank_sharded_order
from simclr_dist.data.ffcv.gpu_augment import (
    BatchedViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
)
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader

N_IMAGES, BATCH, SIZE = 48, 8, 16
# (width, height, format, mode): tiny images below the crop size, JPEG above the 'smart' threshold, non-RGB modes
SHAPES = [(5, 7, "PNG", "RGB"), (40, 30, "JPEG", "RGB"), (200, 150, "JPEG", "RGB"), (64, 64, "PNG", "L"),
          (33, 80, "PNG", "RGBA"), (24, 24, "JPEG", "RGB")]


def make_folder(root, n: int = N_IMAGES):
    """An imagefolder split where image i is alone in class i, so a label identifies its sample."""
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h, fmt, mode = SHAPES[i % len(SHAPES)]
        d = root / "train" / f"c{i:03d}"
        d.mkdir(parents=True)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(d / f"img.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("beton") / "folder.beton"
    res = convert(ConvertSpec(dataset="imagefolder", split="train", data_root=str(folder), out=str(out),
                              shards=2, num_workers=2, progress=False))
    return res


def spec(beton, rank: int = 0, world: int = 2, **kw) -> LoaderSpec:
    base = dict(dataset="imagefolder", split="train", root=None, image_size=SIZE, augment=None, jitter_strength=None,
                batch_size=BATCH, rank=rank, world_size=world, seed=7, backend="ffcv", beton=str(beton), device="cpu")
    return LoaderSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def loader(shards):
    """Rank 0 of 2 over both shards (given as the unsharded name: the loader finds x-0000k-of-00002.beton)."""
    return build_pretrain_loader(spec(shards.files[0].rsplit("-00000-of-", 1)[0] + ".beton"))


def epoch_labels(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(y) for _, _, labels in loader for y in labels]



def test_sharded_betons_decode_with_parallel_threads(shards):
    """Two decode threads compile FFCV's parallel (prange) decoder, which takes the sharded memory state through a
    numba parfor; it must decode the same epoch, bit for bit, as one thread."""
    views = {}
    for threads in (1, 2):
        ld = build_pretrain_loader(spec(",".join(shards.files), num_workers=threads))
        assert ld.threads == threads
        ld.set_epoch(3)
        views[threads] = [(v1.clone(), v2.clone(), y.clone()) for v1, v2, y in ld]
    assert len(views[1]) == len(views[2]) > 0
    for (a1, a2, ay), (b1, b2, by) in zip(views[1], views[2]):
        assert torch.equal(ay, by) and torch.equal(a1, b1) and torch.equal(a2, b2)

# ---------------------------------------------------------------------------- conversion
def test_convert_writes_complete_shards_atomically(shards, folder):
    d = os.path.dirname(shards.files[0])
    assert [os.path.basename(f) for f in shards.files] == ["folder-00000-of-00002.beton", "folder-00001-of-00002.beton"]
    assert sorted(os.listdir(d)) == sorted(os.path.basename(f) for f in shards.files)  # no temporary files left
    info = inspect_beton(shards.files)
    assert (info.num_samples, shards.num_samples, info.num_labels) == (N_IMAGES, N_IMAGES, N_IMAGES)
    assert (info.min_side, info.max_side) == (5, 200)
    assert resolve_betons(os.path.join(d, "folder-*.beton")) == shards.files
    assert resolve_betons(",".join(shards.files)) == shards.files


def test_missing_shard_and_unreadable_file_are_named(shards, tmp_path):
    one = tmp_path / os.path.basename(shards.files[1])
    shutil.copy(shards.files[1], one)
    with pytest.raises(BetonError, match="shard 0 of 2 is missing"):
        resolve_betons(str(tmp_path / "folder.beton"))
    cut = tmp_path / "cut.beton"
    cut.write_bytes(open(shards.files[0], "rb").read()[:100])
    with pytest.raises(BetonError, match="cut.beton: not a readable FFCV .beton"):
        inspect_beton([str(cut)])


def test_corrupt_image_fails_naming_the_file_or_is_skipped(tmp_path):
    root = make_folder(tmp_path / "src", 12)
    bad = root / "train" / "c003" / "broken.jpg"
    good = (root / "train" / "c001" / "img.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # a truncated JPEG
    out = tmp_path / "out" / "x.beton"
    args = dict(dataset="imagefolder", split="train", data_root=str(root), out=str(out), num_workers=1, progress=False)
    with pytest.raises(ConvertError, match=r"broken\.jpg \(index 3\): cannot read image.*--skip-corrupt"):
        convert(ConvertSpec(**args))
    assert os.listdir(out.parent) == []  # nothing that looks finished, no temporary file either
    res = convert(ConvertSpec(**args, skip_corrupt=True))
    assert [(i, os.path.basename(f)) for i, f, _ in res.skipped] == [(3, "broken.jpg")]
    assert res.num_samples == inspect_beton(res.files).num_samples == 12


# ---------------------------------------------------------------------------- the loader
def test_ranks_partition_every_epoch(loader, shards):
    assert len(loader) == N_IMAGES // 2 // BATCH
    seen = {}
    for epoch in (0, 1):
        rank0 = epoch_labels(loader, epoch)
        rank1_order = rank_sharded_order(1, 2, 7)(loader.loader).sample_order(epoch)
        rank1 = [int(i) for i in rank1_order]  # label i is sample i (one image per class)
        assert len(rank0) == len(rank1) == N_IMAGES // 2
        assert sorted(rank0 + rank1) == list(range(N_IMAGES))  # every sample exactly once per epoch
        seen[epoch] = rank0
    assert seen[0] != seen[1]  # reshuffled per epoch


def test_views_shape_range_and_epoch_replay(loader):
    loader.set_epoch(3)
    first = [tuple(t.clone() for t in batch) for batch in loader]
    v1, v2, labels = first[0]
    assert v1.shape == v2.shape == (BATCH, 3, SIZE, SIZE) and v1.dtype == v2.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
    mean, std = torch.tensor(loader.augment.mean).view(1, 3, 1, 1), torch.tensor(loader.augment.std).view(1, 3, 1, 1)
    for v in (v1, v2):
        assert torch.isfinite(v).all()
        assert (v >= (0 - mean) / std - 1e-5).all() and (v <= (1 - mean) / std + 1e-5).all()
    assert not torch.equal(v1, v2)  # two independent views
    loader.set_epoch(4)
    other = next(iter(loader))
    loader.set_epoch(3)  # a resumed epoch 3: same samples, same crops, same tensor-op draws
    again = [batch for batch in loader]
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(other[0], v1)


def test_components_act_through_the_loader(loader):
    """Swap the loader's tensor stage: gray at p=1 gives equal channels before normalisation; no colour ops
    and no blur change the output statistics."""
    saved = loader.views
    try:
        loader.views = BatchedViewAugment(AugmentConfig(("crop", "gray"), SIZE, gray_p=1.0, mean=(0, 0, 0), std=(1, 1, 1)))
        loader.set_epoch(0)
        v1, v2, _ = next(iter(loader))
        for v in (v1, v2):
            assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 1], v[:, 2])
        loader.views = BatchedViewAugment(AugmentConfig(("crop",), SIZE, mean=(0, 0, 0), std=(1, 1, 1)))
        plain, _, _ = next(iter(loader))
        assert not torch.equal(plain[:, 0], plain[:, 1])  # colour images stay colour without 'gray'
    finally:
        loader.views = saved


def test_augment2_transforms_one_branch_only(shards):
    """--augment crop,color --augment2 crop (paper Figure 5): the second view is exactly the crop-only view of the
    same seed (the crops come from the decode, which both loaders share), while the first is colour-jittered."""
    beton = shards.files[0].rsplit("-00000-of-", 1)[0] + ".beton"
    one = build_pretrain_loader(spec(beton, augment="crop,color", augment2="crop"))
    plain = build_pretrain_loader(spec(beton, augment="crop"))
    one.set_epoch(0)
    plain.set_epoch(0)
    (a1, a2, _), (p1, p2, _) = next(iter(one)), next(iter(plain))
    assert one.augment2.components == ("crop",) and torch.equal(a2, p2)
    assert not torch.equal(a1, p1)  # colour jitter at p=0.8 changes some of the batch
    with pytest.raises(ValueError, match="crops both views alike"):
        build_pretrain_loader(spec(beton, augment="crop,color", augment2="color"))


# ---------------------------------------------------------------------------- batched augmentation
@pytest.mark.parametrize("fn, ref, factor", [
    (adjust_brightness, TF.adjust_brightness, 1.4), (adjust_contrast, TF.adjust_contrast, 0.5),
    (adjust_saturation, TF.adjust_saturation, 1.7), (adjust_hue, TF.adjust_hue, 0.2), (adjust_hue, TF.adjust_hue, -0.45),
])
def test_jitter_ops_match_torchvision(fn, ref, factor):
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    f = torch.full((4,), factor)
    out = fn(x.clone(), f if fn is adjust_hue else f.view(-1, 1, 1, 1))
    torch.testing.assert_close(out, ref(x, factor), atol=2e-6, rtol=0)


def test_blur_matches_torchvision_per_sample_sigma():
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(x, sigma, 5)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", ["flip", "color", "gray", "blur", "rotate", "sobel", "noise", "cutout"])
def test_each_component_acts_and_is_reproducible(component):
    x = torch.randint(0, 256, (16, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    cfg = dict(image_size=24, gray_p=1.0, blur_p=1.0, color_p=1.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    base = BatchedViewAugment(AugmentConfig(("crop",), **cfg))(x, torch.Generator().manual_seed(0))
    aug = BatchedViewAugment(AugmentConfig(("crop", component), **cfg))
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32 and out.is_contiguous()
    assert not torch.allclose(out, base)
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(0)))
    if component == "gray":
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    if component == "blur":  # smoother: less energy in neighbouring-pixel differences
        assert out.diff(dim=-1).abs().mean() < 0.6 * base.diff(dim=-1).abs().mean()
    if component == "flip":
        flipped = [torch.equal(o, b.flip(-1)) for o, b in zip(out, base)]
        assert all(f or torch.equal(o, b) for f, o, b in zip(flipped, out, base)) and 0 < sum(flipped) < 16
    if component == "cutout":
        assert ((out == 0).all(1).flatten(1).sum(1) > 0).all()  # every image has an erased (mean-valued) square



def test_sync_free_gpu_path_equals_subset_path():
    """The GPU path (every sample computed, blended with torch.where: no host sync) must give the CPU path's values."""
    x = torch.randint(0, 256, (32, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cfg = AugmentConfig(("crop", "flip", "color", "gray", "blur", "rotate"), 24, mean=(0.5,) * 3, std=(0.25,) * 3)
    subset, sync_free = BatchedViewAugment(cfg), BatchedViewAugment(cfg)
    sync_free.sync_free = True
    assert not subset.sync_free  # CPU default
    a, b = subset(x, torch.Generator().manual_seed(5)), sync_free(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

# ---------------------------------------------------------------------------- preflight and CLI
def test_preflight_rejects_bad_betons_before_training(shards, tmp_path, capsys):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    labels_only = tmp_path / "labels.beton"
    DatasetWriter(str(labels_only), {"label": IntField()}, num_workers=1).from_indexed_dataset([(1,)] * 4)
    capsys.readouterr()
    base = ["--storage-path", str(tmp_path / "runs"), "--loader", "ffcv", "--num-workers", "2"]
    cases = [
        (["--beton", str(tmp_path / "nope.beton")], "nope.beton: no such file"),
        (["--beton", str(labels_only)], "has fields label (IntField); expected image (RGBImageField)"),
        (["--beton", ",".join(shards.files), "--batch-size", "64"], "48 samples is fewer than one global batch (2 workers x 32 = 64)"),
        (["--beton", shards.files[0]], "shard 1 of 2 is missing"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path)], "--loader: ffcv needs --beton PATH"),
    ]
    for args, needle in cases:
        assert pretrain.main([*base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="--beton: is only read by --loader ffcv"):
        parse_config(["--loader", "torch", "--beton", shards.files[0]]).validate()
    resolved = lambda *a: parse_config(list(a)).resolved().loader  # noqa: E731
    assert resolved("--dataset", "cifar10", "--beton", shards.files[0]) == "ffcv"
    assert resolved("--dataset", "cifar10") == "resident"  # fits in memory (data.resident.resident_fits)
    assert resolved("--dataset", "imagenet") == "torch"
    assert resolved("--image-size", "2048") == "ffcv"  # embedded digits too big to hold: auto converts it per node
    assert resolved("--loader", "torch") == "torch"
    assert check_beton(shards.files, world_size=2, batch_size=BATCH).num_samples == N_IMAGES


def test_embedded_dataset_is_converted_once_per_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMCLR_DIST_CACHE", str(tmp_path / "cache"))
    path = embedded_beton("digits", "test", 16)
    info = inspect_beton([path])
    assert (info.num_samples, info.min_side, info.max_side, info.num_labels) == (360, 16, 16, 10)
    stamp = os.stat(path).st_mtime_ns
    assert embedded_beton("digits", "test", 16) == path and os.stat(path).st_mtime_ns == stamp


# ---------------------------------------------------------------------------- end to end on Ray
@pytest.mark.ray
@pytest.mark.drill  # CI's second stage (make test-cluster): every Ray worker pays FFCV's numba compilation, 1.5-4 min
def test_pretraining_epoch_on_ray_reads_the_beton(ray_cluster, tiny_args, tmp_path):
    """--loader auto + --beton trains from the file: the digits *test* split (360 images) gives 360 // 64 = 5
    steps per epoch, where the torch path would read the 1437-image train split (22 steps)."""
    beton = tmp_path / "digits-test.beton"
    convert(ConvertSpec(dataset="digits", split="test", out=str(beton), num_workers=1, progress=False))
    summary = pretrain.run(parse_config(tiny_args("ffcv", "--epochs", "1", "--beton", str(beton))))
    [h] = summary["history"]
    assert summary["config"]["loader"] == "ffcv"
    assert (h["epoch"], h["step"]) == (1, 360 // 64)
    assert 0 < h["loss"] < 10
    assert glob.glob(str(tmp_path / "runs" / "ffcv" / "checkpoint_*"))


# ---------------------------------------------------------------------------- the CPU side against reference ops
def _smooth_image(rng, w: int, h: int) -> Image.Image:
    coarse = rng.integers(0, 256, size=(max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def photo_beton(tmp_path_factory):
    """Stored as JPEG (large) and raw (small, under the 'smart' threshold); sample i is alone in class i."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(4)
    for i, (w, h) in enumerate([(300, 260), (520, 400), (40, 30), (5, 7), (200, 150), (640, 480), (64, 90), (260, 300)]):
        d = root / "train" / f"c{i:03d}"
        d.mkdir(parents=True)
        _smooth_image(rng, w, h).save(d / "img.png")
    out = tmp_path_factory.mktemp("photo-beton") / "photos.beton"
    return convert(ConvertSpec(dataset="imagefolder", split="train", data_root=str(root), out=str(out), num_workers=1,
                               progress=False)).files[0]


def _stored_images(beton: str) -> list[tuple[np.ndarray, bool]]:
    """(raw bytes of the stored image, is JPEG) per sample, read straight from the file."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    reader = Reader(beton)
    meta, table = reader.metadata["f0"], reader.alloc_table
    size = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    data = np.fromfile(beton, np.uint8)
    return [(data[int(m["data_ptr"]):int(m["data_ptr"]) + size[int(m["data_ptr"])]], m["mode"] == IMAGE_MODES["jpg"],
             int(m["height"]), int(m["width"])) for m in meta]


def _decode(stored: np.ndarray, jpeg: bool, h: int, w: int, d: int) -> np.ndarray:
    from ffcv.libffcv import imdecode

    if not jpeg:
        return stored.reshape(h, w, 3)
    hs, ws = -(-h // d), -(-w // d)
    out = np.empty(hs * ws * 3, np.uint8)
    imdecode(stored, out, h, w, h, w, 0, 0, 1, d, False, False)
    return out.reshape(hs, ws, 3)


@pytest.mark.parametrize("resample", ["linear", "area"])
def test_views_equal_reference_crop_and_resize(photo_beton, resample):
    """Each uint8 view is the seeded crop box of its sample (torchvision's RandomResizedCrop algorithm from
    (seed, epoch, sample, view)), cut from the image decoded once - at 1/d scale when both boxes keep >= S pixels a
    side - and resized by the chosen kernel; with the antialiased kernel, reduced-scale views stay close to
    full-resolution ones (bilinear aliases differently at each scale when it shrinks by more than 2x)."""
    import cv2
    from ffcv.libffcv import resize_crop

    from simclr_dist.data.ffcv.decode import compiled_crop, decode_scale, mix64, scaled_box

    size, seed, epoch = 32, 3, 5
    ld = build_pretrain_loader(spec(photo_beton, world=1, image_size=size, augment="crop", seed=seed,
                                    resample=resample))
    ld.set_epoch(epoch)
    stored = _stored_images(photo_beton)
    crop, epoch_seed = compiled_crop(ld.augment.crop_scale), np.uint64(mix64(seed, epoch))
    scales, seen = [], 0
    for views, labels in ld.cpu_batches():
        assert views.shape == (BATCH, 2, size, size, 3) and views.dtype == torch.uint8
        for b, sample in enumerate(labels.reshape(-1).tolist()):
            data, jpeg, h, w = stored[sample]
            boxes = [crop(epoch_seed, np.uint64(sample), np.uint64(v), np.uint32(h), np.uint32(w)) for v in (0, 1)]
            d = decode_scale(size, boxes[0][2], boxes[0][3], boxes[1][2], boxes[1][3], True) if jpeg else 1
            scales.append(d)
            image = _decode(data, jpeg, h, w, d)
            for v, (i, j, bh, bw) in enumerate(boxes):
                (r0, r1), (c0, c1) = scaled_box(i, bh, d, image.shape[0]), scaled_box(j, bw, d, image.shape[1])
                if resample == "area":
                    ref = np.empty((size, size, 3), np.uint8)
                    resize_crop(np.ascontiguousarray(image), r0, r1, c0, c1, ref)
                else:
                    ref = cv2.resize(image[r0:r1, c0:c1], (size, size), interpolation=cv2.INTER_LINEAR)
                got = views[b, v].numpy().astype(int)
                assert np.abs(got - ref).max() <= 1, (sample, v, d)
                if d > 1 and resample == "area":  # the reduced-scale decode shows the full-resolution picture
                    full = np.empty((size, size, 3), np.uint8)  # of the box as snapped to whole pixels at 1/d
                    resize_crop(_decode(data, jpeg, h, w, 1), r0 * d, min(h, r1 * d), c0 * d, min(w, c1 * d), full)
                    assert np.abs(got - full).mean() < 4, (sample, v, d)  # another crop: ~40
            seen += 1
    assert seen == len(ld) * BATCH and 1 in scales and max(scales) > 1


def test_decode_scale_only_when_both_crops_keep_the_output_size():
    from simclr_dist.data.ffcv.decode import decode_scale, scaled_box

    assert decode_scale(224, 448, 500, 460, 449, True) == 2
    assert decode_scale(224, 448, 500, 447, 449, True) == 1  # one side of the second box is 1 px short
    assert decode_scale(32, 256, 300, 260, 512, True) == 8 and decode_scale(32, 255, 300, 260, 512, True) == 4
    assert decode_scale(32, 256, 300, 260, 512, False) == 1
    assert scaled_box(3, 10, 2, 100) == (1, 7) and scaled_box(90, 11, 4, 26) == (22, 26)  # covers, within the image
