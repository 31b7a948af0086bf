"""Two-view loader throughput: FFCV (.beton) vs torchvision ImageFolder + PIL DataLoader, and the
augmentation-placement measurement behind the FFCV path's design.

    python -m bench.loader [--quick] [--what loader,aug,pretrain] [--workers N] [--out PATH.json]

Table "loader": JPEG files generated here with PIL (random 256-500 px images, output 224; and 96 px
images, output 96), read by (a) torchvision ``ImageFolder`` + PIL + the per-sample SimCLR view transform in a
``DataLoader`` with N worker processes and (b) ``FFCVPretrainLoader`` on a ``.beton`` converted from the same
files, with N decode threads. Both produce two views per image with the dataset's default recipe. One run
each: ``first_batch_s`` (construction + first batch: process start-up for torch, numba compilation for FFCV),
``img_per_s`` (source images/s after the first batch, two views each), ``epoch2_first_batch_s`` (is the
compilation cached across epochs?) and, for FFCV, ``new_process_first_batch_s``: the first batch again in a
fresh process (is it cached across runs?).

Table "aug": the ops after the crop, on a uint8 ``(B, S, S, 3)`` batch as FFCV decodes it, ms per batch:
FFCV's numba ops (flip, brightness, contrast, saturation - all FFCV has - then NormalizeImage) against the
same ops as batched torch tensors, plus the full recipe (hue, grayscale, blur added) batched and per sample
(torchvision v2, as the torch path runs it), all with the same thread count.

Table "pretrain" (not with --quick): ``simclr_dist.pretrain.run`` on digits (2 Ray workers, the default
digits config, ``--pretrain-epochs`` epochs, no kNN) with ``--loader torch`` and ``--loader ffcv`` (on a .beton of the
digits train split converted first, not timed): wall time of ``run`` and the first and last epoch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import Column, Row, base_parser, interleaved, machine_info, median, write_report
from simclr_dist.data.augment import build_view_transform, default_augment
from simclr_dist.data.datasets import dataset_info

LOADER_COLUMNS: list[Column] = [
    ("set", "set", ""), ("loader", "loader", ""), ("out_px", "out px", "d"), ("workers", "workers", "d"),
    ("batch", "batch", "d"), ("images", "images", "d"), ("first_batch_s", "first batch s", ".2f"),
    ("img_per_s", "img/s (2 views)", ".1f"), ("epoch_s", "epoch s", ".2f"),
    ("epoch2_first_batch_s", "epoch-2 first batch s", ".2f"),
    ("new_process_first_batch_s", "new-process first batch s", ".2f"), ("storage", "storage", ""),
]
AUG_COLUMNS: list[Column] = [
    ("px", "px", "d"), ("batch", "batch", "d"), ("threads", "threads", "d"), ("ops", "ops", ""),
    ("impl", "implementation", ""), ("ms", "ms/batch", ".2f"), ("img_per_s", "views/s", ".0f"),
]
PRETRAIN_COLUMNS: list[Column] = [
    ("loader", "loader", ""), ("epochs", "epochs", "d"), ("wall_s", "wall s", ".1f"),
    ("first_epoch_s", "epoch 1 s", ".2f"), ("last_epoch_s", "last epoch s", ".2f"),
    ("samples_per_s", "last epoch samples/s", ".1f"), ("data_wait_s", "last epoch data wait s", ".2f"),
]


# ---------------------------------------------------------------------------- data
def make_jpegs(root: Path, count: int, min_px: int, max_px: int, seed: int = 0, classes: int = 10) -> Path:
    """``root/train/cNN/xxxxx.jpg``: smooth random images (blurred noise) of random size in [min_px, max_px]."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
        small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=90)
    return root


# ---------------------------------------------------------------------------- loaders
def _spec(root: Path, beton: str | None, size: int, batch: int, workers: int) -> Any:
    from simclr_dist.data.loader import LoaderSpec

    return LoaderSpec(dataset="imagefolder", split="train", root=str(root), image_size=size, augment=None,
                      jitter_strength=None, batch_size=batch, rank=0, world_size=1, seed=0, num_workers=workers,
                      backend="ffcv" if beton else "torch", beton=beton, device="cpu")


def _epoch(loader: Any, epoch: int) -> tuple[float, float, int]:
    """(first batch s, rest s, images after the first batch) of one epoch."""
    loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
    t0 = time.perf_counter()
    first, n = None, 0
    for i, (v1, _v2, _y) in enumerate(loader):
        if i == 0:
            first = time.perf_counter()
        else:
            n += len(v1)
    end = time.perf_counter()
    return (first or end) - t0, end - (first or end), n


