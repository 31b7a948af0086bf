"""The classifier's training step on the CPU with each batch maker: the torch DataLoader vs the resident batches.

    python -m bench.classifier_loader [--quick] [--out PATH.json] [--threads N] [--repeats N]

What the Fashion-MNIST study's trained arms do each step, loading included: the next batch of the supervised recipe
(pad-crop + flip, :func:`simclr_dist.run.train.classify_loop.training_batches`, the production function, over all
54,000 fit images as at 100% of the labels) then :func:`simclr_dist.run.train.step.classify_step` (encoder + linear
head, cross-entropy, SGD) on the study's network (ResNet-18 x1/4, CIFAR stem, 28 px, batch 64, channels_last). The
two loaders are measured round-robin in one process (``bench.common.interleaved``), each with its own model, so the
machine's load hits both alike. Reported per loader: the median ms of a step and of the batch alone, and the step
ratio torch / resident (how much faster the study's classifier steps are with resident batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.common import Column, Row, base_parser, interleaved, machine_info, median, set_threads, write_report
from simclr_dist.config import PretrainConfig
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.core.models import Classifier
from simclr_dist.core.precision import Precision, to_memory_format, use_channels_last
from simclr_dist.data.splits import LabelSplit
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.train.classify_loop import training_batches
from simclr_dist.run.train.evaluation import load_eval_data
from simclr_dist.run.train.step import classify_step

LOADERS = ("torch", "resident")
COLUMNS: list[Column] = [("loader", "loader", ""), ("step_ms", "step ms (batch + train)", ".1f"),
                         ("batch_ms", "batch ms", ".2f"), ("ratio", "torch step / this step", ".3f"),
                         ("repeats", "repeats", "d")]


def measure(repeats: int, fit: int) -> list[Row]:
    device = torch.device("cpu")
    mcfg = PretrainConfig(dataset="fashion-mnist", width=0.25, image_size=28).resolved()
    data = load_eval_data(mcfg)
    idx = np.arange(fit)
    split = LabelSplit(fraction=1.0, subset_seed=0, subset=idx, fit=idx, val=None, val_split=None, folds=1)
    scfg = SupervisedConfig(dataset="fashion-mnist", batch_size=64, augment="padcrop,flip", loader_workers=0)
    channels_last = use_channels_last(None)
    precision = Precision.of("auto", device)
    steps, batch_only = {}, {}
    for kind in LOADERS:
        torch.manual_seed(0)
        encoder = build_model(mcfg).encoder
        model = to_memory_format(Classifier(encoder, encoder.feat_dim, data.num_classes), channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, nesterov=True)
        scaler = precision.scaler()
        loader, sampler, _, _ = training_batches(kind, scfg, data, split, "padcrop,flip", rank=0, world=1,
                                                 device=device)
        sampler.set_epoch(0)
        it = iter(loader)

        def step(it=it, model=model, optimizer=optimizer, scaler=scaler) -> None:
            x, y = next(it)  # (64, 3, 28, 28), (64,)
            classify_step(model, optimizer, scaler, x, y, precision=precision, device=device,
                          channels_last=channels_last)

        steps[kind] = step
        batch_only[kind] = lambda it=it: next(it)
    t_step = interleaved(steps, repeats, warmup=3, device=device)
    t_batch = interleaved(batch_only, repeats, warmup=1, device=device)
    base = median(t_step["torch"])
    return [{"loader": k, "step_ms": 1e3 * median(t_step[k]), "batch_ms": 1e3 * median(t_batch[k]),
             "ratio": base / median(t_step[k]), "repeats": repeats} for k in LOADERS]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser("bench.classifier_loader", __doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed rounds (each runs one step of every loader)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info()
    repeats = 5 if args.quick else args.repeats
    rows = measure(repeats, fit=2_000 if args.quick else 54_000)
    return write_report("classifier_loader", args.out, {"classifier step by batch maker": (rows, COLUMNS)},
                        machine=machine)


if __name__ == "__main__":
    main()
