"""SimCLR ResNet-50 224 px pretraining throughput on one CUDA device: samples/s and TFLOP/s vs the card's peak.

    python -m bench.gpu [--quick] [--out PATH.json] [--compile] [--loaders synthetic[,ffcv]] [--beton PATH]
                        [--time-budget-s 420]

The production step ``run.step.pretrain_step`` (both views in one forward, ``nt_xent``, backward, LARS) with bf16 autocast and
channels_last, fed by one or more input pipelines (``--loaders``, run in this order per batch size, each
leg from the same initial weights and a fresh optimizer):

* ``synthetic`` (the default): views made on the device once, so the number is the compute-only ceiling.
* ``ffcv``: the real input pipeline, ``FFCVPretrainLoader`` built through ``build_pretrain_loader`` (FFCV
  decodes + crops each view on the CPU, the rest of the recipe runs batched on the device), reading a
  ``.beton`` of generated JPEG images (random size in ``--beton-px``, converted once by
  ``simclr_dist.data.convert`` into a temp dir, or into/from ``--beton PATH``). Its row adds the data wait
  (time in the loader's ``next()``: waiting for FFCV's decode thread plus the batched augmentation; on CUDA
  measured after a device sync, see ``_run_steps``) per step and as a share of the timed time, and
  ``vs synthetic``: its samples/s over the synthetic row of the same batch size, measured in the same
  process. The loader's construction and first batch (FFCV's numba compilation, 5-20 s) are in the
  warm-up, never in the timed steps.

FLOP count per sample = ``forward_flops`` x 3 x 2 views; achieved TFLOP/s is compared with the card's dense
bf16 peak and with a bf16 matmul probe on the same card. Batch sizes run smallest first; the run stops
starting new work once ``--time-budget-s`` is spent, so the whole script stays under 8 minutes with the
default. An OOM stops at the last batch size that fit. Without CUDA it prints "no CUDA device: skipped" and
exits 0, unless ``--allow-cpu`` (a tiny smoke run of the same code paths).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    Column,
    Row,
    base_parser,
    machine_info,
    median,
    set_threads,
    sync,
    write_report,
)
from simclr_dist.core.models import SimCLRModel, forward_flops
from simclr_dist.core.optim import build_optimizer, scale_lr
from simclr_dist.core.precision import Precision
from simclr_dist.run.train.step import pretrain_step

TAU = 0.1
LOADERS = ("synthetic", "ffcv")
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
CPU_SMOKE = dict(arch="resnet50", image_size=32, width=0.125, batch_sizes=[2], steps=2, warmup=1, beton_px=[40, 56])
GPU_DEFAULT = dict(arch="resnet50", image_size=224, width=1.0, batch_sizes=[64, 128, 256], steps=30, warmup=5,
                   beton_px=[256, 320])
GPU_QUICK = dict(GPU_DEFAULT, batch_sizes=[128], steps=10, warmup=3)
DISTINCT_IMAGES = 256  # generated JPEGs; the rest of the folder is hard links to them (convert re-encodes each)


def parse_loaders(text: str) -> list[str]:
    """``"ffcv,synthetic"`` -> ``["synthetic", "ffcv"]``: known names, deduplicated, synthetic first (so ``ffcv``'s
    ratio has its baseline and the model is warm)."""
    names = {s.strip().lower() for s in text.split(",")} - {""}
    if not names or names - set(LOADERS):
        bad = sorted(names - set(LOADERS)) or ["(none)"]
        raise argparse.ArgumentTypeError(f"unknown loader {bad[0]!r}; choose from {', '.join(LOADERS)}, "
                                         "comma-separated")
    return [n for n in LOADERS if n in names]


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


# ---------------------------------------------------------------------------- the .beton
def _noise_field(rng: np.random.Generator, w: int, h: int, div: int) -> np.ndarray:
    """Uniform noise at 1/div of the size, upscaled bicubically: float (h, w, 3)."""
    from PIL import Image

    small = rng.integers(0, 256, size=(max(2, h // div), max(2, w // div), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)


def make_image_folder(root: Path, count: int, min_px: int, max_px: int, seed: int = 0, classes: int = 10) -> Path:
    """``root/train/cNN/xxxxx.jpg``, ``count`` JPEGs (q90) of random size in [min_px, max_px]: a smooth colour
    field plus texture and pixel noise (about 0.55 bytes/pixel, natural-photo-like decode work). Only the first
    ``DISTINCT_IMAGES`` are generated; the rest are hard links to them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    made: list[Path] = []
    for i in range(count):
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:06d}.jpg"
        if i >= DISTINCT_IMAGES:
            src = made[i % len(made)]
            try:
                os.link(src, path)
            except OSError:
                path.write_bytes(src.read_bytes())
            continue
        w, h = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))

        pixels = 0.6 * _noise_field(rng, w, h, 24) + 0.4 * _noise_field(rng, w, h, 3) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        made.append(path)
    return root


