"""Where a loader that augments on the device puts its batches (the resident and FFCV loaders share the rule)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch


def training_device(spec: Any) -> torch.device:
    """``spec.device``, else the Ray Train worker's device, else CUDA when asked to pin memory and present."""
    if spec.device:
        return torch.device(spec.device)
    if "ray.train" in sys.modules:  # only a process that imported Ray Train can be one of its workers
        with contextlib.suppress(Exception):  # outside a Ray Train worker get_context() raises
            import ray.train
            import ray.train.torch
            ray.train.get_context()
            return ray.train.torch.get_device()
    return torch.device("cuda" if spec.pin_memory and torch.cuda.is_available() else "cpu")
