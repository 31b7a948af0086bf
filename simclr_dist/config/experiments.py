"""The experiments driver's configuration, its per-dataset defaults and the named presets of the study.

Why presets: the study's fairness rules are fixed in code: every trained arm trains at every fraction until early
stopping on its own validation split says it has converged (a maximum epoch budget and a patience per fraction), its
LR chosen from a log-spaced grid of its own (extended by a point when the choice lands on an edge), with the same
supervised augmentation for every arm, over several replicates. What changes with the machine is the budget: a
preset names one (maximum epochs, replicates per fraction) and its pretraining run, so a coordinator can start that
pretraining early and the study reuses it by name. Fields left ``None`` take the preset's value, else the dataset's
default (:data:`DATASET_DEFAULTS`); a flag given on the command line always wins. ``--steps N`` replaces early
stopping with the old fixed budget (N updates for every run, cosine schedule).

Per-fraction values (``--max-epochs``, ``--patience``, ``--seeds-by-fraction``) are written ``F:N,...`` (and/or one
bare ``N`` for every fraction not listed); a fraction not listed and without a bare default takes the entry of the
largest listed fraction below it (more epochs and replicates than a larger subset would get), else the smallest
listed fraction's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from simclr_dist.config.base import FORMATS, JobConfig, bad, flag, parse_weights_spec
from simclr_dist.config.supervised import CLASSIFIER_LOADERS, classifier_components
from simclr_dist.config.evaluate import (
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
                          "--dataset fashion-mnist --image-size 28 --width 0.25 --batch-size 256 --epochs 12 "
                          "--num-workers 2 --cpus-per-worker 1 --knn-every -1"),
    # one worker per GPU present ({gpus}: counted when the study starts, so one GPU runs it as well as eight); the
    # kNN monitor queries a validation part of the train split: the test split is read by the final models only
    "fashion-mnist-gpu": ("simclr-fashion-mnist-gpu",
                          "--dataset fashion-mnist --image-size 28 --width 1.0 --batch-size 1024 --epochs 500 "
                          "--num-workers {gpus} --use-gpu --knn-every 50 --knn-split val"),
    # one GPU without Ray (the device machine has torch, no Ray, no FFCV): this process, the resident loader, 25
    # epochs of 117 steps at batch 512 (the estimate above PRESETS); the monitor on validation queries (at step 0 and
    # after the last epoch)
    "fashion-mnist-h200": ("simclr-fashion-mnist-h200",
                           "--dataset fashion-mnist --image-size 28 --width 1.0 --batch-size 512 --epochs 25 "
                           "--no-ray --loader resident --knn-every 0 --knn-split val"),
}
# --smoke: appended to the preset's pretraining flags (the last of a repeated flag wins), so the preset's own
# pretraining path runs (its loader, Ray or not, its monitor) on a network and budget that take seconds on a CPU
SMOKE_PRETRAIN = "--epochs 1 --width 0.125 --batch-size 64 --threads 1"
# --smoke: the protocol fields it shrinks (a flag given still wins): one fraction, 3 replicates (so the tests over
# seeds exist), 2 epochs with patience 1, one point per LR grid; with --data-root on a few hundred images (the test:
# tests/run/test_h200_preset.py) the whole study takes seconds
SMOKE: dict[str, Any] = dict(fractions="0.1", small_fraction=0.1, seeds=3, seeds_by_fraction=None, steps=None,
                             max_epochs="2", patience="1", batch_size=32, lr_grid_finetune="0.05",
                             lr_grid_supervised="0.1", wd_grid="5e-4", threads=1)
# --smoke: the probes' grids when not given (10 L2 strengths x every fold of LBFGS were the smoke's largest cost:
# about half of its CPU seconds); a grid given on the command line wins, even one equal to the default
SMOKE_PROBE_GRIDS = dict(l2_grid="0.01,1", knn_k="1,5")


def gpus_present() -> int:
    """GPUs this process sees (at least 1: a GPU preset on a machine without one fails later, in the capacity
    check, with its own one-line error)."""
    import torch

    return max(1, torch.cuda.device_count())
# The LR grids (per 256 images, log-spaced, factor 2): fine-tuning wants smaller steps than training from scratch
# (the old shared 0.1,0.4 grid had fine-tuning on its bottom edge and scratch on its top edge at 10%).
FINETUNE_LRS, SCRATCH_LRS = "0.025,0.05,0.1", "0.1,0.2,0.4"
# The encoder each preset studies when no --checkpoint/--run/--pretrained is given and --pretrain is not asked for:
# published in the repository (python -m simclr_dist.export --format simclr-dist), its SHA-256 pinned in
# weights/SHA256SUMS and checked on load; relative to the repository root (elsewhere the preset pretrains its run).
PRESET_ENCODER = {"fashion-mnist-cpu": "weights/simclr-fmnist-cpu-e12"}
# fashion-mnist-h200, estimated (not measured: no GPU was lent when it was written). Step costs: bench/h200.py's
# assumption and docs/performance.md section 6b, an H200 does 10-30k pairs/s of ResNet-18 SimCLR at 28-32 px
# (20-60k images/s forward + backward), and an eager step costs at least ~4-6 ms of kernel launches.
#   pretraining: 25 epochs x 117 steps x 512 pairs = 1.50 M pairs -> 50-150 s (100 s at 15k pairs/s); its kNN
#     monitor at step 0 and at the end: 2 x 60,000 images through the per-sample eval transform (~80 us each on the
#     host) -> ~10 s;
#   trained arms: at most 16,500 optimiser steps if every run reached its maximum epochs (4,800 fine-tuning, 11,700
#     from scratch, 6,900 of them on all labels at 226 steps/epoch), at 4-13 ms a step, with every epoch's
#     validation and every final run's test read -> 190-275 s; early stopping cuts the small fractions (~150-220 s
#     expected); grid extensions (a choice on an edge) add at most ~50 s;
#   probes and baselines: ~250,000 images through the host's eval transform (~20 s) and the LBFGS L2 sweeps on the
#     host's CPU (~40 s) -> ~60 s;
#   results.json, report and plots rewritten after each of the 24 parts -> ~25-50 s; start, data, timing -> ~20 s.
# Total about 7 minutes (415 s central; 5.5-10 min over the ranges), within the device tool's 10-minute command.
PRESETS: dict[str, dict[str, Any]] = {
    # Experiment A at 0.1% (60 labels), 1% and 10%, Experiment B at 100%, each arm trained to convergence; tuned on
    # the first replicate, reused by the others (docs/performance.md: the dry run prints the planned budget)
    "fashion-mnist-cpu": dict(dataset="fashion-mnist", fractions="0.001,0.01,0.1", small_fraction=0.1, seeds=10,
                              seeds_by_fraction="0.001:10,0.01:10,0.1:6,1:3", steps=None,
                              # at most 100 epochs at 10%, 40 at 100% (patience 5): from scratch reached the old 40
                              # at 10% still improving (2026-12-04); a run that converged under a smaller maximum is
                              # reused as is (constant LR: the maximum changes nothing before it is reached)
                              max_epochs="0.001:300,0.01:120,0.1:100,1:40", patience="0.001:40,0.01:20,0.1:8,1:5",
                              tune_once=True, batch_size=64, lr_grid_finetune=FINETUNE_LRS,
                              lr_grid_supervised=SCRATCH_LRS, wd_grid="0,5e-4", ray=False, threads=2,
                              # the batches made on the tensors held in memory: 1.21x a classifier step on 2 cores
                              # (bench.classifier_loader); the same distribution as the torch DataLoader that made
                              # the batches of the runs it finished before this (each run records its loader)
                              classifier_loader="resident"),
    # the paper-scale study for a GPU cluster: full-width ResNet-18, 500 pretraining epochs
    "fashion-mnist-gpu": dict(dataset="fashion-mnist", fractions="0.001,0.01,0.1", small_fraction=0.1, seeds=10,
                              seeds_by_fraction="0.001:10,0.01:10,0.1:6,1:3", steps=None,
                              max_epochs="0.001:1000,0.01:300,0.1:100,1:60",
                              patience="0.001:100,0.01:30,0.1:10,1:5", tune_once=True, batch_size=256,
                              lr_grid_finetune=FINETUNE_LRS, lr_grid_supervised=SCRATCH_LRS, wd_grid="0,5e-4",
                              ray=True, num_workers=1, use_gpu=True),
    # the whole study, pretraining included, on one H200 in about 7 minutes (the estimate above; 5.5-10): full-width
    # ResNet-18, 25 pretraining epochs, 3 replicates at every fraction, short early-stopped budgets, one weight decay
    # for both arms, every arm in this process on the GPU with resident batches (no Ray, no per-sample CPU work)
    "fashion-mnist-h200": dict(dataset="fashion-mnist", fractions="0.001,0.01,0.1", small_fraction=0.1, seeds=3,
                               seeds_by_fraction=None, steps=None, max_epochs="0.001:100,0.01:60,0.1:20,1:5",
                               patience="0.001:20,0.01:10,0.1:4,1:2", tune_once=True, batch_size=256,
                               lr_grid_finetune=FINETUNE_LRS, lr_grid_supervised=SCRATCH_LRS, wd_grid="5e-4",
                               ray=False, threads=0, num_workers=1, classifier_loader="resident"),
}
# Defaults of the fields a preset sets, per dataset (others: "*"). Digits: the 10-minute demo (pretraining
# included): at 10% of the labels a selection epoch is 1 step (112 labels to fit, batch 64) and from scratch sits at
# chance for its first 25-50 epochs, so at most 200 epochs with patience 50 (20 stopped it at chance or not depending
# on the thread count); on all labels at most 15 epochs of 18 steps, patience 4; one weight decay; tuned on the first
# replicate; the in-process arms on every core. Measured 2026-12-04 on 2 cores, from an empty directory: 8.3 min;
# every chosen point stopped on patience, none at its maximum (docs/performance.md section 5).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(fractions="0.1", small_fraction=0.1, seeds=2, seeds_by_fraction=None, steps=None,
                   max_epochs="0.1:200,1:15", patience="0.1:50,1:4", tune_once=True, batch_size=64,
                   lr_grid_finetune="0.05,0.1,0.2", lr_grid_supervised=SCRATCH_LRS, wd_grid="5e-4", ray=False,
                   threads=0),  # in-process arms on every core (torch's default): 1.7x the step of 1 thread here
    "fashion-mnist": PRESETS["fashion-mnist-cpu"],
    "*": dict(fractions="0.01,0.1", small_fraction=0.1, seeds=3, seeds_by_fraction=None, steps=None,
              max_epochs="0.01:100,0.1:40,1:20", patience="0.01:20,0.1:8,1:4", tune_once=True, batch_size=256,
              lr_grid_finetune=FINETUNE_LRS, lr_grid_supervised=SCRATCH_LRS, wd_grid="0,5e-4", ray=True, threads=1,
              classifier_loader="auto"),
}
PRESET_FIELDS = ("dataset", "fractions", "small_fraction", "seeds", "seeds_by_fraction", "steps", "max_epochs",
                 "patience", "tune_once", "batch_size", "lr_grid_finetune", "lr_grid_supervised", "wd_grid", "ray",
                 "threads", "num_workers", "use_gpu", "classifier_loader")
# The probes' grids, each chosen on validation: L2 over 10 decades (the old 1e-6..1e-2 grid had pixels on its top
# edge at 10% in every seed) and k from 1 to 200 (the old fixed k=20 and k=200 were both reported, neither chosen).
WIDE_L2_GRID = tuple(10.0 ** p for p in range(-6, 4))
KNN_K_GRID = (1, 3, 5, 10, 20, 50, 100, 200)
# the probes' grids when not given: L2 over 10 decades, k from 1 to 200
PROBE_GRIDS = dict(l2_grid=",".join(f"{v:g}" for v in WIDE_L2_GRID), knn_k=",".join(str(k) for k in KNN_K_GRID))
GRID_ARMS = ("finetune", "supervised")  # the trained arms, each with its own LR grid


def parse_by_fraction(name: str, text: str) -> tuple[int | None, dict[float, int]]:
    """``"30"`` -> (30, {}); ``"0.001:300,0.1:40"`` -> (None, {0.001: 300, 0.1: 40}); a bare number and ``F:N``
    entries may be mixed (the bare one is the default). One-line error naming the field otherwise."""
    default, table = None, {}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        bad(name, "is empty: give N or F:N,...")
    for part in parts:
        f_text, sep, n_text = part.rpartition(":")
        try:
            n = int(n_text)
            f = float(f_text) if sep else None
        except ValueError:
            bad(name, f"{part!r} is not N or FRACTION:N (N a whole number)")
        if n < 1:
            bad(name, f"each value must be >= 1, got {part!r}")
        if f is None:
            default = n
        elif not 0 < f <= 1:
            bad(name, f"each fraction must be in (0, 1], got {part!r}")
        else:
            table[f] = n
    return default, table


def value_for(name: str, text: str, fraction: float) -> int:
    """The value of ``fraction`` in a per-fraction spec: its own entry, else the bare default, else the entry of the
    largest listed fraction below it, else the smallest listed fraction's."""
    default, table = parse_by_fraction(name, text)
    if fraction in table:
        return table[fraction]
    if default is not None:
        return default
    below = [f for f in table if f < fraction]
    return table[max(below)] if below else table[min(table)]


