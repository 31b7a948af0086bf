"""channels_last vs contiguous: the decision behind the default memory format, measured on this machine.

    python -m bench.memory_format [--quick] [--threads N] [--repeats N] [--out PATH.json]

One protocol: for each network (the Fashion-MNIST CPU preset's ResNet-18 x1/4 at 28 px, the digits default at 24 px,
a full-width CIFAR ResNet-18 at 32 px), the three production code paths that run convolutions are timed in the
same process, round-robin (``bench.common.interleaved``: machine noise hits both formats alike):

- ``pretrain``: ``simclr_dist.run.train.step.pretrain_step`` (both views, NT-Xent, backward, LARS), pairs/s;
- ``classify``: ``classify_step`` on the encoder + linear head (cross-entropy, SGD), images/s;
- ``features``: ``simclr_dist.core.knn.extract_features``'s forward (eval mode, no grad), images/s.

Each row gives both formats' throughput, their ratio (``channels_last / contiguous``; > 1: channels_last is
faster) and, for the pretraining step, the fraction of the FLOP-count limit at the best fp32 matmul speed this
process reached (``bench.step.matmul_probe``). The project's default (``simclr_dist.core.precision.CHANNELS_LAST``)
follows the ratios of this table; docs/performance.md, "Memory format", holds the figures.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.common import Column, Row, base_parser, interleaved, machine_info, median, set_threads, write_report
from bench.step import matmul_probe
from simclr_dist.core.knn import extract_features
from simclr_dist.core.models import SimCLRModel, forward_flops
from simclr_dist.core.optim import build_optimizer, scale_lr
from simclr_dist.core.precision import Precision
from simclr_dist.run.train.step import classify_step, pretrain_step

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class Net:
    name: str
    image_size: int
    width: float
    batch: int


FULL = (Net("fmnist-cpu preset r18 x0.25 28px", 28, 0.25, 256), Net("digits r18 x0.25 24px", 24, 0.25, 64),
        Net("cifar r18 x1 32px", 32, 1.0, 64))
QUICK = (Net("r18 x0.125 16px", 16, 0.125, 16),)


class ImageFeatures(torch.utils.data.Dataset):
    """Random images as the (PIL-free) dataset ``extract_features`` reads: (tensor, label)."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 10

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def setups(net: Net, fmt: torch.memory_format, device: torch.device) -> dict[str, Any]:
    """The three callables of one memory format, each on its own model with identical weights."""
    channels_last = fmt == torch.channels_last
    precision = Precision.of("fp32", device)
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(net.batch, 3, net.image_size, net.image_size, generator=g) for _ in range(2))
    y = torch.randint(0, 10, (net.batch,), generator=g)

    torch.manual_seed(0)
    simclr = SimCLRModel("resnet18", cifar_stem=True, width=net.width).to(device, memory_format=fmt).train()
    opt = build_optimizer(simclr, "lars", scale_lr(0.3, net.batch), weight_decay=1e-6)
    scaler = precision.scaler()

    torch.manual_seed(0)
    base = SimCLRModel("resnet18", cifar_stem=True, width=net.width)
    clf = nn.Sequential(base.encoder, nn.Linear(base.feat_dim, 10)).to(device, memory_format=fmt).train()
    copt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
    cscaler = precision.scaler()

    torch.manual_seed(0)
    feat_enc = SimCLRModel("resnet18", cifar_stem=True, width=net.width).encoder.to(device, memory_format=fmt)
    images = ImageFeatures(4 * net.batch, net.image_size)

    return {
        "pretrain": lambda: pretrain_step(simclr, opt, scaler, v1, v2, temperature=0.5, precision=precision,
                                          device=device, channels_last=channels_last),
        "classify": lambda: classify_step(clf, copt, cscaler, v1, y, precision=precision, device=device,
                                          channels_last=channels_last),
        "features": lambda: extract_features(feat_enc, images, identity, batch_size=net.batch, device=device,
                                             channels_last=channels_last),
        "flops_per_pair": 6 * forward_flops(simclr, (3, net.image_size, net.image_size)),
        "features_per_call": len(images),
    }


def measure(net: Net, repeats: int, device: torch.device) -> list[Row]:
    per_fmt = {name: setups(net, fmt, device) for name, fmt in FORMATS.items()}
    rows: list[Row] = []
    probes: list[float] = []
    for path in ("pretrain", "classify", "features"):
        fns = {fmt: per_fmt[fmt][path] for fmt in FORMATS}
        times = interleaved(fns, repeats, warmup=1, device=device)
        probes.append(matmul_probe(device))
        items = per_fmt["contiguous"]["features_per_call"] if path == "features" else net.batch
        rate = {fmt: items / median(ts) for fmt, ts in times.items()}
        row: Row = {"network": net.name, "path": path, "batch": net.batch, "repeats": repeats,
                    "contiguous_per_s": rate["contiguous"], "channels_last_per_s": rate["channels_last"],
                    "ratio": rate["channels_last"] / rate["contiguous"], "raw_s": times}
        if path == "pretrain":
            row["gflop_per_pair"] = per_fmt["contiguous"]["flops_per_pair"] / 1e9
        rows.append(row)
    peak = max(probes)
    for row in rows:
        if "gflop_per_pair" in row:
            limit = peak / row["gflop_per_pair"]
            row.update(matmul_gflops=peak, limit_pairs_per_s=limit,
                       contiguous_of_limit=row["contiguous_per_s"] / limit,
                       channels_last_of_limit=row["channels_last_per_s"] / limit)
    return rows


COLUMNS: list[Column] = [
    ("network", "network", ""), ("path", "path", ""), ("batch", "batch", "d"),
    ("contiguous_per_s", "contiguous /s", ".1f"), ("channels_last_per_s", "channels_last /s", ".1f"),
    ("ratio", "ratio", ".2f"), ("contiguous_of_limit", "contig. of limit", ".2f"),
    ("channels_last_of_limit", "c_last of limit", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.memory_format", __doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per path (default 7; 2 with --quick)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (2 if args.quick else 7)
    rows = [r for net in (QUICK if args.quick else FULL) for r in measure(net, repeats, device)]
    report = write_report("memory_format", args.out, {"rows": (rows, COLUMNS)}, machine=machine,
                          threads=torch.get_num_threads(), device=device.type, repeats=repeats)
    faster = all(r["ratio"] > 1 for r in report["rows"])
    print(f"channels_last faster on every path: {faster}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
