"""Dataset registry tests: digits (embedded), fake CIFAR pickles and a tiny ImageFolder; no network."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_dist.data import DATASETS, DatasetError, check_available, dataset_info, load_dataset


def test_registry_covers_all_datasets():
    assert set(DATASETS) == {"digits", "fashion-mnist", "cifar10", "cifar100", "stl10", "imagenet", "imagefolder"}
    assert all(info.pretrain_split in info.splits for info in DATASETS.values())
    assert DATASETS["stl10"].pretrain_split == "unlabeled" and DATASETS["stl10"].image_size == 96
    assert DATASETS["imagenet"].blur and not DATASETS["cifar10"].blur
    # fashion-mnist is embedded exactly when its Debian package is installed (tests/data/test_fashion_mnist.py)
    assert [n for n, i in DATASETS.items() if i.embedded and n != "fashion-mnist"] == ["digits"]


def test_digits_info():
    info = dataset_info("digits")
    assert (info.num_classes, info.image_size, info.embedded, info.blur) == (10, 32, True, False)
    assert set(info.splits) == {"train", "test", "all"}


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*cifar10"):
        dataset_info("mnist")


def test_digits_splits_are_disjoint_stratified_and_complete():
    train, test, full = (load_dataset("digits", s) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(full) == 1797
    assert len(test) == 360
    assert set(test.targets.tolist()) == set(range(10))
    # Disjoint as sample sets: every image of the full set is in exactly one split (as a multiset).
    key = lambda ds: sorted(map(bytes, ds.images.flatten(1).numpy()))  # noqa: E731
    assert sorted(key(train) + key(test)) == key(full)
    assert torch.equal(load_dataset("digits", "test").targets, test.targets)  # fixed seed


def test_digits_images_and_labels():
    ds = load_dataset("digits", "train")
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    assert ds.images.max() > 200  # scaled 0..16 -> 0..255
    assert isinstance(label, int) and ds.targets.min() >= 0 and ds.targets.max() <= 9
    small = load_dataset("digits", "test", image_size=16)
    assert small.images.shape[1:] == (3, 16, 16) and small[0][0].dtype == torch.uint8


def test_digits_stats_match_registry():
    x = load_dataset("digits", "all").images.float().div(255)
    info = dataset_info("digits")
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(info.std[0], abs=1e-3)


def test_check_available_errors(tmp_path):
    check_available("digits", "train", None)
    with pytest.raises(DatasetError, match="unknown dataset"):
        check_available("nope", "train", None)
    with pytest.raises(DatasetError, match="unknown split 'val'.*train, test"):
        check_available("cifar10", "val", str(tmp_path))
    with pytest.raises(DatasetError, match="--download"):
        check_available("cifar10", "train", None)
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py.*--download"):
        check_available("cifar10", "train", str(tmp_path))
    check_available("cifar10", "train", str(tmp_path), download=True)  # will be fetched at load
    with pytest.raises(DatasetError, match="stl10_binary"):
        check_available("stl10", "unlabeled", str(tmp_path))
    with pytest.raises(DatasetError, match=r"train/<wnid>/\*\.JPEG"):
        check_available("imagenet", "train", str(tmp_path))


def _write_png(path: Path, color: tuple[int, int, int], size=(20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_splits_and_labels(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            _write_png(tmp_path / split / "cat" / f"{i}.png", (255, 0, 0))
            _write_png(tmp_path / split / "dog" / f"{i}.png", (0, 0, 255))
    check_available("imagefolder", "train", str(tmp_path))
    ds = load_dataset("imagefolder", "train", root=str(tmp_path))
    assert len(ds) == 6 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    for img, label in (ds[i] for i in range(len(ds))):
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 20)
        assert img[0, 0, 0].item() == (255 if label == 0 else 0) and img[2, 0, 0].item() == (0 if label == 0 else 255)
    assert sorted(ds.targets) == [0, 0, 0, 1, 1, 1]
    assert len(load_dataset("imagefolder", "val", root=str(tmp_path))) == 2
    with pytest.raises(DatasetError, match="no directory"):
        check_available("imagefolder", "test", str(tmp_path))


def test_imagefolder_val_keeps_train_class_indices(tmp_path):
    for cls in ("ant", "bee", "cat"):
        _write_png(tmp_path / "train" / cls / "0.png", (1, 2, 3))
    _write_png(tmp_path / "val" / "cat" / "0.png", (1, 2, 3))  # val lacks ant and bee
    val = load_dataset("imagenet", "val", root=str(tmp_path))
    assert val.num_classes == 3 and [label for _, label in val] == [2]


def test_imagefolder_all_with_class_folders_at_root(tmp_path):
    _write_png(tmp_path / "a" / "0.png", (0, 0, 0))
    _write_png(tmp_path / "b" / "0.png", (9, 9, 9))
    check_available("imagefolder", "all", str(tmp_path))
    ds = load_dataset("imagefolder", "all", root=str(tmp_path))
    assert [label for _, label in ds] == [0, 1]
    with pytest.raises(DatasetError, match="--split all"):
        check_available("imagefolder", "train", str(tmp_path))


def _write_fake_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """torchvision's cifar-10-batches-py layout: pickled dicts of (N, 3072) uint8 rows + labels."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        (base / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        written[name] = data
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return written


def test_cifar10_from_fake_pickles(tmp_path, monkeypatch):
    written = _write_fake_cifar10(tmp_path)
    check_available("cifar10", "train", str(tmp_path))
    with pytest.raises(DatasetError, match="corrupted.*--download"):  # md5 of fake files fails
        load_dataset("cifar10", "train", root=str(tmp_path))
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    assert (len(train), len(test), train.num_classes) == (20, 4, 10)
    img, label = test[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and 0 <= label < 10
    assert torch.equal(img, torch.from_numpy(written["test_batch"][1].reshape(3, 32, 32)))
    assert load_dataset("cifar10", "test", root=str(tmp_path), image_size=16).images.shape == (4, 3, 16, 16)


def test_stl10_from_fake_binaries(tmp_path, monkeypatch):
    """torchvision's stl10_binary layout: column-major 96x96 uint8 images, labels 1..10."""
    base = tmp_path / "stl10_binary"
    base.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 3), ("unlabeled", 4)):
        (base / f"{split}_X.bin").write_bytes(rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tobytes())
        if split != "unlabeled":
            (base / f"{split}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
    check_available("stl10", "train+unlabeled", str(tmp_path))
    monkeypatch.setattr("torchvision.datasets.stl10.check_integrity", lambda *a, **k: True)
    unlabeled = load_dataset("stl10", "unlabeled", root=str(tmp_path))
    img, label = unlabeled[3]
    assert len(unlabeled) == 4 and label == -1 and img.dtype == torch.uint8 and img.shape == (3, 96, 96)
    both = load_dataset("stl10", "train+unlabeled", root=str(tmp_path))
    assert both.targets.tolist() == [0, 1, -1, -1, -1, -1]
    assert load_dataset("stl10", "test", root=str(tmp_path), image_size=32).images.shape == (3, 3, 32, 32)
