"""``python -m simclr_dist.experiments``: Experiments A and B and the label-fraction sweep, as one report.

The proposal's primary metric: accuracy of the self-supervised model against
(A) the same network trained from scratch on the same small labelled set (default 10% of the labels), and
(B) the same network trained supervised on *all* labels,
plus how the comparison moves with the label count and the training time. Three arms per label fraction:

- ``linear``: the frozen SimCLR encoder + a logistic-regression head (:func:`evaluate.linear_probe_features`; its L2
  strength is chosen on a validation split of the *labelled subset*, never on test);
- ``finetune``: the SimCLR encoder + a linear head, whole network trained (:mod:`simclr_dist.supervised` with
  ``init_checkpoint``);
- ``supervised``: the same network from a random init, same loop and recipe (plus weight decay).

Fairness invariant: every arm of a fraction trains on the *same* images, drawn once by
:func:`evaluate.balanced_subset` with the fixed seed (smaller fractions nested in larger ones); each arm's subset
fingerprint is checked against the drawn one and the indices are saved in ``results.json``. The SimCLR arms are
charged their pretraining time too in the accuracy-vs-time plot, since that is the price of the labels they save.

Outputs in ``--out`` (local path or storage URI): ``report.md`` (tables + plots), ``results.json``,
``results.csv``, ``accuracy_vs_fraction.png``, ``training_curves.png`` (SimCLR pretraining and every trained arm,
per epoch), ``accuracy_vs_time.png``, ``linear/`` and ``runs/<arm>-<fraction>-<epochs>ep-b<batch>/`` (the trained
runs' checkpoints and results). A rerun reuses every arm already finished in ``--out``; the recipe is part of a run's
name, so other flags train new runs rather than extend finished ones.

``--pretrained FORMAT:PATH_OR_URI`` runs the same experiments on an imported encoder (:mod:`simclr_dist.run.pretrained`:
SimCLR v1 converted, Spijkervet/SimCLR, torchvision ImageNet weights, or our own checkpoint), with the conventions
of ``evaluate --pretrained``: the network (architecture, width, stem) is the import's, the data are ``--dataset``
(required except for simclr-dist, whose checkpoint names its own) at ``--image-size`` (default: the checkpoint's on
its own dataset, else the dataset's), and the import's input normalisation replaces the dataset's in the linear and
fine-tuned arms; the supervised arm trains the same network from scratch on the dataset's normalisation. The
fine-tuned runs are named after the import (``finetune-...-pt<digest of the spec>``), the linear arm's cache is
keyed by it, and the report names the encoder's source instead of a checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from simclr_dist.run import storage
from simclr_dist import supervised as sup
from simclr_dist.run.checkpoint import latest_checkpoint
from simclr_dist.config import ConfigError, PretrainConfig, build_parser, flag
from simclr_dist.console import Log, emit
from simclr_dist.data.datasets import DatasetError, check_available, dataset_info
from simclr_dist.evaluate import (
    DEFAULT_L2_GRID,
    EvalError,
    Features,
    compute_features,
    linear_probe_features,
    parse_floats,
    load_eval_data,
    require_complete,
    select_device,
)
from simclr_dist.config import FORMATS, PretrainedError, parse_spec
from simclr_dist.run.pretrained import PretrainedEncoder, load_pretrained
from simclr_dist.run.checkpoint import MANIFEST_FILE, load_checkpoint
from simclr_dist.run.step import build_model
from simclr_dist.data.splits import balanced_subset, labelled_splits

ARMS = ("linear", "finetune", "supervised")
ARM_TITLES = {"linear": "SimCLR + linear head", "finetune": "SimCLR fine-tuned", "supervised": "supervised from scratch"}
ARM_COLORS = {"linear": "tab:blue", "finetune": "tab:green", "supervised": "tab:red"}
DEFAULT_FRACTIONS = "0.01,0.02,0.05,0.1,0.2,0.5,1"
RESULT_FORMAT = 1



class ExperimentError(ValueError):
    """Bad input for the experiments driver; one line for the user."""




# ---------------------------------------------------------------------------- configuration
@dataclass
class ExperimentsConfig:
    checkpoint: str | None = flag(None, "the SimCLR checkpoint directory (local path, s3:// or gs:// URI)")
    run: str | None = flag(None, "a pretraining run STORAGE/NAME: its latest complete checkpoint, pretrained first "
                               "when it has none (default: ./runs/simclr-<dataset>-resnet18, the run `make demo` "
                               "writes)")
    pretrained: str | None = flag(None, "an imported encoder FORMAT:PATH_OR_URI instead of a SimCLR checkpoint, FORMAT "
                                      f"one of {', '.join(FORMATS)} (see simclr_dist.run.pretrained); needs --dataset "
                                      "except for simclr-dist")
    strict: bool = flag(True, "with --pretrained: refuse a partial load (any missing/unexpected key or shape "
                            "mismatch); --no-strict loads the matching tensors and warns")
    image_size: int | None = flag(None, "with --pretrained: resolution (default: a simclr-dist checkpoint's on its own "
                                      "dataset, else the dataset's: 224 imagenet, 96 stl10, 32 cifar, 24 digits)")
    pretrain: bool = flag(False, "pretrain (or finish) the --run with simclr_dist.pretrain before the experiments, "
                               "even if it already has a checkpoint")
    pretrain_args: str = flag("", "extra simclr_dist.pretrain flags for that pretraining, e.g. '--epochs 10'")
    dataset: str | None = flag(None, "dataset (default: the checkpoint's; digits when pretraining a new run; required "
                                   "with --pretrained except for simclr-dist)")
    data_root: str | None = flag(None, "dataset directory on this machine (default: the pretraining run's)")
    out: str | None = flag(None, "output directory, local or storage URI (default: ./runs/experiments-<dataset>; with "
                               "--pretrained ./runs/experiments-<dataset>-<format>-<file>)")
    fractions: str = flag(DEFAULT_FRACTIONS, "label fractions of the sweep, each in (0, 1]")
    small_fraction: float = flag(0.1, "Experiment A's small labelled set (added to the sweep if missing)")
    arms: str = flag(",".join(ARMS), f"comma-separated arms: {', '.join(ARMS)}")
    seed: int = flag(0, "seed of the label subsets (shared by every arm), inits and data order")
    # the trained arms (fine-tuned and from scratch share the recipe; see simclr_dist.supervised)
    epochs: int | None = flag(None, "epochs of the fine-tuned and supervised arms (default on digits: ~330 steps "
                                  "within 15..30 epochs, i.e. 30 up to 50%% of the labels, 15 at 100%%; else "
                                  "evaluate's fine-tuning budget: 60 for <= 1%%, 30 above)")
    batch_size: int = flag(64, "global batch size of the trained arms (capped at the label count)")
    lr: float | None = flag(None, "learning rate per 256 images of the trained arms (default: simclr_dist.supervised's)")
    ray: bool | None = flag(None, "train the fine-tuned and supervised arms under Ray Train (--ray) or in this "
                                "process (--no-ray); default: Ray on a cluster (--ray-address / RAY_ADDRESS) or for "
                                "datasets on disk, in-process for the embedded digits, where starting a Ray worker "
                                "group per arm costs more than training it")
    num_workers: int = flag(2, "Ray Train workers per trained arm")
    cpus_per_worker: float = flag(1.0, "CPUs Ray reserves for each worker (also its torch thread count)")
    use_gpu: bool | None = flag(None, "one GPU per worker (default: when the cluster has GPUs)")
    ray_address: str | None = flag(None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    threads: int = flag(1, "torch CPU threads of this process: linear arm, --no-ray arms (0: torch's default). 1 "
                         "by default: on a busy 2-core machine one epoch of these small models took 4-11 s with one "
                         "thread and 40-70 s with two contending ones")
    # the linear arm
    l2_grid: str = flag(",".join(f"{v:g}" for v in DEFAULT_L2_GRID), "L2 strengths of the linear arm's sweep")
    val_fraction: float = flag(0.2, "share of each labelled subset held out to choose the linear arm's L2")

    def validate(self) -> "ExperimentsConfig":
        """Raise :class:`ExperimentError` for the first bad flag (nothing is read or written); returns self."""
        def bad(flag: str, msg: str) -> None:
            raise ExperimentError(f"--{flag.replace('_', '-')}: {msg}")

        if sum(x is not None for x in (self.checkpoint, self.run, self.pretrained)) > 1:
            bad("checkpoint" if self.checkpoint is not None else "run",
                "give at most one of --checkpoint DIR, --run STORAGE/NAME and --pretrained FORMAT:PATH "
                "(none: the default --run)")
        if self.pretrain and (self.checkpoint is not None or self.pretrained is not None):
            given = "--checkpoint" if self.checkpoint is not None else "--pretrained"
            bad("pretrain", f"pretrains a --run STORAGE/NAME, not a {given}")
        if self.pretrain_args and (self.checkpoint is not None or self.pretrained is not None):
            given = "--checkpoint" if self.checkpoint is not None else "--pretrained"
            bad("pretrain_args", f"only applies when pretraining a --run, not with {given}")
        if self.pretrained is not None:
            try:
                fmt, _ = parse_spec(self.pretrained)
            except PretrainedError as e:
                raise ExperimentError(str(e)) from None
            if self.dataset is None and fmt != "simclr-dist":
                bad("dataset", f"required with --pretrained {fmt}:... (the dataset of the experiments)")
        elif self.image_size is not None:
            bad("image_size", "only applies with --pretrained (a checkpoint is evaluated at its own resolution)")
        if self.image_size is not None and self.image_size < 8:
            bad("image_size", f"must be >= 8 pixels, got {self.image_size}")
        if self.dataset is not None:
            try:
                dataset_info(self.dataset)
            except DatasetError as e:
                bad("dataset", str(e))
        for f in self.fraction_list():
            if not 0 < f <= 1:
                bad("fractions", f"each fraction must be in (0, 1], got {f:g}")
        if not 0 < self.small_fraction <= 1:
            bad("small_fraction", f"must be in (0, 1], got {self.small_fraction:g}")
        self.arm_list()
        for v in _floats("l2_grid", self.l2_grid):
            if not (v >= 0 and math.isfinite(v)):
                bad("l2_grid", f"each L2 strength must be >= 0, got {v:g}")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        for name in ("epochs", "batch_size", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                bad(name, f"must be >= 1, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be > 0, got {self.lr}")
        if self.cpus_per_worker <= 0:
            bad("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.threads < 0:
            bad("threads", f"must be >= 0, got {self.threads}")
        return self

    def use_ray(self, dataset: str) -> bool:
        if self.ray is not None:
            return self.ray
        return bool(self.ray_address or os.environ.get("RAY_ADDRESS")) or not dataset_info(dataset).embedded

    def fraction_list(self) -> tuple[float, ...]:
        """The sweep, sorted, with Experiment A's small fraction and B's 100% always in it."""
        return tuple(sorted(set(_floats("fractions", self.fractions)) | {self.small_fraction, 1.0}))

    def arm_list(self) -> tuple[str, ...]:
        names = {a.strip().lower() for a in self.arms.split(",") if a.strip()}
        unknown = sorted(names - set(ARMS))
        if unknown or not names:
            raise ExperimentError(f"--arms: unknown arm {(unknown or [''])[0]!r}; choose from {', '.join(ARMS)}")
        return tuple(a for a in ARMS if a in names)


def _floats(flag: str, text: str) -> tuple[float, ...]:
    return parse_floats(flag, text, ExperimentError)


def parse_args(argv: list[str] | None = None) -> ExperimentsConfig:
    parser = build_parser(ExperimentsConfig, "python -m simclr_dist.experiments",
                          "Experiments A/B: SimCLR (linear head, fine-tuned) vs the same network trained "
                          "supervised, on a small and on the full labelled set, and a label-fraction sweep.")
    sup.one_line_errors(parser)
    return ExperimentsConfig(**vars(parser.parse_args(argv)))


DIGITS_STEP_BUDGET = 330  # 15 epochs of all 1437 digits labels at batch 64


def default_epochs(label_count: int, batch_size: int, dataset: str, fraction: float) -> int:
    """Digits: enough epochs for ~330 optimiser steps, within 15..30 epochs: 30 while an epoch is a few steps (up
    to 50% of the labels), 15 for all labels (22 steps each), where both trained arms have converged (~0.98 top-1;
    10 epochs under-trained the full-label baseline by ~2 points, which would flatter SimCLR in Experiment B).
    Other datasets: evaluate's fine-tuning budget (the paper's 60 epochs for <= 1% of the labels, 30 above)."""
    if dataset == "digits":
        steps_per_epoch = max(1, label_count // min(batch_size, label_count))
        return min(30, max(15, math.ceil(DIGITS_STEP_BUDGET / steps_per_epoch)))
    return 60 if fraction <= 0.01 else 30


# ---------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Everything resolved and checked before any training: the checkpoint (or the pretraining to make it, or the
    imported encoder), the output, the label subsets every arm shares, and one supervised config per trained arm
    and fraction."""

    ecfg: ExperimentsConfig
    out: str
    run: str | None
    pretrain_cfg: PretrainConfig | None
    checkpoint: str | None
    model_cfg: PretrainConfig
    fractions: tuple[float, ...]
    arms: tuple[str, ...]
    subsets: dict[float, np.ndarray]
    pretrained: PretrainedEncoder | None = None  # --pretrained: the import, read and verified once
    pretrained_spec: str | None = None  # FORMAT:URI of what was read (a run directory's checkpoint, a hub file)


