"""``python -m simclr_dist.supervised``: the SimCLR network trained with labels, under Ray Train like pretraining.

Why this exists: the project's question is whether self-supervised pretraining beats plain supervised training
on the same (few) labels. The baseline must therefore be *the same network* (``build_model(cfg).encoder`` + a
linear classifier), trained on *the same class-balanced label subset* (:func:`evaluate.balanced_subset`, fixed
seed, indices saved with the results), and it must scale the same way as pretraining: a ``TorchTrainer`` with the
same ScalingConfig / RunConfig, DDP over the workers, a checkpoint per epoch in ``STORAGE/NAME`` (manifest last,
see :func:`train.make_uploader`), and resume by rerunning the same command.

``--init-checkpoint`` starts from a SimCLR checkpoint's encoder instead of a random one: that is SimCLR
fine-tuning with the very same loop, so Experiment A's "fine-tuned" and "from scratch" arms differ only in the
initialisation and the weight decay (the paper fine-tunes without it; from scratch needs it). The recipe for both:
random-resized crop (+ flip, except on digits where a mirrored digit is another symbol), SGD with Nesterov
momentum, a per-step cosine decay from ``lr * batch / 256``, last-epoch test accuracy (no early stopping on test).

``--init-pretrained FORMAT:PATH_OR_URI`` starts from an imported encoder instead (:mod:`simclr_dist.run.pretrained`:
SimCLR v1 converted, Spijkervet/SimCLR, torchvision ImageNet weights, or our own checkpoint): the network
(architecture, width, stem) is the import's, ``--dataset`` is required (except for a simclr-dist checkpoint, whose
own dataset is the default), and the import's input normalisation replaces the dataset's in the training and test
transforms (SimCLR v1: raw [0, 1] pixels), as in ``evaluate --pretrained``.

``--no-ray`` runs the identical loop in this process (one worker, no DDP), for quick local runs and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from simclr_dist.run import storage
from simclr_dist.run.checkpoint import latest_checkpoint, list_complete_checkpoints
from simclr_dist.config import ConfigError, PretrainConfig, build_parser, flag
from simclr_dist.console import Log, emit
from simclr_dist.data.augment import (
    build_view_transform,
    default_augment,
    parse_components,
)
from simclr_dist.data.datasets import (
    DatasetError,
    check_available,
    dataset_info,
    load_dataset,
)
from simclr_dist.core.dist import all_sum, broadcast_buffers
from simclr_dist.core.models import Classifier
from simclr_dist.core.precision import Precision
from simclr_dist.data.splits import balanced_subset, labelled_splits
from simclr_dist.run.chaos import chaos_kill
from simclr_dist.run.checkpoint import load_checkpoint, make_uploader, save_checkpoint
from simclr_dist.run.launch import RunError, fit
from simclr_dist.run.step import build_model
from simclr_dist.evaluate import (
    EvalConfig,
    EvalData,
    TransformedSubset,
    classify,
    finetune_components,
    load_eval_data,
    require_complete,
    select_device,
)
from simclr_dist.core.optim import WarmupCosine, scale_lr
from simclr_dist.config import FORMATS, PretrainedError, parse_spec
from simclr_dist.run.pretrained import Normalization, PretrainedEncoder, init_from_pretrained, load_pretrained

RUN_CONFIG_FILE = "supervised_config.json"
RESULTS_FILE = "results.json"
FORMAT_VERSION = 1
# Fields that change neither the experiment nor its result's meaning: a finished run is reused across them.
CLUSTER_FIELDS = ("ray", "num_workers", "use_gpu", "cpus_per_worker", "ray_address", "storage_path", "name",
                  "checkpoint_every", "num_to_keep", "max_failures", "threads", "loader_workers", "eval_batch_size",
                  "verbose", "chaos_kill_epoch", "data_root",
                  # a complete import is the same under --strict and --no-strict (a partial one fails --strict)
                  "init_strict")





# ---------------------------------------------------------------------------- configuration
@dataclass
class SupervisedConfig:
    # what to train
    dataset: str | None = flag(None, "dataset (default: the --init-checkpoint's or a simclr-dist --init-pretrained's, "
                                   "else digits)")
    data_root: str | None = flag(None, "dataset directory (default: the --init-checkpoint's; not needed for digits)")
    image_size: int | None = flag(None, "resolution (default: the --init-checkpoint's, else as pretraining: 24 digits)")
    arch: str | None = flag(None, "backbone (default: the --init-checkpoint's or --init-pretrained's, else resnet18)")
    width: float | None = flag(None, "channel width multiplier (default: the --init-checkpoint's or "
                                   "--init-pretrained's, else as pretraining)")
    cifar_stem: bool | None = flag(None, "3x3 stride-1 stem (default: the --init-checkpoint's or --init-pretrained's, "
                                       "else on for <= 64 px)")
    init_checkpoint: str | None = flag(None, "start from this SimCLR checkpoint's encoder (fine-tune the whole "
                                           "network) instead of a random init: SimCLR fine-tuning with this loop")
    init_pretrained: str | None = flag(None, "start from an imported encoder FORMAT:PATH_OR_URI, FORMAT one of "
                                           f"{', '.join(FORMATS)} (see simclr_dist.run.pretrained): its network, and its "
                                           "input normalisation instead of the dataset's; needs --dataset except "
                                           "for simclr-dist")
    init_strict: bool = flag(True, "with --init-pretrained: refuse a partial load (any missing/unexpected key or "
                                 "shape mismatch); --no-init-strict loads the matching tensors and warns")
    fraction: float = flag(1.0, "fraction of the train labels, class-balanced (1: all labels)")
    seed: int = flag(0, "seed of the label subset (the same seed gives the subset evaluate and experiments use), "
                      "the initialisation and the data order")
    # recipe
    epochs: int | None = flag(None, "epochs (default: evaluate's fine-tuning budget: 30 on digits; 60 for <= 1%% "
                                  "of the labels, else 30)")
    batch_size: int = flag(64, "global batch size (capped at the label count, rounded down to the workers)")
    lr: float | None = flag(None, "SGD (Nesterov) learning rate per 256 images, scaled linearly to the batch "
                                "(default: digits 0.4; else 0.05 fine-tuning (paper), 0.1 from scratch)")
    weight_decay: float | None = flag(None, "weight decay (default: 0 when fine-tuning, as the paper; from scratch "
                                          "5e-4, 1e-4 on imagenet/imagefolder)")
    momentum: float = flag(0.9, "SGD momentum (Nesterov)")
    augment: str | None = flag(None, "augmentation components (default: crop on digits, crop,flip elsewhere)")
    eval_batch_size: int = flag(256, "images per forward pass when testing")
    loader_workers: int = flag(0, "DataLoader worker processes per training process")
    # cluster, checkpoints (as pretraining)
    ray: bool = flag(True, "train under Ray Train (DDP workers); --no-ray: the same loop in this process")
    num_workers: int = flag(2, "Ray Train workers (one process each, DDP)")
    use_gpu: bool | None = flag(None, "one GPU per worker (default: when the cluster has GPUs)")
    cpus_per_worker: float = flag(1.0, "CPUs Ray reserves for each worker (also its torch thread count)")
    ray_address: str | None = flag(None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    threads: int = flag(0, "with --no-ray: torch CPU threads (0: torch's default)")
    storage_path: str = flag("./runs", "checkpoint storage: a local/NFS directory, s3://bucket/prefix or gs://...")
    name: str | None = flag(None, "run name; rerunning with the same storage path and name resumes (default: "
                                "supervised-<dataset>-<arch>-<fraction>, finetune-... with --init-checkpoint or "
                                "--init-pretrained)")
    checkpoint_every: int = flag(1, "save a checkpoint every K epochs (and always after the last)")
    num_to_keep: int = flag(2, "checkpoints kept in storage")
    max_failures: int = flag(0, "worker failures Ray Train recovers from (restarting from the last checkpoint)")
    verbose: bool = flag(False, "show Ray Train's INFO logs")
    chaos_kill_epoch: int = flag(-1, "fault drill: SIGKILL the last worker once, after epoch N's checkpoint (-1: off)")

    def validate(self) -> "SupervisedConfig":
        """Raise :class:`ConfigError` for the first bad flag (no data or storage is touched); returns self."""
        def bad(flag: str, msg: str) -> None:
            raise ConfigError(f"--{flag.replace('_', '-')}: {msg}")

        if self.init_pretrained is not None:
            if self.init_checkpoint is not None:
                bad("init_pretrained", "give at most one of --init-checkpoint DIR and --init-pretrained FORMAT:PATH")
            try:
                fmt, _ = parse_spec(self.init_pretrained)
            except PretrainedError as e:
                raise ConfigError(str(e).replace("--pretrained", "--init-pretrained", 1)) from None
            if self.dataset is None and fmt != "simclr-dist":
                bad("dataset", f"required with --init-pretrained {fmt}:... (the dataset to fine-tune the encoder on)")
        if self.dataset is not None:
            try:
                dataset_info(self.dataset)
            except DatasetError as e:
                bad("dataset", str(e))
        if self.image_size is not None and self.image_size < 8:
            bad("image_size", f"must be >= 8 pixels, got {self.image_size}")
        if not (0 < self.fraction <= 1):
            bad("fraction", f"must be in (0, 1], got {self.fraction:g}")
        for name in ("epochs", "batch_size", "eval_batch_size", "num_workers", "checkpoint_every", "num_to_keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                bad(name, f"must be >= 1, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay is not None and not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.cpus_per_worker <= 0:
            bad("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            bad("max_failures", f"must be >= -1, got {self.max_failures}")
        for name in ("threads", "loader_workers"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.augment is not None:
            try:
                parse_components(self.augment)
            except ValueError as e:
                bad("augment", str(e))
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            bad("name", f"must be a plain directory name, got {self.name!r}")
        if self.chaos_kill_epoch >= 0 and not self.ray:
            bad("chaos_kill_epoch", "is a Ray Train fault drill: it needs --ray")
        return self

    # ---------------------------------------------------------------- derived values (after resolve())
    def from_pretrained(self) -> bool:
        return self.init_checkpoint is not None or self.init_pretrained is not None

    def init_source(self) -> str | None:
        """Where the encoder starts from: the SimCLR checkpoint, the import's FORMAT:PATH, or None (random)."""
        return self.init_checkpoint or self.init_pretrained

    def world(self) -> int:
        return self.num_workers if self.ray else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SupervisedConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def experiment_key(self) -> dict[str, Any]:
        """What defines the result (cluster layout and bookkeeping excluded)."""
        return {k: v for k, v in self.to_dict().items() if k not in CLUSTER_FIELDS}


