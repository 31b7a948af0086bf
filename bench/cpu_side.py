"""The CPU side of the two-view pipeline at 224 px, against its limit (the JPEG decode) and torchvision.

    python -m bench.cpu_side [--quick] [--images N] [--sizes 224,128] [--workers T] [--out PATH.json]

What production runs on the CPU per image, and nothing else (flip, colour, grayscale and blur run on the device
in ``gpu_augment``, so they are excluded from every arm):

* ``ffcv``: ``FFCVPretrainLoader.cpu_batches()`` - FFCV reads the ``.beton``, decodes each JPEG once (at reduced
  IDCT scale when both crops allow it), makes two seeded crops resized to S, and assembles uint8 ``(B, 2, S, S, 3)``
  batches in its reused (pinned where CUDA exists) buffers; T numba threads.
* ``ffcv-area``: the same with ``resample="area"`` (FFCV's antialiased INTER_AREA resize instead of bilinear).
* ``decode``: the limit - only the full-scale JPEG decode of the same ``.beton`` bytes with the same library
  (FFCV's libjpeg-turbo ``imdecode``) and the same T threads (a numba ``prange`` over each batch).
* ``torchvision``: the usual CPU side of the torch path for the same job - a ``DataLoader`` with T worker processes,
  PIL decode of the JPEG files, two ``RandomResizedCrop(S)`` + ``RandomHorizontalFlip`` + uint8 tensor, collate.

The images are ImageNet-like JPEGs made here from the real photographs that scikit-learn and matplotlib ship
(random crops, sides 256-500 px each, quality 90), so the entropy-decode cost is that of photographs, not of
synthetic smooth noise; the ``.beton`` holds them re-encoded by ``simclr_dist.data.convert`` (``write_mode=jpg``,
quality 90). The arms run interleaved in one process, one epoch per call, median over the repeats: compare the
ratios, which the machine's load moves far less than the absolute rates.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import Column, Row, base_parser, interleaved, machine_info, median, write_report

COLUMNS: list[Column] = [
    ("arm", "arm", ""), ("px", "out px", "d"), ("threads", "threads", "d"), ("batch", "batch", "d"),
    ("images", "images/epoch", "d"), ("epoch_s", "epoch s", ".3f"), ("img_per_s", "img/s", ".1f"),
    ("img_per_s_per_core", "img/s/core", ".1f"), ("ms_per_img_core", "core-ms/img", ".3f"),
    ("vs_decode", "vs decode", ".3f"), ("vs_torchvision", "vs torchvision", ".2f"),
]
ARMS = ("decode", "ffcv", "ffcv-area", "torchvision")


# ---------------------------------------------------------------------------- data
def sample_photos() -> list[np.ndarray]:
    """The real photographs shipped inside installed dependencies (scikit-learn: 2 x 640x427, matplotlib: 512x600)."""
    import matplotlib
    import sklearn.datasets
    from PIL import Image

    paths = [Path(sklearn.datasets.__file__).parent / "images" / n for n in ("china.jpg", "flower.jpg")]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def make_photo_jpegs(root: Path, count: int, lo: int = 256, hi: int = 500, seed: int = 0,
                     classes: int = 10) -> dict[str, float]:
    """``root/train/cNN/xxxxx.jpg``: width and height each uniform in [lo, hi], cut from a photograph (a random box
    of the target aspect, 70-100% of the largest that fits, mirrored half the time), quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = sample_photos()
    pixels = nbytes = 0
    for i in range(count):
        photo = photos[i % len(photos)]
        ph, pw = photo.shape[:2]
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        fit = min(pw / w, ph / h) * rng.uniform(0.7, 1.0)
        cw, ch = max(1, int(w * fit)), max(1, int(h * fit))
        x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.LANCZOS)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:05d}.jpg"
        img.save(path, quality=90)
        pixels, nbytes = pixels + w * h, nbytes + path.stat().st_size
    return {"mean_px": pixels / count, "mean_kb": nbytes / count / 1e3, "bits_per_px": 8 * nbytes / pixels}


