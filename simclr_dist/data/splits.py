"""Which labelled images each protocol may use: class-balanced label subsets and stratified validation splits.

Why one module: every arm of an experiment, the kNN monitor and the sweeps must draw their subsets the same way
(seeded, nested, class-balanced), and model selection must only ever see splits carved from the labelled *train*
split. Labels are read from ``.targets``; no image is decoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simclr_dist.data.datasets import dataset_info

VAL_FRACTION, VAL_SEED = 0.2, 0  # the kNN monitor's validation split: fixed, so every trial of a sweep shares it
SUBSET_SEED = 0  # --train-subset: one fixed subset for every run


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


class LabelledSubset(torch.utils.data.Subset):
    """A ``Subset`` that keeps ``.targets`` (the subset's labels), so it splits and subsets like its parent."""

    @property
    def targets(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.targets)[torch.as_tensor(self.indices, dtype=torch.long)]


def fixed_subset_indices(labels: Sequence[int] | np.ndarray, size: int) -> np.ndarray | None:
    """Indices of a fixed class-balanced subset of about ``size`` items (None for 0 or >= all): the same images
    for every run, so runs on a CPU-sized budget (``--train-subset``) stay comparable."""
    labels = np.asarray(labels)
    if not size or size >= len(labels):
        return None
    return balanced_subset(labels, size / len(labels), seed=SUBSET_SEED)


def fixed_subset(labelled: torch.utils.data.Dataset, size: int) -> torch.utils.data.Dataset:
    """``labelled`` restricted to :func:`fixed_subset_indices` (itself when that is all of it)."""
    idx = fixed_subset_indices(torch.as_tensor(labelled.targets).numpy(), size)
    return labelled if idx is None else LabelledSubset(labelled, idx.tolist())


MIN_HOLDOUT = 10  # labels per class from which one hold-out split is used; below it, k-fold
MAX_VAL_PER_CLASS = 200  # a hold-out larger than this per class adds little to a choice among a few grid points


class SelectionError(ValueError):
    """A labelled subset too small for model selection (a class without a validation sample)."""


def selection_splits(labels: Sequence[int] | np.ndarray, *, val_fraction: float = 0.2, seed: int = 0,
                     min_holdout: int = MIN_HOLDOUT, max_val_per_class: int = MAX_VAL_PER_CLASS,
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, val) positions into ``labels`` (a labelled subset) for choosing hyper-parameters without test data.

    Every class of the subset with at least ``min_holdout`` labels: one class-stratified hold-out split
    (``round(val_fraction * n_c)`` per class, at least 1, at most ``max_val_per_class``). A class with fewer: k-fold,
    ``k = min(round(1 / val_fraction), smallest class)``, each label validated exactly once, so few labels are not
    spent on a hold-out. A class with a single label cannot be both fitted and validated: :class:`SelectionError`
    naming it.
    """
    perms = class_permutations(np.asarray(labels), seed)
    counts = {c: len(p) for c, p in perms.items()}
    smallest = min(counts, key=lambda c: (counts[c], c))
    if counts[smallest] < 2:
        raise SelectionError(f"class {smallest} has {counts[smallest]} label in the subset: model selection needs "
                             "at least 2 per class (one to fit, one to validate)")
    if counts[smallest] >= min_holdout:
        val = [p[:min(max_val_per_class, max(1, round(val_fraction * len(p))))] for p in perms.values()]
        fit = [p[len(v):] for p, v in zip(perms.values(), val)]
        return [(np.sort(np.concatenate(fit)), np.sort(np.concatenate(val)))]
    k = min(max(2, round(1 / val_fraction)), counts[smallest])
    splits = []
    for fold in range(k):
        val = [p[fold::k] for p in perms.values()]
        fit = [np.setdiff1d(p, v) for p, v in zip(perms.values(), val)]
        splits.append((np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))))
    return splits


def subset_digest(indices: Sequence[int] | np.ndarray) -> str:
    """A short fingerprint of a label subset (SHA-256 of its int64 indices, 16 hex digits): equal digests, the same
    labelled images. Recorded with every classifier run."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class LabelSplit:
    """The labelled images of one classifier run, drawn once (by the experiments plan, or by the classifier job's
    preflight) and handed down to the loop, which never redraws them. Indices point into the labelled train split.
    """

    fraction: float
    subset_seed: int
    subset: np.ndarray          # (n,) sorted: the class-balanced subset of the fraction
    fit: np.ndarray             # (n_fit,) sorted: what the run trains on
    val: np.ndarray | None      # (n_val,) sorted: its validation images (None: a final run fits the whole subset)
    val_split: int | None       # which selection split (None: the final run)
    folds: int                  # selection splits the subset has (0 for a final run; 1: a hold-out; k: k-fold)

    def digest(self) -> str:
        return subset_digest(self.subset)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, to cross to Ray workers in the train-loop config."""
        return {"fraction": self.fraction, "subset_seed": self.subset_seed, "subset": self.subset.tolist(),
                "fit": self.fit.tolist(), "val": None if self.val is None else self.val.tolist(),
                "val_split": self.val_split, "folds": self.folds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelSplit:
        arr = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
        return cls(d["fraction"], d["subset_seed"], arr(d["subset"]), arr(d["fit"]),
                   None if d["val"] is None else arr(d["val"]), d["val_split"], d["folds"])


def label_splits(labels: Sequence[int] | np.ndarray, *, fraction: float, subset_seed: int,
                 val_fraction: float = 0.2) -> tuple[LabelSplit, list[LabelSplit]]:
    """(the final run's split, every selection split) of one fraction's subset: the subset is drawn once and all
    of them are carved from it. :class:`SelectionError` when the subset is too small to select on."""
    labels = np.asarray(labels)
    subset = balanced_subset(labels, fraction, subset_seed)
    final = LabelSplit(fraction, subset_seed, subset, subset, None, None, 0)
    folds = selection_splits(labels[subset], val_fraction=val_fraction, seed=subset_seed)
    selecting = [LabelSplit(fraction, subset_seed, subset, subset[fit], subset[val], k, len(folds))
                 for k, (fit, val) in enumerate(folds)]
    return final, selecting


def label_split(labels: Sequence[int] | np.ndarray, *, fraction: float, subset_seed: int, val_split: int | None,
                val_fraction: float = 0.2) -> LabelSplit:
    """One run's split: the final run's (``val_split=None``) or selection split ``val_split``. ``ValueError``
    (one line) when the subset has fewer selection splits; :class:`SelectionError` when it has none."""
    if val_split is None:
        subset = balanced_subset(labels, fraction, subset_seed)
        return LabelSplit(fraction, subset_seed, subset, subset, None, None, 0)
    _, selecting = label_splits(labels, fraction=fraction, subset_seed=subset_seed, val_fraction=val_fraction)
    if not 0 <= val_split < len(selecting):
        raise ValueError(f"--val-split {val_split}: the subset has {len(selecting)} selection split(s)")
    return selecting[val_split]
