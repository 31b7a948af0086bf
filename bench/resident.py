"""The resident loader against the torch loader (and FFCV where it can read the set) on the CPU at 28 and 32 px.

    python -m bench.resident [--quick] [--threads 1] [--repeats 5] [--batch 256] [--out PATH.json]
                             [--pretrain RUNS [--pretrain-epochs 3] [--only-pretrain]]

One protocol: for each set, every loader is built through ``build_pretrain_loader`` with the same spec (one rank,
batch ``--batch``, the dataset's default recipe, device cpu), its construction and first batch timed apart
(``first_batch_s``: FFCV's numba compilation is in it, and its conversion into the per-node cache when that is cold), then each timed call pulls
``--batches`` more batches from it (a new epoch starts when one ends), the loaders interleaved round-robin in one
process (``bench.common.interleaved``), median over ``--repeats`` rounds. Reported: pairs/s (one pair = one image,
two views) and the ratio to the torch loader of the same set, which is the number to read on a shared machine.

Sets: ``fashion-mnist 28 px`` (the Debian package; grey, crop + flip + brightness/contrast), ``digits 32 px``
(embedded; grey, crop + colour + grey) - both also read by FFCV from its per-node cache - and
``synthetic colour 32 px`` (CIFAR-size colour images made here, served to the torch and resident loaders as
``cifar10`` so they run the CIFAR recipe: crop, flip, colour jitter, grey; CIFAR-10 itself is not on this box,
and FFCV would need a ``.beton`` of it). The torch loader runs in the process (``loader_workers`` 0, the default).

``--pretrain RUNS`` adds the end-to-end table: the default digits pretraining (``--no-ray``, one thread) through
the resident and the FFCV loader, RUNS runs each, alternating, with epoch 1 (FFCV's compilation) apart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.common import Column, Row, base_parser, interleaved, machine_info, median, set_threads, write_report
from simclr_dist.data import resident as resident_mod
from simclr_dist.data import torch_loader as torch_loader_mod
from simclr_dist.data.datasets import DATASETS, TensorImageDataset
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader

COLUMNS: list[Column] = [
    ("set", "set", ""), ("px", "px", "d"), ("loader", "loader", ""), ("batch", "batch", "d"),
    ("first_batch_s", "build + first batch s", ".2f"), ("ms_per_batch", "ms/batch", ".1f"),
    ("pairs_per_s", "pairs/s", ".0f"), ("vs_torch", "vs torch", ".1f"),
]


def synthetic_colour(n: int, size: int) -> TensorImageDataset:
    """CIFAR-size colour images: random 4x4 colour fields upscaled, plus 15% pixel noise (so blur and crops act)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = (0.85 * x + 0.15 * torch.rand(n, 3, size, size, generator=g)).mul(255).round().to(torch.uint8)
    return TensorImageDataset(x, torch.arange(n) % 10, [str(c) for c in range(10)])


@contextlib.contextmanager
def serving(data: TensorImageDataset) -> Iterator[None]:
    """The torch and resident loaders read ``data`` whatever dataset they load (restored afterwards): the dataset's
    name still picks the recipe and the normalisation."""
    saved = resident_mod.load_dataset, torch_loader_mod.load_dataset
    fake = lambda *a, **kw: data  # noqa: E731
    resident_mod.load_dataset = torch_loader_mod.load_dataset = fake
    try:
        yield
    finally:
        resident_mod.load_dataset, torch_loader_mod.load_dataset = saved


def spec(dataset: str, px: int, batch: int, backend: str) -> LoaderSpec:
    return LoaderSpec(dataset=dataset, split="train", root="synthetic" if dataset == "cifar10" else None,
                      image_size=px, augment=None, jitter_strength=None, batch_size=batch, rank=0, world_size=1,
                      seed=0, num_workers=1 if backend == "ffcv" else 0, backend=backend, device="cpu")


class Puller:
    """Batches of one loader, epoch after epoch: ``pull(k)`` takes the next k."""

    def __init__(self, loader: Any):
        self.loader, self.epoch = loader, 0
        self.it = self._next_epoch()

    def _next_epoch(self) -> Iterator[Any]:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def pull(self, k: int) -> None:
        for _ in range(k):
            try:
                next(self.it)
            except StopIteration:
                self.it = self._next_epoch()
                next(self.it)


