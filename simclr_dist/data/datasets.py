"""Dataset registry: one name -> metadata, an early availability check, and a loader.

Every loader yields ``(image, label)`` with ``image`` a uint8 ``(3, H, W)`` tensor, so the
augmentation path sees a single input type whatever the source (label ``-1`` = unlabeled).
In-memory sets (digits, CIFAR, STL-10) are held as one uint8 tensor for cheap indexing and
batched feature extraction; file-based sets (imagenet, imagefolder) decode per item.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, STL10, ImageFolder
from torchvision.transforms.v2.functional import pil_to_tensor


class DatasetError(ValueError):
    """Bad dataset name/split/root; the message says how to fix it (shown as-is by the CLI)."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int  # 0 = discovered at load (imagefolder)
    image_size: int  # default training resolution
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    splits: tuple[str, ...]  # valid split names (imagefolder: conventional ones; any subdirectory works)
    pretrain_split: str  # split pretraining uses by default
    blur: bool  # Gaussian blur in the default recipe (paper: on for ImageNet-size, off for 32 px)
    embedded: bool  # ships with a dependency: no data root needed
    labelled: tuple[str, str] = ("train", "test")  # (labelled train split, held-out test split) for evaluation


_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
# Digits: pixel mean/std of all 1797 images after the 32 px bilinear upscale, x/255
# (load_dataset("digits", "all").images.float().div(255) -> .mean(), .std()).
_DIGITS_STATS = ((0.3052,) * 3, (0.3236,) * 3)

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 32, *_DIGITS_STATS, ("train", "test", "all"), "train", False, True),
    "cifar10": DatasetInfo("cifar10", 10, 32, *_CIFAR10_STATS, ("train", "test"), "train", False, False),
    "cifar100": DatasetInfo("cifar100", 100, 32, *_CIFAR100_STATS, ("train", "test"), "train", False, False),
    "stl10": DatasetInfo(
        "stl10", 10, 96, *_IMAGENET_STATS, ("unlabeled", "train", "test", "train+unlabeled"), "unlabeled", True, False
    ),
    "imagenet": DatasetInfo("imagenet", 1000, 224, *_IMAGENET_STATS, ("train", "val"), "train", True, False,
                            ("train", "val")),
    "imagefolder": DatasetInfo(
        "imagefolder", 0, 224, *_IMAGENET_STATS, ("train", "val", "test", "all"), "train", True, False,
        ("train", "val")),
}

_TORCHVISION = {"cifar10": CIFAR10, "cifar100": CIFAR100, "stl10": STL10}


def _required_files(cls: type) -> list[str]:
    """Files torchvision insists on (for every split) under <root>/<base_folder>/; md5 is checked at load."""
    meta = getattr(cls, "meta", None)
    return [f for f, _ in cls.train_list + cls.test_list] + ([meta["filename"]] if isinstance(meta, dict) else [])


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None


class TensorImageDataset(Dataset):
    """Images held as one uint8 (N, 3, H, W) tensor; ``.images``/``.targets`` allow batched access."""

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.classes = images, targets.long(), list(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])


