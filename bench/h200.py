"""One-GPU speed check of small-image SimCLR: ResNet-18 on Fashion-MNIST and CIFAR-size data, resident vs torch loader.

    python -m bench.h200 --out OUT/h200.json [--budget-s 270] [--batch 512]     # on the GPU (about 5 minutes)
    python -m bench.h200 --smoke [--out PATH.json]                               # CPU smoke run of the same code

Why: the resident loader (``simclr_dist.data.resident``) exists to keep a GPU fed on small images without CPU
workers; this measures whether it does, against the per-sample torch loader, on one card. Legs, in priority order
(the run starts no leg once ``--budget-s`` is spent, and caps each leg's timed part at ``--leg-s``):

    for data in (cifar-size, fashion-mnist): for mode in (eager, compile): for loader in (resident, torch)

The production step (``run.train.step.pretrain_step``: both views in one forward, NT-Xent, backward, LARS) on a
ResNet-18 (width 1, CIFAR stem: 3x3 stride-1 first conv, no max-pool), bf16 autocast, channels_last, batch
``--batch`` (512, SimCLR's CIFAR batch), temperature 0.5. Each row: pairs/s (one image, two views), ms per step,
data wait (host seconds inside the loader's ``next()`` over the timed seconds: for the resident loader that is the
time to queue its batched ops, for the torch loader the time waiting for DataLoader workers), median GPU
utilisation (NVML, sampled every 0.2 s while the leg runs), TFLOP/s and its fraction of the card's dense bf16 peak
(and of a bf16 matmul measured on the same card), seconds per epoch of the real training split (50,000 CIFAR
images, 60,000 Fashion-MNIST) and, for CIFAR-size, the ratio to the 11.9 s/epoch anchor (SimCLR ResNet-18 on
CIFAR-10, one A100). A final ``epoch`` row times one whole CIFAR-size epoch through the fastest resident leg.
The resident loader's claim to run sync-free on CUDA is checked with ``torch.cuda.set_sync_debug_mode("error")``.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` when installed, else synthetic grey 28 px
images; CIFAR-size data is always synthetic colour 32 px (CIFAR-10 is not shipped anywhere here). The report says
which (``data_source``). Synthetic images are served to both loaders under the dataset's name, so they run its
recipe and normalisation. Needs torch + torchvision only (no Ray, no FFCV, no pynvml: without it, utilisation is
read from ``nvidia-smi`` when present).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, format_table, machine_info, median, sync
from bench.gpu import matmul_tflops, peak_tflops
from bench.resident import serving, synthetic_colour
from simclr_dist.core.models import SimCLRModel, forward_flops
from simclr_dist.core.optim import build_optimizer, scale_lr
from simclr_dist.core.precision import Precision
from simclr_dist.data.datasets import DATASETS, TensorImageDataset, load_dataset
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from simclr_dist.run.train.step import pretrain_step

ANCHOR_S_PER_EPOCH = 11.9  # SimCLR ResNet-18 on CIFAR-10, one A100 (issue 21's reference point)
TRAIN_IMAGES = {"cifar10": 50_000, "fashion-mnist": 60_000}
GPU = dict(width=1.0, batch=512, warmup=5, steps=60, images=None, workers=max(1, min(14, (os.cpu_count() or 2) - 2)))
SMOKE = dict(width=0.125, batch=16, warmup=1, steps=2, images=64, workers=0)
COLUMNS = [("data", "data", ""), ("mode", "mode", ""), ("loader", "loader", ""), ("status", "status", ""),
           ("pairs_per_s", "pairs/s", ".0f"), ("step_ms", "ms/step", ".1f"), ("data_wait_share", "data wait", ".3f"),
           ("gpu_util", "GPU util", ".2f"), ("tflops", "TFLOP/s", ".1f"), ("of_peak", "of bf16 peak", ".3f"),
           ("s_per_epoch", "s/epoch", ".2f"), ("vs_anchor", "vs 11.9 s", ".2f"), ("warmup_s", "warm-up s", ".1f")]


def grey_images(n: int, size: int) -> TensorImageDataset:
    """Fashion-MNIST stand-in: grey 28 px images (a bright blob on black plus noise), three channels as one."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 1, 4, 4, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) > 0.3)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = (0.9 * x + 0.1 * torch.rand(n, 1, size, size, generator=g)).mul(255).round().to(torch.uint8)
    return TensorImageDataset(x.expand(-1, 3, -1, -1), torch.arange(n) % 10, [str(c) for c in range(10)])