def default_name(scfg: SupervisedConfig) -> str:
    prefix = "finetune" if scfg.from_pretrained() else "supervised"
    return f"{prefix}-{scfg.dataset}-{scfg.arch}-{scfg.fraction:g}"


def absolute_spec(spec: str) -> str:
    """``FORMAT:PATH`` with a local path made absolute (Ray workers read it and need not share this process's cwd);
    URIs and torch-hub names (``torchvision:resnet50``) are kept as given. The format is lower-cased."""
    fmt, path = parse_spec(spec)
    local = os.path.expanduser(path)
    if "://" not in path and os.path.exists(local):
        path = os.path.abspath(local)
    return f"{fmt}:{path}"


def pretrained_model_config(pre: PretrainedEncoder, *, dataset: str | None, image_size: int | None,
                            data_root: str | None) -> PretrainConfig:
    """The network and data of an imported encoder: architecture, width and stem from the import; the dataset
    given (default: a simclr-dist checkpoint's own) at ``image_size`` (default: the checkpoint's when it is its own
    dataset, else the dataset's); the data root given (default: the checkpoint's on its own dataset). The
    convention of ``evaluate --pretrained`` (:func:`evaluate.pretrained_eval_data`)."""
    own = (pre.checkpoint or {}).get("config")
    base = PretrainConfig.from_dict(own) if own else None
    dataset = dataset or (base.dataset if base is not None else None)
    if dataset is None:
        raise ConfigError(f"--dataset: required with --pretrained {pre.source} (the dataset to train on)")
    same = base is not None and dataset == base.dataset
    head = {k: getattr(base, k) for k in ("proj_hidden_dim", "proj_out_dim")} if base is not None else {}
    return PretrainConfig(dataset=dataset, image_size=image_size or (base.image_size if same else None),
                          data_root=data_root or (base.data_root if same else None), arch=pre.arch,
                          width=float(pre.width), cifar_stem=bool(pre.cifar_stem), **head).resolved()