@dataclass
class ExperimentsConfig(JobConfig):
    preset: str | None = flag(None, "a named study: fashion-mnist-cpu (the whole protocol on 2 CPU cores: 0.1/1/10%% "
                                  "and 100%%, 10/10/6/3 replicates, every run to convergence; at most ~13 h of "
                                  "classifier steps if no run stopped early, see --dry-run), fashion-mnist-gpu (paper "
                                  "scale, for a GPU cluster), fashion-mnist-h200 (a short version of the whole study, "
                                  "pretraining included, for one GPU without Ray: about 7 min on an H200, estimated); flags "
                                  "given as well override the preset's",
                              choices=tuple(PRESETS), what="preset")
    smoke: bool = flag(False, "with --preset: a smoke run of the preset's code path on a CPU: its pretraining flags "
                              f"with '{SMOKE_PRETRAIN}' appended, the protocol shrunk (one fraction, 3 replicates, "
                              "2 epochs, one LR per arm, 2 L2 strengths and 2 k for the probes; flags given win); "
                              "give --data-root a few hundred images (under a minute; on a whole dataset many "
                              "minutes). The results mean nothing")
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
    runs_cache: str | None = flag(None, "a folder of finished classifier runs (their results as gzipped JSON, no "
                                      "weights): runs --out lacks are read from it before the study, and each run "
                                      "the study finishes is added to it, so a study continues on another machine "
                                      "(the CPU preset's is committed: docs/results/fashion-mnist-cpu/runs)")
    time_limit: float | None = flag(None, "minutes: a soft limit for a session's share of a long study: after it no "
                                          "new classifier run starts (the one training finishes), the report of "
                                          "what is done is written and the command exits 0 saying so; a rerun "
                                          "goes on", gt=0)
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
    seeds: int | None = flag(None, "replicates per fraction (default: digits 2, the fashion-mnist presets by "
                                 "fraction, see --seeds-by-fraction, else 3); replicate r draws its label subset with "
                                 "--subset-seed + r and its init/data order with --seed + r; given alone it replaces "
                                 "the preset's --seeds-by-fraction", ge=1)
    seeds_by_fraction: str | None = flag(None, "replicates per fraction, F:N,... (the fashion-mnist presets: "
                                             "0.001:10,0.01:10,0.1:6,1:3); overrides --seeds")
    subset_seed: int = flag(0, "first seed of the label subsets (shared by every arm of a replicate)")
    seed: int = flag(0, "first seed of the initialisations, data order and augmentation")
    steps: int | None = flag(None, "a fixed budget instead of early stopping: this many optimiser steps for every "
                                 "trained run at every fraction, cosine schedule (the old protocol); default: off, "
                                 "every run trains until early stopping (--max-epochs, --patience)", ge=1)
    max_epochs: str | None = flag(None, "early stopping: the maximum epochs of a selection run, N or F:N,... per "
                                      "fraction (default: digits 0.1:200,1:15; fashion-mnist-cpu "
                                      "0.001:300,0.01:120,0.1:100,1:40); a run that reaches it is flagged "
                                      "hit_max_epochs (the budget was too small)")
    patience: str | None = flag(None, "early stopping: epochs without a better validation top-1 before a selection "
                                    "run stops (its best epoch's weights kept), N or F:N,... (default: digits "
                                    "0.1:50,1:4; fashion-mnist-cpu 0.001:40,0.01:20,0.1:8,1:5)")
    tune_once: bool | None = flag(None, "choose each arm's LR, weight decay and epochs on the first replicate only "
                                      "and reuse them for the others (recorded per record); --no-tune-once tunes "
                                      "every replicate (default: on)")
    grid_extensions: int = flag(2, "when the chosen LR is the lowest or highest of the arm's grid, try one more log "
                                   "step beyond that edge (the grid's spacing) and choose again, at most this many "
                                   "times; 0: off", ge=0)
    batch_size: int | None = flag(None, "global batch size of the trained arms (capped at the label count; the peak "
                                      "LR keeps using this nominal batch)", ge=1)
    lr_grid: str | None = flag(None, "learning rates per 256 images tried by both trained arms (sets the two per-arm "
                                   "grids below that are not given)")
    lr_grid_finetune: str | None = flag(None, "learning rates per 256 images of SimCLR fine-tuning, log-spaced "
                                            f"(default {FINETUNE_LRS}; digits 0.05,0.1,0.2)")
    lr_grid_supervised: str | None = flag(None, "learning rates per 256 images of the from-scratch arm, log-spaced "
                                              f"(default {SCRATCH_LRS})")
    wd_grid: str | None = flag(None, "weight decays tried by every trained arm (default 0,5e-4; digits 5e-4)")
    augment: str | None = flag(None, "training augmentation of every trained arm (simclr_dist.supervised "
                                   "--augment): supervised (default: pad-crop + flip; pad-crop alone on digits), "
                                   "simclr (SimCLR's RandomResizedCrop, which the SimCLR encoder is invariant to), "
                                   "or components")
    val_fraction: float = flag(0.2, "share of each labelled subset held out for model selection (k-fold when a "
                                    "class has fewer than 10 labels)", gt=0, le=0.5)
    l2_grid: str | None = flag(None, "L2 strengths of the linear probes' sweep (each probe chooses one on "
                                     f"validation; default {PROBE_GRIDS['l2_grid']}; --smoke: "
                                     f"{SMOKE_PROBE_GRIDS['l2_grid']})")
    knn_k: str | None = flag(None, "neighbours k of the kNN baselines: each chooses one on validation (capped at "
                                   f"the labels it fits on; default {PROBE_GRIDS['knn_k']}; --smoke: "
                                   f"{SMOKE_PROBE_GRIDS['knn_k']})")
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
    classifier_loader: str | None = flag(None, "how the trained arms' batches are made (simclr_dist.supervised "
                                             "--classifier-loader): auto (resident on a CUDA device, else torch: the "
                                             "default), torch or resident (the fashion-mnist-h200 preset)",
                                         choices=CLASSIFIER_LOADERS, what="loader")
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
            own = self.pretrained is not None and self.pretrained == f"simclr-dist:{PRESET_ENCODER.get(self.preset)}"
            if given and not own:  # the preset's own published encoder is what it resolves to
                bad("preset", f"names its own pretraining run; drop {given}")
            if self.dataset is not None and self.dataset != PRESETS[self.preset]["dataset"]:
                bad("dataset", f"the preset {self.preset} is a {PRESETS[self.preset]['dataset']} study")
        if self.fractions is not None:
            check_fractions("fractions", self.fraction_values())
        self.arm_list()
        self.baseline_list()
        check_l2("l2_grid", self.l2_values())
        for k in parse_floats("knn_k", self.knn_k or PROBE_GRIDS["knn_k"]):
            if k < 1 or k != int(k):
                bad("knn_k", f"each k must be a whole number >= 1, got {k:g}")
        for name in ("lr_grid", "lr_grid_finetune", "lr_grid_supervised", "wd_grid"):
            text = getattr(self, name)
            if text is not None:
                positive = name.startswith("lr_grid")
                for v in parse_floats(name, text):
                    if not (v > 0 if positive else v >= 0) or not math.isfinite(v):
                        bad(name, f"each value must be {'> 0' if positive else '>= 0'}, got {v:g}")
        for name in ("max_epochs", "patience", "seeds_by_fraction"):
            if getattr(self, name) is not None:
                parse_by_fraction(name, getattr(self, name))
        if self.steps is not None:
            for name in ("max_epochs", "patience"):
                if getattr(self, name) is not None:
                    bad(name, "--steps fixes the budget of every run (no early stopping): give one of the two")
        if self.augment is not None:
            try:
                classifier_components(self.augment)
            except ValueError as e:
                bad("augment", str(e))
        if self.smoke and self.preset is None:
            bad("smoke", "runs a preset's code path: give --preset NAME")

    # ---------------------------------------------------------------- defaults
    def resolved(self, dataset: str) -> "ExperimentsConfig":
        """A copy with every ``None`` protocol field filled: the preset's value, else ``dataset``'s default."""
        cfg = dataclasses.replace(self)
        table = PRESETS[self.preset] if self.preset else DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["*"])
        if self.smoke:
            table = {**table, **SMOKE}
        given = {name for name in PRESET_FIELDS if getattr(self, name) is not None}
        if cfg.lr_grid is not None:  # the shared grid, for each arm without a grid of its own
            cfg.lr_grid_finetune = cfg.lr_grid_finetune or cfg.lr_grid
            cfg.lr_grid_supervised = cfg.lr_grid_supervised or cfg.lr_grid
        for name in PRESET_FIELDS:
            if getattr(cfg, name) is None:
                setattr(cfg, name, table.get(name, DATASET_DEFAULTS["*"].get(name)))
        if "steps" in given:  # the fixed budget replaces early stopping
            cfg.max_epochs = cfg.patience = None
        elif cfg.steps is not None:  # a table's fixed budget, overridden by early-stopping flags
            if given & {"max_epochs", "patience"}:
                cfg.steps = None
        for name, value in (SMOKE_PROBE_GRIDS if cfg.smoke else PROBE_GRIDS).items():
            if getattr(cfg, name) is None:  # not given
                setattr(cfg, name, value)
        if "seeds" in given and "seeds_by_fraction" not in given:  # --seeds alone: that many at every fraction
            cfg.seeds_by_fraction = None
        cfg.num_workers = cfg.num_workers or 2
        published = PRESET_ENCODER.get(cfg.preset or "")
        if (published and cfg.run is None and cfg.checkpoint is None and cfg.pretrained is None and not cfg.pretrain
                and os.path.isdir(published)):  # the published encoder (SHA-256 pinned), so no pretraining is needed
            cfg.pretrained = f"simclr-dist:{published}"
        elif cfg.preset and cfg.run is None and cfg.checkpoint is None and cfg.pretrained is None:
            # a smoke run pretrains a run of its own: the preset's run would resume from its 1-epoch toy checkpoint
            cfg.run = f"./runs/{PRESET_PRETRAIN[cfg.preset][0]}" + ("-smoke" if cfg.smoke else "")
            if cfg.pretrain_args is None:
                cfg.pretrain_args = PRESET_PRETRAIN[cfg.preset][1].replace("{gpus}", str(gpus_present()))
                if cfg.smoke:
                    cfg.pretrain_args += " " + SMOKE_PRETRAIN
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

    def lrs(self, arm: str) -> tuple[float, ...]:
        """The LR grid of a trained arm (after resolved())."""
        name = f"lr_grid_{arm}"
        return parse_floats(name, getattr(self, name))

    def grid(self, arm: str | None = None) -> list[tuple[float, float]]:
        """(lr per 256, weight decay) of every grid point of ``arm``; without an arm every point some trained arm
        tries (the fine-tuning grid's, then the scratch grid's new ones)."""
        wds = parse_floats("wd_grid", self.wd_grid)
        arms = (arm,) if arm is not None else GRID_ARMS
        return list(dict.fromkeys((lr, wd) for a in arms for lr in self.lrs(a) for wd in wds))

    def early_stopping(self) -> bool:
        """Every trained run stops on its validation split (after resolved(): no --steps)."""
        return self.steps is None

    def seeds_for(self, fraction: float) -> int:
        """Replicates at ``fraction`` (after resolved())."""
        if self.seeds_by_fraction:
            return value_for("seeds_by_fraction", self.seeds_by_fraction, fraction)
        return self.seeds

    def max_epochs_for(self, fraction: float) -> int:
        return value_for("max_epochs", self.max_epochs, fraction)

    def patience_for(self, fraction: float) -> int:
        return value_for("patience", self.patience, fraction)

    def knn_ks(self) -> tuple[int, ...]:
        return tuple(int(k) for k in parse_floats("knn_k", self.knn_k or PROBE_GRIDS["knn_k"]))

    def l2_values(self) -> tuple[float, ...]:
        return parse_floats("l2_grid", self.l2_grid or PROBE_GRIDS["l2_grid"])