def dataset(name: str, images: int | None) -> tuple[TensorImageDataset, str]:
    """(the images the loaders will read, where they came from)."""
    if name == "fashion-mnist":
        if images is None and DATASETS["fashion-mnist"].embedded:
            data = load_dataset("fashion-mnist", "train", image_size=28)
            assert isinstance(data, TensorImageDataset)
            return data, "fashion-mnist train (Debian package)"
        return grey_images(images or TRAIN_IMAGES[name], 28), "synthetic grey 28 px"
    return synthetic_colour(images or TRAIN_IMAGES[name], 32), "synthetic colour 32 px"


class Utilisation:
    """Median GPU utilisation while active: NVML (the production probe) if it works, else ``nvidia-smi``."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.read: Callable[[], float | None] = lambda: None
        self.source = "none"
        if device.type != "cuda":
            return
        from simclr_dist.run.train.metrics import NvmlProbe

        probe = NvmlProbe(device)
        if probe.available:
            self.read, self.source = (lambda: probe.read().get("simclr_gpu_utilization_ratio")), "nvml"
        elif shutil.which("nvidia-smi"):
            index = str(device.index or 0)

            def smi() -> float | None:
                out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip()) / 100 if out.returncode == 0 and out.stdout.strip() else None
            self.read, self.source = smi, "nvidia-smi"

    def __enter__(self) -> "Utilisation":
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            v = self.read()
            if v is not None:
                self.samples.append(v)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def median(self) -> float | None:
        return median(self.samples) if self.samples else None


def endless(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def check_sync_free(loader: Any) -> bool | str:
    """Whether three resident batches are queued with no host-device synchronisation (CUDA only)."""
    it = endless(loader)
    next(it)  # the epoch's order moves to the device first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            next(it)
        return True
    except RuntimeError as e:
        return f"no: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run_leg(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches: Iterator[Any], p: dict[str, Any],
            device: torch.device, leg_s: float, util: Utilisation) -> Row:
    """Warm-up steps (compilation, the loader's first batch), then up to ``p['steps']`` timed steps or ``leg_s``."""
    t0 = time.perf_counter()
    for _ in range(p["warmup"]):
        v1, v2, _ = next(batches)
        step(v1, v2)
    sync(device)
    warmup_s = time.perf_counter() - t0
    wait, steps, loss = 0.0, 0, None
    with util:
        sync(device)
        start = time.perf_counter()
        while steps < p["steps"] and (steps < 3 or time.perf_counter() - start < leg_s):
            t = time.perf_counter()
            v1, v2, _ = next(batches)
            wait += time.perf_counter() - t
            loss = step(v1, v2)
            steps += 1
        sync(device)
        elapsed = time.perf_counter() - start
    return {"warmup_s": warmup_s, "steps": steps, "step_ms": 1e3 * elapsed / steps,
            "pairs_per_s": steps * p["batch"] / elapsed, "data_wait_share": wait / elapsed,
            "gpu_util": util.median(), "loss": float(loss) if loss is not None else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.h200", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: $OUT/h200.json or results/h200.json)")
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU run of the same code (no compile)")
    ap.add_argument("--batch", type=int, default=None, help="images per step, two views each (default 512)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no leg after this many seconds")
    ap.add_argument("--leg-s", type=float, default=12.0, help="cap on each leg's timed steps, seconds")
    ap.add_argument("--skip", default="", help="comma list of legs' parts to leave out: compile, torch, fashion-mnist, "
                                               "cifar10, epoch")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: skipped (--smoke for the CPU smoke run)")
        return 0
    t_start = time.perf_counter()
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    p = dict(SMOKE if args.smoke else GPU)
    if args.batch:
        p["batch"] = args.batch
    skip = {s.strip() for s in args.skip.split(",") if s.strip()} | ({"compile"} if args.smoke else set())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)
    info: dict[str, Any] = {**machine_info(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    peak = peak_tflops(info["device"])
    if device.type == "cuda":
        info["matmul_bf16_tflops"] = matmul_tflops(device, torch.bfloat16, 8192)
    info["peak_bf16_tflops"] = peak
    util = Utilisation(device)
    info["utilisation_source"] = util.source
    precision = Precision.of("auto", device)
    rows: list[Row] = []
    sources: dict[str, str] = {}
    best: tuple[float, Callable[[], Any] | None] = (0.0, None)
    for name in ("cifar10", "fashion-mnist"):
        if name in skip:
            continue
        data, sources[name] = dataset(name, p["images"])
        size = int(data.images.shape[-1])
        torch.manual_seed(0)
        raw = SimCLRModel("resnet18", cifar_stem=True, width=p["width"]).to(device, memory_format=torch.channels_last)
        flops = 6 * forward_flops(raw, (3, size, size))  # per pair: 2 views x (forward + 2x backward)
        opt = build_optimizer(raw, "lars", scale_lr(0.3, p["batch"], "linear"), weight_decay=1e-6)
        scaler = precision.scaler()
        models = {"eager": raw}
        for mode in ("eager", "compile"):
            if mode in skip:
                rows.append({"data": name, "mode": mode, "status": "skipped"})
                continue
            model = raw if mode == "eager" else models.setdefault("compile", torch.compile(raw))

            def step(v1: torch.Tensor, v2: torch.Tensor, model: Any = model) -> torch.Tensor:
                return pretrain_step(model, opt, scaler, v1, v2, temperature=0.5, precision=precision, device=device,
                                     channels_last=True)

            for backend in ("resident", "torch"):
                row: Row = {"data": name, "mode": mode, "loader": backend, "batch": p["batch"], "px": size}
                if backend in skip or time.perf_counter() - t_start > args.budget_s:
                    rows.append({**row, "status": "skipped" + ("" if backend in skip else ": time budget")})
                    continue
                t0 = time.perf_counter()
                try:
                    with serving(data):
                        loader = build_pretrain_loader(LoaderSpec(
                            dataset=name, split="train", root="synthetic", image_size=size, augment=None,
                            jitter_strength=None, batch_size=p["batch"], rank=0, world_size=1, seed=0,
                            num_workers=p["workers"] if backend == "torch" else 0, pin_memory=device.type == "cuda",
                            backend=backend, device=str(device)))
                    if backend == "resident" and device.type == "cuda":
                        row["sync_free"] = check_sync_free(loader)
                    row.update(status="ok", **run_leg(step, endless(loader), p, device, args.leg_s, util))
                    row["tflops"] = row["pairs_per_s"] * flops / 1e12
                    row["of_peak"] = row["tflops"] / peak if peak else None
                    if info.get("matmul_bf16_tflops"):
                        row["of_matmul"] = row["tflops"] / info["matmul_bf16_tflops"]
                    row["s_per_epoch"] = TRAIN_IMAGES[name] / row["pairs_per_s"]
                    if name == "cifar10":
                        row["vs_anchor"] = ANCHOR_S_PER_EPOCH / row["s_per_epoch"]  # > 1: faster than the anchor
                        if backend == "resident" and row["pairs_per_s"] > best[0]:
                            best = (row["pairs_per_s"], lambda step=step, loader=loader: (step, loader))
                    del loader
                except Exception as e:  # noqa: BLE001 - a failed leg is a row; the others still run
                    traceback.print_exc()
                    row["status"] = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                row["seconds"] = time.perf_counter() - t0
                print(f"[h200] {name} {mode} {backend}: {row['status']} {row.get('pairs_per_s', 0):.0f} pairs/s "
                      f"({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if best[1] is not None and "epoch" not in skip and time.perf_counter() - t_start < args.budget_s:
        step, loader = best[1]()
        loader.set_epoch(99)
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for v1, v2, _ in loader:
            step(v1, v2)
            n += 1
        sync(device)
        s = time.perf_counter() - t0
        rows.append({"data": "cifar10", "mode": "epoch", "loader": "resident", "status": "ok", "steps": n,
                     "s_per_epoch": s, "pairs_per_s": n * p["batch"] / s,
                     "vs_anchor": None if args.smoke else ANCHOR_S_PER_EPOCH / s,  # a smoke epoch is 64 images
                     "note": f"one whole epoch ({n} steps of {p['batch']}) through the fastest resident leg"})
    print(json.dumps(info, default=str))
    print(format_table(rows, COLUMNS))
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("results")) / "h200.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "h200", "machine": info, "config": p, "data_source": sources, "smoke": args.smoke,
              "anchor_s_per_epoch": ANCHOR_S_PER_EPOCH, "seconds": time.perf_counter() - t_start, "rows": rows}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(not str(r.get("status", "")).startswith("FAILED") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
