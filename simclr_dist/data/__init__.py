"""Datasets (uint8 CHW tensors + int labels) and SimCLR augmentations."""

from .augment import (
    COMPONENTS,
    RECIPE,
    AugmentConfig,
    TwoViewDataset,
    TwoViewTransform,
    build_eval_transform,
    build_view_transform,
    default_augment,
    parse_components,
)
from .datasets import (
    DATASETS,
    DatasetError,
    DatasetInfo,
    ImageFiles,
    TensorImageDataset,
    check_available,
    dataset_info,
    load_dataset,
)

__all__ = [
    "COMPONENTS",
    "DATASETS",
    "RECIPE",
    "AugmentConfig",
    "DatasetError",
    "DatasetInfo",
    "ImageFiles",
    "TensorImageDataset",
    "TwoViewDataset",
    "TwoViewTransform",
    "build_eval_transform",
    "build_view_transform",
    "check_available",
    "dataset_info",
    "default_augment",
    "load_dataset",
    "parse_components",
]
