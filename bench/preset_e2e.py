"""The Fashion-MNIST CPU preset's pretraining end to end, before and after the throughput work, in one process.

    python -m bench.preset_e2e [--quick] [--runs 2] [--epochs 3] [--subset 5120] [--threads 2] [--out PATH.json]

One protocol: the preset's pretraining recipe (``PRESET_PRETRAIN["fashion-mnist-cpu"]``: Fashion-MNIST at 28 px,
ResNet-18 x1/4 with the CIFAR stem, batch 256, the default augmentation) run through the production command
(``simclr_dist.pretrain.run``: loader, step, metrics, checkpoints every epoch) in this process (``--no-ray``,
``--threads`` intra-op threads), on a fixed class-balanced ``--subset`` of train so an epoch is short, once per
configuration per round, the configurations alternating round by round (the load of a shared box hits both):

- ``before``: what the preset ran at 9461f9e: contiguous memory format, the FFCV loader (``--loader ffcv``; the
  torch loader where FFCV is not installed);
- ``after``: today's defaults: channels_last and ``--loader auto`` (the resident loader for Fashion-MNIST).

Each row: wall time, epoch 1 (compilation, cold caches), the median of the later epochs' samples/s (pairs: an image
gives two views) and data wait, and that rate as a fraction of the FLOP-count limit of the pretraining step at the
best fp32 matmul speed this process reached (``bench.step.matmul_probe``, probed between runs with the same
threads). The summary's ``speedup`` is after/before of the later-epoch medians over all rounds.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import torch

from bench.common import Column, Row, base_parser, machine_info, median, set_threads, write_report
from bench.step import matmul_probe
from simclr_dist import pretrain
from simclr_dist.config import parse_config
from simclr_dist.config.experiments import PRESET_PRETRAIN
from simclr_dist.core.models import forward_flops

COLUMNS: list[Column] = [
    ("config", "config", ""), ("loader", "loader", ""), ("memory_format", "format", ""), ("run", "run", ""),
    ("wall_s", "wall s", ".1f"), ("first_epoch_s", "epoch 1 s", ".1f"), ("later_epoch_s", "later epochs s", ".1f"),
    ("later_samples_per_s", "later samples/s", ".1f"), ("data_wait_s", "data wait s/epoch", ".2f"),
    ("of_limit", "of FLOP limit", ".2f"),
]
SUMMARY: list[Column] = [
    ("config", "config", ""), ("runs", "runs", ""), ("samples_per_s", "later samples/s (median)", ".1f"),
    ("of_limit", "of FLOP limit", ".2f"), ("speedup", "vs before", ".2f"),
]


def preset_args() -> list[str]:
    """The preset's pretraining flags that define the network and the data (not its Ray layout or epochs)."""
    words = PRESET_PRETRAIN["fashion-mnist-cpu"][1].split()
    keep = {"--dataset", "--image-size", "--width", "--batch-size"}
    return [w for i, w in enumerate(words) if w in keep or (i > 0 and words[i - 1] in keep)]


def configs(before_loader: str) -> dict[str, list[str]]:
    return {"before": ["--no-channels-last", "--loader", before_loader], "after": ["--loader", "auto"]}


def flop_per_pair(args: list[str]) -> float:
    """Forward + backward (3x forward) of both views (2x) of one image through the network ``args`` define."""
    from simclr_dist.run.store.weights import build_model

    cfg = parse_config([*args, "--no-ray"]).resolved()  # resolved: the stem the run trains (CIFAR stem at 28 px)
    return 6.0 * forward_flops(build_model(cfg), (3, cfg.image_size, cfg.image_size))


def run_once(name: str, flags: list[str], base: list[str], epochs: int, subset: int, threads: int, run: int,
             tmp: str) -> Row:
    cfg = parse_config([
        *base, *flags, "--no-ray", "--threads", str(threads), "--epochs", str(epochs), "--train-subset", str(subset),
        "--knn-every", "-1", "--tracking", "none", "--storage-path", tmp, "--name", f"{name}-{run}"])
    summary = pretrain.run(cfg)
    h = summary["history"]
    later = h[1:] or h
    return {"config": name, "loader": cfg.resolved().loader, "run": run,
            "memory_format": "contiguous" if "--no-channels-last" in flags else "channels_last",
            "wall_s": summary["wall_time_s"], "first_epoch_s": h[0]["epoch_time_s"],
            "later_epoch_s": median([x["epoch_time_s"] for x in later]),
            "later_samples_per_s": median([x["samples_per_s"] for x in later]),
            "data_wait_s": median([x["data_wait_s"] for x in later])}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("bench.preset_e2e", __doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="rounds; each runs both configurations (default 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; epoch 1 is reported apart")
    parser.add_argument("--subset", type=int, default=5120, help="train images per epoch (class-balanced)")
    parser.add_argument("--before-loader", default=None, help="the 'before' loader (default: ffcv if installed, "
                                                                 "else torch)")
    args = parser.parse_args(argv)
    threads = args.threads or 2
    set_threads(threads)
    if args.quick:  # the smoke test: a tiny network, one short round
        args.runs, args.epochs, args.subset = 1, 2, 512
    machine = machine_info()
    base = preset_args() + (["--width", "0.125", "--image-size", "16", "--batch-size", "64"] if args.quick else [])
    before_loader = args.before_loader or ("ffcv" if importlib.util.find_spec("ffcv") else "torch")
    flops = flop_per_pair(base)
    rows: list[Row] = []
    peak = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            order = list(configs(before_loader).items())
            for name, flags in order if run % 2 == 0 else order[::-1]:
                peak = max(peak, matmul_probe(torch.device("cpu")))
                rows.append(run_once(name, flags, base, args.epochs, args.subset, threads, run, tmp))
                print(rows[-1], flush=True)
    limit = peak * 1e9 / flops  # pairs/s at the matmul speed
    for r in rows:
        r["of_limit"] = r["later_samples_per_s"] / limit
    before = median([r["later_samples_per_s"] for r in rows if r["config"] == "before"])
    summary = []
    for name in ("before", "after"):
        mine = [r for r in rows if r["config"] == name]
        rate = median([r["later_samples_per_s"] for r in mine])
        summary.append({"config": name, "runs": len(mine), "samples_per_s": rate, "of_limit": rate / limit,
                        "speedup": rate / before})
    write_report("preset_e2e", args.out, {"rows": (rows, COLUMNS), "summary": (summary, SUMMARY)},
                 machine=machine, threads=threads, preset_args=base, epochs=args.epochs, subset=args.subset,
                 gflop_per_pair=flops / 1e9, matmul_gflops=peak, limit_pairs_per_s=limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
