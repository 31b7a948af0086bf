"""A quick linear probe of frozen features: multinomial logistic regression, fitted by full-batch L-BFGS.

Why here: the pretraining loop scores it beside the kNN monitor on the validation split (``--linear-probe``), so a
sweep can select on linear-probe accuracy - the paper's protocol - and not only on kNN, which on small data already
scores well for a random encoder. One fixed L2 strength and a capped iteration count keep it cheap enough to run at
every evaluation of a CPU sweep; the evaluation command's probe (which also chooses L2) is the one to report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PROBE_L2 = 1e-4       # on standardised features; fixed, so every trial of a sweep is scored the same way
PROBE_MAX_ITER = 100  # L-BFGS iterations: the convex fit has converged to well under a query's worth of accuracy


def fit_probe(x: Tensor, y: Tensor, *, num_classes: int, l2: float = PROBE_L2,
              max_iter: int = PROBE_MAX_ITER) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, std, weight, bias) minimising mean cross-entropy + l2/2 ||W||^2 on standardised features."""
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, weight.detach(), bias.detach()


def probe_accuracy(fit_x: Tensor, fit_y: Tensor, query_x: Tensor, query_y: Tensor, *,
                   num_classes: int) -> dict[str, float]:
    """Top-1/top-5 accuracy on the queries of a probe fitted on (fit_x, fit_y); all on the CPU."""
    fit_x, fit_y, query_x, query_y = (t.detach().cpu() for t in (fit_x, fit_y, query_x, query_y))
    mean, std, weight, bias = fit_probe(fit_x, fit_y.long(), num_classes=num_classes)
    logits = ((query_x.float() - mean) / std) @ weight.T + bias
    top = logits.topk(min(5, num_classes), dim=1).indices
    hit = top == query_y.long().unsqueeze(1)
    return {"linear_top1": hit[:, 0].float().mean().item(), "linear_top5": hit.any(1).float().mean().item()}
