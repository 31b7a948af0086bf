"""A tiny Fashion-MNIST written as IDX files: shared by the dataset's tests (tests/data) and the experiments tests
(tests/run), importable like ``ray_procs`` because tests/ is on the path (its conftest)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from simclr_dist.data.datasets import IDX_FILES

N_TRAIN, N_TEST = 40, 20


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> Path:
    """``array`` (uint8) as an IDX file, gzip'd when the name ends in .gz."""
    head = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    data = head + np.asarray(array.shape, ">u4").tobytes() + np.ascontiguousarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_slice(directory: Path, gz: bool = False, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny Fashion-MNIST (random 28x28 pixels, every class present) as the four IDX files in ``directory``."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        image_stem, label_stem = IDX_FILES[split]
        write_idx(directory / (image_stem + (".gz" if gz else "")), images)
        write_idx(directory / (label_stem + (".gz" if gz else "")), labels)
        out[split] = (images, labels)
    return out
