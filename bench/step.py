"""SimCLR pretraining throughput: samples/s of the training step, its phases, and its FLOP-count limit.

    python -m bench.step [--quick] [--out PATH.json] [--threads N] [--no-ray]

Table "steps": the production step ``simclr_dist.run.train.step.pretrain_step`` (both views in one forward, ``nt_xent``,
backward, LARS) run in this process per model and batch size, with the median time of each phase:
data (the real digits loader, augmentation in-process, or pre-made synthetic views), forward, loss,
backward (loss and network), optimizer. FLOP count per sample = ``forward_flops`` x 3 (forward +
backward) x 2 views; its limit is the samples/s at which the step would run at the best fp32 matmul speed
this process reached (a 1024^3 matmul, best of 3, after every timed step; the column "matmul GFLOP/s" is
the median of those probes during the row, i.e. what the machine's load left at the time).

Table "scaling" (skipped with --quick or --no-ray): one epoch of the digits tiny config, in one process
(1 and 2 threads) and through ``simclr_dist.pretrain.run`` with 1 and 2 Ray workers (1 CPU each);
samples/s is ``history[-1]["samples_per_s"]`` (the epoch loop only, without Ray's start-up).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import Column, Row, base_parser, machine_info, median, set_threads, sync, write_report
from simclr_dist.config import PretrainConfig, parse_config
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from simclr_dist.core.models import SimCLRModel, forward_flops
from simclr_dist.core.optim import WarmupCosine, build_optimizer, scale_lr
from simclr_dist.core.precision import CHANNELS_LAST, Precision, to_memory_format
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.train.step import pretrain_step

TAU = 0.5
PHASES = ("data", "forward", "loss", "backward", "optimizer")
PROBE_N = 1024  # matmul probe: PROBE_N^3 multiply-adds


@dataclass(frozen=True)
class StepConfig:
    name: str
    arch: str
    image_size: int
    batch_sizes: tuple[int, ...]
    width: float = 1.0
    cifar_stem: bool = False
    steps: int = 3       # timed steps per batch size (after one warm-up step)
    data: str = "synthetic"  # or "digits": the real pretraining loader

    def model(self) -> SimCLRModel:
        return SimCLRModel(self.arch, cifar_stem=self.cifar_stem, width=self.width)


FULL = (
    StepConfig("r18-cifar 32px", "resnet18", 32, (8, 32), cifar_stem=True),
    StepConfig("r18-cifar 32px", "resnet18", 32, (32,), cifar_stem=True, data="digits"),
    StepConfig("r50 96px", "resnet50", 96, (4, 8), steps=2),
    StepConfig("r50 224px", "resnet50", 224, (4,), steps=1),
)
QUICK = (
    StepConfig("r18-cifar 32px w0.25", "resnet18", 32, (8,), width=0.25, cifar_stem=True, steps=2),
    StepConfig("r18-cifar 32px w0.25", "resnet18", 32, (8,), width=0.25, cifar_stem=True, steps=2, data="digits"),
    StepConfig("r50 96px w0.25", "resnet50", 96, (4,), width=0.25, steps=2),
)
# the digits "tiny" run of tests/conftest.py: ResNet-18 x1/8 at 16 px, global batch 64, 22 steps/epoch
TINY_ARGS = ["--dataset", "digits", "--image-size", "16", "--width", "0.125", "--batch-size", "64", "--epochs", "1",
             "--knn-every", "-1", "--log-every", "1000"]


# ---------------------------------------------------------------------------- data
def digits_loader(image_size: int, batch: int, world: int = 1, rank: int = 0):
    loader = build_pretrain_loader(LoaderSpec(
        dataset="digits", split="train", root=None, image_size=image_size, augment=None, jitter_strength=None,
        batch_size=batch, rank=rank, world_size=world, seed=0))
    loader.set_epoch(0)
    return loader


def view_batches(cfg: StepConfig, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (view1, view2) batches: the digits loader (cycled over epochs) or fixed synthetic views."""
    if cfg.data == "synthetic":
        g = torch.Generator().manual_seed(0)
        v1, v2 = (torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g) for _ in range(2))
        while True:
            yield v1, v2
    loader = digits_loader(cfg.image_size, batch)
    for epoch in range(10**9):
        loader.set_epoch(epoch)
        for v1, v2, _ in loader:
            yield v1, v2


# ---------------------------------------------------------------------------- one step, timed by phase
def matmul_probe(device: torch.device, tries: int = 3) -> float:
    """GFLOP/s of a PROBE_N^3 fp32 matmul, best of `tries` (contention only ever slows it down)."""
    a = torch.randn(PROBE_N, PROBE_N, device=device)
    best = float("inf")
    for _ in range(tries):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * PROBE_N**3 / best / 1e9