def _resolve_pretrained(scfg: SupervisedConfig) -> PretrainConfig:
    """The network of ``--init-pretrained`` (the import is read and verified here: a bad file costs one line before
    any training); a conflicting ``--arch/--width/--cifar-stem`` is a one-line error."""
    scfg.init_pretrained = absolute_spec(scfg.init_pretrained)
    try:
        pre = load_pretrained(scfg.init_pretrained, strict=scfg.init_strict)
    except PretrainedError as e:
        raise ConfigError(str(e).replace("--pretrained", "--init-pretrained", 1)) from None
    # pinned to what was read (a run directory's latest checkpoint, a torch-hub name's file): every worker, a resume
    # and the results cache then see the same weights
    scfg.init_pretrained = f"{pre.format}:{pre.uri}"
    for key, got in (("arch", pre.arch), ("width", float(pre.width)), ("cifar_stem", bool(pre.cifar_stem))):
        want = getattr(scfg, key)
        if want is not None and want != got:
            raise ConfigError(f"--{key.replace('_', '-')} {want}: --init-pretrained {scfg.init_pretrained} is a "
                              f"{key}={got!r} network; drop the flag or pick another import")
    return pretrained_model_config(pre, dataset=scfg.dataset, image_size=scfg.image_size, data_root=scfg.data_root)


