"""SimCLR ResNet-50 224 px pretraining throughput on one CUDA device: samples/s and TFLOP/s vs the card's peak.

    python -m bench.gpu [--quick] [--out PATH.json] [--compile] [--loader synthetic] [--time-budget-s 420]

The production step (both views in one forward, ``nt_xent``, backward, LARS) with bf16 autocast and
channels_last, on synthetic views made on the device once (``--loader synthetic``, the only loader for
now: the FFCV loader will be a second choice, so this number is the compute-only ceiling). FLOP count per
sample = ``forward_flops`` x 3 x 2 views; achieved TFLOP/s is compared with the card's dense bf16 peak
and with a bf16 matmul probe on the same card. Batch sizes run smallest first; the run stops starting new
work once ``--time-budget-s`` is spent, so the whole script stays under 8 minutes with the default.
Without CUDA it prints "no CUDA device: skipped" and exits 0, unless ``--allow-cpu`` (a tiny smoke run).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from bench.common import Column, Row, base_parser, machine_info, median, sync, write_report
from simclr_dist.loss import nt_xent
from simclr_dist.models import SimCLRModel, forward_flops
from simclr_dist.optim import build_optimizer, scale_lr

TAU = 0.1
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
CPU_SMOKE = dict(arch="resnet50", image_size=32, width=0.125, batch_sizes=[2], steps=2, warmup=1)
GPU_DEFAULT = dict(arch="resnet50", image_size=224, width=1.0, batch_sizes=[64, 128, 256], steps=30, warmup=5)
GPU_QUICK = dict(GPU_DEFAULT, batch_sizes=[128], steps=10, warmup=3)


def peak_tflops(device_name: str | None) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return tflops
    return None


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Median TFLOP/s of an n^3 matmul (what this card's matrix units deliver in practice)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times) / 1e12


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def bench_batch(args: argparse.Namespace, batch: int, device: torch.device, budget: Budget) -> Row:
    """Samples/s of `batch` images (2 views each) per step after `warmup` steps (compilation included there)."""
    torch.manual_seed(0)
    raw = SimCLRModel(args.arch, width=args.width).to(device, memory_format=torch.channels_last).train()
    flops = 6 * forward_flops(raw, (3, args.image_size, args.image_size))
    model = torch.compile(raw) if args.compile else raw
    opt = build_optimizer(raw, args.optimizer, scale_lr(0.3, batch), weight_decay=1e-6)
    x = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)  # [view 1; view 2], as train.py feeds the model

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, z = model(x)
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, TAU)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    row: Row = {"batch": batch, "compile": args.compile, "gflop_per_sample": flops / 1e9}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    done, elapsed = 0, 0.0
    while done < args.steps and (done == 0 or budget.left() > 0):
        chunk = min(5, args.steps - done)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(chunk):
            loss = step()
        sync(device)
        elapsed += time.perf_counter() - t0
        done += chunk
    sps = done * batch / elapsed
    row.update(steps=done, step_ms=elapsed / done * 1e3, samples_per_s=sps, tflops=sps * flops / 1e12,
               loss=float(loss), status="ok")
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


COLUMNS: list[Column] = [
    ("batch", "batch", "d"), ("compile", "compile", ""), ("status", "status", ""), ("steps", "steps", "d"),
    ("warmup_s", "warmup s", ".1f"), ("step_ms", "step ms", ".1f"), ("samples_per_s", "samples/s", ".1f"),
    ("gflop_per_sample", "GFLOP/sample", ".2f"), ("tflops", "TFLOP/s", ".4g"), ("of_peak", "of peak", ".3f"),
    ("of_matmul", "of matmul", ".3f"), ("limit_samples_per_s", "limit samples/s", ".0f"),
    ("peak_mem_gib", "mem GiB", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.gpu", __doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in warm-up)")
    parser.add_argument("--loader", choices=["synthetic"], default="synthetic",
                        help="input pipeline: synthetic views made on the device once (FFCV: not wired yet)")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="stop starting new work after this many seconds (default keeps the run under 8 min)")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run a tiny smoke test on the CPU")
    parser.add_argument("--arch", default=None, help="default resnet50")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 on CPU)")
    parser.add_argument("--width", type=float, default=None, help="default 1.0 (0.125 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="per-step images; default 64 128 256")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch size (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    parser.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak (default: table)")
    args = parser.parse_args(argv)
    budget = Budget(args.time_budget_s)
    machine = machine_info()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: skipped")
        write_report("gpu", args.out, {"rows": ([], COLUMNS)}, machine=machine, skipped="no CUDA device")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    defaults = (GPU_QUICK if args.quick else GPU_DEFAULT) if cuda else CPU_SMOKE
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    name = torch.cuda.get_device_name(0) if cuda else None
    peak = args.peak_tflops or peak_tflops(name)
    matmul = matmul_tflops(device, torch.bfloat16, 8192 if cuda else 256)
    rows: list[Row] = []
    for batch in sorted(args.batch_sizes):
        if rows and budget.left() <= 0:
            rows.append({"batch": batch, "compile": args.compile, "status": "skipped: time budget"})
            continue
        try:
            row = bench_batch(args, batch, device, budget)
        except torch.OutOfMemoryError:
            rows.append({"batch": batch, "compile": args.compile, "status": "oom"})
            torch.cuda.empty_cache()
            break
        if peak:
            row["of_peak"] = row["tflops"] / peak
            row["limit_samples_per_s"] = peak * 1e12 / (row["gflop_per_sample"] * 1e9)
        row["of_matmul"] = row["tflops"] / matmul
        rows.append(row)
        print(f"batch {batch}: {row['samples_per_s']:.1f} samples/s, {row['tflops']:.4g} TFLOP/s", file=sys.stderr,
              flush=True)
    extra: dict[str, Any] = dict(
        arch=args.arch, image_size=args.image_size, width=args.width, loader=args.loader, precision="bf16 autocast",
        memory_format="channels_last", optimizer=args.optimizer, device=name or "cpu", peak_bf16_tflops=peak,
        matmul_bf16_tflops=matmul, elapsed_s=args.time_budget_s - budget.left())
    print(f"\n{name or 'cpu'}: bf16 matmul probe {matmul:.4g} TFLOP/s, peak {peak or 'unknown'} TFLOP/s")
    write_report("gpu", args.out, {"rows": (rows, COLUMNS)}, machine=machine, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
