"""NT-Xent (SimCLR) contrastive loss with exact cross-rank gradients.

Each rank scores its 2B local anchors against the 2BW projections of *all*
ranks, so the negatives are global while the logit matrix stays (2B, 2BW)
per rank. `gather_with_grad` sums gradients across ranks in backward; with
DDP's gradient averaging on top, W workers with batch B produce exactly the
gradient of one process with batch W*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simclr_dist.core.dist import gather_with_grad, rank_world

__all__ = ["ntxent_logits", "nt_xent", "NTXentLoss"]

_HALF = (torch.float16, torch.bfloat16)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def ntxent_logits(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2B, 2BW) of local anchors vs. all projections, and the positive column per anchor.

    Columns are [view1 of rank 0..W-1, view2 of rank 0..W-1]; rows are [z1; z2] of this rank.
    Self-similarities are masked with the dtype minimum (finite in fp16/bf16, unlike -inf or -1e9).
    With gather=False (or no process group) W is 1: negatives come from the local batch only.
    """
    _check_temperature(temperature)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.dim() != 2 or z1.shape[0] < 1:
        raise ValueError(f"expected (B, D) projections with B >= 1, got shape {tuple(z1.shape)}")

    rank, world = rank_world() if gather else (0, 1)
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)]) if world > 1 else torch.cat([z1, z2])
    logits = torch.cat([z1, z2]) @ keys.T / temperature  # (2B, 2BW)

    i = torch.arange(b, device=logits.device)
    own_v1, own_v2 = rank * b + i, world * b + rank * b + i  # columns of this rank's rows
    rows = torch.arange(2 * b, device=logits.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, torch.cat([own_v1, own_v2])] = True
    logits = logits.masked_fill(self_mask, torch.finfo(logits.dtype).min)
    targets = torch.cat([own_v2, own_v1])  # view-1 anchor -> its view 2, and vice versa
    return logits, targets


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """NT-Xent loss averaged over this rank's 2B anchors.

    Distributed: every rank has the same anchor count, so the global loss (mean over all 2BW
    anchors) is the mean of the rank losses -- which is what DDP's gradient averaging optimises.
    The softmax runs in float32 for fp16/bf16 logits (e.g. under autocast).
    """
    logits, targets = ntxent_logits(z1, z2, temperature, gather=gather)
    if logits.dtype in _HALF:
        logits = logits.float()
    return F.cross_entropy(logits, targets)


class NTXentLoss(torch.nn.Module):
    """Module wrapper around `nt_xent`."""

    def __init__(self, temperature: float = 0.5, gather: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature, self.gather = temperature, gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, gather=self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