def resolve(scfg: SupervisedConfig) -> tuple[SupervisedConfig, PretrainConfig]:
    """(config with every default filled, the network's PretrainConfig). With ``--init-checkpoint`` the network,
    dataset and resolution are the checkpoint's, and a conflicting flag is a one-line error. With
    ``--init-pretrained`` the network is the import's (see :func:`pretrained_model_config`)."""
    scfg = dataclasses.replace(scfg.validate())
    if scfg.init_checkpoint is not None:
        if "://" not in scfg.init_checkpoint:  # Ray workers read it and need not share this process's cwd
            scfg.init_checkpoint = os.path.abspath(os.path.expanduser(scfg.init_checkpoint))
        try:
            require_complete(scfg.init_checkpoint)
        except ValueError as e:
            raise ConfigError(str(e).replace("--checkpoint", "--init-checkpoint", 1)) from None
        try:
            state = load_checkpoint(scfg.init_checkpoint)
        except ValueError as e:  # checksum mismatch: a corrupt or half-copied checkpoint
            raise ConfigError(f"--init-checkpoint {scfg.init_checkpoint}: {e}") from None
        if "config" not in state or "model" not in state or state.get("kind") == "supervised":
            raise ConfigError(f"--init-checkpoint {scfg.init_checkpoint}: not a simclr-dist pretraining checkpoint")
        mcfg = PretrainConfig.from_dict(state["config"])
        mine = {"dataset": scfg.dataset, "image_size": scfg.image_size, "arch": scfg.arch, "width": scfg.width,
                "cifar_stem": scfg.cifar_stem}
        for key, want in mine.items():
            if want is not None and want != getattr(mcfg, key):
                raise ConfigError(f"--{key.replace('_', '-')} {want}: --init-checkpoint {scfg.init_checkpoint} was "
                                  f"trained with {key}={getattr(mcfg, key)!r}; drop the flag or pick another checkpoint")
        if scfg.data_root is not None:
            mcfg.data_root = scfg.data_root
    elif scfg.init_pretrained is not None:
        mcfg = _resolve_pretrained(scfg)
    else:
        mcfg = PretrainConfig(dataset=scfg.dataset or "digits", data_root=scfg.data_root,
                              image_size=scfg.image_size, arch=scfg.arch or "resnet18", width=scfg.width,
                              cifar_stem=scfg.cifar_stem).validate().resolved()
    for key in ("dataset", "image_size", "arch", "width", "cifar_stem"):
        setattr(scfg, key, getattr(mcfg, key))
    scfg.data_root = mcfg.data_root
    big = scfg.dataset in ("imagenet", "imagefolder")
    digits = scfg.dataset == "digits"
    if scfg.epochs is None:
        scfg.epochs = EvalConfig().epochs_for(scfg.fraction, scfg.dataset)
    if scfg.lr is None:
        scfg.lr = 0.4 if digits else (0.05 if scfg.from_pretrained() else 0.1)
    if scfg.weight_decay is None:
        scfg.weight_decay = 0.0 if scfg.from_pretrained() else (1e-4 if big else 5e-4)
    if scfg.augment is None:
        scfg.augment = finetune_components(scfg.dataset)
    scfg.augment = ",".join(parse_components(scfg.augment))
    scfg.name = scfg.name or default_name(scfg)
    if "://" not in scfg.storage_path:
        scfg.storage_path = os.path.abspath(os.path.expanduser(scfg.storage_path))
    return scfg, mcfg


