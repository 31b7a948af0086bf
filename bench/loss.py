"""NT-Xent forward+backward: production ``nt_xent`` vs the usual full-matrix implementation.

    python -m bench.loss [--quick] [--out PATH.json]

For each global batch G (projection dim 128) and world size W in {1, 2, 8} it times, interleaved in one
process (median of repeats), one forward+backward of

* ``prod``  - ``simclr_dist.core.loss.nt_xent`` as rank 0 of W: logits (2G/W, 2G) per rank;
* ``naive`` - the full-matrix peer implementation below; gather-then-loss codes run it on the
  all-gathered projections, so every rank pays for the whole (2G, 2G) matrix whatever W is;
* ``lean``  - a candidate rewrite of ``ntxent_logits`` (same logits; see ``lean_nt_xent``), as rank 0 of W.

W > 1 runs the production code without a process group (see ``emulated_ranks``): the per-rank compute is
real, the all-gather / all-reduce communication is not included. Peak memory is what one call allocates
beyond its inputs (``torch.cuda.max_memory_allocated`` on CUDA, live tensor bytes on CPU).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F

import simclr_dist.core.loss as L
from bench.common import (Column, Row, base_parser, interleaved, machine_info, mem_available_bytes, median,
                          peak_bytes, set_threads, write_report)

DIM, TAU = 128, 0.5
WORLDS = (1, 2, 8)
MiB = 2**20
# Peak bytes per logit measured at large G (CPU, fp32: naive 23, prod 13); only used to skip what would not fit.
NAIVE_BYTES_PER_LOGIT, PROD_BYTES_PER_LOGIT = 24, 14

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The widespread reimplementation (e.g. the popular ``info_nce_loss``): full (2N, 2N) similarity,
    an identity mask that drops self-similarities by boolean indexing, positives and negatives copied
    into (2N, 1) and (2N, 2N-2) blocks, cross-entropy against column 0. Same value as ``nt_xent``."""
    n2 = 2 * z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    ids = torch.arange(z1.shape[0], device=z.device).repeat(2)
    labels = (ids[None, :] == ids[:, None]).float()
    sim = z @ z.T
    keep = ~torch.eye(n2, dtype=torch.bool, device=z.device)
    labels, sim = labels[keep].view(n2, -1), sim[keep].view(n2, -1)
    positives = sim[labels.bool()].view(n2, -1)
    negatives = sim[~labels.bool()].view(n2, -1)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(n2, dtype=torch.long, device=z.device))


def lean_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """Candidate for ``simclr_dist.core.loss`` (not used in production): the same (2B, 2BW) logits and loss,
    with 1/T folded into the (2B, D) queries instead of a pass over the logits, and the 2B self-similarities
    overwritten in place (index_put_) instead of a full-size boolean mask plus ``masked_fill`` copy.
    In place is safe: the matmul's backward needs its inputs, not its output."""
    rank, world = L.rank_world() if gather else (0, 1)
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    keys = torch.cat([L.gather_with_grad(z1), L.gather_with_grad(z2)]) if world > 1 else torch.cat([z1, z2])
    logits = torch.cat([z1, z2]).div(temperature) @ keys.T
    i = torch.arange(b, device=logits.device)
    own = torch.cat([rank * b + i, world * b + rank * b + i])
    logits[torch.arange(2 * b, device=logits.device), own] = torch.finfo(logits.dtype).min
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, torch.cat([own[b:], own[:b]]))


@contextlib.contextmanager
def emulated_ranks(world: int, rank: int, foreign: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run ``simclr_dist.core.loss`` as rank ``rank`` of ``world`` without a process group.

    ``rank_world`` reports (rank, world) and ``gather_with_grad`` splices the local (B, D) rows into
    ``foreign[k]``, the other ranks' rows of the k-th gathered tensor (((W-1)*B, D), rank order; k counts
    the calls modulo len(foreign): view 1, view 2). The production code thus builds exactly the per-rank
    (2B, 2BW) logits; in backward, autograd computes the gradient of every gathered row, as the real path
    does before its all-reduce. Communication itself is not emulated.
    """
    calls = itertools.count()

    def gather(x: torch.Tensor) -> torch.Tensor:
        other = foreign[next(calls) % len(foreign)]
        split = rank * x.shape[0]
        return torch.cat([other[:split], x, other[split:]])

    with mock.patch.object(L, "rank_world", lambda: (rank, world)), mock.patch.object(L, "gather_with_grad", gather):
        yield


def foreign_rows(world: int, b: int, dim: int = DIM, *, seed: int = 1) -> list[torch.Tensor]:
    """Normalised stand-ins for the other ranks' projections (two views), requiring grad like gathered rows."""
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn((world - 1) * b, dim, generator=g), dim=1).requires_grad_() for _ in range(2)]


