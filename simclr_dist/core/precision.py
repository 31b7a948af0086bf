"""Mixed precision from one word: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.

Why one place: pretraining, the classifier loop, feature extraction and the benchmarks must agree on what a
precision means (autocast dtype, whether a GradScaler is needed); bf16 needs no scaler, fp16 does.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; other names are returned as given (validated)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


@dataclass(frozen=True)
class Precision:
    """A resolved precision on a device: ``with p.autocast(): ...`` and ``p.scaler()``."""

    name: str
    device_type: str

    @classmethod
    def of(cls, precision: str, device: torch.device | str) -> "Precision":
        return cls(resolve_precision(precision, device), torch.device(device).type)

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active only for fp16 (bf16 and fp32 keep fp32's exponent range)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


# The default memory format of every convolution path (pretraining and classifier steps, feature extraction), on
# CPU and GPU alike: channels_last, decided by ``python -m bench.memory_format`` (interleaved in one process, both
# formats on the same weights; the figures are in docs/performance.md, "Memory format").
CHANNELS_LAST = True


def use_channels_last(flag: bool | None) -> bool:
    """``--channels-last`` / ``--no-channels-last`` when given, else the measured default :data:`CHANNELS_LAST`."""
    return CHANNELS_LAST if flag is None else bool(flag)


def to_memory_format(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``module`` with its 4-d weights in the chosen layout (in place, as ``Module.to`` does)."""
    return module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