def run_uri(scfg: SupervisedConfig) -> str:
    return storage.join(scfg.storage_path, scfg.name)


def batch_layout(label_count: int, batch_size: int, world: int) -> tuple[int, int]:
    """(global batch, per-worker batch): the batch is capped at the label count and split evenly over workers."""
    global_batch = min(batch_size, label_count) // world * world
    return global_batch, global_batch // world


def preflight(scfg: SupervisedConfig) -> tuple[SupervisedConfig, PretrainConfig]:
    """Every check that needs no Ray (flags, checkpoint, data, label subset, storage, a resume's config):
    the resolved configs or a one-line error. Writes the run's config file, as pretraining does."""
    scfg, mcfg = resolve(scfg)
    train_split, test_split = labelled_splits(scfg.dataset)
    for split in (train_split, test_split):
        check_available(scfg.dataset, split, scfg.data_root)
    labels = np.asarray(load_dataset(scfg.dataset, train_split, root=scfg.data_root,
                                     image_size=scfg.image_size).targets)
    count = len(balanced_subset(labels, scfg.fraction, scfg.seed))
    _, per_worker = batch_layout(count, scfg.batch_size, scfg.world())
    if per_worker < 2:
        flag = f"--fraction {scfg.fraction:g}" if count < scfg.batch_size else f"--batch-size {scfg.batch_size}"
        raise ConfigError(f"{flag}: {count} labels in batches of {scfg.batch_size} give {per_worker} image(s) per "
                          f"worker over {scfg.world()} worker(s); BatchNorm needs >= 2 per worker")
    storage.check_writable(scfg.storage_path)
    cfg_uri = storage.join(run_uri(scfg), RUN_CONFIG_FILE)
    if storage.exists(cfg_uri):
        saved = SupervisedConfig.from_dict(storage.read_json(cfg_uri))
        fixed = ("dataset", "image_size", "arch", "width", "cifar_stem", "init_checkpoint", "init_pretrained",
                 "fraction", "seed", "batch_size")
        diff = [f"{k}={getattr(saved, k)!r} (now {getattr(scfg, k)!r})" for k in fixed
                if getattr(saved, k) != getattr(scfg, k)]
        if diff:
            raise ConfigError(f"run {run_uri(scfg)} was started with {', '.join(diff)}: resume with the same "
                              "settings or choose a new --name")
    storage.write_json(cfg_uri, scfg.to_dict())
    return scfg, mcfg


# ---------------------------------------------------------------------------- where the loop runs
class LocalSession:
    """This process as the only worker: checkpoints go straight to ``STORAGE/NAME/checkpoint_local_<epoch>``."""

    def __init__(self, scfg: SupervisedConfig):
        self.scfg, self.rank, self.world, self.device = scfg, 0, 1, select_device()

    def restore(self) -> dict[str, Any] | None:
        latest = latest_checkpoint(run_uri(self.scfg))
        return load_checkpoint(latest) if latest else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            return
        save_checkpoint(storage.join(run_uri(self.scfg), f"checkpoint_local_{state['epoch']:06d}"), state)
        for old in list_complete_checkpoints(run_uri(self.scfg))[:-self.scfg.num_to_keep]:
            fs, path = storage.resolve(old.uri)
            fs.delete_dir(path)

    def after_report(self, epoch: int) -> None:
        pass


