"""The online probe and the collapse signal: a linear classifier trained on detached encoder features while SimCLR
pretrains, and RankMe (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained
self-supervised representations by their rank").

Why here (torch only): both are arithmetic on feature matrices; what feeds them (a labelled stream carved from the
train split, its held-out validation part) is the training loop's business. The probe never reaches the encoder:
its input is computed under ``torch.no_grad`` and detached, so the encoder's gradients are the same with and without
it (tested), and its labels are used by this head alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class OnlineProbe(nn.Module):
    """BatchNorm without affine parameters (the features' scale drifts as the encoder trains; the linear layer should
    not have to chase it), then a linear layer: (N, D) features -> (N, C) logits."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, C)
        return self.linear(self.norm(features))


def probe_optimizer(probe: OnlineProbe, lr: float = 0.1) -> torch.optim.Optimizer:
    """Plain SGD with momentum at a fixed LR: the input is standardised, so one LR fits every encoder."""
    return torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)


def probe_update(probe: OnlineProbe, optimizer: torch.optim.Optimizer, features: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """One step of the probe on ``features`` (N, D), detached here, and ``labels`` (N,); returns the loss (a device
    scalar, no host sync). Over several workers the gradients are averaged, so every rank's probe stays identical."""
    probe.train()
    loss = nn.functional.cross_entropy(probe(features.detach()), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in probe.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def probe_top1(probe: OnlineProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the probe on (N, D) features with (N,) labels (BatchNorm on its running statistics)."""
    probe.eval()
    return (probe(features).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of an (N, D) embedding matrix: exp of the entropy of its normalised singular values, a smooth effective
    rank in [1, min(N, D)]. A collapsed encoder (every image mapped near one point, or onto a few directions) scores
    near 1 or the few; a healthy one a large fraction of min(N, D)."""
    s = torch.linalg.svdvals(embeddings.double())   # (min(N, D),)
    p = s / s.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
