"""The linear probe: multinomial logistic regression on frozen features, and the choice of its L2 strength.

Why a closed-form-style solver: the problem is convex and small (N x D features), so full-batch L-BFGS gives the
same answer every time, with no epochs or learning rate to tune (and to tune on the wrong split). Features are
standardised first, which lets one L2 grid fit every encoder width and feature scale. :func:`select_l2` sees the
fit and validation parts of the labelled split only, by signature: test data cannot enter the choice. The grid is
where a probe waits (one full L-BFGS fit per L2 value), so it shows progress: a bar on a terminal, plain lines in a
log (:class:`~simclr_dist.console.Progress`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_dist.console import Progress


def topk_accuracy(logits: Tensor, y: Tensor) -> tuple[float, float]:
    """(top-1, top-5) accuracy of class scores ``logits`` (N, C) against labels ``y`` (N,)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y.to(top.device).unsqueeze(1)
    return hit[:, 0].float().mean().item(), hit.any(1).float().mean().item()


@dataclass
class LogisticRegression:
    """Multinomial logistic regression on standardised features."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.device, torch.float32)
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def fit_logistic(x: Tensor, y: Tensor, *, num_classes: int, l2: float, max_iter: int = 300,
                 device: torch.device | str = "cpu") -> LogisticRegression:
    """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias not penalised) with full-batch L-BFGS."""
    x, y = x.to(device, torch.float32), y.to(device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(mean, std, weight.detach(), bias.detach())


def select_l2(fit_x: Tensor, fit_y: Tensor, val_x: Tensor, val_y: Tensor, *, num_classes: int,
              l2_grid: Sequence[float], max_iter: int = 300, device: torch.device | str = "cpu",
              log: Callable[[str], None] = lambda m: None, progress: str | None = None
              ) -> tuple[float, dict[str, float]]:
    """(best L2, validation top-1 of every L2). Ties go to the stronger regularisation. ``progress``: the display
    mode of the grid's progress, one step per fit (``None``: :func:`~simclr_dist.console.progress_mode`'s default,
    ``"off"``: silent)."""
    val_acc: dict[str, float] = {}
    with Progress(len(l2_grid), "linear probe: L2 grid", unit="fit", mode=progress) as bar:
        for l2 in l2_grid:
            clf = fit_logistic(fit_x, fit_y, num_classes=num_classes, l2=l2, max_iter=max_iter, device=device)
            val_acc[f"{l2:g}"] = topk_accuracy(clf.logits(val_x), val_y)[0]
            with bar.interrupt():  # the log line above the bar, not through it
                log(f"[eval] linear probe: L2 {l2:g} -> validation top-1 {val_acc[f'{l2:g}']:.4f}")
            bar.update(1)
    best = max(l2_grid, key=lambda l2: (val_acc[f"{l2:g}"], l2))
    return best, val_acc


# The pretraining loop's quick probe (``--linear-probe``): one fixed L2 and a capped iteration count keep it cheap
# enough for every evaluation of a CPU sweep, and score every trial the same way; the evaluation command's probe
# (which also chooses L2 with select_l2) is the one to report.
PROBE_L2 = 1e-4       # on standardised features
PROBE_MAX_ITER = 100  # L-BFGS iterations: the convex fit has converged to well under a query's worth of accuracy


def probe_accuracy(fit_x: Tensor, fit_y: Tensor, query_x: Tensor, query_y: Tensor, *,
                   num_classes: int) -> dict[str, float]:
    """Top-1/top-5 accuracy on the queries of a probe fitted on (fit_x, fit_y) with PROBE_L2; all on the CPU."""
    fit_x, fit_y, query_x, query_y = (t.detach().cpu() for t in (fit_x, fit_y, query_x, query_y))
    clf = fit_logistic(fit_x, fit_y.long(), num_classes=num_classes, l2=PROBE_L2, max_iter=PROBE_MAX_ITER)
    top1, top5 = topk_accuracy(clf.logits(query_x), query_y.long())
    return {"linear_top1": top1, "linear_top5": top5}