def time_steps(cfg: StepConfig, batch: int, device: torch.device) -> dict[str, Any]:
    """Phase times (s) of 1 warm-up + cfg.steps timed steps, plus the matmul probe after each timed step."""
    torch.manual_seed(0)
    model = to_memory_format(cfg.model().to(device), CHANNELS_LAST).train()  # as the loops run it
    opt = build_optimizer(model, "lars", scale_lr(0.3, batch), weight_decay=1e-6)
    batches = view_batches(cfg, batch)
    precision = Precision.of("fp32", device)
    scaler = precision.scaler()
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    probe: list[float] = []
    for i in range(1 + cfg.steps):
        t = [time.perf_counter()]

        def mark(_: str) -> None:
            sync(device)
            t.append(time.perf_counter())

        v1, v2 = next(batches)
        t.append(time.perf_counter())
        pretrain_step(model, opt, scaler, v1, v2, temperature=TAU, precision=precision, device=device, phase=mark)
        if i == 0:
            continue  # warm-up
        for p, a, b in zip(PHASES, t, t[1:]):
            times[p].append(b - a)
        times["total"].append(t[-1] - t[0])
        probe.append(matmul_probe(device))
    flops = 6 * forward_flops(model, (3, cfg.image_size, cfg.image_size))
    return {"times": times, "probe_gflops": probe, "flops_per_sample": flops}


def step_row(cfg: StepConfig, batch: int, device: torch.device) -> Row:
    m = time_steps(cfg, batch, device)
    med = {p: median(ts) for p, ts in m["times"].items()}
    sps, flops = batch / med["total"], m["flops_per_sample"]
    return {
        "config": cfg.name, "data": cfg.data, "batch": batch, "steps": cfg.steps,
        **{f"{p}_ms": med[p] * 1e3 for p in (*PHASES, "total")},
        "samples_per_s": sps, "gflop_per_sample": flops / 1e9, "achieved_gflops": sps * flops / 1e9,
        "matmul_gflops": median(m["probe_gflops"]), "raw_s": m["times"], "probe_gflops": m["probe_gflops"],
    }


def add_limits(rows: list[Row]) -> float:
    """FLOP-count limit of every row at the best matmul speed seen in this run (returned, GFLOP/s)."""
    peak = max(p for r in rows for p in r["probe_gflops"])
    for r in rows:
        r["limit_samples_per_s"] = peak / r["gflop_per_sample"]
        r["of_limit"] = r["samples_per_s"] / r["limit_samples_per_s"]
    return peak


STEP_COLUMNS: list[Column] = [
    ("config", "config", ""), ("data", "data", ""), ("batch", "batch", "d"),
    ("data_ms", "data ms", ".1f"), ("forward_ms", "fwd ms", ".1f"), ("loss_ms", "loss ms", ".2f"),
    ("backward_ms", "bwd ms", ".1f"), ("optimizer_ms", "opt ms", ".1f"), ("total_ms", "step ms", ".1f"),
    ("samples_per_s", "samples/s", ".2f"), ("gflop_per_sample", "GFLOP/sample", ".2f"),
    ("achieved_gflops", "GFLOP/s", ".1f"), ("matmul_gflops", "matmul GFLOP/s now", ".1f"),
    ("limit_samples_per_s", "limit samples/s", ".2f"), ("of_limit", "of limit", ".2f"),
]