def bench_set(name: str, dataset: str, px: int, loaders: list[str], batch: int, batches: int,
              repeats: int) -> list[Row]:
    pullers: dict[str, Puller] = {}
    first: dict[str, float] = {}
    for backend in loaders:
        t0 = time.perf_counter()
        pullers[backend] = Puller(build_pretrain_loader(spec(dataset, px, batch, backend)))
        pullers[backend].pull(1)
        first[backend] = time.perf_counter() - t0
    fns: dict[str, Callable[[], object]] = {b: (lambda p=p: p.pull(batches)) for b, p in pullers.items()}
    times = interleaved(fns, repeats=repeats, warmup=0)
    rows = []
    for backend in loaders:
        s = median(times[backend])
        rows.append({"set": name, "px": px, "loader": backend, "batch": batch, "first_batch_s": first[backend],
                     "ms_per_batch": 1e3 * s / batches, "pairs_per_s": batches * batch / s,
                     "seconds": times[backend]})
    torch_rate = next(r["pairs_per_s"] for r in rows if r["loader"] == "torch")
    for r in rows:
        r["vs_torch"] = r["pairs_per_s"] / torch_rate
    print(*rows, sep="\n", flush=True)
    return rows


PRETRAIN_COLUMNS: list[Column] = [
    ("loader", "loader", ""), ("run", "run", "d"), ("epochs", "epochs", "d"), ("wall_s", "wall s", ".1f"),
    ("first_epoch_s", "epoch 1 s", ".1f"), ("later_epoch_s", "later epochs s (median)", ".1f"),
    ("later_samples_per_s", "later samples/s", ".0f"), ("data_wait_s", "later data wait s (median)", ".2f"),
]


def ffcv_or_not(args: Any) -> list[str]:
    return [] if args.no_ffcv else ["ffcv"]


def bench_pretrain(loaders: list[str], epochs: int, runs: int, tmp: str) -> list[Row]:
    """The default digits pretraining (24 px, ResNet-18 x1/4, batch 128) in this process (``--no-ray``, one thread)
    per loader, the loaders alternating run by run: wall time, epoch 1 (FFCV's compilation) and later epochs."""
    from simclr_dist import pretrain
    from simclr_dist.config import parse_config

    rows: list[Row] = []
    for run in range(runs):
        for loader in loaders if run % 2 == 0 else loaders[::-1]:
            summary = pretrain.run(parse_config([
                "--no-ray", "--threads", "1", "--loader", loader, "--epochs", str(epochs), "--knn-every", "-1",
                "--storage-path", tmp, "--name", f"{loader}-{run}", "--tracking", "none"]))
            h = summary["history"]
            rows.append({"loader": loader, "run": run, "epochs": epochs, "wall_s": summary["wall_time_s"],
                         "first_epoch_s": h[0]["epoch_time_s"],
                         "later_epoch_s": median([x["epoch_time_s"] for x in h[1:]]),
                         "later_samples_per_s": median([x["samples_per_s"] for x in h[1:]]),
                         "data_wait_s": median([x["data_wait_s"] for x in h[1:]])})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.resident", __doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (two views each)")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed call")
    parser.add_argument("--no-ffcv", action="store_true", help="leave FFCV out (e.g. where it is not installed)")
    parser.add_argument("--pretrain", type=int, default=0, metavar="RUNS",
                        help="also RUNS in-process digits pretraining runs per loader (resident, ffcv), alternating")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of each pretraining run")
    parser.add_argument("--only-pretrain", action="store_true", help="skip the loader table")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info()
    batch, batches, repeats = (32, 1, 2) if args.quick else (args.batch, args.batches, args.repeats)
    ffcv = [] if args.no_ffcv or args.quick else ["ffcv"]
    rows: list[Row] = []
    tables: dict[str, tuple[list[Row], list[Column]]] = {}
    if args.pretrain:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="bench-resident-") as tmp:
            tables["pretrain"] = (bench_pretrain(["resident", *ffcv_or_not(args)], args.pretrain_epochs,
                                                 args.pretrain, tmp), PRETRAIN_COLUMNS)
    if args.only_pretrain:
        write_report("resident", args.out, tables, machine=machine, threads=torch.get_num_threads())
        return 0
    if DATASETS["fashion-mnist"].embedded:
        rows += bench_set("fashion-mnist", "fashion-mnist", 28, ["torch", "resident", *ffcv], batch, batches, repeats)
    rows += bench_set("digits", "digits", 32, ["torch", "resident", *ffcv], batch, batches, repeats)
    with serving(synthetic_colour(1024 if args.quick else 10_000, 32)):
        rows += bench_set("synthetic colour (cifar10 recipe)", "cifar10", 32, ["torch", "resident"], batch, batches,
                          repeats)
    write_report("resident", args.out, {"rows": (rows, COLUMNS), **tables}, machine=machine, quick=args.quick,
                 threads=torch.get_num_threads(), batch=batch, batches_per_call=batches, repeats=repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
