"""Which labelled images each protocol may use: class-balanced label subsets and stratified validation splits.

Why one module: every arm of an experiment, the kNN monitor and the sweeps must draw their subsets the same way
(seeded, nested, class-balanced), and model selection must only ever see splits carved from the labelled *train*
split. Labels are read from ``.targets``; no image is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from simclr_dist.data.datasets import dataset_info

VAL_FRACTION, VAL_SEED = 0.2, 0  # the kNN monitor's validation split: fixed, so every trial of a sweep shares it


def labelled_splits(dataset: str) -> tuple[str, str]:
    """(labelled train split, held-out test split) of a dataset: ImageNet-style folders test on ``val``."""
    return dataset_info(dataset).labelled


def class_permutations(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """One seeded shuffle of each class's indices; prefixes of it give nested subsets (1% within 10%)."""
    rng = np.random.default_rng(seed)
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels[labels >= 0])}


def balanced_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified subset: each class keeps ``round(fraction * n_c)`` of its images, and
    at least one. The same seed always gives the same subset, and smaller fractions are subsets of larger ones,
    so a label-fraction curve varies only the number of labels. Unlabelled items (label < 0) are never drawn."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    chosen = [perm[:max(1, round(fraction * len(perm)))] for perm in class_permutations(labels, seed).values()]
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: Sequence[int] | np.ndarray, val_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) indices: ``round(val_fraction * n_c)`` of each class held out, but every class keeps one item
    to fit on."""
    fit, val = [], []
    for perm in class_permutations(np.asarray(labels), seed).values():
        n_val = min(len(perm) - 1, max(1, round(val_fraction * len(perm))))
        val.append(perm[:n_val])
        fit.append(perm[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def validation_split(labelled: torch.utils.data.Dataset) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """(bank, queries) of a labelled split: a fixed class-stratified VAL_FRACTION held out as queries."""
    fit_idx, val_idx = stratified_split(torch.as_tensor(labelled.targets).numpy(), VAL_FRACTION, VAL_SEED)
    return (torch.utils.data.Subset(labelled, fit_idx.tolist()), torch.utils.data.Subset(labelled, val_idx.tolist()))
