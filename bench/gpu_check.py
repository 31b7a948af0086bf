"""The GPU paths, checked and measured in one short run on one CUDA device (about 5 minutes on an H200).

    python -m bench.gpu_check [--out PATH.json] [--batch 128] [--budget-s 330] [--allow-cpu] [--skip compile]

Why one script: none of the GPU-only code paths (bf16 autocast, channels_last, ``torch.compile``, SyncBN, the
batched augmentation on CUDA, NVML metrics) can run in CI, so a lent GPU gets one prepared run that exercises all
of them with the production code (``run.step.pretrain_step``, ``core.precision``, ``data`` loaders) and needs
neither Ray nor FFCV. Each check is one row: ``ok`` or the reason it failed, and its figures:

1. ``eager`` / ``compile``: ResNet-50 at 224 px, bf16 autocast, channels_last, LARS; samples/s (two views per
   sample), TFLOP/s and share of the bf16 matmul speed measured on the same card; compile time apart.
2. ``syncbn``: the model converted to SyncBatchNorm in a one-rank NCCL process group; with one rank it must give
   the loss of plain BatchNorm from the same weights and inputs (a wrong reduction shows up as a different loss).
3. ``augment``: the batched view augmentation (flip, colour, gray, blur) on CUDA against the same operations on
   the CPU with equal parameters (max abs difference), and its claim to be sync-free checked by
   ``torch.cuda.set_sync_debug_mode("error")``; its images/s.
4. ``metrics``: GPU utilisation and memory read by the production NVML probe (``run.metrics.NvmlProbe``) while
   the model trains.
5. ``torch-loader``: the torchvision input path (JPEG decode + crops + CPU augmentation in DataLoader workers) on
   generated 256-500 px JPEGs feeding the same step; samples/s and the share of time spent waiting for data.

With ``--allow-cpu`` and no CUDA it runs a tiny smoke version of the same code (CI does, so the script is known to
run before a GPU is lent); checks that need CUDA say "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, format_table, machine_info, median, sync
from bench.gpu import make_image_folder, matmul_tflops, peak_tflops
from simclr_dist.core.models import SimCLRModel, forward_flops
from simclr_dist.core.optim import build_optimizer, scale_lr
from simclr_dist.core.precision import Precision
from simclr_dist.run.train.step import pretrain_step

GPU = dict(arch="resnet50", width=1.0, image_size=224, batch=128, warmup=3, steps=15, jpeg_px=(256, 500),
           jpeg_count=2048, loader_workers=min(12, (os.cpu_count() or 2) - 2))
CPU_SMOKE = dict(arch="resnet18", width=0.125, image_size=32, batch=4, warmup=1, steps=2, jpeg_px=(40, 56),
                 jpeg_count=16, loader_workers=0)
TAU = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    """The production step on a fresh ResNet + LARS, fed (2B, 3, S, S) batches; ``run`` times ``steps`` steps."""

    def __init__(self, p: dict[str, Any], device: torch.device, *, compile: bool = False, sync_bn: bool = False):
        torch.manual_seed(0)
        self.p, self.device = p, device
        model = SimCLRModel(p["arch"], width=p["width"])
        self.flops = 6 * forward_flops(model, (3, p["image_size"], p["image_size"]))
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.raw = model.to(device, memory_format=torch.channels_last).train()
        self.model = torch.compile(self.raw) if compile else self.raw
        self.opt = build_optimizer(self.raw, "lars", scale_lr(0.3, p["batch"]), weight_decay=1e-6)
        self.precision = Precision.of("auto", device)
        self.scaler = self.precision.scaler()

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        return pretrain_step(self.model, self.opt, self.scaler, v1, v2, temperature=TAU, precision=self.precision,
                             device=self.device, channels_last=True)

    def run(self, batches: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int) -> Row:
        """Timed steps; ``data_wait_s`` is the time spent in ``batches()`` after the device finished the step."""
        wait, losses = 0.0, []
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            sync(self.device)
            t = time.perf_counter()
            v1, v2 = batches()
            wait += time.perf_counter() - t
            losses.append(self.step(v1, v2))
        sync(self.device)
        elapsed = time.perf_counter() - t0
        sps = steps * self.p["batch"] / elapsed
        return {"steps": steps, "samples_per_s": sps, "tflops": sps * self.flops / 1e12, "step_ms": 1e3 * elapsed / steps,
                "data_wait_share": wait / elapsed, "loss": float(losses[-1])}


def synthetic(p: dict[str, Any], device: torch.device) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)
    v1, v2 = (torch.randn(p["batch"], 3, p["image_size"], p["image_size"], device=device, generator=g)
              for _ in range(2))
    return lambda: (v1, v2)


def check_throughput(p: dict[str, Any], device: torch.device, compile: bool) -> Row:
    t0 = time.perf_counter()
    trainer = Trainer(p, device, compile=compile)
    batches = synthetic(p, device)
    for _ in range(p["warmup"]):
        trainer.step(*batches())
    sync(device)
    row = {"warmup_s": time.perf_counter() - t0, **trainer.run(batches, p["steps"])}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def check_syncbn(p: dict[str, Any], device: torch.device) -> Row:
    """One-rank process group: SyncBatchNorm's loss must equal BatchNorm's from the same weights and inputs."""
    import torch.distributed as dist

    if device.type != "cuda":
        return {"status": "skipped: no CUDA (SyncBatchNorm runs on CUDA only)"}
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        batches = synthetic(p, device)
        losses = {}
        for name, sync_bn in (("bn", False), ("syncbn", True)):
            trainer = Trainer(p, device, sync_bn=sync_bn)
            losses[name] = [float(trainer.step(*batches())) for _ in range(3)]
        diff = max(abs(a - b) for a, b in zip(losses["bn"], losses["syncbn"]))
        ok = diff <= 1e-2 * max(abs(x) for x in losses["bn"])  # bf16 autocast: equal up to rounding
        return {"status": "ok" if ok else f"FAILED: loss differs by {diff:.3g}", "loss_bn": losses["bn"],
                "loss_syncbn": losses["syncbn"], "max_loss_diff": diff}
    finally:
        dist.destroy_process_group()


def check_augment(p: dict[str, Any], device: torch.device) -> Row:
    from simclr_dist.data.augment import AugmentConfig, blur_kernel
    from simclr_dist.data.ffcv.gpu_augment import (
        BatchedViewAugment,
        adjust_brightness,
        adjust_contrast,
        adjust_hue,
        adjust_saturation,
        gaussian_blur,
    )

    if device.type != "cuda":
        return {"status": "skipped: no CUDA"}
    g = torch.Generator().manual_seed(0)
    n, s = 64, p["image_size"]
    x = torch.rand(n, 3, s, s, generator=g)
    f = 0.5 + torch.rand(n, generator=g)
    h = torch.rand(n, generator=g) - 0.5
    sigma = 0.1 + 1.9 * torch.rand(n, generator=g)
    ops = {"brightness": lambda t, d: adjust_brightness(t, f.to(d).view(-1, 1, 1, 1)),
           "contrast": lambda t, d: adjust_contrast(t, f.to(d).view(-1, 1, 1, 1)),
           "saturation": lambda t, d: adjust_saturation(t, f.to(d).view(-1, 1, 1, 1)),
           "hue": lambda t, d: adjust_hue(t, h.to(d)),
           "blur": lambda t, d: gaussian_blur(t, sigma.to(d), blur_kernel(s))}
    diffs = {k: float((op(x.clone(), "cpu") - op(x.to(device), device).cpu()).abs().max()) for k, op in ops.items()}
    aug = BatchedViewAugment(AugmentConfig(("crop", "flip", "color", "gray", "blur"), s), device)
    images = torch.randint(0, 256, (p["batch"], 3, s, s), dtype=torch.uint8).pin_memory()
    gen = torch.Generator(device=device).manual_seed(0)
    aug(images, gen)  # warm-up
    sync(device)
    torch.cuda.set_sync_debug_mode("error")  # any host<->device sync inside now raises
    try:
        t0 = time.perf_counter()
        for _ in range(10):
            out = aug(images, gen)
        sync_free = True
    except RuntimeError as e:
        sync_free, out = False, None
        print(f"augment: not sync-free: {str(e).splitlines()[0]}", file=sys.stderr)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(device)
    per_s = 10 * p["batch"] / (time.perf_counter() - t0)
    ok = max(diffs.values()) < 1e-4 and sync_free and out is not None and bool(torch.isfinite(out).all())
    return {"status": "ok" if ok else "FAILED", "max_abs_diff_vs_cpu": diffs, "sync_free": sync_free,
            "images_per_s": per_s}


def check_metrics(p: dict[str, Any], device: torch.device) -> Row:
    """The production probe (``run.metrics.NvmlProbe``, what the Grafana GPU panels show) read while training."""
    from simclr_dist.run.train.metrics import NvmlProbe

    if device.type != "cuda":
        return {"status": "skipped: no CUDA"}
    probe = NvmlProbe(device)
    if not probe.available:
        return {"status": f"FAILED: {probe.reason}"}
    trainer, batches, reads = Trainer(p, device), synthetic(p, device), []
    for _ in range(p["steps"]):
        trainer.step(*batches())
        reads.append(probe.read())
    util = [r["simclr_gpu_utilization_ratio"] for r in reads]
    return {"status": "ok" if max(util) > 0 else "FAILED: utilisation read as 0", "gpu_util_median": median(util),
            "gpu_mem_used_gib": reads[-1]["simclr_gpu_memory_used_bytes"] / 2**30,
            "gpu_mem_total_gib": reads[-1]["simclr_gpu_memory_total_bytes"] / 2**30}


def check_torch_loader(p: dict[str, Any], device: torch.device, tmp: Path) -> Row:
    from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader

    t0 = time.perf_counter()
    root = make_image_folder(tmp / "jpegs", p["jpeg_count"], *p["jpeg_px"])
    made = time.perf_counter() - t0
    loader = build_pretrain_loader(LoaderSpec(
        dataset="imagefolder", split="train", root=str(root), image_size=p["image_size"], augment=None,
        jitter_strength=None, batch_size=p["batch"], rank=0, world_size=1, seed=0,
        num_workers=p["loader_workers"], pin_memory=device.type == "cuda", backend="torch"))
    loader.set_epoch(0)
    it = iter(loader)

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal it
        try:
            v1, v2, _ = next(it)
        except StopIteration:
            it = iter(loader)
            v1, v2, _ = next(it)
        return v1, v2

    trainer = Trainer(p, device)
    for _ in range(p["warmup"]):
        trainer.step(*batches())
    row = trainer.run(batches, min(p["steps"], max(1, len(loader) - p["warmup"])))
    return {**row, "loader_workers": p["loader_workers"], "jpegs_made_s": made}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: $OUT/gpu_check.json or "
                                                            "results/gpu_check.json)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (two views each); default 128")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining checks after this long")
    ap.add_argument("--allow-cpu", action="store_true", help="without CUDA: a tiny smoke run of the same code")
    ap.add_argument("--skip", default="", help="comma-separated checks to leave out (e.g. compile)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: skipped (use --allow-cpu for the smoke run)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    p = dict(GPU if cuda else CPU_SMOKE)
    if args.batch:
        p["batch"] = args.batch
    if cuda:
        torch.backends.cudnn.benchmark = True
    t_start, rows = time.perf_counter(), []
    info = {**machine_info(), "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    if cuda:
        info["matmul_bf16_tflops"] = matmul_tflops(device, torch.bfloat16, 8192)
        info["peak_bf16_tflops"] = peak_tflops(info["device"])
    with tempfile.TemporaryDirectory() as tmp:
        checks: list[tuple[str, Callable[[], Row]]] = [
            ("eager", lambda: check_throughput(p, device, compile=False)),
            ("compile", lambda: check_throughput(p, device, compile=True)),
            ("syncbn", lambda: check_syncbn(p, device)),
            ("augment", lambda: check_augment(p, device)),
            ("metrics", lambda: check_metrics(p, device)),
            ("torch-loader", lambda: check_torch_loader(p, device, Path(tmp))),
        ]
        skip = {x.strip() for x in args.skip.split(",") if x.strip()}
        for name, fn in checks:
            if name in skip:
                rows.append({"check": name, "status": "skipped: --skip"})
                continue
            if time.perf_counter() - t_start > args.budget_s:
                rows.append({"check": name, "status": "skipped: time budget"})
                continue
            t0 = time.perf_counter()
            try:
                row = {"status": "ok", **fn()}
            except Exception as e:  # noqa: BLE001 - a failed check is a row; the others still run
                traceback.print_exc()
                row = {"status": f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}
            row = {"check": name, **row, "seconds": time.perf_counter() - t0}
            if "tflops" in row and info.get("matmul_bf16_tflops"):
                row["of_matmul"] = row["tflops"] / info["matmul_bf16_tflops"]
            print(f"[gpu_check] {name}: {row['status']} ({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()
    columns = [("check", "check", ""), ("status", "status", ""), ("samples_per_s", "samples/s", ".1f"),
               ("tflops", "TFLOP/s", ".1f"), ("of_matmul", "of matmul", ".2f"), ("data_wait_share", "data wait",
               ".3f"), ("warmup_s", "warm-up s", ".1f"), ("seconds", "s", ".1f")]
    print(json.dumps(info, default=str))
    print(format_table(rows, columns))
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("results")) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "config": p, "checks": rows}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(not r["status"].startswith("FAILED") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