class ImageFiles(ImageFolder):
    """ImageFolder yielding uint8 RGB CHW tensors, with the class list fixed by the caller.

    Fixing the classes (from the train split) keeps label indices identical across splits
    even when a val/test split lacks some class directories.
    """

    def __init__(self, root: str | Path, classes: Sequence[str]):
        self._fixed = sorted(classes)
        super().__init__(str(root), loader=_load_rgb, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._fixed, {c: i for i, c in enumerate(self._fixed)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _load_rgb(path: str) -> Tensor:
    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB"))


def _resize(images: Tensor, size: int) -> Tensor:
    """Resize a uint8 batch once at load (bilinear); no-op at native size."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _folder_split_dir(name: str, root: Path, split: str) -> Path:
    """imagefolder 'all' means root itself unless root/all exists."""
    if name == "imagefolder" and split == "all" and not (root / "all").is_dir():
        return root
    return root / split


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.splits and info.name != "imagefolder":
        raise DatasetError(f"{info.name}: unknown split {split!r}; choose from {', '.join(info.splits)}")


def _how_to_get(info: DatasetInfo) -> str:
    if info.name == "imagenet":
        return "expected <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG; set --data-root"
    if info.name == "imagefolder":
        return "expected <root>/<split>/<class>/<image>, or --split all with class folders directly under <root>"
    return "pass --download or set --data-root"


def check_available(name: str, split: str, root: str | None, download: bool = False) -> None:
    """Fail fast (before any Ray resources are claimed) with a message saying how to get the data.

    Only checks names on disk, never reads images, so it is cheap even for ImageNet.
    """
    info = dataset_info(name)
    _check_split(info, split)
    if info.embedded:
        return
    if not root:
        hint = " (and --download)" if name in _TORCHVISION else ""
        raise DatasetError(f"{name}: no data root given; set --data-root{hint}")
    base = Path(root).expanduser()
    if name in _TORCHVISION:
        cls = _TORCHVISION[name]
        missing = [f for f in _required_files(cls) if not (base / cls.base_folder / f).is_file()]
        if missing and not download:
            expected = f"expected {cls.base_folder}/{missing[0]}"
            raise DatasetError(f"{name}: no data under {base} ({expected}); pass --download or set --data-root")
        return
    if download:
        raise DatasetError(f"{name}: --download is not supported; {_how_to_get(info)}")
    split_dir = _folder_split_dir(name, base, split)
    if not split_dir.is_dir():
        raise DatasetError(f"{name}: no directory {split_dir}; {_how_to_get(info)}")
    classes = _subdirs(split_dir)
    if not classes:
        raise DatasetError(f"{name}: no class folders in {split_dir}; {_how_to_get(info)}")
    with os.scandir(split_dir / classes[0]) as it:
        if not any(e.is_file() for e in it):
            raise DatasetError(f"{name}: class folder {split_dir / classes[0]} is empty; {_how_to_get(info)}")


@contextlib.contextmanager
def _download_lock(root: Path, enabled: bool) -> Iterator[None]:
    """Serialise torchvision downloads when several workers on one node share a root."""
    if not enabled:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".download.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_digits(split: str, image_size: int) -> TensorImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    targets = torch.as_tensor(digits.target, dtype=torch.long)
    if split != "all":
        # Fixed stratified 80/20 split so "test" is a held-out set for linear evaluation.
        train_idx, test_idx = train_test_split(
            range(len(targets)), test_size=0.2, stratify=digits.target, random_state=0
        )
        idx = torch.as_tensor(sorted(train_idx if split == "train" else test_idx))
    else:
        idx = torch.arange(len(targets))
    x = torch.as_tensor(digits.images, dtype=torch.float32)[idx, None] * (255 / 16)  # 0..16 -> 0..255
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorImageDataset(images, targets[idx], [str(d) for d in range(10)])


def _load_torchvision(name: str, split: str, root: Path, download: bool, image_size: int | None) -> TensorImageDataset:
    cls, info = _TORCHVISION[name], dataset_info(name)
    with _download_lock(root, download):
        try:
            kw = {"split": split} if name == "stl10" else {"train": split == "train"}
            ds = cls(str(root), download=download, **kw)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DatasetError(f"{name}: {e} (root {root}); pass --download or set --data-root") from None
    if name == "stl10":  # already (N, 3, H, W) uint8; labels -1 for unlabeled
        images, targets = torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype("int64"))
    else:  # (N, H, W, 3) uint8
        images, targets = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets)
    if image_size is not None:
        images = _resize(images, image_size)
    classes = getattr(ds, "classes", None) or [str(c) for c in range(info.num_classes)]  # stl10 names are optional
    return TensorImageDataset(images, targets, classes)


def _load_folder(name: str, split: str, root: Path) -> ImageFiles:
    split_dir = _folder_split_dir(name, root, split)
    if not split_dir.is_dir():
        raise DatasetError(f"{name}: no directory {split_dir}; {_how_to_get(dataset_info(name))}")
    class_dir = root / "train" if (root / "train").is_dir() and split_dir != root else split_dir
    classes = _subdirs(class_dir)
    ds = ImageFiles(split_dir, classes) if classes else None
    if ds is None or len(ds) == 0:
        raise DatasetError(f"{name}: no images found under {split_dir}; {_how_to_get(dataset_info(name))}")
    return ds


def load_dataset(
    name: str, split: str, *, root: str | None = None, download: bool = False, image_size: int | None = None
) -> Dataset:
    """Build the split as a Dataset of ``(uint8 (3, H, W) tensor, int label)``.

    ``image_size`` resizes in-memory sets once at load (digits default 32); file-based sets
    keep their native resolution because the view/eval transforms resize them anyway, and
    cropping before downscaling keeps detail. Labels of imagenet/imagefolder splits follow
    the class list of ``<root>/train`` when it exists. With ``download`` several processes
    may share a root: downloads are serialised by a file lock.
    """
    info = dataset_info(name)
    _check_split(info, split)
    if image_size is not None and image_size < 1:
        raise DatasetError(f"{name}: image_size must be positive, got {image_size}")
    if name == "digits":
        return _load_digits(split, image_size or info.image_size)
    if not root:
        raise DatasetError(f"{name}: no data root given; set --data-root")
    base = Path(root).expanduser()
    if name in _TORCHVISION:
        return _load_torchvision(name, split, base, download, image_size)
    if download:
        raise DatasetError(f"{name}: --download is not supported; {_how_to_get(info)}")
    return _load_folder(name, split, base)