# ---------------------------------------------------------------------------- the limit: decode only
class DecodeOnly:
    """Full-scale decode of every JPEG in a single-file .beton, batch by batch, T numba threads (prange)."""

    def __init__(self, beton: str, batch: int, threads: int):
        import numba
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.libffcv import imdecode
        from ffcv.reader import Reader

        from simclr_dist.data.ffcv.decode import compiled

        reader = Reader(beton)
        meta = reader.metadata["f0"]  # field 0: image (convert writes image, label)
        if not (meta["mode"] == IMAGE_MODES["jpg"]).all():
            raise ValueError(f"{beton}: decode arm needs an all-JPEG .beton (write_mode=jpg)")
        table = reader.alloc_table
        size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self.ptrs = meta["data_ptr"].astype(np.int64)
        self.sizes = np.array([size_of[int(p)] for p in meta["data_ptr"]], np.int64)
        self.heights, self.widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
        self.mm = np.memmap(beton, np.uint8, mode="r").view(np.ndarray)
        self.batch, self.threads = batch, threads
        side = int(max(self.heights.max(), self.widths.max()))
        self.temp = np.empty((batch, side * side * 3), np.uint8)
        self.mean_kb = float(self.sizes.mean() / 1e3)
        self.epoch = 0
        imdecode_c = compiled(imdecode)

        @numba.njit(parallel=True, nogil=True)
        def decode_batch(mm, ptrs, sizes, heights, widths, indices, temp):
            for k in numba.prange(len(indices)):
                s = indices[k]
                h, w = np.uint32(heights[s]), np.uint32(widths[s])
                imdecode_c(mm[ptrs[s]:ptrs[s] + sizes[s]], temp[k], h, w, h, w, 0, 0, 1, 1, False, False)

        self.decode_batch = decode_batch

    def run_epoch(self) -> int:
        import numba

        numba.set_num_threads(self.threads)
        order = np.random.default_rng(self.epoch).permutation(len(self.ptrs))
        self.epoch += 1
        n = len(order) // self.batch * self.batch
        for lo in range(0, n, self.batch):
            self.decode_batch(self.mm, self.ptrs, self.sizes, self.heights, self.widths, order[lo:lo + self.batch],
                              self.temp)
        return n


# ---------------------------------------------------------------------------- torchvision's CPU side
class TorchvisionTwoView(torch.utils.data.Dataset):
    """PIL decode, then per view RandomResizedCrop + RandomHorizontalFlip + uint8 tensor (colour: on the device)."""

    def __init__(self, root: Path, size: int):
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2

        self.folder = ImageFolder(str(root / "train"))
        self.view = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                                v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img, label = self.folder[i]
        return self.view(img), self.view(img), label


