"""The pretraining job's configuration: its flags, their rules, and the dataset-dependent defaults.

Why one class: each bad input must fail *before* any Ray resources are claimed, with one line naming the
culprit. Fields left at ``None`` mean "the dataset's default" and are filled by :meth:`PretrainConfig.resolved`,
so ``python -m simclr_dist.pretrain`` with no flags is the small, fast digits run, while ``--dataset imagenet``
gets paper-sized defaults without the user restating them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from simclr_dist.core.models import ARCHS
from simclr_dist.core.precision import PRECISIONS
from simclr_dist.data.augment import default_augment
from simclr_dist.data.datasets import DATASETS, dataset_info, reads_embedded
from simclr_dist.data.resident import resident_bytes, resident_fits
from simclr_dist.config.base import JobConfig, bad, check_plain_name, flag, is_uri, parse_into, parse_weights_spec

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALING = ("linear", "sqrt", "none")
LOADERS = ("auto", "torch", "ffcv", "resident")
KNN_SPLITS = ("test", "val")
TRACKERS = ("tensorboard", "mlflow", "none")

# Fields that change the network's shapes: a run may not be resumed with different values.
ARCH_FIELDS = ("arch", "width", "cifar_stem", "proj_hidden_dim", "proj_out_dim")


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def _embedded(dataset: str, data_root: str | None) -> bool:
    return dataset in DATASETS and reads_embedded(dataset, data_root)


@dataclass
class PretrainConfig(JobConfig):
    # data
    dataset: str = flag("digits", "dataset: digits (embedded, no download), fashion-mnist (no download: the Debian "
                                  "package dataset-fashion-mnist, or --data-root), cifar10, cifar100, stl10, imagenet, "
                                  "imagefolder", choices=dataset_names, what="dataset")
    data_root: str | None = flag(None, "directory holding the dataset (not needed for digits, nor for fashion-mnist "
                                     "when its Debian package is installed)")
    download: bool = flag(False, "let torchvision download cifar10/cifar100/stl10 into --data-root")
    split: str | None = flag(None, "split to pretrain on (default: the dataset's pretraining split, e.g. stl10 'unlabeled')")
    train_subset: int = flag(0, "pretrain (and validate) on a fixed class-balanced subset of about this many images "
                                "of the labelled train split, the same for every run (0: all of it); for CPU-sized "
                                "sweeps - the test split stays whole", ge=0)
    image_size: int | None = flag(None, "training resolution in pixels (default: the dataset's, 24 for digits)", ge=8)
    augment: str | None = flag(None, "comma-separated augmentation components, e.g. crop,flip,color,gray,blur "
                                   "(default: the paper's recipe adapted to the dataset; the resolved config "
                                   "records the components used)")
    augment2: str | None = flag(None, "augmentation components of the second view (default: the same as --augment); "
                                    "--augment crop,color --augment2 crop transforms one branch only (paper Figure 5)")
    jitter_strength: float | None = flag(None, "colour-jitter strength s (default: 1.0 ImageNet-size, 0.5 small images)", ge=0, le=2.5)
    loader_workers: int = flag(0, "DataLoader worker processes per Ray worker (0: load in the training process); "
                                "with --loader ffcv: decode threads (0: the CPUs Ray reserved for the worker)", ge=0)
    loader: str = flag("auto", "data path: torch (per-sample torchvision), ffcv (a .beton, see --beton), resident (an "
                             "in-memory dataset held once as a tensor, on the GPU when training there, every view "
                             "batched) or auto: ffcv when --beton is given, else resident when the split takes at "
                             "most 3 GiB as uint8 at the training size (digits, fashion-mnist, cifar10/100, stl10 at "
                             "96 px), else torch", choices=LOADERS, what="loader")
    beton: str | None = flag(None, "FFCV file(s) made by python -m simclr_dist.data.convert: a path, a glob or a "
                                 "comma list of shards (local disk)")
    # model
    arch: str = flag("resnet18", "backbone: resnet18, resnet34, resnet50", choices=ARCHS, what="architecture")
    width: float | None = flag(None, "channel width multiplier of every ResNet stage (default 1.0; 0.25 for digits)", gt=0, le=8)
    cifar_stem: bool | None = flag(None, "3x3 stride-1 first conv and no max-pool (default: on for images <= 64 px)")
    proj_hidden_dim: int | None = flag(None, "projection head hidden size (default: the encoder's feature size)")
    proj_out_dim: int = flag(128, "projection head output size")
    sync_bn: bool = flag(False, "synchronise BatchNorm statistics across workers (the paper's global BN)")
    pretrained: str | None = flag(None, "initialise the encoder (and a same-layout projection head) from "
                                      "FORMAT:PATH_OR_URI before the first step, FORMAT one of simclr-v1, spijkervet, "
                                      "torchvision, simclr-dist (a resumed run restores its own checkpoint instead)")
    pretrained_strict: bool = flag(True, "with --pretrained: refuse a partial load (any missing/unexpected key or shape "
                                       "mismatch)")
    # objective and optimisation
    temperature: float = flag(0.5, "NT-Xent temperature (paper: 0.1 at large batch on ImageNet, 0.5 on CIFAR)", gt=0)
    proj_normalize: bool = flag(True, "l2-normalise the projections in NT-Xent (cosine similarity); "
                                    "--no-proj-normalize scores raw dot products (paper Table 5)")
    batch_size: int = flag(128, "global batch size (images per step over all workers; each contributes two views)")
    epochs: int | None = flag(None, "training epochs (default: 100; 20 for digits)", ge=1)
    optimizer: str = flag("lars", "optimizer: lars, sgd, adamw", choices=OPTIMIZERS, what="optimizer")
    lr_scaling: str | None = flag(None, "lr = base_lr*batch/256 (linear), base_lr*sqrt(batch) (sqrt) or base_lr (none); "
                                      "default: sqrt below a global batch of 1024, linear above (SimCLR appendix B.1)", choices=LR_SCALING, what="rule")
    base_lr: float | None = flag(None, "learning rate before scaling (default: 0.3 for linear, 0.075 for sqrt scaling)", gt=0)
    weight_decay: float = flag(1e-6, "weight decay (not applied to biases and BatchNorm parameters)", ge=0)
    momentum: float = flag(0.9, "momentum of lars/sgd")
    warmup_epochs: float | None = flag(None, "linear warm-up epochs before the cosine decay (default: 10%% of epochs, at most 10)")
    precision: str = flag("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16", choices=PRECISIONS, what="precision")
    channels_last: bool | None = flag(None, "channels_last memory format (default: on, CPU and GPU: measured faster by bench.memory_format)")
    compile: bool = flag(False, "torch.compile the model")
    seed: int = flag(0, "seed of model init, data order and augmentation")
    # cluster
    ray: bool = flag(True, "train under Ray Train (DDP workers); --no-ray: the same loop in this process (one worker, "
                           "--threads CPU threads), the same checkpoints in --storage-path/--name, resumed alike")
    threads: int = flag(0, "with --no-ray: torch CPU threads (0: torch's default)", ge=0)
    num_workers: int = flag(2, "Ray Train workers (one process each, DDP)", ge=1)
    use_gpu: bool | None = flag(None, "one GPU per worker (default: when the cluster has GPUs)")
    cpus_per_worker: float = flag(1.0, "CPUs Ray reserves for each worker (also its torch thread count)", gt=0)
    ray_address: str | None = flag(None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    max_cluster_cpus: float | None = flag(None, "CPUs an autoscaling cluster can grow to: a request up to this waits "
                                               "for nodes, above it fails at once (default: SIMCLR_MAX_CLUSTER_CPUS, "
                                               "else unknown if an autoscaler runs, else the CPUs it has)", ge=0)
    max_cluster_gpus: float | None = flag(None, "GPUs an autoscaling cluster can grow to (default: "
                                               "SIMCLR_MAX_CLUSTER_GPUS, as --max-cluster-cpus); > 0 also means "
                                               "GPU workers when --use-gpu is not given", ge=0)
    resource_timeout: float | None = flag(None, "seconds to wait for the cluster to grow to the request (default: "
                                               "SIMCLR_RESOURCE_TIMEOUT_S, else 600; 0: fail at once)", ge=0)
    # checkpoints and fault tolerance
    storage_path: str = flag("./runs", "checkpoint storage: a local/NFS directory, s3://bucket/prefix or gs://bucket/prefix")
    name: str | None = flag(None, "run name; rerunning with the same storage path and name resumes (default: simclr-<dataset>-<arch>)")
    checkpoint_every: int = flag(1, "save a checkpoint every K epochs (and always after the last)", ge=1)
    checkpoint_every_steps: int = flag(0, "also save a checkpoint every N global steps, mid-epoch included; a resume "
                                        "continues at the next batch of the same epoch (0: off)", ge=0)
    checkpoint_every_minutes: float = flag(0.0, "also save a checkpoint when M minutes have passed since the last one "
                                             "(checked every --log-every steps; 0: off)", ge=0)
    num_to_keep: int = flag(2, "checkpoints kept in storage (the newest are kept)", ge=1)
    max_failures: int = flag(1, "worker failures the run survives by restarting from the last checkpoint (-1: unlimited)", ge=-1)
    summary_json: str | None = flag(None, "also write the run summary (history, checkpoint, kNN) as JSON here (path or URI)")
    # monitoring and evaluation
    log_every: int = flag(10, "print progress (and check the loss is finite) every N steps", ge=1)
    tracking: str | None = flag(None, "where rank 0 records the curves (per --log-every step: loss, lr, samples/s, data "
                                    "wait; per epoch: the epoch line, kNN, probe; the config as hyper-parameters): "
                                    "tensorboard (event files in RUN/tensorboard), mlflow (MLFLOW_TRACKING_URI, else "
                                    "sqlite STORAGE/mlflow.db; a resume continues the same MLflow run) or none "
                                    "(default: tensorboard, none on s3:// or gs:// storage)", choices=TRACKERS,
                                what="tracking")
    knn_every: int = flag(0, "online kNN accuracy every N epochs (0: only after the last epoch; -1: never)")
    knn_k: int = flag(200, "neighbours of the kNN monitor", ge=1)
    knn_temperature: float = flag(0.1, "temperature of the kNN monitor's weighted vote")
    knn_split: str = flag("test", "queries of the kNN monitor: test (the held-out test split; metrics knn_top1/5) or val "
                                "(a fixed class-stratified 20%% of the labelled train split, the other 80%% the bank; "
                                "metrics val_knn_top1/5): what sweeps select on, never the test split", choices=KNN_SPLITS, what="split")
    online_probe: bool = flag(False, "train a linear classifier on detached encoder features during pretraining, on "
                                   "its own stream of the labelled train split's fit part (80%%), and report its "
                                   "top-1 on the fixed validation part (20%%; never the test split) and the RankMe "
                                   "of its features every epoch (metrics online_probe_top1, rankme); measured cost "
                                   "on CPU: ~1.15-1.2x the step (python -m bench.online_probe)")
    linear_probe: bool = flag(False, "with each kNN evaluation also fit a logistic-regression probe on the frozen "
                                   "features of the kNN bank and score it on the queries (metrics linear_top1/5, or "
                                   "val_linear_top1/5 with --knn-split val)")
    verbose: bool = flag(False, "show Ray Train's INFO logs (worker placement, every report)")
    chaos_kill_step: int = flag(-1, "fault drill: SIGKILL the last worker once, at this global step (-1: off)")
    chaos_kill_in_upload: int = flag(-1, "fault drill: kill rank 0 halfway through uploading this epoch's checkpoint (-1: off)")
    chaos_nan_step: int = flag(-1, "fault drill: make the loss NaN at this global step to exercise the stop (-1: off)")

    # ------------------------------------------------------------------ defaults
    def resolved(self) -> "PretrainConfig":
        """Fill every ``None`` default from the dataset's preset (a copy; idempotent)."""

        cfg = dataclasses.replace(self)
        if cfg.dataset not in DATASETS:
            bad("dataset", f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
        info = dataset_info(cfg.dataset)
        tiny = cfg.dataset == "digits"
        cfg.split = cfg.split or info.pretrain_split
        cfg.image_size = cfg.image_size or (24 if tiny else info.image_size)
        cfg.width = cfg.width if cfg.width is not None else (0.25 if tiny else 1.0)
        cfg.cifar_stem = cfg.cifar_stem if cfg.cifar_stem is not None else cfg.image_size <= 64
        cfg.epochs = cfg.epochs if cfg.epochs is not None else (20 if tiny else 100)
        cfg.lr_scaling = cfg.lr_scaling or ("sqrt" if cfg.batch_size < 1024 else "linear")
        if cfg.base_lr is None:
            cfg.base_lr = {"linear": 0.3, "sqrt": 0.075, "none": 0.3}[cfg.lr_scaling]
        if cfg.warmup_epochs is None:
            cfg.warmup_epochs = min(10.0, 0.1 * cfg.epochs)
        cfg.name = cfg.name or f"simclr-{cfg.dataset}-{cfg.arch}"
        # The recipe, resolved once: a checkpoint's config records the components and strength that were used.
        try:
            aug = default_augment(info, cfg.augment, image_size=cfg.image_size, jitter_strength=cfg.jitter_strength)
        except ValueError as e:
            bad("augment", str(e))
        cfg.augment = ",".join(aug.components) or "none"
        if cfg.augment2 is not None:  # the second view's own recipe (None: the same as the first)
            try:
                cfg.augment2 = ",".join(default_augment(info, cfg.augment2).components) or "none"
            except ValueError as e:
                bad("augment2", str(e))
        cfg.jitter_strength = aug.jitter_strength
        if cfg.loader == "auto":
            cfg.loader = ("ffcv" if cfg.beton else "resident" if resident_fits(cfg.dataset, cfg.split, cfg.image_size)
                          else "ffcv" if _embedded(cfg.dataset, cfg.data_root) else "torch")
        if not is_uri(cfg.storage_path):
            cfg.storage_path = os.path.abspath(os.path.expanduser(cfg.storage_path))
        cfg.tracking = cfg.tracking or ("none" if is_uri(cfg.storage_path) else "tensorboard")
        return cfg

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """The rules that relate fields (each field's own rules are in its ``flag(...)``)."""
        if self.batch_size % self.world():
            bad("batch_size", f"{self.batch_size} is not divisible by --num-workers {self.num_workers}")
        if self.batch_size // self.world() < 2:
            bad("batch_size", f"{self.batch_size} gives {self.batch_size // self.world()} image(s) per worker; "
                              "NT-Xent needs at least 2 per worker")
        if not self.ray:
            for name in ("ray_address", "chaos_kill_in_upload"):
                if getattr(self, name) not in (None, -1):
                    bad(name, "is for a Ray Train run; --no-ray trains in this process")
        if self.warmup_epochs is not None and self.epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            bad("warmup_epochs", f"must be within [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.loader == "ffcv" and not self.beton and not _embedded(self.dataset, self.data_root):
            bad("loader", "ffcv needs --beton PATH (make one with python -m simclr_dist.data.convert)")
        if self.loader in ("torch", "resident") and self.beton:
            bad("beton", "is only read by --loader ffcv (or auto); drop it or choose --loader ffcv")
        if self.loader == "resident" and self.dataset in DATASETS and resident_bytes(
                self.dataset, self.split or dataset_info(self.dataset).pretrain_split, 1) is None:
            bad("loader", "resident holds in-memory datasets only (digits, fashion-mnist, cifar10, cifar100, stl10); "
                          "choose torch or ffcv")
        for name in ("augment", "augment2"):
            if getattr(self, name) is not None:
                from simclr_dist.data.augment import parse_components
                try:
                    parse_components(getattr(self, name))
                except ValueError as e:
                    bad(name, str(e))
        if self.loader == "ffcv" and self.augment is not None and self.augment2 is not None:
            from simclr_dist.data.augment import parse_components
            if ("crop" in parse_components(self.augment)) != ("crop" in parse_components(self.augment2)):
                bad("augment2", "the ffcv loader crops both views alike (one decode): give both branches crop or "
                                "neither, or choose --loader torch")
        if self.train_subset and self.beton:
            bad("train_subset", "draws its images from the dataset itself, not from a --beton file")
        if self.train_subset and self.split is not None and self.split != dataset_info(self.dataset).labelled[0]:
            bad("train_subset", f"draws from the labelled train split "
                                f"({dataset_info(self.dataset).labelled[0]!r}); --split is {self.split!r}")
        if self.pretrained is not None:
            parse_weights_spec(self.pretrained)
        if self.sync_bn and self.use_gpu is False and self.world() > 1:
            bad("sync_bn", "needs GPU workers (SyncBatchNorm synchronises over NCCL; --no-use-gpu trains on CPU "
                           "with gloo): drop --sync-bn or --no-use-gpu")
        check_plain_name(self.name)

    def world(self) -> int:
        """Processes that train: the Ray Train workers, or this one process with --no-ray."""
        return self.num_workers if self.ray else 1

    def arch_signature(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ARCH_FIELDS}


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    return parse_into(PretrainConfig, argv, "python -m simclr_dist.pretrain",
                      "SimCLR pretraining on Ray Train (DDP workers, all-gather NT-Xent).")