def time_ffcv(beton: str, root: Path, size: int, batch: int, workers: int) -> Row:
    from simclr_dist.data.ffcv.loader import FFCVPretrainLoader

    t0 = time.perf_counter()
    loader = FFCVPretrainLoader(_spec(root, beton, size, batch, workers))
    build = time.perf_counter() - t0
    first, rest, n = _epoch(loader, 0)
    first2, rest2, n2 = _epoch(loader, 1)
    return {"first_batch_s": build + first, "img_per_s": (n + n2) / (rest + rest2), "epoch_s": first2 + rest2,
            "epoch2_first_batch_s": first2, "images": len(loader) * batch}


def _first_batch_child(beton: str, root: str, size: int, batch: int, workers: int, q: Any) -> None:
    torch.set_num_threads(workers)
    from simclr_dist.data.ffcv.loader import FFCVPretrainLoader

    t0 = time.perf_counter()
    loader = FFCVPretrainLoader(_spec(Path(root), beton, size, batch, workers))
    next(iter(loader))
    q.put(time.perf_counter() - t0)


def time_ffcv_new_process(beton: str, root: Path, size: int, batch: int, workers: int) -> float:
    """Construction + first batch in a fresh interpreter (imports excluded): numba's compilation is per process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_first_batch_child, args=(beton, str(root), size, batch, workers, q))
    p.start()
    took = q.get(timeout=900)
    p.join()
    return took


class _Folder(torch.utils.data.Dataset):
    """torchvision ImageFolder with PIL decoding and the torch path's two-view transform."""

    def __init__(self, root: Path, size: int):
        from torchvision.datasets import ImageFolder

        from simclr_dist.data.augment import TwoViewTransform

        aug = default_augment(dataset_info("imagefolder"), None, image_size=size)
        self.folder = ImageFolder(str(root / "train"))
        self.transform = TwoViewTransform(build_view_transform(aug))

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img, label = self.folder[i]
        v1, v2 = self.transform(img)
        return v1, v2, label


def time_torch(root: Path, size: int, batch: int, workers: int) -> Row:
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    loader = DataLoader(_Folder(root, size), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    first, rest, n = _epoch(loader, 0)
    first = time.perf_counter() - t0 - rest
    first2, rest2, n2 = _epoch(loader, 1)
    return {"first_batch_s": first, "img_per_s": (n + n2) / (rest + rest2), "epoch_s": first2 + rest2,
            "epoch2_first_batch_s": first2, "images": len(loader) * batch}


def bench_loaders(quick: bool, workers: int, tmp: Path) -> list[Row]:
    from simclr_dist.data.ffcv.convert import ConvertSpec, convert
    from simclr_dist.data.ffcv.beton import inspect_beton

    count = 160 if quick else 2000
    sets = [("jpeg 256-500 px", 256, 500, 224, 32 if quick else 64), ("jpeg 96 px", 96, 96, 96, 32 if quick else 128)]
    rows: list[Row] = []
    for name, lo, hi, out, batch in sets:
        root = make_jpegs(tmp / f"{lo}-{hi}", count, lo, hi)
        beton = str(tmp / f"{lo}-{hi}.beton")
        res = convert(ConvertSpec(dataset="imagefolder", split="train", data_root=str(root), out=beton,
                                  num_workers=workers, progress=False))
        info = inspect_beton(res.files)
        mode = "jpg" if info.max_side * info.max_side * 3 > 128 * 128 * 3 else "raw"
        base = {"set": name, "out_px": out, "workers": workers, "batch": batch}
        rows.append({**base, "loader": "torchvision+PIL", **time_torch(root, out, batch, workers),
                     "storage": "jpeg files"})
        rows.append({**base, "loader": "ffcv", **time_ffcv(beton, root, out, batch, workers),
                     "new_process_first_batch_s": time_ffcv_new_process(beton, root, out, batch, workers),
                     "storage": f".beton ({mode}, {res.seconds:.0f}s to convert)"})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


# ---------------------------------------------------------------------------- augmentation placement
def bench_aug(quick: bool, thread_counts: list[int]) -> list[Row]:
    return [row for t in thread_counts for row in _bench_aug(quick, t)]


def _bench_aug(quick: bool, threads: int) -> list[Row]:
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import NormalizeImage, RandomBrightness, RandomContrast, RandomHorizontalFlip, RandomSaturation

    from simclr_dist.data.ffcv.gpu_augment import BatchedViewAugment, adjust_brightness, adjust_contrast, adjust_saturation

    Compiler.set_num_threads(threads)  # numba and torch alike
    rows: list[Row] = []
    info = dataset_info("imagenet")
    mean, std = np.array(info.mean) * 255, np.array(info.std) * 255
    for px, batch in ((32, 256), (96, 128), (224, 64)) if not quick else ((32, 64), (96, 32)):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(batch, px, px, 3), dtype=np.uint8)
        flip_buf = np.empty_like(x)
        norm_out = np.empty(x.shape, np.float32)
        idx = np.arange(batch)
        flip = Compiler.compile(RandomHorizontalFlip(0.5).generate_code())
        bcs = [Compiler.compile(op(0.8, p=1.0).generate_code())
               for op in (RandomBrightness, RandomContrast, RandomSaturation)]
        norm = Compiler.compile(NormalizeImage(mean, std, np.float32).generate_code_cpu())

        def numba_chain() -> torch.Tensor:
            y = flip(x, flip_buf)
            for op in bcs:
                y = op(y, None)
            return torch.from_numpy(norm(y, norm_out, idx))

        g = torch.Generator().manual_seed(0)
        m, s = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)

        def tensor_chain() -> torch.Tensor:
            t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255).contiguous()
            sel = (torch.rand(batch, generator=g) < 0.5).nonzero().flatten()
            t[sel] = t[sel].flip(-1)
            for op in (adjust_brightness, adjust_contrast, adjust_saturation):
                t = op(t, (0.2 + 1.6 * torch.rand(batch, generator=g)).view(-1, 1, 1, 1))
            return t.sub_(m).div_(s)

        full = default_augment(info, "crop,flip,color,gray,blur", image_size=px)
        batched = BatchedViewAugment(full, "cpu")
        per_sample = build_view_transform(default_augment(info, "flip,color,gray,blur", image_size=px))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)

        fns = {"ffcv numba": numba_chain, "torch batched": tensor_chain,
               "full batched": lambda: batched(torch.from_numpy(x), g),
               "full per-sample": lambda: torch.stack([per_sample(im) for im in xt])}
        times = interleaved(fns, repeats=3 if quick else 7, warmup=1)
        for name, ops in (("ffcv numba", "flip,bcs"), ("torch batched", "flip,bcs"),
                          ("full batched", "flip,color,gray,blur"), ("full per-sample", "flip,color,gray,blur")):
            ms = median(times[name]) * 1e3
            impl = {"ffcv numba": "FFCV numba ops (p=1)", "torch batched": "batched torch (p=1)",
                    "full batched": "batched torch (gpu_augment)",
                    "full per-sample": "per-sample torchvision v2"}[name]
            rows.append({"px": px, "batch": batch, "threads": threads, "ops": ops, "impl": impl, "ms": ms,
                         "img_per_s": batch / ms * 1e3})
        print(*rows[-4:], sep="\n", flush=True)
    return rows


