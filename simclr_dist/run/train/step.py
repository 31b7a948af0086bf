"""The two optimisation steps of the project, used by the training loops and timed by ``bench/`` as they are.

Why separate from the loops: a benchmark that copies "the production step" measures its copy; these functions are
the production step. Neither synchronises with the host: losses come back as detached device tensors, so a loop
reads them only when it logs. ``phase`` (optional) is called after each phase with its name, which lets a
benchmark time forward / loss / backward / optimizer without a second implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_dist.core.loss import nt_xent
from simclr_dist.core.precision import CHANNELS_LAST, Precision

Phase = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      phase: Phase = _noop) -> None:
    """Backward (scaled for fp16, a no-op scale otherwise) and one optimizer step: the tail both steps share."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    phase("backward")
    scaler.step(optimizer)
    scaler.update()
    phase("optimizer")


def pretrain_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  v1: Tensor, v2: Tensor, *, temperature: float, precision: Precision, device: torch.device,
                  channels_last: bool = CHANNELS_LAST, poison: bool = False, normalize: bool = True,
                  phase: Phase = _noop) -> Tensor:
    """One SimCLR step on a batch of view pairs ``v1, v2`` (B, 3, S, S); returns the detached loss.

    Both views go through one forward pass (2B images), so BatchNorm statistics cover both views of the batch;
    the NT-Xent all-gathers the projections (negatives of every worker, exact gradients); ``normalize=False``
    drops the l2 normalisation of the projections (``--no-proj-normalize``). ``poison`` makes the loss NaN (the
    ``--chaos-nan-step`` drill) to exercise the non-finite stop.
    """
    x = to_device(torch.cat([v1, v2]), device, channels_last)  # (2B, 3, S, S)
    with precision.autocast():
        _, z = model(x)  # (2B, D)
    phase("forward")
    z1, z2 = z.float().chunk(2)  # (B, D) each
    loss = nt_xent(z1, z2, temperature, normalize=normalize)
    if poison:
        loss = loss * float("nan")
    phase("loss")
    backward_and_step(loss, optimizer, scaler, phase)
    return loss.detach()


def classify_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  x: Tensor, y: Tensor, *, precision: Precision, device: torch.device,
                  channels_last: bool = CHANNELS_LAST,
                  phase: Phase = _noop) -> Tensor:
    """One cross-entropy step of encoder + linear head on ``x`` (B, 3, S, S), ``y`` (B,).

    Returns the detached ``[loss * B, correct, B]`` (float64, on the device) to be summed over the epoch, so the
    loop syncs with the host once per epoch rather than twice per step.
    """
    x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
    with precision.autocast():
        logits = model(x).float()  # (B, C)
    phase("forward")
    loss = F.cross_entropy(logits, y)
    phase("loss")
    backward_and_step(loss, optimizer, scaler, phase)
    n = torch.tensor(float(len(y)), dtype=torch.float64, device=device)
    correct = (logits.detach().argmax(1) == y).sum().to(torch.float64)
    return torch.stack([loss.detach().to(torch.float64) * n, correct, n])