def gloo_rank_logits(rank: int, world: int, init_file: str, out_dir: str, z1: torch.Tensor, z2: torch.Tensor) -> None:
    """``torch.multiprocessing.spawn`` target: this rank's real ``ntxent_logits`` on its slice of (z1, z2) in a gloo
    group, saved to ``out_dir/rank{rank}.pt``; the tests compare it with ``emulated_ranks`` (kept in this light
    module so spawned processes import little)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        logits, targets = L.ntxent_logits(z1[rank * b:(rank + 1) * b], z2[rank * b:(rank + 1) * b], TAU)
        torch.save({"logits": logits, "targets": targets}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()


def leave_spawned_rank() -> None:
    """End a ``torch.multiprocessing.spawn`` gloo rank that finished its work, skipping interpreter teardown.

    With torch 2.14 a gloo rank that has destroyed its process group still aborts at interpreter exit now and
    then ("terminate called without an active exception", SIGABRT, after its results are saved): 3 of 40 spawns
    of tests/core/test_loss.py's worker, 1 of 40 with a barrier and the DDP modules freed first, 3 of 40 with a
    TCP store instead of a file store, 0 of 40 leaving with ``os._exit(0)`` (measured on the 2-core box). Only the
    success path calls this; an exception still exits non-zero through the normal route.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fwd_bwd(loss_fn: LossFn, z1: torch.Tensor, z2: torch.Tensor, *, world: int = 1) -> Callable[[], None]:
    """One forward+backward of ``loss_fn`` on (z1, z2) as rank 0 of ``world`` (no .grad state left behind)."""
    foreign = foreign_rows(world, z1.shape[0]) if world > 1 else []
    inputs = [z1, z2, *foreign]

    def run() -> None:
        with emulated_ranks(world, 0, foreign) if world > 1 else contextlib.nullcontext():
            loss = loss_fn(z1, z2, TAU)
        torch.autograd.grad(loss, inputs)

    return run


def bench_batch(g: int, repeats: int) -> list[Row]:
    """Rows (one per W) for global batch g."""
    gen = torch.Generator().manual_seed(g)
    fns: dict[str, Callable[[], None]] = {}
    free = mem_available_bytes()
    naive_fits = free is None or NAIVE_BYTES_PER_LOGIT * (2 * g) ** 2 < free // 2
    for w in WORLDS:
        b = g // w
        z1, z2 = (torch.randn(b, DIM, generator=gen).requires_grad_() for _ in range(2))
        if PROD_BYTES_PER_LOGIT * 2 * b * 2 * g < (free or 2**62) // 2:
            fns[f"prod_w{w}"] = fwd_bwd(L.nt_xent, z1, z2, world=w)
            fns[f"lean_w{w}"] = fwd_bwd(lean_nt_xent, z1, z2, world=w)
        if w == 1 and naive_fits:
            fns["naive"] = fwd_bwd(naive_nt_xent, z1, z2)
    peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
    raw = interleaved(fns, repeats)
    times = {name: median(ts) * 1e3 for name, ts in raw.items()}

    rows = []
    for w in WORLDS:
        b = g // w
        prod, lean, naive = times.get(f"prod_w{w}"), times.get(f"lean_w{w}"), times.get("naive")
        flops = 3 * 2 * (2 * b) * (2 * g) * DIM  # forward matmul + its two backward matmuls
        rows.append({
            "global_batch": g, "world": w, "local_batch": b, "logits": f"{2 * b}x{2 * g}",
            "logit_mib": 2 * b * 2 * g * 4 / MiB,
            "prod_ms": prod, "naive_ms": naive, "prod_over_naive": prod / naive if prod and naive else None,
            "lean_ms": lean, "lean_over_prod": lean / prod if lean and prod else None,
            "prod_peak_mib": _mib(peaks.get(f"prod_w{w}")), "naive_peak_mib": _mib(peaks.get("naive")),
            "lean_peak_mib": _mib(peaks.get(f"lean_w{w}")),
            "prod_gflops": flops / (prod * 1e-3) / 1e9 if prod else None,
            "raw_ms": {k: [t * 1e3 for t in raw[k]] for k in (f"prod_w{w}", f"lean_w{w}", "naive") if k in raw},
        })
    return rows


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MiB


COLUMNS: list[Column] = [
    ("global_batch", "G", "d"), ("world", "W", "d"), ("logits", "logits/rank", ""),
    ("logit_mib", "logit MiB", ".1f"), ("prod_ms", "prod ms", ".2f"), ("naive_ms", "naive ms", ".2f"),
    ("prod_over_naive", "prod/naive", ".3f"), ("lean_ms", "lean ms", ".2f"), ("lean_over_prod", "lean/prod", ".3f"),
    ("prod_peak_mib", "prod peak MiB", ".1f"), ("naive_peak_mib", "naive peak MiB", ".1f"),
    ("lean_peak_mib", "lean peak MiB", ".1f"), ("prod_gflops", "prod GFLOP/s", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.loss", __doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="global batch sizes (default 256..8192)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per size (default: by size)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info()
    sizes = args.sizes or ([256, 512] if args.quick else [256, 512, 1024, 2048, 4096, 8192])
    if any(g % max(WORLDS) for g in sizes):
        parser.error(f"--sizes must be multiples of {max(WORLDS)}")
    rows: list[Row] = []
    for g in sizes:
        repeats = args.repeats or (3 if args.quick else 7 if g <= 1024 else 5 if g <= 2048 else 3)
        rows += bench_batch(g, repeats)
        print(f"G={g}: done", file=sys.stderr, flush=True)
    note = ("prod/lean: rank 0 of W, logits (2G/W, 2G), communication excluded; naive: full (2G, 2G) per rank "
            "(gather-then-loss); dim 128, fp32, forward+backward; peak = bytes allocated beyond the inputs")
    write_report("loss", args.out, {"rows": (rows, COLUMNS)}, machine=machine, dim=DIM, temperature=TAU, note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
