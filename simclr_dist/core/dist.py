"""Collectives the training code needs, each a no-op in a single process.

Why here and not inline: the loss, the loops and the kNN monitor all need "rank/world", a differentiable gather and
a few all-reduces; one definition keeps their semantics (and their single-process fallbacks) identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX_DIMS = 8  # shape check payload: [ndim, *shape, padding]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when not running distributed."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_equal_shapes(x: torch.Tensor, world: int) -> None:
    """all_gather needs equal shapes; mismatches would hang or corrupt, so fail loudly on every rank."""
    if x.dim() > MAX_DIMS:
        raise ValueError(f"gather_with_grad supports at most {MAX_DIMS} dims, got shape {tuple(x.shape)}")
    meta = torch.full((MAX_DIMS + 1,), -1, dtype=torch.long, device=x.device)
    meta[0] = x.dim()
    meta[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    shapes = [tuple(m[1 : 1 + int(m[0])].tolist()) for m in metas]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"gather_with_grad requires equal shapes on all ranks, got {shapes} (rank order)")


class GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradient over ranks and keeps this rank's slice.

    Every rank's loss depends on every rank's embeddings, so d(sum_r L_r)/dz_local is the
    all-reduced (summed) gradient. DDP then averages parameter gradients, giving
    d(mean_r L_r)/dθ == the single-process gradient on the concatenated batch.
    Uses all_reduce (not reduce_scatter) so it also works on gloo.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = rank_world()
        check_equal_shapes(x, world)
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad_out.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.batch, ctx.batch)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (W*B, D) in rank order, differentiable; identity when not distributed or W == 1."""
    if rank_world()[1] == 1:
        return x
    return GatherWithGrad.apply(x)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def mean_across(t: torch.Tensor) -> float:
    """Mean over ranks, as a Python float (one host sync)."""
    return float(all_sum(t).item()) / rank_world()[1]


def max_across(t: torch.Tensor) -> int:
    """Max over ranks, as a Python int (one host sync)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank, so a sharded evaluation and the
    checkpoint agree."""
    if is_distributed():
        for b in module.buffers():
            dist.broadcast(b, src)
