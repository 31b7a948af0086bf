"""Tests for simclr_dist.core.loss: naive-reference equivalence, low precision, and the
DDP exactness invariant on real 2-process gloo groups."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.loss import leave_spawned_rank
from simclr_dist.core.dist import gather_with_grad
from simclr_dist.core.loss import NTXentLoss, nt_xent, ntxent_logits

WORLD, B, IN_DIM, HID, OUT_DIM, TAU = 2, 4, 6, 16, 5, 0.3


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR paper, Alg. 1, literally: interleaved pairs (2k, 2k+1), exp-sum denominator over k != i."""
    reps = [v for pair in zip(z1.double(), z2.double()) for v in pair]
    n = len(reps)

    def sim(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u @ v) / (u.norm() * v.norm())

    def ell(i: int, j: int) -> torch.Tensor:
        denom = sum(torch.exp(sim(reps[i], reps[k]) / temperature) for k in range(n) if k != i)
        return -torch.log(torch.exp(sim(reps[i], reps[j]) / temperature) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n // 2)) / n


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("b,d,tau", [(1, 3, 0.5), (2, 2, 0.1), (3, 7, 0.5), (5, 4, 1.0), (6, 8, 0.07)])
def test_matches_naive_reference_loss_and_grads(b: int, d: int, tau: float) -> None:
    g = torch.Generator().manual_seed(1000 * b + d)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)

    loss = nt_xent(z1, z2, tau)
    ref = naive_nt_xent(z1, z2, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(loss, (z1, z2))
    want = torch.autograd.grad(ref, (z1, z2))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(NTXentLoss(tau)(z1, z2), loss)


def test_single_process_logits_shape_targets_and_mask() -> None:
    b, d, tau = 5, 3, 0.5
    z1, z2 = torch.randn(b, d), torch.randn(b, d)
    logits, targets = ntxent_logits(z1, z2, tau)
    assert logits.shape == (2 * b, 2 * b)
    assert targets.dtype == torch.long
    assert targets.tolist() == [*range(b, 2 * b), *range(b)]
    assert torch.all(logits.diagonal() == torch.finfo(logits.dtype).min)
    cos = F.cosine_similarity(z1, z2, dim=1) / tau
    torch.testing.assert_close(logits[torch.arange(b), targets[:b]], cos)
    # gather=True without a process group is the identity
    assert gather_with_grad(z1) is z1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_half_precision_finite_and_close(dtype: torch.dtype, tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 32, generator=g).to(dtype).requires_grad_()
    z2 = torch.randn(16, 32, generator=g).to(dtype).requires_grad_()
    logits, _ = ntxent_logits(z1, z2, tau)
    assert logits.dtype == dtype and logits.diagonal().eq(torch.finfo(dtype).min).all()
    loss = nt_xent(z1, z2, tau)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = nt_xent(z1.detach().float(), z2.detach().float(), tau)
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)
    loss.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_autocast_bf16_logits_softmax_in_fp32() -> None:
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = ntxent_logits(z1, z2, 0.1)
        loss = nt_xent(z1, z2, 0.1)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, nt_xent(z1, z2, 0.1), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("tau", [0.0, -0.5, float("nan")])
def test_bad_temperature_raises(tau: float) -> None:
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=rf"temperature must be > 0, got {tau}"):
        nt_xent(z, z, tau)
    with pytest.raises(ValueError, match=rf"temperature must be > 0, got {tau}"):
        NTXentLoss(tau)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3, 3\)"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3), 0.5)
    with pytest.raises(ValueError, match=r"got shape \(6,\)"):
        nt_xent(torch.randn(6), torch.randn(6), 0.5)
    with pytest.raises(ValueError, match=r"got shape \(0, 3\)"):
        nt_xent(torch.randn(0, 3), torch.randn(0, 3), 0.5)


# ---------------------------------------------------------------- 2-process gloo


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed float64 dataset of WORLD*B samples and two deterministic 'views' of it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * B, IN_DIM, generator=g, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)  # identical init on every process
    return torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, HID), torch.nn.ReLU(), torch.nn.Linear(HID, OUT_DIM)
    ).double()


def _step(model: torch.nn.Module, v1: torch.Tensor, v2: torch.Tensor, gather: bool):
    """One forward (both views in one batch, no BN so batching is irrelevant) + backward."""
    z1, z2 = model(torch.cat([v1, v2])).chunk(2)
    loss = nt_xent(z1, z2, TAU, gather=gather)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x1, x2 = _data()
        sl = slice(rank * B, (rank + 1) * B)
        res: dict = {}
        for gather in (True, False):
            ddp = torch.nn.parallel.DistributedDataParallel(_encoder())
            res[f"loss_{gather}"], res[f"grads_{gather}"] = _step(ddp, x1[sl], x2[sl], gather)

        # logits / targets on this rank, from raw local slices
        logits, targets = ntxent_logits(x1[sl], x2[sl], TAU)
        res["logits"], res["targets"] = logits, targets

        # unequal shapes must raise on every rank (and not hang)
        try:
            gather_with_grad(torch.zeros(rank + 1, 3))
        except ValueError as e:
            res["shape_error"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()  # a gloo rank can abort at interpreter exit after its work is done (see its docstring)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> dict:
    x1, x2 = _data()
    out = {}
    for gather in (True, False):
        out[f"loss_{gather}"], out[f"grads_{gather}"] = _step(_encoder(), x1, x2, gather)
    return out


def test_ddp_gather_equals_single_process_big_batch(dist_results: list[dict], single_process: dict) -> None:
    """W=2 x batch B with gathered negatives + DDP averaging == one process with batch 2B."""
    mean_loss = sum(r["loss_True"] for r in dist_results) / WORLD
    torch.testing.assert_close(mean_loss, single_process["loss_True"], rtol=0, atol=1e-10)
    for r in dist_results:
        for got, want in zip(r["grads_True"], single_process["grads_True"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_ddp_local_negatives_do_not_match(dist_results: list[dict], single_process: dict) -> None:
    """Negative control: without the gather the invariant breaks, so the test above can fail."""
    mean_loss = sum(r["loss_False"] for r in dist_results) / WORLD
    assert abs(mean_loss - single_process["loss_True"]) > 1e-3
    max_diff = max(
        (got - want).abs().max().item()
        for got, want in zip(dist_results[0]["grads_False"], single_process["grads_True"])
    )
    assert max_diff > 1e-4


def test_distributed_logit_shape_and_rank_offset_targets(dist_results: list[dict]) -> None:
    x1, x2 = _data()
    for rank, r in enumerate(dist_results):
        logits, targets = r["logits"], r["targets"]
        assert logits.shape == (2 * B, 2 * B * WORLD)
        i = torch.arange(B)
        assert targets.tolist() == (WORLD * B + rank * B + i).tolist() + (rank * B + i).tolist()
        sl = slice(rank * B, (rank + 1) * B)
        cos = F.cosine_similarity(x1[sl], x2[sl], dim=1) / TAU
        rows = torch.arange(2 * B)
        torch.testing.assert_close(logits[rows, targets], torch.cat([cos, cos]))
        self_cols = torch.cat([rank * B + i, WORLD * B + rank * B + i])
        assert torch.all(logits[rows, self_cols] == torch.finfo(logits.dtype).min)
        assert math.isfinite(logits.min().item())


def test_gather_unequal_shapes_raise_on_all_ranks(dist_results: list[dict]) -> None:
    for r in dist_results:
        assert "[(1, 3), (2, 3)]" in r["shape_error"]