# ---------------------------------------------------------------------------- one epoch: process vs Ray
def single_process_epoch(cfg: PretrainConfig, threads: int) -> dict[str, float]:
    """One epoch of the pretraining loop's step (same model, loader, LARS, schedule, ``pretrain_step``) in this
    process, measured the same way."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        model = to_memory_format(build_model(cfg), CHANNELS_LAST).train()
        loader = digits_loader(cfg.image_size, cfg.batch_size)
        lr = scale_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
        opt = build_optimizer(model, cfg.optimizer, lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        schedule = WarmupCosine(opt, lr, round(cfg.warmup_epochs * len(loader)), cfg.epochs * len(loader))
        precision = Precision.of(cfg.precision, "cpu")
        scaler = precision.scaler()
        data_wait, step = 0.0, 0
        t_epoch = t_ready = time.perf_counter()
        for v1, v2, _ in loader:
            data_wait += time.perf_counter() - t_ready
            schedule.apply(step)
            pretrain_step(model, opt, scaler, v1, v2, temperature=cfg.temperature, precision=precision,
                          device=torch.device("cpu"))
            step += 1
            t_ready = time.perf_counter()
        epoch = time.perf_counter() - t_epoch
        return {"samples_per_s": step * cfg.batch_size / epoch, "epoch_time_s": epoch, "data_wait_s": data_wait,
                "steps": step}
    finally:
        torch.set_num_threads(old)


def ray_epoch(workers: int, storage: str) -> dict[str, float]:
    from simclr_dist import pretrain

    summary = pretrain.run(parse_config([*TINY_ARGS, "--num-workers", str(workers), "--cpus-per-worker", "1",
                                         "--storage-path", storage, "--name", f"bench-step-w{workers}"]))
    h = summary["history"][-1]
    return {"samples_per_s": h["samples_per_s"], "epoch_time_s": h["epoch_time_s"], "data_wait_s": h["data_wait_s"],
            "steps": h["step"], "wall_time_s": summary["wall_time_s"]}


def scaling_rows(repeats: int = 2) -> list[Row]:
    """Single process (1, 2 threads) before and after the Ray runs (median over both), Ray with 1 and 2 workers."""
    import ray

    cfg = parse_config(TINY_ARGS).validate().resolved()
    model = SimCLRModel(cfg.arch, cifar_stem=cfg.cifar_stem, width=cfg.width)
    flops = 6 * forward_flops(model, (3, cfg.image_size, cfg.image_size))
    runs: dict[tuple[str, int, int], list[dict[str, float]]] = {}

    def single() -> None:
        for threads in (1, 2):
            runs.setdefault(("process", 1, threads), []).append(single_process_epoch(cfg, threads))

    for _ in range(repeats // 2):
        single()
    os.environ.pop("RAY_ADDRESS", None)  # never join a cluster that happens to be running here
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workers in (1, 2):
                runs[("ray", workers, 1)] = [ray_epoch(workers, tmp)]
    finally:
        ray.shutdown()
    for _ in range(repeats - repeats // 2):
        single()

    base = median([r["samples_per_s"] for r in runs[("process", 1, 1)]])
    rows = []
    for (mode, workers, threads), rs in runs.items():
        sps = median([r["samples_per_s"] for r in rs])
        rows.append({
            "mode": mode, "workers": workers, "threads_per_worker": threads, "global_batch": cfg.batch_size,
            "worker_batch": cfg.batch_size // workers, "steps": int(rs[0]["steps"]), "runs": len(rs),
            "epoch_time_s": median([r["epoch_time_s"] for r in rs]),
            "data_wait_s": median([r["data_wait_s"] for r in rs]),
            "samples_per_s": sps, "vs_process_1t": sps / base, "achieved_gflops": sps * flops / 1e9,
            "wall_time_s": rs[0].get("wall_time_s"),
        })
    return rows


SCALING_COLUMNS: list[Column] = [
    ("mode", "mode", ""), ("workers", "workers", "d"), ("threads_per_worker", "threads/worker", "d"),
    ("global_batch", "global batch", "d"), ("worker_batch", "worker batch", "d"), ("steps", "steps", "d"),
    ("runs", "runs", "d"), ("epoch_time_s", "epoch s", ".2f"), ("data_wait_s", "data wait s", ".2f"),
    ("samples_per_s", "samples/s", ".1f"), ("vs_process_1t", "vs 1 process 1 thread", ".2f"),
    ("achieved_gflops", "GFLOP/s", ".2f"), ("wall_time_s", "ray wall s", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.step", __doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device of the in-process steps (cpu or cuda)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray scaling table (~2 min)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info()
    device = torch.device(args.device)
    rows = []
    for cfg in QUICK if args.quick else FULL:
        for batch in cfg.batch_sizes:
            rows.append(step_row(cfg, batch, device))
            print(f"{cfg.name} {cfg.data} batch {batch}: {rows[-1]['samples_per_s']:.2f} samples/s",
                  file=sys.stderr, flush=True)
    peak = add_limits(rows)
    tables = {"steps": (rows, STEP_COLUMNS)}
    if not (args.quick or args.no_ray):
        with contextlib.redirect_stdout(sys.stderr):  # Ray's own prints stay out of the tables
            tables["scaling"] = (scaling_rows(), SCALING_COLUMNS)
    print(f"\nlimit = best {PROBE_N}^3 fp32 matmul of this run: {peak:.1f} GFLOP/s", flush=True)
    write_report("step", args.out, tables, machine=machine, optimizer="lars", temperature=TAU,
                 peak_matmul_gflops=peak, tiny_config=" ".join(TINY_ARGS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