class RaySession:
    """A Ray Train worker: checkpoints through ``ray.train.report`` and pretraining's manifest-last uploader."""

    def __init__(self, scfg: SupervisedConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.scfg, self.rank, self.world = scfg, ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict[str, Any] | None:
        """Ray's checkpoint after a worker failure or a rerun; else the newest complete one in the run directory
        (a run begun with --no-ray, whose checkpoints Ray never registered)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                return load_checkpoint(d)
        latest = latest_checkpoint(run_uri(self.scfg))
        return load_checkpoint(latest) if latest else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(tmp, state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=make_uploader(run_uri(self.scfg)))

    def after_report(self, epoch: int) -> None:
        if epoch == self.scfg.chaos_kill_epoch and self.rank == self.world - 1:
            chaos_kill(run_uri(self.scfg))  # once per run (a marker in the run directory), after it registers


# ---------------------------------------------------------------------------- the loop
def sharded_test(model: torch.nn.Module, data: EvalData, *, rank: int, world: int, device: torch.device,
                 batch_size: int) -> tuple[float, float]:
    """Test top-1/top-5: each rank classifies every world-th image and the hit counts are summed."""
    idx = list(range(rank, len(data.test), world))
    top1, top5 = classify(model, Subset(data.test, idx), data.eval_transform(), device=device, batch_size=batch_size)
    hits = all_sum(torch.tensor([top1 * len(idx), top5 * len(idx), float(len(idx))], dtype=torch.float64))
    return float(hits[0] / hits[2]), float(hits[1] / hits[2])


def load_initial(scfg: SupervisedConfig, mcfg: PretrainConfig, log: Log | None = None
                 ) -> tuple[torch.nn.Module, Normalization | None]:
    """(encoder, input normalisation): a seeded random encoder (identical on every rank), the SimCLR checkpoint's,
    or the ``--init-pretrained`` import's (verified, :func:`pretrained.init_from_pretrained`), whose input
    normalisation (mean, std) then replaces the dataset's; None: the dataset's."""
    torch.manual_seed(scfg.seed)
    model = build_model(mcfg)
    if scfg.init_checkpoint is not None:
        model.load_state_dict(load_checkpoint(scfg.init_checkpoint)["model"])
    elif scfg.init_pretrained is not None:
        pre = init_from_pretrained(model, scfg.init_pretrained, strict=scfg.init_strict, log=log)
        return model.encoder, pre.mean_std()
    return model.encoder, None


def initial_encoder(scfg: SupervisedConfig, mcfg: PretrainConfig) -> torch.nn.Module:
    """A seeded random encoder (identical on every rank), the SimCLR checkpoint's, or the imported one."""
    return load_initial(scfg, mcfg)[0]


def train_classifier(scfg: SupervisedConfig, mcfg: PretrainConfig, session: LocalSession | RaySession,
                     log: Log = emit) -> dict[str, Any]:
    """Train encoder + linear head on the label subset; report and checkpoint every epoch; resume if the session
    has a checkpoint. Returns rank 0's view: history, subset indices and the last epoch's test accuracy."""
    rank, world, device = session.rank, session.world, torch.device(session.device)
    log = log if rank == 0 else (lambda msg: None)
    data = load_eval_data(mcfg, scfg.data_root)
    subset = balanced_subset(data.train_labels, scfg.fraction, scfg.seed)
    global_batch, per_worker = batch_layout(len(subset), scfg.batch_size, world)

    encoder, norm = load_initial(scfg, mcfg, log=log)
    if norm is not None:  # the import's input normalisation, in the training and the test transforms
        data = dataclasses.replace(data, mean=tuple(norm[0]), std=tuple(norm[1]))
    torch.manual_seed(scfg.seed)  # the head is zero-initialised; this seeds nothing else but keeps runs replayable
    model = Classifier(encoder, encoder.feat_dim, data.num_classes).to(device)
    aug = dataclasses.replace(default_augment(dataset_info(scfg.dataset), scfg.augment, image_size=scfg.image_size),
                              mean=data.mean, std=data.std)
    train_set = TransformedSubset(data.train, build_view_transform(aug), subset.tolist())
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=scfg.seed)
    loader = DataLoader(train_set, batch_size=per_worker, sampler=sampler, drop_last=len(subset) > global_batch,
                        num_workers=scfg.loader_workers)
    steps_per_epoch = len(loader)
    peak_lr = scale_lr(scfg.lr, global_batch, "linear")
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=scfg.momentum, nesterov=scfg.momentum > 0,
                                weight_decay=scfg.weight_decay)
    schedule = WarmupCosine(optimizer, peak_lr, warmup_steps=0, total_steps=scfg.epochs * steps_per_epoch)

    start_epoch, step, history = 0, 0, []
    state = session.restore()
    if state is not None:
        if state.get("kind") != "supervised" or state["supervised_config"]["fraction"] != scfg.fraction:
            raise ValueError("the run directory holds a checkpoint of another run: choose a new --name")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        log(f"[supervised] resumed from epoch {start_epoch} (step {step})")
    resumed_from = start_epoch
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None) if world > 1 else model)
    init = (f"SimCLR {scfg.init_checkpoint}" if scfg.init_checkpoint else
            f"imported {scfg.init_pretrained}" if scfg.init_pretrained else "random init")
    log(f"[supervised] {scfg.arch} x{scfg.width} + linear head on {len(subset)} labels ({100 * scfg.fraction:g}% of "
        f"{len(data.train_labels)}) from {init} | {world} worker(s) x {per_worker} = batch {global_batch} | "
        f"{steps_per_epoch} steps/epoch x {scfg.epochs} epochs | lr {peak_lr:.4g} wd {scfg.weight_decay:g} | "
        f"augment {scfg.augment} | {device.type}")

    for epoch in range(start_epoch, scfg.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed((scfg.seed * 1_000_003 + rank * 10_007 + epoch) % 2**63)  # this epoch's augmentations
        ddp.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
        t0 = time.perf_counter()
        for x, y in loader:
            schedule.apply(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with Precision.of("auto", device).autocast():
                logits = ddp(x).float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)],
                                 dtype=torch.float64)
        sums = all_sum(sums)
        train_time = time.perf_counter() - t0
        train_loss = float(sums[0] / sums[2])
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}: lower --lr")
        broadcast_buffers(model)
        t1 = time.perf_counter()
        top1, top5 = sharded_test(model, data, rank=rank, world=world, device=device,
                                  batch_size=scfg.eval_batch_size)
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_acc": float(sums[1] / sums[2]),
                   "test_top1": top1, "test_top5": top5, "lr": schedule.lr_at(step - 1), "epoch_time_s": train_time,
                   "eval_time_s": time.perf_counter() - t1, "world_size": world}
        history.append(metrics)
        log(f"[supervised] epoch {epoch + 1}/{scfg.epochs}: loss {train_loss:.4f} train acc "
            f"{metrics['train_acc']:.3f} test top-1 {top1:.4f} | {train_time:.1f}s")
        last = epoch + 1 == scfg.epochs
        state = None
        if last or (epoch + 1) % scfg.checkpoint_every == 0:
            state = {"format_version": FORMAT_VERSION, "kind": "supervised", "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step,
                     "steps_per_epoch": steps_per_epoch, "config": mcfg.to_dict(),
                     "supervised_config": scfg.to_dict(), "history": history}
        session.report(metrics, state)
        session.after_report(epoch + 1)

    if start_epoch >= scfg.epochs:
        log(f"[supervised] run already complete ({start_epoch}/{scfg.epochs} epochs): nothing to train")
    return {"history": history, "subset_indices": subset.tolist(), "resumed_from_epoch": resumed_from,
            "global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "peak_lr": peak_lr,
            "num_classes": data.num_classes, "test_size": len(data.test), "device": device.type,
            "normalization": {"mean": list(data.mean), "std": list(data.std)}}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (one per worker)."""
    scfg = SupervisedConfig.from_dict(config["supervised"])
    torch.set_num_threads(max(1, int(scfg.cpus_per_worker)))
    return train_classifier(scfg, PretrainConfig.from_dict(config["model"]), RaySession(scfg))


# ---------------------------------------------------------------------------- driver
def subset_digest(indices: list[int] | np.ndarray) -> str:
    """A short fingerprint of a label subset: equal digests = the same labelled images."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _fit_ray(scfg: SupervisedConfig, mcfg: PretrainConfig) -> dict[str, Any]:
    result = fit(train_loop_per_worker, {"supervised": scfg.to_dict(), "model": mcfg.to_dict()}, scfg)
    return {**(result.return_value or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None}


def cached_result(scfg: SupervisedConfig) -> dict[str, Any] | None:
    """The run's results file if it holds a finished run of the same experiment (so a rerun trains nothing)."""
    uri = storage.join(run_uri(scfg), RESULTS_FILE)
    if not storage.exists(uri):
        return None
    saved = storage.read_json(uri)
    if SupervisedConfig.from_dict(saved.get("config", {})).experiment_key() != scfg.experiment_key():
        return None
    return {**saved, "cached": True}


def run(scfg: SupervisedConfig, *, log: Log = emit) -> dict[str, Any]:
    """Train (or resume, or read back a finished) supervised run; returns its results, also written to
    ``STORAGE/NAME/results.json`` with the label subset's indices."""
    scfg, mcfg = preflight(scfg)
    cached = cached_result(scfg)
    if cached is not None:
        log(f"[supervised] {run_uri(scfg)}: already trained (top-1 {cached['top1']:.4f}); reusing its results")
        return cached
    if not scfg.ray and scfg.threads:
        torch.set_num_threads(scfg.threads)
    t0 = time.perf_counter()
    if scfg.ray:
        out = _fit_ray(scfg, mcfg)
    else:
        out = {**train_classifier(scfg, mcfg, LocalSession(scfg), log=log),
               "checkpoint": latest_checkpoint(run_uri(scfg))}
    wall = time.perf_counter() - t0
    history = out["history"]
    last = history[-1]
    result = {
        "format_version": FORMAT_VERSION, "kind": "supervised", "run": run_uri(scfg),
        "arm": "finetune" if scfg.from_pretrained() else "supervised", "init_checkpoint": scfg.init_checkpoint,
        "init_pretrained": scfg.init_pretrained, "normalization": out.get("normalization"),
        "dataset": scfg.dataset, "arch": mcfg.arch_signature(), "image_size": scfg.image_size,
        "top1": last["test_top1"], "top5": last["test_top5"], "label_fraction": scfg.fraction,
        "label_count": len(out["subset_indices"]), "subset_indices": out["subset_indices"],
        "subset_sha256": subset_digest(out["subset_indices"]), "test_size": out["test_size"],
        "history": history, "epochs_done": last["epoch"], "resumed_from_epoch": out["resumed_from_epoch"],
        # training compute of every epoch (those before a resume included) vs this command's wall clock
        "train_time_s": sum(h["epoch_time_s"] + h["eval_time_s"] for h in history), "wall_time_s": wall,
        "checkpoint": out.get("checkpoint"), "device": out["device"], "workers": scfg.world(),
        "params": {"epochs": scfg.epochs, "global_batch": out["global_batch"], "lr_per_256": scfg.lr,
                   "peak_lr": out["peak_lr"], "momentum": scfg.momentum, "nesterov": scfg.momentum > 0,
                   "weight_decay": scfg.weight_decay, "schedule": "cosine", "augment": scfg.augment,
                   "seed": scfg.seed, "steps_per_epoch": out["steps_per_epoch"]},
        "config": scfg.to_dict(), "cached": False,
    }
    storage.write_json(storage.join(run_uri(scfg), RESULTS_FILE), result)
    return result


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse prints its usage and exits on a bad flag; raise a one-line :class:`ConfigError` instead."""
    def error(message: str) -> None:
        raise ConfigError(message)
    parser.error = error  # type: ignore[method-assign]
    return parser


def parse_args(argv: list[str] | None = None) -> SupervisedConfig:
    parser = build_parser(SupervisedConfig, "python -m simclr_dist.supervised",
                          "Supervised baseline (or SimCLR fine-tuning with --init-checkpoint, or fine-tuning an "
                          "imported encoder with --init-pretrained) of the SimCLR network on a class-balanced label "
                          "fraction, under Ray Train.")
    one_line_errors(parser)
    return SupervisedConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(parse_args(argv))  # flag errors are ConfigErrors: one line, exit 2
    except (ConfigError, DatasetError, storage.StorageError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\n{result['arm']} on {result['label_count']} labels ({result['label_fraction']:g}): test top-1 "
          f"{result['top1']:.4f}, top-5 {result['top5']:.4f} after {result['epochs_done']} epochs "
          f"({result['train_time_s']:.0f}s training, {result['wall_time_s']:.0f}s wall); results in "
          f"{storage.join(result['run'], RESULTS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