# ---------------------------------------------------------------------------- end to end
def bench_pretrain(tmp: Path, epochs: int = 3) -> list[Row]:
    from simclr_dist import pretrain
    from simclr_dist.config import parse_config
    from simclr_dist.data.ffcv.convert import ConvertSpec, convert

    beton = str(tmp / "digits-train.beton")
    convert(ConvertSpec(dataset="digits", split="train", out=beton, progress=False))
    rows: list[Row] = []
    for loader in ("torch", "ffcv"):
        args = ["--epochs", str(epochs), "--knn-every", "-1", "--storage-path", str(tmp / "runs"),
                "--name", f"bench-{loader}", "--loader", loader] + (["--beton", beton] if loader == "ffcv" else [])
        s = pretrain.run(parse_config(args))
        h = s["history"]
        rows.append({"loader": loader, "epochs": epochs, "wall_s": s["wall_time_s"], "first_epoch_s": h[0]["epoch_time_s"],
                     "last_epoch_s": h[-1]["epoch_time_s"], "samples_per_s": h[-1]["samples_per_s"],
                     "data_wait_s": h[-1]["data_wait_s"]})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.loader", __doc__.splitlines()[0])
    parser.add_argument("--what", default="loader,aug,pretrain", help="comma list of: loader, aug, pretrain")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers = FFCV threads (default: usable CPUs)")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of each digits run (default digits run: 20)")
    args = parser.parse_args(argv)
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    if args.quick:
        what.discard("pretrain")
    workers = args.workers or len(os.sched_getaffinity(0))
    machine = machine_info()
    tables: dict[str, tuple[list[Row], list[Column]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        if "aug" in what:
            tables["aug"] = (bench_aug(args.quick, sorted({1, workers})), AUG_COLUMNS)
        if "loader" in what:
            tables["loader"] = (bench_loaders(args.quick, workers, Path(tmp)), LOADER_COLUMNS)
        if "pretrain" in what:
            tables["pretrain"] = (bench_pretrain(Path(tmp), args.pretrain_epochs), PRETRAIN_COLUMNS)
    write_report("loader", args.out, tables, machine=machine, workers=workers, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
