"""Fashion-MNIST without a download: the Debian package's IDX files, a --data-root of IDX files written here (plain,
.gz, torchvision's FashionMNIST/raw), one-line errors for missing/truncated/foreign files, both loaders and the
converter on a small slice, and the config choices that depend on where the files are."""

from __future__ import annotations

import dataclasses
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_dist.config import ConfigError, parse_config
from simclr_dist.data import datasets
from simclr_dist.data.ffcv.convert import embedded_beton
from simclr_dist.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    IDX_FILES,
    DatasetError,
    check_available,
    dataset_info,
    load_dataset,
)
from simclr_dist.data.ffcv.beton import inspect_beton
from simclr_dist.data.idx import read_idx
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from fashion_slices import N_TEST, N_TRAIN, make_slice, write_idx

DEBIAN = all((FASHION_MNIST_ROOT / f"{stem}.gz").is_file() for pair in IDX_FILES.values() for stem in pair)
needs_debian = pytest.mark.skipif(not DEBIAN, reason=f"Debian package dataset-fashion-mnist not installed (no IDX "
                                                     f"files in {FASHION_MNIST_ROOT}); `make setup` installs it")
@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    return root, make_slice(root)


# ---------------------------------------------------------------------------- the Debian package's files
@needs_debian
def test_reads_the_debian_package_by_default():
    info = dataset_info("fashion-mnist")
    assert info.embedded and (info.num_classes, info.image_size, info.labelled) == (10, 28, ("train", "test"))
    check_available("fashion-mnist", "train", None)
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 10_000 and test.classes == list(FASHION_MNIST_CLASSES)
    assert test.images.shape == (10_000, 3, 28, 28) and test.images.dtype == torch.uint8
    assert torch.equal(test.images[:, 0], test.images[:, 2])  # grey: three equal channels
    assert test.targets.bincount().tolist() == [1000] * 10
    train = load_dataset("fashion-mnist", "train")
    assert len(train) == 60_000 and train.targets.bincount().tolist() == [6000] * 10
    x = train.images.float().div(255)  # the registry's figures are measured on this split
    assert (round(x.mean().item(), 4), round(x.std().item(), 4)) == (info.mean[0], info.std[0])
    assert test[0][0].max() > 200 and test[0][0].min() == 0  # real garments on black, not noise


@needs_debian
def test_embedded_fashion_mnist_is_converted_for_ffcv(tmp_path, monkeypatch):
    """With the package installed --loader auto picks FFCV, and the node cache holds the 10k test split at 28 px."""
    monkeypatch.setenv("SIMCLR_DIST_CACHE", str(tmp_path / "cache"))
    info = inspect_beton([embedded_beton("fashion-mnist", "test", 28)])
    assert (info.num_samples, info.min_side, info.max_side, info.num_labels) == (10_000, 28, 28, 10)


# ---------------------------------------------------------------------------- --data-root layouts
@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision"])
def test_data_root_layouts_give_the_written_pixels(tmp_path, layout):
    root = tmp_path / "data"
    directory = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    written = make_slice(directory, gz=layout == "gz", seed=1)
    check_available("fashion-mnist", "test", str(root))
    for split, (images, labels) in written.items():
        ds = load_dataset("fashion-mnist", split, root=str(root))
        assert len(ds) == len(labels) and ds.num_classes == 10
        assert np.array_equal(ds.images[:, 1].numpy(), images) and np.array_equal(ds.targets.numpy(), labels)
        img, label = ds[3]
        assert img.shape == (3, 28, 28) and label == labels[3]


def test_image_size_resizes_once_at_load(fm_root):
    root, _ = fm_root
    assert load_dataset("fashion-mnist", "train", root=str(root), image_size=32).images.shape == (N_TRAIN, 3, 32, 32)


