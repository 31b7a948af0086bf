"""Optimisation for large-batch SimCLR: LR scaling rules, LARS, and a per-step warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn


def scale_lr(base_lr: float, global_batch: int, rule: str = "linear") -> float:
    """SimCLR's LR rules: "linear" = base_lr * B / 256; "sqrt" = base_lr * sqrt(B), which the paper
    found better for small batches / long runs (e.g. 0.075 * sqrt(B)); "none" = base_lr."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; valid choices: linear, sqrt, none")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable params into [weights, biases + norm params].

    SimCLR excludes biases and BN parameters from both weight decay and LARS adaptation: decaying
    BN's scale fights normalisation, and their trust ratios are meaningless. ndim <= 1 captures
    exactly those for conv/linear/BN networks.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with heavy-ball momentum and layer-wise trust ratios (You et al., 2017).

    Per parameter: g = grad + wd * p; trust = trust_coefficient * ||p|| / (||g|| + eps) when both
    norms are > 0, else 1; buf = momentum * buf + trust * g; p -= lr * buf. The step size of each
    layer thus follows its weight norm, not its gradient scale, which keeps batches of 4k+ stable.
    Groups with lars_exclude=True get plain momentum SGD (no weight decay, no trust ratio).
    Everything stays on device (torch.where instead of .item()), so a step never syncs with the host.
    All params of a group must share one device (true for DDP).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(
                f"invalid LARS hyper-parameters: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"trust_coefficient={trust_coefficient}, eps={eps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(self.state[p]["momentum_buffer"])

            if group["lars_exclude"]:
                updates = grads
            else:
                wd = group["weight_decay"]
                g = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(g))
                ratio = group["trust_coefficient"] * p_norm / (g_norm + group["eps"])
                trust = torch.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)
                updates = torch._foreach_mul(g, list(trust.unbind()))  # out of place: never touch .grad

            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(
    model: nn.Module, name: str, lr: float, *, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """LARS / SGD / AdamW over param_groups(); `momentum` is ignored by AdamW."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = True if params and all(p.is_cuda for p in params) else None  # fused kernels are CUDA-only
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: lars, sgd, adamw")


class WarmupCosine:
    """Per-iteration LR: linear warm-up to base_lr, then half-cosine down to final_lr.

    Stepping per iteration rather than per epoch matters for large batches, where an epoch is only a
    few dozen steps and a coarse warm-up would hit the network with the full LR at once.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_steps: int,
        total_steps: int,
        final_lr: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr, self.warmup_steps, self.total_steps, self.final_lr = base_lr, warmup_steps, total_steps, final_lr
        self._validate()

    def _validate(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if not self.final_lr >= 0:
            raise ValueError(f"final_lr must be >= 0, got {self.final_lr}")

    def lr_at(self, step: int) -> float:
        """LR for 0-indexed optimizer step `step`; steps past the end stay at the last value."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        step = min(step, self.total_steps - 1)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - 1 - self.warmup_steps
        t = (step - self.warmup_steps) / decay_steps if decay_steps > 0 else 0.0  # 1-step decay: keep the peak
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * t))

    def apply(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, float | int]:
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_lr": self.final_lr,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore the schedule's parameters (callers that must not change them compare state_dict() first)."""
        self.base_lr, self.warmup_steps = state["base_lr"], state["warmup_steps"]
        self.total_steps, self.final_lr = state["total_steps"], state["final_lr"]
        self._validate()
