"""The experiments driver's configuration, its per-dataset defaults and the named presets of the study.

Why presets: the study's fairness rules (same steps at every label fraction, the same LR x weight-decay grid for
every trained arm, several seeds) are fixed in code; what changes with the machine is the budget. A preset names a
budget that was measured to fit (see docs/performance.md) and its pretraining run, so a coordinator can start that
pretraining early and the study reuses it by name. Fields left ``None`` take the preset's value, else the dataset's
default (:data:`DATASET_DEFAULTS`); a flag given on the command line always wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from simclr_dist.config.base import FORMATS, JobConfig, bad, flag, parse_weights_spec
from simclr_dist.config.evaluate import (
    DEFAULT_L2_GRID,
    check_fractions,
    check_l2,
    dataset_names,
    parse_floats,
    parse_names,
)

ARMS = ("linear", "finetune", "supervised")
BASELINES = ("pixels", "random", "knn")  # logistic regression on raw pixels, random-init encoder, kNN of each encoder

# The pretraining run of each preset: explicit and stable, so a finished run of the same name is reused.
PRESET_PRETRAIN = {
    "fashion-mnist-cpu": ("simclr-fashion-mnist-cpu",
                          "--dataset fashion-mnist --image-size 28 --width 0.25 --batch-size 256 --epochs 6 "
                          "--num-workers 2 --cpus-per-worker 1 --knn-every -1"),
    "fashion-mnist-gpu": ("simclr-fashion-mnist-gpu",
                          "--dataset fashion-mnist --image-size 28 --width 1.0 --batch-size 1024 --epochs 500 "
                          "--num-workers 4 --use-gpu --knn-every 50"),
}
PRESETS: dict[str, dict[str, Any]] = {
    # ~100 min on 2 CPU cores, pretraining included (measured step times: docs/performance.md)
    "fashion-mnist-cpu": dict(dataset="fashion-mnist", fractions="0.01,0.1", small_fraction=0.1, seeds=3,
                              steps=300, batch_size=64, lr_grid="0.1,0.4", wd_grid="0,5e-4", ray=False,
                              threads=2),
    # the paper-scale study for a GPU cluster: full-width ResNet-18, 500 pretraining epochs, 5 seeds
    "fashion-mnist-gpu": dict(dataset="fashion-mnist", fractions="0.01,0.1,1", small_fraction=0.1, seeds=5,
                              steps=5000, batch_size=256, lr_grid="0.05,0.2,0.8", wd_grid="0,5e-4", ray=True,
                              num_workers=1, use_gpu=True),
}
# Defaults of the fields a preset sets, per dataset (others: "*").
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(fractions="0.1", small_fraction=0.1, seeds=2, steps=120, batch_size=64, lr_grid="0.1,0.4",
                   wd_grid="0,5e-4", ray=False, threads=1),
    "fashion-mnist": PRESETS["fashion-mnist-cpu"],
    "*": dict(fractions="0.01,0.1", small_fraction=0.1, seeds=3, steps=2000, batch_size=256, lr_grid="0.05,0.2",
              wd_grid="0,5e-4", ray=True, threads=1),
}
PRESET_FIELDS = ("dataset", "fractions", "small_fraction", "seeds", "steps", "batch_size", "lr_grid", "wd_grid",
                 "ray", "threads", "num_workers", "use_gpu")


@dataclass
class ExperimentsConfig(JobConfig):
    preset: str | None = flag(None, "a named study: fashion-mnist-cpu (all of it, pretraining included, in ~100 min "
                                  "on 2 CPU cores), fashion-mnist-gpu (paper scale, for a GPU cluster); flags given "
                                  "as well override the preset's", choices=tuple(PRESETS), what="preset")
    checkpoint: str | None = flag(None, "the SimCLR checkpoint directory (local path, s3:// or gs:// URI)")
    run: str | None = flag(None, "a pretraining run STORAGE/NAME: its latest complete checkpoint, pretrained (or "
                               "finished) first when it has none (default: ./runs/simclr-<dataset>-resnet18, the run "
                               "`make demo` writes; a preset names its own)")
    pretrained: str | None = flag(None, "an imported encoder FORMAT:PATH_OR_URI instead of a SimCLR checkpoint, FORMAT "
                                      f"one of {', '.join(FORMATS)} (see simclr_dist.run.store.pretrained); needs --dataset "
                                      "except for simclr-dist")
    strict: bool = flag(True, "with --pretrained: refuse a partial load (any missing/unexpected key or shape "
                            "mismatch); --no-strict loads the matching tensors and warns")
    image_size: int | None = flag(None, "with --pretrained: resolution (default: a simclr-dist checkpoint's on its own "
                                      "dataset, else the dataset's: 224 imagenet, 96 stl10, 32 cifar, 24 digits)", ge=8)
    pretrain: bool = flag(False, "pretrain (or finish) the --run with simclr_dist.pretrain before the experiments, "
                               "even if it already has a checkpoint")
    pretrain_args: str | None = flag(None, "extra simclr_dist.pretrain flags for that pretraining, e.g. '--epochs 10' "
                                         "(a preset gives its own)")
    dataset: str | None = flag(None, "dataset (default: the checkpoint's; digits when pretraining a new run; required "
                                   "with --pretrained except for simclr-dist)", choices=dataset_names, what="dataset")
    data_root: str | None = flag(None, "dataset directory on this machine (default: the pretraining run's)")
    out: str | None = flag(None, "output directory, local or storage URI (default: ./runs/experiments-<dataset>, "
                               "./runs/experiments-<preset>; with --pretrained ./runs/experiments-<dataset>-<format>-"
                               "<file>)")
    # the protocol
    fractions: str | None = flag(None, "label fractions every arm is trained on, each in (0, 1] (default: digits "
                                     "0.1; else 0.01,0.1); the supervised arm on all labels (Experiment B) is "
                                     "always added")
    small_fraction: float | None = flag(None, "Experiment B's small labelled set (added to the fractions if "
                                            "missing; default 0.1)", gt=0, le=1)
    arms: str = flag(",".join(ARMS), f"comma-separated trained/probed arms: {', '.join(ARMS)}")
    baselines: str = flag(",".join(BASELINES), "comma-separated baselines on the same subsets: pixels (logistic "
                                               "regression on raw pixels), random (the randomly initialised encoder: "
                                               "linear probe and kNN), knn (kNN of the SimCLR encoder); '' for none")
    seeds: int | None = flag(None, "replicates per fraction (default: digits 2, else 3); replicate r draws its "
                                 "label subset with --subset-seed + r and its init/data order with --seed + r", ge=1)
    subset_seed: int = flag(0, "first seed of the label subsets (shared by every arm of a replicate)")
    seed: int = flag(0, "first seed of the initialisations, data order and augmentation")
    steps: int | None = flag(None, "optimiser steps of every trained arm at every fraction (the same budget; epochs "
                                 "grow as the subset shrinks); default: measured per preset/dataset", ge=1)
    batch_size: int | None = flag(None, "global batch size of the trained arms (capped at the label count; the peak "
                                      "LR keeps using this nominal batch)", ge=1)
    lr_grid: str | None = flag(None, "learning rates per 256 images tried by every trained arm (default 0.1,0.4)")
    wd_grid: str | None = flag(None, "weight decays tried by every trained arm (default 0,5e-4)")
    val_fraction: float = flag(0.2, "share of each labelled subset held out for model selection (k-fold when a "
                                    "class has fewer than 10 labels)", gt=0, le=0.5)
    l2_grid: str = flag(",".join(f"{v:g}" for v in DEFAULT_L2_GRID), "L2 strengths of the linear probes' sweep")
    knn_k: str = flag("20,200", "neighbours of the kNN baselines")
    # where the trained arms run
    ray: bool | None = flag(None, "train the arms under Ray Train (--ray) or in this process (--no-ray); default: "
                                "in-process on digits and the CPU preset (a Ray worker group per arm costs more than "
                                "the arm), Ray elsewhere")
    num_workers: int | None = flag(None, "Ray Train workers per trained arm (default 2)", ge=1)
    cpus_per_worker: float = flag(1.0, "CPUs Ray reserves for each worker (also its torch thread count)", gt=0)
    use_gpu: bool | None = flag(None, "one GPU per worker (default: when the cluster has GPUs)")
    ray_address: str | None = flag(None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    threads: int | None = flag(None, "torch CPU threads of this process (probes, in-process arms; 0: torch's "
                                   "default)", ge=0)
    dry_run: bool = flag(False, "check every input, time a few steps and print the planned runs, steps and time; "
                                "train nothing")

    def check(self) -> None:
        if sum(x is not None for x in (self.checkpoint, self.run, self.pretrained)) > 1:
            bad("checkpoint" if self.checkpoint is not None else "run",
                "give at most one of --checkpoint DIR, --run STORAGE/NAME and --pretrained FORMAT:PATH "
                "(none: the default --run)")
        given = "--checkpoint" if self.checkpoint is not None else "--pretrained" if self.pretrained else None
        if self.pretrain and given:
            bad("pretrain", f"pretrains a --run STORAGE/NAME, not a {given}")
        if self.pretrain_args and given:
            bad("pretrain_args", f"only applies when pretraining a --run, not with {given}")
        if self.pretrained is not None:
            fmt, _ = parse_weights_spec(self.pretrained)
            if self.dataset is None and fmt != "simclr-dist":
                bad("dataset", f"required with --pretrained {fmt}:... (the dataset of the experiments)")
        elif self.image_size is not None:
            bad("image_size", "only applies with --pretrained (a checkpoint is evaluated at its own resolution)")
        if self.preset is not None:
            if given:
                bad("preset", f"names its own pretraining run; drop {given}")
            if self.dataset is not None and self.dataset != PRESETS[self.preset]["dataset"]:
                bad("dataset", f"the preset {self.preset} is a {PRESETS[self.preset]['dataset']} study")
        if self.fractions is not None:
            check_fractions("fractions", self.fraction_values())
        self.arm_list()
        self.baseline_list()
        check_l2("l2_grid", parse_floats("l2_grid", self.l2_grid))
        for k in parse_floats("knn_k", self.knn_k):
            if k < 1 or k != int(k):
                bad("knn_k", f"each k must be a whole number >= 1, got {k:g}")
        for name in ("lr_grid", "wd_grid"):
            text = getattr(self, name)
            if text is not None:
                for v in parse_floats(name, text):
                    if not (v > 0 if name == "lr_grid" else v >= 0):
                        bad(name, f"each value must be {'> 0' if name == 'lr_grid' else '>= 0'}, got {v:g}")

    # ---------------------------------------------------------------- defaults
    def resolved(self, dataset: str) -> "ExperimentsConfig":
        """A copy with every ``None`` protocol field filled: the preset's value, else ``dataset``'s default."""
        cfg = dataclasses.replace(self)
        table = PRESETS[self.preset] if self.preset else DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["*"])
        for name in PRESET_FIELDS:
            if getattr(cfg, name) is None:
                setattr(cfg, name, table.get(name, DATASET_DEFAULTS["*"].get(name)))
        cfg.num_workers = cfg.num_workers or 2
        if cfg.preset and cfg.run is None:
            cfg.run = f"./runs/{PRESET_PRETRAIN[cfg.preset][0]}"
            if cfg.pretrain_args is None:
                cfg.pretrain_args = PRESET_PRETRAIN[cfg.preset][1]
        cfg.pretrain_args = cfg.pretrain_args or ""
        return cfg.validate()

    def fraction_values(self) -> tuple[float, ...]:
        return parse_floats("fractions", self.fractions or "")

    def fraction_list(self) -> tuple[float, ...]:
        """The fractions every arm trains on, sorted, with Experiment B's small fraction in it (after resolved())."""
        return tuple(sorted(set(self.fraction_values()) | {self.small_fraction}))

    def arm_list(self) -> tuple[str, ...]:
        return parse_names("arms", self.arms, ARMS, "arm")

    def baseline_list(self) -> tuple[str, ...]:
        return parse_names("baselines", self.baselines, BASELINES, "baseline") if self.baselines.strip() else ()

    def grid(self) -> list[tuple[float, float]]:
        """(lr per 256, weight decay) of every grid point, the same for every trained arm."""
        return [(lr, wd) for lr in parse_floats("lr_grid", self.lr_grid) for wd in parse_floats("wd_grid", self.wd_grid)]

    def knn_ks(self) -> tuple[int, ...]:
        return tuple(int(k) for k in parse_floats("knn_k", self.knn_k))

    def l2_values(self) -> tuple[float, ...]:
        return parse_floats("l2_grid", self.l2_grid)