def _pretrain_config(ecfg: ExperimentsConfig, run: str) -> PretrainConfig:
    """The pretraining config: ``--pretrain-args`` on top of pretraining's defaults, stored at ``run``."""
    extra = shlex.split(ecfg.pretrain_args)
    for flag in ("--storage-path", "--name"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ExperimentError(f"--pretrain-args: {flag} comes from --run STORAGE/NAME; drop it")
    storage_path, name = run.rstrip("/").rsplit("/", 1) if "/" in run.rstrip("/") else (".", run)
    args = [*extra, "--storage-path", storage_path, "--name", name]
    if ecfg.dataset is not None and "--dataset" not in extra:
        args += ["--dataset", ecfg.dataset]
    parser = sup.one_line_errors(build_parser(PretrainConfig, "python -m simclr_dist.pretrain", ""))
    from simclr_dist.pretrain import check_config
    try:
        return check_config(PretrainConfig(**vars(parser.parse_args(args))))
    except ConfigError as e:
        raise ExperimentError(f"--pretrain-args: {e}") from None


def make_plan(ecfg: ExperimentsConfig) -> Plan:
    """Resolve and check every input (flags, checkpoint or pretraining config, data, output storage, each arm's
    batch layout and resume state) so a bad input costs one line and no training."""
    ecfg.validate()
    pretrain_cfg, checkpoint, run = None, _absolute(ecfg.checkpoint), _absolute(ecfg.run)
    pre, spec = None, None
    if ecfg.pretrained is not None:
        spec = sup.absolute_spec(ecfg.pretrained)
        try:
            pre = load_pretrained(spec, strict=ecfg.strict)
        except PretrainedError as e:
            raise ExperimentError(str(e)) from None
        # the trained arms read the very file or checkpoint read here (a run directory's latest checkpoint, a
        # torch-hub name's file), so a run that gains a checkpoint later is not mistaken for this one by the caches
        spec = f"{pre.format}:{pre.uri}"
        model_cfg = sup.pretrained_model_config(pre, dataset=ecfg.dataset, image_size=ecfg.image_size,
                                                data_root=ecfg.data_root)
    elif checkpoint is None:
        run = run or _absolute(f"./runs/simclr-{ecfg.dataset or 'digits'}-resnet18")
        if not ecfg.pretrain:
            checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            pretrain_cfg = _pretrain_config(ecfg, run)
    if checkpoint is not None:
        try:
            require_complete(checkpoint)
        except EvalError as e:
            raise ExperimentError(str(e)) from None
        model_cfg = _checkpoint_config(checkpoint)
    elif pre is None:
        model_cfg = pretrain_cfg
    if pre is None and ecfg.dataset is not None and ecfg.dataset != model_cfg.dataset:
        raise ExperimentError(f"--dataset {ecfg.dataset}: the checkpoint was pretrained on {model_cfg.dataset}; "
                              "evaluate on its own dataset (or drop --dataset)")
    if ecfg.data_root is not None:
        model_cfg = dataclasses.replace(model_cfg, data_root=ecfg.data_root)
    for split in labelled_splits(model_cfg.dataset):
        check_available(model_cfg.dataset, split, model_cfg.data_root)
    out = _absolute(ecfg.out or f"./runs/experiments-{model_cfg.dataset}" + (_pretrained_tag(pre) if pre else ""))
    storage.resolve(out)  # an unknown scheme fails here; writability is checked last, as it creates the directory

    from simclr_dist.data.datasets import load_dataset
    labels = np.asarray(load_dataset(model_cfg.dataset, labelled_splits(model_cfg.dataset)[0],
                                     root=model_cfg.data_root, image_size=model_cfg.image_size).targets)
    fractions = ecfg.fraction_list()
    subsets = {f: balanced_subset(labels, f, ecfg.seed) for f in fractions}
    plan = Plan(ecfg, out, run, pretrain_cfg, checkpoint, model_cfg, fractions, ecfg.arm_list(), subsets,
                pretrained=pre, pretrained_spec=spec)
    for arm in plan.arms:
        if arm == "linear":
            continue
        for f in fractions:  # the batch layout of every trained arm, before anything trains
            scfg = arm_config(plan, arm, f, checkpoint or "pending")
            _, per_worker = sup.batch_layout(len(subsets[f]), scfg.batch_size, scfg.world())
            if per_worker < 2:
                raise ExperimentError(f"--fractions {f:g}: {len(subsets[f])} labels give {per_worker} image(s) per "
                                      f"worker over {scfg.world()} worker(s); BatchNorm needs >= 2: drop the "
                                      "fraction or lower --num-workers")
            saved_uri = storage.join(sup.run_uri(scfg), sup.RUN_CONFIG_FILE)
            if (checkpoint is not None or pre is not None) and storage.exists(saved_uri):
                saved = sup.SupervisedConfig.from_dict(storage.read_json(saved_uri))
                if saved.init_source() != scfg.init_source():
                    raise ExperimentError(f"--out {out}: {sup.run_uri(scfg)} was fine-tuned from "
                                          f"{saved.init_source()}, not {scfg.init_source()}: choose a new --out")
                diff = [f"{k}={getattr(saved, k)!r}" for k in ("dataset", "image_size", "arch", "width", "cifar_stem")
                        if getattr(saved, k) != getattr(scfg, k)]
                if diff:
                    raise ExperimentError(f"--out {out}: {sup.run_uri(scfg)} trained another network or data "
                                          f"({', '.join(diff)}): choose a new --out")
    storage.check_writable(out)
    return plan


def _absolute(uri: str | None) -> str | None:
    """Local paths made absolute: Ray workers, which read the checkpoint, need not share this process's cwd."""
    return uri if uri is None or "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _pretrained_tag(pre: PretrainedEncoder) -> str:
    """``-<format>-<file>`` of an import, for default output names (as evaluate's ``pretrained_results_dir``)."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in pre.uri.rstrip("/").rsplit("/", 1)[-1])
    return f"-{pre.format}-{name}"


def _spec_digest(spec: str) -> str:
    """8 hex digits naming an import in the fine-tuned runs' names: another --pretrained trains other runs."""
    import hashlib
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def _checkpoint_config(checkpoint: str) -> PretrainConfig:
    try:
        state = load_checkpoint(checkpoint)
    except ValueError as e:
        raise ExperimentError(f"--checkpoint {checkpoint}: {e}") from None
    if state.get("kind") == "supervised" or "config" not in state or "model" not in state:
        raise ExperimentError(f"--checkpoint {checkpoint}: not a simclr-dist pretraining checkpoint")
    return PretrainConfig.from_dict(state["config"])


def arm_config(plan: Plan, arm: str, fraction: float, checkpoint: str) -> sup.SupervisedConfig:
    """The supervised-trainer config of a trained arm: ``finetune`` starts from the SimCLR checkpoint (or the
    ``--pretrained`` import, whose spec ``checkpoint`` then stands for), ``supervised`` from a random init of the
    same network; everything else is shared."""
    e, m = plan.ecfg, plan.model_cfg
    label_count = len(plan.subsets[fraction])
    epochs = e.epochs or default_epochs(label_count, e.batch_size, m.dataset, fraction)
    imported = plan.pretrained_spec if arm == "finetune" else None
    # the recipe is in the name: a rerun with other flags trains new runs instead of extending finished ones
    name = (f"{arm}-{fraction:g}-{epochs}ep-b{e.batch_size}" + (f"-lr{e.lr:g}" if e.lr else "")
            + (f"-seed{e.seed}" if e.seed else "") + (f"-pt{_spec_digest(imported)}" if imported else ""))
    return sup.SupervisedConfig(
        dataset=m.dataset, data_root=m.data_root, image_size=m.image_size, arch=m.arch, width=m.width,
        cifar_stem=m.cifar_stem, init_checkpoint=checkpoint if arm == "finetune" and not imported else None,
        init_pretrained=imported, init_strict=e.strict, fraction=fraction,
        seed=e.seed, epochs=epochs, batch_size=e.batch_size,
        lr=e.lr, ray=e.use_ray(m.dataset), num_workers=e.num_workers, use_gpu=e.use_gpu, cpus_per_worker=e.cpus_per_worker,
        ray_address=e.ray_address, threads=e.threads, storage_path=storage.join(plan.out, "runs"),
        name=name)


# ---------------------------------------------------------------------------- the arms
def run_order(plan: Plan) -> list[tuple[str, float]]:
    """Experiment A first (every arm on the small fraction), then B's full-label supervised run, then the rest of
    the sweep: an interrupted run has the headline numbers first."""
    small = plan.ecfg.small_fraction
    jobs = [(a, small) for a in plan.arms] + [("supervised", 1.0)] * ("supervised" in plan.arms)
    jobs += [(a, f) for f in plan.fractions for a in plan.arms]
    return list(dict.fromkeys(jobs))


def linear_key(plan: Plan, fraction: float) -> dict[str, Any]:
    source: dict[str, Any] = {"checkpoint": plan.checkpoint}
    if plan.pretrained_spec is not None:  # the import, and the data it is evaluated on
        source = {"pretrained": plan.pretrained_spec, "dataset": plan.model_cfg.dataset,
                  "image_size": plan.model_cfg.image_size}
    return {**source, "fraction": fraction, "seed": plan.ecfg.seed,
            "l2_grid": plan.ecfg.l2_grid, "val_fraction": plan.ecfg.val_fraction}


def cached_linear(plan: Plan, fraction: float) -> dict[str, Any] | None:
    """A linear-arm result already in ``--out`` for the same checkpoint, subset and grid."""
    uri = storage.join(plan.out, "linear", f"linear-{fraction:g}.json")
    if storage.exists(uri):
        saved = storage.read_json(uri)
        if saved.get("key") == linear_key(plan, fraction):
            return {**saved, "cached": True}
    return None


def run_linear(plan: Plan, features: Features, num_classes: int, fraction: float, feature_time: float,
               log: Log) -> dict[str, Any]:
    """The frozen encoder's features of the subset -> logistic regression (L2 chosen inside the subset)."""
    idx = torch.as_tensor(plan.subsets[fraction])
    sub = Features(features.train_x[idx], features.train_y[idx], features.test_x, features.test_y)
    out = linear_probe_features(sub, num_classes=num_classes, l2_grid=_floats("l2_grid", plan.ecfg.l2_grid),
                                val_fraction=plan.ecfg.val_fraction, seed=plan.ecfg.seed, log=log)
    result = {**out, "arm": "linear", "label_fraction": fraction, "key": linear_key(plan, fraction),
              "history": [], "subset_indices": plan.subsets[fraction].tolist(),
              "subset_sha256": sup.subset_digest(plan.subsets[fraction]),
              # the probe plus the one feature pass a standalone probe would also need
              "train_time_s": out["wall_time_s"] + feature_time, "wall_time_s": out["wall_time_s"] + feature_time,
              "epochs_done": None, "cached": False}
    storage.write_json(storage.join(plan.out, "linear", f"linear-{fraction:g}.json"), result)
    return result


def pretraining_info(checkpoint: str, wall_time_s: float | None = None) -> dict[str, Any]:
    """What the SimCLR arms cost before any label was used: the checkpoint's per-epoch history (from its
    manifest, no weights read) and the sum of its epoch times."""
    manifest = storage.read_json(storage.join(checkpoint, MANIFEST_FILE))
    history = [{k: h[k] for k in ("epoch", "loss", "epoch_time_s", "knn_top1", "samples_per_s") if k in h}
               for h in manifest.get("history", [])]
    return {"checkpoint": checkpoint, "epoch": manifest["epoch"], "arch": manifest.get("arch"),
            "dataset": manifest.get("dataset"), "history": history,
            "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in history), "wall_time_s": wall_time_s}


def imported_info(pre: PretrainedEncoder) -> dict[str, Any]:
    """The ``pretraining`` entry of an imported encoder: its source and, for our own checkpoints, the manifest's
    history and time; an external file's pretraining cost is unknown (None, not 0: the report shows '-')."""
    info: dict[str, Any] = {"checkpoint": None, "epoch": pre.epoch, "arch": None, "dataset": None, "history": [],
                            "train_time_s": None, "wall_time_s": None}
    if pre.format == "simclr-dist":
        info = pretraining_info(pre.uri)
    return {**info, "source": pre.source, "format": pre.format, "uri": pre.uri,
            "normalization": pre.normalization_text(), "pretrained": pre.summary()}


def arm_titles(plan: Plan) -> dict[str, str]:
    """The arms' titles: 'SimCLR ...' for our own checkpoints, else the import's format ('torchvision fine-tuned')."""
    pre = plan.pretrained
    if pre is None or pre.format == "simclr-dist":
        return dict(ARM_TITLES)
    return {"linear": f"{pre.format} + linear head", "finetune": f"{pre.format} fine-tuned",
            "supervised": ARM_TITLES["supervised"]}


def _load_encoder(checkpoint: str, cfg: PretrainConfig) -> torch.nn.Module:
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.encoder


def execute(plan: Plan, *, log: Log = emit) -> dict[str, Any]:
    """Pretrain if the plan says so, then run every (arm, fraction) in :func:`_order`, checking each arm trained on
    the drawn subset; results.json is rewritten after every arm, the report and plots at the end."""
    t_start = time.perf_counter()
    pre_wall = None
    if plan.pretrain_cfg is not None:
        from simclr_dist import pretrain

        log(f"[exp] pretraining SimCLR into {plan.run} (simclr_dist.pretrain {plan.ecfg.pretrain_args})".rstrip())
        summary = pretrain.run(plan.pretrain_cfg)
        pre_wall = summary["wall_time_s"]
        checkpoint = latest_checkpoint(plan.run)
        if checkpoint is None:
            raise ExperimentError(f"--run {plan.run}: pretraining finished without a complete checkpoint")
        model_cfg = _checkpoint_config(checkpoint)
        if plan.ecfg.data_root is not None:
            model_cfg = dataclasses.replace(model_cfg, data_root=plan.ecfg.data_root)
        plan = dataclasses.replace(plan, checkpoint=checkpoint, model_cfg=model_cfg, pretrain_cfg=None)
    if plan.pretrained is not None:
        pre = imported_info(plan.pretrained)
        if not plan.pretrained.report.complete:
            log(f"[pretrained] warning: partial load (--no-strict) of {plan.pretrained.source}: "
                f"{plan.pretrained.report.problems()}; the rest keeps its random initialisation")
        log(plan.pretrained.describe())
        log(f"[exp] imported encoder {plan.pretrained_spec} on {plan.model_cfg.dataset} {plan.model_cfg.image_size}px "
            f"(input normalisation of the linear and fine-tuned arms: {pre['normalization']}); output in {plan.out}")
    else:
        assert plan.checkpoint is not None
        pre = pretraining_info(plan.checkpoint, pre_wall)
        log(f"[exp] SimCLR checkpoint {plan.checkpoint} (epoch {pre['epoch']}, {pre['train_time_s']:.0f}s of "
            f"pretraining); output in {plan.out}")
    if plan.ecfg.threads:
        torch.set_num_threads(plan.ecfg.threads)
    data = load_eval_data(plan.model_cfg, plan.ecfg.data_root)
    if plan.pretrained is not None:  # the import's input normalisation, not the dataset's
        mean, std = plan.pretrained.mean_std()
        data = dataclasses.replace(data, mean=tuple(mean), std=tuple(std))
    titles = arm_titles(plan)
    features, feature_time = None, 0.0
    results: dict[tuple[str, float], dict[str, Any]] = {}
    jobs = run_order(plan)
    for i, (arm, f) in enumerate(jobs, 1):
        count = len(plan.subsets[f])
        log(f"[exp] ({i}/{len(jobs)}) {titles[arm]} on {count} labels ({100 * f:g}% of {len(data.train_labels)})")
        if arm == "linear":
            r = cached_linear(plan, f)
            if r is None:
                if features is None:  # one frozen-encoder pass serves every fraction
                    t0 = time.perf_counter()
                    device = select_device()
                    encoder = (plan.pretrained.encoder if plan.pretrained is not None
                               else _load_encoder(plan.checkpoint, plan.model_cfg))
                    features = compute_features(encoder.to(device), data, device=device, log=log)
                    feature_time = time.perf_counter() - t0
                r = run_linear(plan, features, data.num_classes, f, feature_time, log)
        else:
            r = sup.run(arm_config(plan, arm, f, plan.checkpoint or "pending"), log=log)
        if r["subset_sha256"] != sup.subset_digest(plan.subsets[f]):  # the fairness invariant, checked per arm
            raise RuntimeError(f"{arm} at {f:g} trained on another label subset than the other arms")
        results[(arm, f)] = r
        log(f"[exp] ({i}/{len(jobs)}) {arm} {100 * f:g}%: top-1 {r['top1']:.4f} top-5 {r['top5']:.4f} "
            f"({r['train_time_s']:.1f}s training{', reused' if r.get('cached') else ''})")
        summary = summarise(plan, pre, results, elapsed=time.perf_counter() - t_start, complete=False)
        storage.write_json(storage.join(plan.out, "results.json"), summary)
    summary = summarise(plan, pre, results, elapsed=time.perf_counter() - t_start, complete=True)
    write_outputs(plan.out, summary)
    return summary


# ---------------------------------------------------------------------------- results
def arm_record(arm: str, fraction: float, r: dict[str, Any], pretrain_s: float | None,
               titles: dict[str, str] | None = None) -> dict[str, Any]:
    """One row of results.json/csv: accuracy, labels, time (the SimCLR arms also with their pretraining; None when
    that is unknown, as for an imported external encoder)."""
    ssl = arm in ("linear", "finetune")
    with_pre = (None if pretrain_s is None else r["train_time_s"] + pretrain_s) if ssl else r["train_time_s"]
    return {"arm": arm, "title": (titles or ARM_TITLES)[arm], "fraction": fraction, "label_count": r["label_count"],
            "top1": r["top1"], "top5": r["top5"], "epochs": r.get("epochs_done"),
            "train_time_s": r["train_time_s"], "wall_time_s": r["wall_time_s"],
            "time_with_pretraining_s": with_pre,
            "subset_sha256": r["subset_sha256"], "history": r.get("history", []), "params": r.get("params", {}),
            "run": r.get("run"), "reused": bool(r.get("cached")), "normalization": r.get("normalization"),
            **({"l2": r["l2"], "val_top1_by_l2": r["val_top1_by_l2"]} if arm == "linear" else {})}


def summarise(plan: Plan, pre: dict[str, Any], results: dict[tuple[str, float], dict[str, Any]], *,
              elapsed: float, complete: bool) -> dict[str, Any]:
    titles = arm_titles(plan)
    records = [arm_record(a, f, results[(a, f)], pre["train_time_s"], titles)
               for f in plan.fractions for a in plan.arms if (a, f) in results]
    return {
        "format_version": RESULT_FORMAT, "complete": complete, "elapsed_s": elapsed,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(plan.ecfg), "ray": plan.ecfg.use_ray(plan.model_cfg.dataset),
        "dataset": plan.model_cfg.dataset,
        "arch": plan.model_cfg.arch_signature(), "image_size": plan.model_cfg.image_size,
        "train_size": int(max(len(s) for s in plan.subsets.values())), "test_size": _test_size(results),
        "pretraining": pre, "fractions": list(plan.fractions), "small_fraction": plan.ecfg.small_fraction,
        "arms": list(plan.arms), "titles": titles, "results": records,
        # where the encoder comes from: the SimCLR checkpoint, or the --pretrained import (format, path, network)
        "encoder": ({"kind": "pretrained", **plan.pretrained.summary(), "spec": plan.pretrained_spec,
                     "epoch": plan.pretrained.epoch} if plan.pretrained is not None
                    else {"kind": "checkpoint", "source": pre["checkpoint"], "epoch": pre["epoch"]}),
        "subsets": {f"{f:g}": plan.subsets[f].tolist() for f in plan.fractions},
    }


def _test_size(results: dict[tuple[str, float], dict[str, Any]]) -> int | None:
    return next((r.get("test_size") for r in results.values() if r.get("test_size")), None)


def _find(summary: dict[str, Any], arm: str, fraction: float) -> dict[str, Any] | None:
    return next((r for r in summary["results"] if r["arm"] == arm and r["fraction"] == fraction), None)


def write_outputs(out: str, summary: dict[str, Any]) -> None:
    storage.write_json(storage.join(out, "results.json"), summary)
    buf = io.StringIO()
    fields = ["arm", "fraction", "label_count", "top1", "top5", "epochs", "train_time_s", "wall_time_s",
              "time_with_pretraining_s", "subset_sha256"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary["results"])
    storage.write_bytes(storage.join(out, "results.csv"), buf.getvalue().encode())
    for name, fig in plots(summary).items():
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
        storage.write_bytes(storage.join(out, name), png.getvalue())
        import matplotlib.pyplot as plt
        plt.close(fig)
    storage.write_bytes(storage.join(out, "report.md"), report(summary).encode())


# ---------------------------------------------------------------------------- plots
def plots(summary: dict[str, Any]) -> dict[str, Any]:
    """The three figures of the report, as matplotlib figures keyed by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, fractions = summary["arms"], summary["fractions"]
    titles = summary.get("titles") or ARM_TITLES
    figs: dict[str, Any] = {}

    # accuracy vs label fraction (log-x)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in arms:
        rows = [r for r in summary["results"] if r["arm"] == arm]
        ax.plot([100 * r["fraction"] for r in rows], [r["top1"] for r in rows], "o-", color=ARM_COLORS[arm],
                label=titles[arm])
    full = _find(summary, "supervised", 1.0)
    if full is not None:
        ax.axhline(full["top1"], color=ARM_COLORS["supervised"], ls="--", lw=1,
                   label=f"supervised, all labels ({full['top1']:.3f})")
    ax.axvline(100 * summary["small_fraction"], color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set(xlabel="labelled training images (fraction of the train split)", ylabel="test top-1 accuracy",
           title=f"{summary['dataset']}: accuracy vs label fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figs["accuracy_vs_fraction.png"] = fig

    # per-epoch curves: SimCLR pretraining, then every trained arm (one line per fraction)
    trained = [a for a in arms if a != "linear"]
    cols = ["pretraining", *trained]
    fig, axes = plt.subplots(3, len(cols), figsize=(4.2 * len(cols), 9), squeeze=False)
    pre = summary["pretraining"]["history"]
    ax = axes[0][0]
    ax.plot([h["epoch"] for h in pre], [h["loss"] for h in pre], "k.-")
    ax.set(title="SimCLR pretraining", ylabel="training loss (NT-Xent)")
    if not pre and summary["pretraining"].get("source"):  # an external import: no history to draw
        ax.text(0.5, 0.5, f"imported {summary['pretraining']['format']} encoder:\npretrained elsewhere, "
                "no history", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(title="pretraining")
        ax.set_axis_off()
        axes[2][0].set_axis_off()
    knn = [h for h in pre if h.get("knn_top1") is not None]
    axes[2][0].plot([h["epoch"] for h in knn], [h["knn_top1"] for h in knn], "ko-")
    axes[2][0].set(ylabel="test top-1 (kNN monitor)", xlabel="epoch")
    axes[1][0].text(0.5, 0.5, "no labels used:\nno training accuracy", ha="center", va="center",
                    transform=axes[1][0].transAxes, color="grey")
    axes[1][0].set_axis_off()
    cmap = plt.get_cmap("viridis")
    for c, arm in enumerate(trained, 1):
        for k, f in enumerate(fractions):
            r = _find(summary, arm, f)
            if r is None or not r["history"]:
                continue
            color = cmap(k / max(1, len(fractions) - 1))
            epochs = [h["epoch"] for h in r["history"]]
            for row, key in enumerate(("train_loss", "train_acc", "test_top1")):
                axes[row][c].plot(epochs, [h[key] for h in r["history"]], ".-", ms=3, color=color,
                                  label=f"{100 * f:g}%")
        axes[0][c].set(title=titles[arm], ylabel="training loss (cross-entropy)")
        axes[1][c].set(ylabel="training accuracy")
        axes[2][c].set(ylabel="test top-1", xlabel="epoch")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    if trained:
        handles, labels = axes[2][len(cols) - 1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, title="labelled fraction",
                   title_fontsize=8, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"{summary['dataset']}: per-epoch training curves (the linear arm is a closed-form L-BFGS fit)")
    fig.tight_layout()
    figs["training_curves.png"] = fig

    # accuracy vs training time (markers only: times are measured, so a line through the fractions would zigzag)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in arms:
        rows = [r for r in summary["results"] if r["arm"] == arm]
        timed = [r for r in rows if r["time_with_pretraining_s"] is not None]  # None: pretraining cost unknown
        if arm != "supervised" and timed:
            ax.plot([r["time_with_pretraining_s"] for r in timed], [r["top1"] for r in timed], "o",
                    color=ARM_COLORS[arm], label=f"{titles[arm]} (incl. pretraining)")
        ax.plot([r["train_time_s"] for r in rows], [r["top1"] for r in rows], "o" if arm == "supervised" else "s",
                mfc="none" if arm != "supervised" else None, color=ARM_COLORS[arm],
                label=titles[arm] + ("" if arm == "supervised" else " (this arm only)"))
        for r in rows:
            ax.annotate(f"{100 * r['fraction']:g}%", (r["train_time_s"], r["top1"]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points", color=ARM_COLORS[arm])
    ax.set_xscale("log")
    ax.set(xlabel="training time, s (sum of epoch times; log scale)", ylabel="test top-1 accuracy",
           title=f"{summary['dataset']}: accuracy vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figs["accuracy_vs_time.png"] = fig
    return figs


# ---------------------------------------------------------------------------- report
def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def report(summary: dict[str, Any]) -> str:
    """report.md: Experiments A and B, the sweep, the plots, and how the numbers were made."""
    pre, small, ds = summary["pretraining"], summary["small_fraction"], summary["dataset"]
    arch = summary["arch"]
    titles = summary.get("titles") or ARM_TITLES
    if pre.get("source"):  # --pretrained: an imported encoder
        known = pre["train_time_s"] is not None
        source = (f"- Encoder: imported `{pre['source']}` (format {pre['format']}, read from `{pre['uri']}`"
                  + (f", epoch {pre['epoch']}" if pre.get("epoch") is not None else "")
                  + f"; {arch['arch']} x{arch['width']:g}, {'CIFAR 3x3' if arch['cifar_stem'] else 'ImageNet 7x7'} "
                  f"stem, {summary['image_size']} px; input normalisation of the linear and fine-tuned arms: "
                  f"{pre['normalization']}; pretraining "
                  + (f"{_secs(pre['train_time_s'])} of epoch time)" if known else "time unknown, not counted)"))
        name = "SimCLR" if pre["format"] == "simclr-dist" else f"the imported {pre['format']} encoder"
        heading = f"# {name[0].upper() + name[1:]} vs supervised on {ds}: Experiments A and B"
    else:
        source = (f"- SimCLR checkpoint: `{pre['checkpoint']}` (epoch {pre['epoch']}; {arch['arch']} x{arch['width']}, "
                  f"{summary['image_size']} px; pretraining {_secs(pre['train_time_s'])} of epoch time"
                  + (f", {_secs(pre['wall_time_s'])} wall in this command" if pre.get("wall_time_s") else "") + ")")
        heading, name = f"# SimCLR vs supervised on {ds}: Experiments A and B", "SimCLR"
    lines = [
        heading, "",
        source,
        f"- {summary['train_size']} labelled train images, {summary['test_size']} test images; label subsets are "
        f"class-balanced, drawn once with seed {summary['config']['seed']}, nested (a smaller fraction is inside "
        "a larger one) and identical for every arm (indices in `results.json`)",
        f"- written {summary['written_at']}; whole command {_secs(summary['elapsed_s'])}", "",
        "Top-1/top-5 are the test split's, after the last epoch (no early stopping on test). Training time is the "
        "sum of the arm's epoch times (train + per-epoch test pass); "
        + ("the pretraining time of the imported encoder is unknown, so 'incl. pretraining' shows '-'."
           if pre["train_time_s"] is None else
           "the SimCLR arms are also shown with the pretraining time added, the price of the labels they save.")
        + _noise_note(summary), "",
    ]
    header = "| arm | labels | top-1 | top-5 | epochs | training time | incl. pretraining |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"

    def row(r: dict[str, Any], name: str | None = None) -> str:
        with_pre = _secs(r["time_with_pretraining_s"]) if r["arm"] != "supervised" else "-"
        return (f"| {name or r['title']} | {r['label_count']} ({_pct(r['fraction'])}) | {r['top1']:.4f} | "
                f"{r['top5']:.4f} | {r['epochs'] or 'L-BFGS'} | {_secs(r['train_time_s'])} | {with_pre} |")

    a_rows = [r for arm in summary["arms"] if (r := _find(summary, arm, small))]
    lines += [f"## Experiment A: {_pct(small)} of the labels, same images for every arm", "", header, rule,
              *map(row, a_rows), ""]
    full = _find(summary, "supervised", 1.0)
    if a_rows and full:
        lines += [f"## Experiment B: {name} on {_pct(small)} of the labels vs supervised on all of them", "",
                  "| arm | labels | top-1 | top-5 | top-1 vs supervised (100%) | training time | incl. pretraining |",
                  rule]
        for r in [r for r in a_rows if r["arm"] != "supervised"] + [full]:
            gap = "reference" if r is full else f"{r['top1'] - full['top1']:+.4f}"
            with_pre = _secs(r["time_with_pretraining_s"]) if r["arm"] != "supervised" else "-"
            lines.append(f"| {r['title']} | {r['label_count']} ({_pct(r['fraction'])}) | {r['top1']:.4f} | "
                         f"{r['top5']:.4f} | {gap} | {_secs(r['train_time_s'])} | {with_pre} |")
        lines.append("")
    lines += ["## Label-fraction sweep (test top-1; training time in brackets)", "",
              "| labels | " + " | ".join(titles[a] for a in summary["arms"]) + " |",
              "|---:|" + "---:|" * len(summary["arms"])]
    for f in summary["fractions"]:
        cells = []
        for arm in summary["arms"]:
            r = _find(summary, arm, f)
            cells.append("-" if r is None else f"{r['top1']:.4f} ({_secs(r['train_time_s'])})")
        count = next((r["label_count"] for r in summary["results"] if r["fraction"] == f), "-")
        lines.append(f"| {count} ({_pct(f)}) | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", "", "![accuracy vs label fraction](accuracy_vs_fraction.png)", "",
              "![per-epoch training curves](training_curves.png)", "",
              "![accuracy vs training time](accuracy_vs_time.png)", "",
              "## How each arm was trained", "",
              f"- **{titles['linear']}**: frozen encoder (eval mode, features computed once), multinomial logistic "
              "regression (L-BFGS) on the subset's features; its L2 strength is chosen on a class-stratified "
              f"{100 * summary['config']['val_fraction']:g}% of the *subset* (with one label per class there is no "
              "validation data and the strongest L2 of the grid is used).",
              f"- **{titles['finetune']}** and **{titles['supervised']}**: `simclr_dist.supervised`, the same loop, "
              "network, subset, batch, epochs, learning rate, cosine schedule and augmentation; they differ only in "
              "the initialisation (the " + ("imported encoder, with its input normalisation," if pre.get("source")
                                           else "SimCLR encoder") + " vs random) and the weight decay (0 for "
              "fine-tuning, as the paper; from scratch needs it). "
              + (f"Run under Ray Train ({summary['config']['num_workers']} DDP workers each)." if summary["ray"]
                 else "Run in-process (`--no-ray`, or the digits default: a Ray worker group per arm costs more "
                      "than the arm); `--ray` runs the same loop under Ray Train."),
              f"- Recipe: {_recipe(summary)}.", ""]
    return "\n".join(lines)


def _noise_note(summary: dict[str, Any]) -> str:
    """How big a difference must be to mean something: each arm ran once, on a finite test split."""
    n = summary["test_size"]
    if not n:
        return ""
    return (f" Each arm ran once (seed {summary['config']['seed']}); one test image is {100 / n:.2f} points of "
            f"accuracy and at 95% accuracy the binomial standard error is {100 * math.sqrt(0.95 * 0.05 / n):.1f} "
            "points, so read differences of a point or two as ties. Times are wall-clock and vary with whatever "
            "else the machine runs.")


def _recipe(summary: dict[str, Any]) -> str:
    r = next((r for r in summary["results"] if r["arm"] == "supervised" and r["params"]), None) or next(
        (r for r in summary["results"] if r["arm"] == "finetune" and r["params"]), None)
    if r is None:
        return "no trained arm"
    p = r["params"]
    ft = next((x for x in summary["results"] if x["arm"] == "finetune" and x["params"]), None)
    wd = (f"weight decay {p['weight_decay']:g}" if r["arm"] == "supervised" else "") + (
        f" (fine-tuning {ft['params']['weight_decay']:g})" if ft else "")
    epochs = sorted({x["epochs"] for x in summary["results"] if x["epochs"]})
    return (f"SGD (Nesterov, momentum {p['momentum']:g}), lr {p['lr_per_256']:g} per 256 images, batch "
            f"min({summary['config']['batch_size']}, labels), {wd.strip()}, augmentation `{p['augment']}`, "
            f"epochs {', '.join(map(str, epochs))} (see `results.json` per arm)")


def format_table(summary: dict[str, Any]) -> str:
    """The sweep on stdout: one row per fraction, one column per arm (top-1)."""
    arms = summary["arms"]
    head = f"{'labels':>14} " + " ".join(f"{a:>11}" for a in arms)
    rows = [head, "-" * len(head)]
    for f in summary["fractions"]:
        count = next((r["label_count"] for r in summary["results"] if r["fraction"] == f), 0)
        cells = [(_find(summary, a, f) or {}).get("top1") for a in arms]
        rows.append(f"{count:>6} ({_pct(f):>5}) " + " ".join(f"{c:>11.4f}" if c is not None else f"{'-':>11}"
                                                             for c in cells))
    return "\n".join(rows)


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from simclr_dist.run.launch import RunError

    try:
        plan = make_plan(parse_args(argv))
    except (ExperimentError, EvalError, ConfigError, DatasetError, storage.StorageError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = execute(plan)
    except (ExperimentError, ConfigError, DatasetError, storage.StorageError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        emit(f"\n[exp] interrupted; finished arms are kept in {plan.out} and reused by a rerun")
        return 130
    emit("\n" + format_table(summary))
    emit(f"\n[exp] done in {summary['elapsed_s']:.0f}s: {storage.join(plan.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
