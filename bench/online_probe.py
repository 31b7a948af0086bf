"""What ``--online-probe`` costs per pretraining step: the step with and without the probe, interleaved in one process.

    python -m bench.online_probe [--quick] [--out PATH.json] [--threads N] [--repeats N]

Per configuration: the production step (``simclr_dist.run.train.step.pretrain_step``: both views through the model,
NT-Xent, backward, LARS) on real digits batches (made once by the real loader and cycled, so loading is not in
either timing), against the same step followed by the probe's own step (``ProbeStream.update``: its labelled images
through the eval transform, the encoder in eval mode without gradients, one SGD step of the head), measured
round-robin (``bench.common.interleaved``) so the machine's load hits both alike. Reported: the median seconds of
each and their ratio; the probe's per-epoch evaluation (validation features + RankMe) once per epoch, in seconds.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from bench.common import Column, Row, base_parser, interleaved, machine_info, median, set_threads, write_report
from simclr_dist.config import PretrainConfig
from simclr_dist.core.optim import build_optimizer, scale_lr
from simclr_dist.core.precision import Precision, use_channels_last
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.train.online_probe import ProbeStream
from simclr_dist.run.train.step import pretrain_step

CONFIGS = {  # name: PretrainConfig fields (digits; the tiny one is the test suite's)
    "digits tiny (16 px, x0.125, batch 64)": dict(image_size=16, width=0.125, batch_size=64),
    "digits default (24 px, x0.25, batch 128)": dict(image_size=24, width=0.25, batch_size=128),
}
COLUMNS: list[Column] = [("config", "config", ""), ("step_ms", "step ms", ".1f"),
                         ("step_probe_ms", "step + probe ms", ".1f"), ("ratio", "ratio", ".3f"),
                         ("probe_eval_s", "probe eval s/epoch", ".2f"), ("steps_per_epoch", "steps/epoch", "d"),
                         ("repeats", "repeats", "d")]


def measure(name: str, fields: dict[str, Any], repeats: int) -> Row:
    cfg = PretrainConfig(dataset="digits", ray=False, online_probe=True, tracking="none", **fields).resolved()
    device = torch.device("cpu")
    channels_last = use_channels_last(cfg.channels_last)
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, scale_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling),
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scaler = Precision.of(cfg.precision, device).scaler()
    loader = build_pretrain_loader(LoaderSpec(
        dataset=cfg.dataset, split=cfg.split, root=cfg.data_root, image_size=cfg.image_size, augment=cfg.augment,
        jitter_strength=cfg.jitter_strength, batch_size=cfg.batch_size, rank=0, world_size=1, seed=0,
        backend="torch"))
    loader.set_epoch(0)
    batches = itertools.cycle([(v1, v2) for v1, v2, _ in itertools.islice(iter(loader), 4)])  # (B, 3, S, S) x 2
    probe = ProbeStream(cfg, model.feat_dim, device=device, channels_last=channels_last, rank=0, world=1)
    precision = Precision.of(cfg.precision, device)
    step = itertools.count()

    def plain() -> None:
        v1, v2 = next(batches)
        pretrain_step(model, optimizer, scaler, v1, v2, temperature=cfg.temperature, precision=precision,
                      device=device, channels_last=channels_last)

    def with_probe() -> None:
        plain()
        probe.update(model.encoder, next(step))

    times = interleaved({"plain": plain, "probe": with_probe}, repeats, warmup=2, device=device)
    t0 = time.perf_counter()
    probe.evaluate(model.encoder, repeats)
    eval_s = time.perf_counter() - t0
    a, b = median(times["plain"]), median(times["probe"])
    return {"config": name, "step_ms": 1e3 * a, "step_probe_ms": 1e3 * b, "ratio": b / a, "probe_eval_s": eval_s,
            "steps_per_epoch": len(loader), "repeats": repeats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser("bench.online_probe", __doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per configuration (each runs both)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info()
    configs = list(CONFIGS.items())[:1] if args.quick else list(CONFIGS.items())
    repeats = 3 if args.quick else args.repeats
    rows = [measure(name, fields, repeats) for name, fields in configs]
    return write_report("online_probe", args.out, {"online probe cost": (rows, COLUMNS)}, machine=machine)


if __name__ == "__main__":
    main()