def torchvision_loader(root: Path, size: int, batch: int, threads: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(TorchvisionTwoView(root, size), batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=threads, persistent_workers=True, pin_memory=torch.cuda.is_available())


def run_epoch(loader: Any) -> int:
    n = 0
    for batch in loader:
        n += len(batch[-1])
    return n


# ---------------------------------------------------------------------------- one output size
def ffcv_loader(beton: str, size: int, batch: int, threads: int, resample: str = "linear",
                scaled_decode: bool = True) -> Any:
    from simclr_dist.data.ffcv.loader import FFCVPretrainLoader
    from simclr_dist.data.loader import LoaderSpec

    return FFCVPretrainLoader(LoaderSpec(
        dataset="imagefolder", split="train", root=None, image_size=size, augment=None, jitter_strength=None,
        batch_size=batch, rank=0, world_size=1, seed=0, num_workers=threads, backend="ffcv", beton=beton,
        device="cpu", scaled_decode=scaled_decode, resample=resample))


def scaled_fraction(beton: str, size: int, crop_scale: tuple[float, float]) -> float:
    """Share of images (one epoch) that the two-view decoder decodes at reduced scale."""
    from ffcv.reader import Reader

    from simclr_dist.data.ffcv.decode import compiled_crop, decode_scale

    meta = Reader(beton).metadata["f0"]
    crop, seed = compiled_crop(crop_scale), np.uint64(12345)
    hits = 0
    for s, (h, w) in enumerate(zip(meta["height"], meta["width"])):
        h, w = np.uint32(h), np.uint32(w)
        _, _, h0, w0 = crop(seed, np.uint64(s), np.uint64(0), h, w)
        _, _, h1, w1 = crop(seed, np.uint64(s), np.uint64(1), h, w)
        hits += decode_scale(size, h0, w0, h1, w1, True) > 1
    return hits / len(meta)


def bench_size(beton: str, root: Path, size: int, batch: int, threads: int, repeats: int) -> list[Row]:
    decode = DecodeOnly(beton, batch, threads)
    ffcv = ffcv_loader(beton, size, batch, threads)
    area = ffcv_loader(beton, size, batch, threads, resample="area")
    tv = torchvision_loader(root, size, batch, threads)

    def ffcv_epoch(loader: Any) -> int:
        n = 0
        for views, _labels in loader.cpu_batches():
            n += len(views)
        return n

    counts: dict[str, int] = {}
    fns = {"decode": decode.run_epoch, "ffcv": lambda: ffcv_epoch(ffcv), "ffcv-area": lambda: ffcv_epoch(area),
           "torchvision": lambda: run_epoch(tv)}
    wrapped = {k: (lambda k=k, f=f: counts.__setitem__(k, f())) for k, f in fns.items()}
    times = interleaved(wrapped, repeats=repeats, warmup=1)  # warm-up: numba compilation, worker start, page cache
    rows = []
    for arm in ARMS:
        t = median(times[arm])
        rows.append({"arm": arm, "px": size, "threads": threads, "batch": batch, "images": counts[arm],
                     "epoch_s": t, "img_per_s": counts[arm] / t, "img_per_s_per_core": counts[arm] / t / threads,
                     "ms_per_img_core": 1e3 * t * threads / counts[arm], "times_s": times[arm]})
    by = {r["arm"]: r for r in rows}
    for r in rows:
        r["vs_decode"] = r["img_per_s"] / by["decode"]["img_per_s"]
        r["vs_torchvision"] = r["img_per_s"] / by["torchvision"]["img_per_s"]
    by["ffcv"]["scaled_decode_share"] = scaled_fraction(beton, size, ffcv.augment.crop_scale)
    by["decode"]["beton_mean_kb"] = decode.mean_kb
    del tv  # stops the persistent workers
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.cpu_side", __doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images per epoch (default: 512 quick, 2048 full)")
    parser.add_argument("--sizes", default=None, help="output sizes, comma list (default: 224; full run: 224,128)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (each gives two views)")
    parser.add_argument("--workers", type=int, default=None,
                        help="T: FFCV/decode threads = DataLoader worker processes (default: usable CPUs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per arm (default: 3 quick, 7 full)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the arms' own threads are the T workers; torch ops here are bookkeeping only
    threads = args.workers or len(os.sched_getaffinity(0))
    count = args.images or (512 if args.quick else 2048)
    sizes = [int(s) for s in (args.sizes or ("224" if args.quick else "224,128")).split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    machine = machine_info()
    from simclr_dist.data.ffcv.convert import ConvertSpec, convert

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-side-") as tmp:
        t0 = time.perf_counter()
        stats = make_photo_jpegs(Path(tmp), count)
        beton = str(Path(tmp) / "photos.beton")
        convert(ConvertSpec(dataset="imagefolder", split="train", data_root=tmp, out=beton, write_mode="jpg",
                            jpeg_quality=90, num_workers=threads, progress=False))
        print(f"{count} JPEGs: {stats['mean_px']:.0f} px, {stats['mean_kb']:.1f} kB, "
              f"{stats['bits_per_px']:.2f} bit/px; made and converted in {time.perf_counter() - t0:.1f}s", flush=True)
        for size in sizes:
            rows += bench_size(beton, Path(tmp), size, args.batch, threads, repeats)
            print(*(f"{r['arm']:>12} {size}px {r['img_per_s']:8.1f} img/s  vs decode {r['vs_decode']:.3f}"
                    for r in rows[-len(ARMS):]), sep="\n", flush=True)
    ratios = {f"{r['px']}px {r['arm']}": {"ffcv_over_decode": r["vs_decode"],
                                           "ffcv_over_torchvision": r["vs_torchvision"]}
              for r in rows if r["arm"].startswith("ffcv")}
    write_report("cpu_side", args.out, {"rows": (rows, COLUMNS)}, machine=machine, threads=threads, images=count,
                 jpegs=stats, ratios=ratios, quick=args.quick)
    for px, r in ratios.items():
        print(f"{px}: cpu_side/decode_limit = {r['ffcv_over_decode']:.3f}, "
              f"cpu_side/torchvision = {r['ffcv_over_torchvision']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