def prepare_beton(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Reuse ``--beton`` when it exists; else generate an image folder and convert it (into ``--beton`` or tmp)."""
    from ffcv.reader import Reader

    from simclr_dist.data.ffcv.convert import ConvertSpec, convert
    from simclr_dist.data.ffcv.beton import BetonError, inspect_beton, resolve_betons

    t0 = time.perf_counter()
    built, files = False, None
    if args.beton:  # a path, a list, a glob or a --shards set, as --beton of the pretraining CLI
        with contextlib.suppress(BetonError):
            files = resolve_betons(args.beton)
    if files is None:
        count = args.beton_images or max(64, max(args.batch_sizes) * (max(1, args.warmup) + args.steps + 1))
        lo, hi = sorted(args.beton_px)
        root = make_image_folder(tmp / "images", count, lo, hi)
        out = args.beton or str(tmp / f"bench-{count}-{lo}-{hi}px.beton")
        files = convert(ConvertSpec(dataset="imagefolder", split="train", data_root=str(root), out=out,
                                    write_mode="jpg", jpeg_quality=90, progress=False)).files
        built = True
    info = inspect_beton(files)
    size = sum(int(Reader(f).alloc_table["size"].sum()) for f in files)  # stored image bytes, no page padding
    return {"path": ",".join(files), "built": built, "images": info.num_samples, "min_side": info.min_side,
            "max_side": info.max_side, "bytes_per_image": size / info.num_samples,
            "prepare_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- one batch size
def _endless(loader: Any, stats: dict[str, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches over consecutive epochs (``stats["epochs"]`` counts the epochs started)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        stats["epochs"] = epoch + 1
        for v1, v2, _ in loader:
            yield v1, v2
        epoch += 1


def _run_steps(args: argparse.Namespace, device: torch.device, budget: Budget, batch: int,
               step: Callable[[torch.Tensor], torch.Tensor], next_x: Callable[[], torch.Tensor],
               settle: bool = False) -> Row:
    """Up to ``args.steps`` timed steps in chunks of 5 (at least one chunk, then only while budget is left).

    The data wait is the time in ``next_x()``. With ``settle`` the device is synchronised first (not counted as
    wait): the batched augmentation's boolean-mask indexing synchronises with the device anyway, so without
    this the wait would absorb the previous step's queued GPU work instead of the loader's own time.
    """
    done, elapsed, wait = 0, 0.0, 0.0
    while done < args.steps and (done == 0 or budget.left() > 0):
        chunk = min(5, args.steps - done)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(chunk):
            if settle:
                sync(device)
            t = time.perf_counter()
            x = next_x()
            wait += time.perf_counter() - t
            loss = step(x)
        sync(device)
        elapsed += time.perf_counter() - t0
        done += chunk
    return {"steps": done, "step_ms": elapsed / done * 1e3, "samples_per_s": done * batch / elapsed,
            "loss": float(loss), "data_wait_ms": wait / done * 1e3, "data_wait_share": wait / elapsed}


def _ffcv_leg(args: argparse.Namespace, batch: int, device: torch.device, budget: Budget, beton: str,
              step: Callable[[torch.Tensor], torch.Tensor], to_model: Callable[..., torch.Tensor]) -> Row:
    from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader

    t0 = time.perf_counter()
    loader = build_pretrain_loader(LoaderSpec(
        dataset="imagefolder", split="train", root=None, image_size=args.image_size, augment=None,
        jitter_strength=None, batch_size=batch, rank=0, world_size=1, seed=0, num_workers=args.ffcv_workers,
        pin_memory=device.type == "cuda", backend="ffcv", beton=beton, device=str(device)))
    stats = {"epochs": 0}
    batches = _endless(loader, stats)
    try:
        x = to_model(*next(batches))  # construction + numba compilation + the first batch
        first = time.perf_counter() - t0
        step(x)
        for _ in range(max(1, args.warmup) - 1):
            step(to_model(*next(batches)))
        sync(device)
        row: Row = {"warmup_s": time.perf_counter() - t0, "first_batch_s": first}
        epochs = stats["epochs"]
        row.update(_run_steps(args, device, budget, batch, step, lambda: to_model(*next(batches)),
                              settle=device.type == "cuda"))
        row.update(status="ok", decode_threads=loader.threads, steps_per_epoch=len(loader),
                   epochs_started=stats["epochs"] - epochs)  # > 0: an epoch start (pipeline refill) was timed
        return row
    finally:
        batches.close()  # stops FFCV's decode thread


def bench_batch(args: argparse.Namespace, batch: int, device: torch.device, budget: Budget,
                beton: dict[str, Any] | None) -> list[Row]:
    """One row per loader: samples/s of `batch` images (2 views each) per step after the warm-up (compilation of
    the model and of FFCV's pipeline included there). Every leg starts from the same weights and a fresh
    optimizer, so the legs differ only in where the views come from."""
    torch.manual_seed(0)
    raw = SimCLRModel(args.arch, width=args.width).to(device, memory_format=torch.channels_last).train()
    flops = 6 * forward_flops(raw, (3, args.image_size, args.image_size))
    initial = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    model = torch.compile(raw) if args.compile else raw
    opt: Any = None

    precision = Precision.of("bf16", device)
    scaler = precision.scaler()

    def step(x: torch.Tensor) -> torch.Tensor:  # x: [view 1; view 2], already on the device, channels_last
        v1, v2 = x.chunk(2)
        return pretrain_step(model, opt, scaler, v1, v2, temperature=TAU, precision=precision, device=device,
                             channels_last=True)

    def to_model(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:  # as train.py feeds the model
        return torch.cat([v1, v2]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    rows: list[Row] = []
    for loader in args.loaders:
        row: Row = {"batch": batch, "loader": loader, "compile": args.compile, "gflop_per_sample": flops / 1e9}
        if rows and any(r["status"] == "oom" for r in rows):
            rows.append({**row, "status": "skipped: oom"})
            continue
        if rows and budget.left() <= 0:
            rows.append({**row, "status": "skipped: time budget"})
            continue
        if loader == "ffcv" and beton.get("error"):
            rows.append({**row, "status": f"error: {beton['error']}"})
            continue
        raw.load_state_dict(initial)
        opt = build_optimizer(raw, args.optimizer, scale_lr(0.3, batch), weight_decay=1e-6)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if loader == "synthetic":
                x = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
                x = x.contiguous(memory_format=torch.channels_last)  # [view 1; view 2]
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    step(x)
                sync(device)
                row["warmup_s"] = time.perf_counter() - t0
                row.update(_run_steps(args, device, budget, batch, step, lambda x=x: x), status="ok")
                del row["data_wait_ms"], row["data_wait_share"]  # no loader: nothing to wait for
                del x
            else:
                row.update(_ffcv_leg(args, batch, device, budget, beton["path"], step, to_model))
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as e:  # noqa: BLE001 - recorded in the row; the other loaders still run
            if "out of memory" in str(e).lower():
                row["status"] = "oom"
            else:
                traceback.print_exc()
                row["status"] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        if row["status"] == "ok":
            row["tflops"] = row["samples_per_s"] * flops / 1e12
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            wait = f", data wait {row['data_wait_share']:.1%}" if "data_wait_share" in row else ""
            print(f"batch {batch} {loader}: {row['samples_per_s']:.1f} samples/s, {row['tflops']:.4g} TFLOP/s{wait}",
                  file=sys.stderr, flush=True)
        elif device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
    base = next((r for r in rows if r["loader"] == "synthetic" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["vs_synthetic"] = r["samples_per_s"] / base["samples_per_s"]
    return rows


COLUMNS: list[Column] = [
    ("batch", "batch", "d"), ("loader", "loader", ""), ("compile", "compile", ""), ("status", "status", ""),
    ("steps", "steps", "d"), ("warmup_s", "warmup s", ".1f"), ("step_ms", "step ms", ".1f"),
    ("samples_per_s", "samples/s", ".1f"), ("vs_synthetic", "vs synthetic", ".3f"),
    ("data_wait_ms", "data wait ms/step", ".1f"), ("data_wait_share", "wait share", ".3f"),
    ("gflop_per_sample", "GFLOP/sample", ".2f"), ("tflops", "TFLOP/s", ".4g"), ("of_peak", "of peak", ".3f"),
    ("of_matmul", "of matmul", ".3f"), ("limit_samples_per_s", "limit samples/s", ".0f"),
    ("peak_mem_gib", "mem GiB", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.gpu", __doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in warm-up)")
    parser.add_argument("--loaders", "--loader", dest="loaders", type=parse_loaders, default="synthetic",
                        metavar="synthetic[,ffcv]",
                        help="input pipelines, comma-separated, measured in one process per batch size: synthetic "
                             "(views made on the device once: the compute-only ceiling) and/or ffcv (the real "
                             "FFCVPretrainLoader on a .beton, augmentation on the device); default synthetic")
    parser.add_argument("--beton", default=None,
                        help="ffcv: an existing .beton to read, or where to write the generated one for later runs "
                             "(default: a temporary file, removed at exit)")
    parser.add_argument("--beton-images", type=int, default=None,
                        help="ffcv: images to generate (default: enough that warm-up + timed steps of the largest "
                             "batch fit in one epoch)")
    parser.add_argument("--beton-px", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="ffcv: generated image sides, random in [MIN, MAX] (default 256 320; 40 56 on CPU)")
    parser.add_argument("--ffcv-workers", type=int, default=0,
                        help="ffcv: decode threads (0: torch's intra-op threads, capped at the usable cores)")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="stop starting new work after this many seconds (default keeps the run under 8 min)")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run a tiny smoke test on the CPU")
    parser.add_argument("--arch", default=None, help="default resnet50")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 on CPU)")
    parser.add_argument("--width", type=float, default=None, help="default 1.0 (0.125 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="per-step images; default 64 128 256")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch size (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 5; ffcv: at least 1, its first batch compiles)")
    parser.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak (default: table)")
    args = parser.parse_args(argv)
    if args.beton_px is not None and min(args.beton_px) < 8:
        parser.error(f"--beton-px: sides must be >= 8 px, got {args.beton_px}")
    budget = Budget(args.time_budget_s)
    set_threads(args.threads)
    machine = machine_info()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: skipped")
        write_report("gpu", args.out, {"rows": ([], COLUMNS)}, machine=machine, skipped="no CUDA device",
                     loader=",".join(args.loaders), loaders=args.loaders)
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
    with contextlib.ExitStack() as stack:
        beton: dict[str, Any] | None = None
        if "ffcv" in args.loaders:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gpu-")))
            try:
                beton = prepare_beton(args, tmp)
                print(f"beton: {beton['images']} images, {beton['min_side']}-{beton['max_side']} px sides, "
                      f"{beton['bytes_per_image'] / 1e3:.1f} kB/image, {beton['prepare_s']:.1f} s "
                      f"({'built' if beton['built'] else 'reused'}) {beton['path']}", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - the synthetic rows are still worth having
                traceback.print_exc()
                beton = {"error": f"beton: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}
        for batch in sorted(args.batch_sizes):
            if rows and budget.left() <= 0:
                rows += [{"batch": batch, "loader": loader, "compile": args.compile, "status": "skipped: time budget"}
                         for loader in args.loaders]
                continue
            try:
                batch_rows = bench_batch(args, batch, device, budget, beton)
            except torch.OutOfMemoryError:  # outside a leg: the model itself
                batch_rows = [{"batch": batch, "loader": loader, "compile": args.compile, "status": "oom"}
                              for loader in args.loaders]
            for row in batch_rows:
                if row["status"] == "ok":
                    if peak:
                        row["of_peak"] = row["tflops"] / peak
                        row["limit_samples_per_s"] = peak * 1e12 / (row["gflop_per_sample"] * 1e9)
                    row["of_matmul"] = row["tflops"] / matmul
            rows += batch_rows
            if any(r["status"] == "oom" for r in batch_rows):
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                break
    extra: dict[str, Any] = dict(
        arch=args.arch, image_size=args.image_size, width=args.width, loader=",".join(args.loaders),
        loaders=args.loaders, precision="bf16 autocast", memory_format="channels_last", optimizer=args.optimizer,
        device=name or "cpu", peak_bf16_tflops=peak, matmul_bf16_tflops=matmul,
        elapsed_s=args.time_budget_s - budget.left())
    if beton is not None:
        extra["beton"] = {**beton, "temporary": not args.beton}
    print(f"\n{name or 'cpu'}: bf16 matmul probe {matmul:.4g} TFLOP/s, peak {peak or 'unknown'} TFLOP/s")
    write_report("gpu", args.out, {"rows": (rows, COLUMNS)}, machine=machine, **extra)
    return 1 if any(str(r["status"]).startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