def test_missing_files_say_which_and_how_to_get_them(tmp_path, monkeypatch):
    make_slice(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    load_dataset("fashion-mnist", "train", root=str(tmp_path))  # the other split is complete
    for call in (lambda: check_available("fashion-mnist", "test", str(tmp_path)),
                 lambda: load_dataset("fashion-mnist", "test", root=str(tmp_path))):
        with pytest.raises(DatasetError, match=r"missing .*t10k-labels-idx1-ubyte .*apt-get install "
                                               r"dataset-fashion-mnist.*--data-root") as e:
            call()
        assert "\n" not in str(e.value)
    monkeypatch.setattr(datasets, "FASHION_MNIST_ROOT", tmp_path / "nowhere")  # package absent, no --data-root
    with pytest.raises(DatasetError, match=r"nowhere/train-images-idx3-ubyte .*apt-get install"):
        check_available("fashion-mnist", "train", None)
    with pytest.raises(DatasetError, match="--download is not supported"):
        check_available("fashion-mnist", "train", str(tmp_path), download=True)


def test_truncated_and_foreign_files_are_named(tmp_path):
    make_slice(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    full = images.read_bytes()

    def fails(pattern: str) -> None:
        with pytest.raises(DatasetError, match=pattern) as e:
            load_dataset("fashion-mnist", "train", root=str(tmp_path))
        assert "\n" not in str(e.value) and "train-images-idx3-ubyte" in str(e.value)

    images.write_bytes(full[:-100])
    fails(r"truncated: 31276 bytes, the header \[40, 28, 28\] of uint8 needs 31376")
    images.write_bytes(full[:10])
    fails("truncated inside the header")
    images.write_bytes(b"\x1f\x8b" + full[2:])  # a gzip magic in a file without .gz
    fails("not an IDX file .magic number 0x1f8b")
    write_idx(images, np.zeros((40, 28, 28), np.uint8), magic=b"\x00\x00\x0c\x03")  # header says int32
    fails(r"truncated: 31376 bytes, the header \[40, 28, 28\] of int32 needs 125456")
    write_idx(images, np.zeros(40, np.uint8))  # a labels file in the images' place
    fails("holds a 1-d array, expected 3-d")
    write_idx(images, np.zeros((39, 28, 28), np.uint8))
    fails("holds 39 images but .*train-labels-idx1-ubyte 40 labels")
    os.remove(images)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(full)[:-200])  # a cut-off download
    fails(r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip file")


def test_read_idx_keeps_wider_types():
    """The reader follows the header's type code: big-endian int32 comes back as native values."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x-idx2-int"
        values = np.arange(-3, 3, dtype=">i4").reshape(2, 3)
        path.write_bytes(bytes([0, 0, 0x0C, 2]) + np.asarray(values.shape, ">u4").tobytes() + values.tobytes())
        out = read_idx(path)
        assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == [[-3, -2, -1], [0, 1, 2]]


# ---------------------------------------------------------------------------- config
def test_config_resolves_the_recipe_and_the_loader(fm_root, monkeypatch):
    root, _ = fm_root
    cfg = parse_config(["--dataset", "fashion-mnist", "--data-root", str(root)]).validate().resolved().validate()
    assert (cfg.image_size, cfg.cifar_stem, cfg.split) == (28, True, "train")
    assert (cfg.augment, cfg.jitter_strength) == ("crop,flip,color", 0.5)
    assert cfg.loader == "resident"  # fits in memory (data.resident.resident_fits), whatever the root
    big = ["--dataset", "fashion-mnist", "--image-size", "256"]  # 60,000 x 256 x 256 > 3 GiB: not held
    assert parse_config([*big, "--data-root", str(root)]).resolved().loader == "torch"  # a user's root: no node cache
    with pytest.raises(ConfigError, match="--loader: ffcv needs --beton"):
        parse_config(["--dataset", "fashion-mnist", "--data-root", str(root), "--loader", "ffcv"]).validate()
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(DATASETS["fashion-mnist"], embedded=True))
    assert parse_config(big).resolved().loader == "ffcv"
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(DATASETS["fashion-mnist"], embedded=False))
    assert parse_config(big).resolved().loader == "torch"


# ---------------------------------------------------------------------------- both loaders and the converter
def _spec(root: Path, **kw) -> LoaderSpec:
    base = dict(dataset="fashion-mnist", split="train", root=str(root), image_size=28, augment="crop,flip,color",
                jitter_strength=0.5, batch_size=8, rank=0, world_size=2, seed=3, device="cpu")
    return LoaderSpec(**{**base, **kw})


def test_torch_loader_gives_two_views(fm_root):
    root, written = fm_root
    loader = build_pretrain_loader(_spec(root))
    loader.set_epoch(0)
    assert len(loader) == N_TRAIN // 2 // 8
    v1, v2, labels = next(iter(loader))
    assert v1.shape == v2.shape == (8, 3, 28, 28) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2) and torch.equal(v1[:, 0], v1[:, 2])  # two draws, still grey
    assert set(labels.tolist()) <= set(written["train"][1].tolist())


def test_convert_cli_and_ffcv_loader(fm_root, tmp_path):
    root, written = fm_root
    out = tmp_path / "fm-train.beton"
    proc = subprocess.run([sys.executable, "-m", "simclr_dist.data.convert", "--dataset", "fashion-mnist",
                           "--data-root", str(root), "--out", str(out), "--num-workers", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and f"wrote {N_TRAIN} samples" in proc.stderr
    info = inspect_beton([str(out)])
    assert (info.num_samples, info.min_side, info.max_side, info.num_labels) == (N_TRAIN, 28, 28, 10)
    loader = build_pretrain_loader(_spec(root, backend="ffcv", beton=str(out)))
    loader.set_epoch(0)
    assert len(loader) == N_TRAIN // 2 // 8
    v1, v2, labels = next(iter(loader))
    assert v1.shape == v2.shape == (8, 3, 28, 28) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2) and torch.equal(v1[:, 0], v1[:, 2])
    assert set(labels.tolist()) <= set(written["train"][1].tolist())

    bad = subprocess.run([sys.executable, "-m", "simclr_dist.data.convert", "--dataset", "fashion-mnist",
                          "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "x.beton")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "missing" in bad.stderr and "train-images-idx3-ubyte" in bad.stderr
