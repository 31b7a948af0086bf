"""The classifier job's configuration: one network + linear head trained with labels (scratch, fine-tuning, or the
supervised reference on all labels), under Ray Train or in this process.

Why one config for every trained arm: Experiments A/B are fair only if the arms differ in nothing but their
initialisation and the hyper-parameters each one is given, so they are all this config, run by the one loop
(:mod:`simclr_dist.run.train.classify_loop`). Two seeds, on purpose: ``subset_seed`` draws the labelled images (shared
by every arm of a replicate), ``seed`` the initialisation, data order and augmentation.

Augmentation: a classifier trains with the supervised recipe by default, pad-crop + horizontal flip
(``RandomCrop(size, padding=size // 8)``; no flip on digits, where a mirrored digit is another symbol), the same for
every arm. SimCLR's RandomResizedCrop(0.2-1) (``--augment simclr``) is opt-in: the SimCLR encoder was pretrained to
be invariant to it, so as the classifiers' default it slowed the from-scratch arm only (a confound).

Budget: ``--steps`` (a fixed number of updates), ``--epochs`` (a fixed number of epochs), or, for a selection run
(``--val-split``), early stopping: ``--patience K`` stops when validation top-1 has not improved for K epochs
(``--epochs`` is then the maximum) and restores the best epoch's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simclr_dist.config.base import (FORMATS, JobConfig, PretrainedError, bad, check_plain_name, flag, internal,
                                     parse_weights_spec)
from simclr_dist.config.evaluate import dataset_names
from simclr_dist.core.models import ARCHS
from simclr_dist.data.augment import PADCROP, parse_components
from simclr_dist.data.resident import SPLIT_IMAGES

AUGMENT_ALIASES = ("supervised", "simclr")
SCHEDULES = ("cosine", "constant")
# How the training batches are made (simclr_dist.data.classifier_batches): the same distribution either way
CLASSIFIER_LOADERS = ("auto", "torch", "resident")

# Fields that change neither the experiment nor its result's meaning: a finished run is reused across them.
CLUSTER_FIELDS = ("ray", "num_workers", "use_gpu", "cpus_per_worker", "ray_address", "storage_path", "name",
                  "checkpoint_every", "num_to_keep", "max_failures", "threads", "loader_workers", "eval_batch_size",
                  "verbose", "chaos_kill_epoch", "data_root",
                  # how the batches are made: the same augmentation distribution, other draws (as the worker count)
                  "classifier_loader",
                  # a complete import is the same under --strict and --no-strict (a partial one fails --strict)
                  "init_strict")
# Fields a resumed run must keep (its checkpoint was trained under them).
RESUME_FIELDS = ("dataset", "image_size", "arch", "width", "cifar_stem", "init_checkpoint", "init_pretrained",
                 "fraction", "subset_seed", "seed", "batch_size", "val_split", "val_fraction", "augment")


@dataclass
class SupervisedConfig(JobConfig):
    # what to train
    dataset: str | None = flag(None, "dataset (default: the --init-checkpoint's or a simclr-dist --init-pretrained's, "
                                   "else digits)", choices=dataset_names, what="dataset")
    data_root: str | None = flag(None, "dataset directory (default: the --init-checkpoint's; not needed for digits)")
    image_size: int | None = flag(None, "resolution (default: the --init-checkpoint's, else as pretraining: 24 digits)",
                                  ge=8)
    arch: str | None = flag(None, "backbone (default: the --init-checkpoint's or --init-pretrained's, else resnet18)",
                            choices=ARCHS, what="architecture")
    width: float | None = flag(None, "channel width multiplier (default: the --init-checkpoint's or "
                                   "--init-pretrained's, else as pretraining)", gt=0, le=8)
    cifar_stem: bool | None = flag(None, "3x3 stride-1 stem (default: the --init-checkpoint's or --init-pretrained's, "
                                       "else on for <= 64 px)")
    init_checkpoint: str | None = flag(None, "start from this SimCLR checkpoint's encoder (fine-tune the whole "
                                           "network) instead of a random init: SimCLR fine-tuning with this loop")
    init_pretrained: str | None = flag(None, "start from an imported encoder FORMAT:PATH_OR_URI, FORMAT one of "
                                           f"{', '.join(FORMATS)} (see simclr_dist.run.store.pretrained): its network, and "
                                           "its input normalisation instead of the dataset's; needs --dataset except "
                                           "for simclr-dist")
    init_digest: str | None = internal(None, "SHA-256 of the imported encoder's weights (16 hex), set by the job: "
                                             "the import's identity in the results cache and on resume, so a "
                                             "repository checked out elsewhere reuses its finished runs")
    init_strict: bool = flag(True, "with --init-pretrained: refuse a partial load (any missing/unexpected key or "
                                 "shape mismatch); --no-init-strict loads the matching tensors and warns")
    fraction: float = flag(1.0, "fraction of the train labels, class-balanced (1: all labels)", gt=0, le=1)
    subset_seed: int = flag(0, "seed of the label subset and of its validation split (the same seed gives the "
                             "subset evaluate and experiments use)")
    seed: int = flag(0, "seed of the initialisation (head; encoder when random), the data order and augmentation")
    # model selection: hold out part of the labelled subset, report on it, never read the test split
    val_split: int | None = flag(None, "train on the labelled subset minus its validation split number K "
                                     "(simclr_dist.data.splits.selection_splits: a class-stratified hold-out, or "
                                     "k folds when a class has few labels) and report validation accuracy instead of "
                                     "test; default: train on the whole subset and test once, at the end", ge=0)
    val_fraction: float = flag(0.2, "share of each class held out by --val-split (hold-out; k-fold below 10 labels "
                                    "per class)", gt=0, le=0.5)
    # recipe
    steps: int | None = flag(None, "optimiser steps (the budget; epochs follow from the label count, so every "
                                 "fraction gets the same number of updates); overrides --epochs", ge=1)
    epochs: int | None = flag(None, "epochs when --steps is not given; with --patience the maximum (default: 30 on "
                                  "digits; 60 for <= 1%% of the labels, else 30)", ge=1)
    patience: int | None = flag(None, "early stopping, with --val-split only: stop when validation top-1 (evaluated "
                                    "every epoch) has not improved for K epochs, restore the best epoch's weights "
                                    "and report that epoch; --epochs is the maximum (a run that reaches it reports "
                                    "hit_max_epochs: the budget was too small). Default: off", ge=1)
    schedule: str | None = flag(None, "learning-rate schedule: cosine (per-step decay to 0 over the run) or "
                                    "constant (default: constant with --patience, whose stopping epoch is not "
                                    "known in advance; else cosine)", choices=SCHEDULES, what="schedule")
    batch_size: int = flag(64, "global batch size (capped at the label count, rounded down to the workers; the LR "
                             "rule keeps using this nominal batch, so a cap does not shrink the peak LR)", ge=1)
    lr: float | None = flag(None, "SGD (Nesterov) learning rate per 256 images: peak LR = lr * batch-size / 256 "
                                "(default: digits 0.4; else 0.05 fine-tuning (paper), 0.1 from scratch)", gt=0)
    weight_decay: float | None = flag(None, "weight decay (default: 0 when fine-tuning, as the paper; from scratch "
                                          "5e-4, 1e-4 on imagenet/imagefolder)", ge=0)
    momentum: float = flag(0.9, "SGD momentum (Nesterov)", ge=0, le=0.999)
    augment: str | None = flag(None, "training augmentation: supervised (the default: padcrop,flip = RandomCrop(size, "
                                   "padding=size//8) + horizontal flip; padcrop alone on digits), simclr (SimCLR's "
                                   "RandomResizedCrop at the dataset's scale, + flip except on digits: the recipe "
                                   "the SimCLR encoder is invariant to), or a list of components: padcrop[,flip], or "
                                   "SimCLR components (simclr_dist.data.augment)")
    eval_batch_size: int = flag(256, "images per forward pass when validating and testing", ge=1)
    loader_workers: int = flag(0, "DataLoader worker processes per training process (--classifier-loader torch)",
                               ge=0)
    classifier_loader: str = flag("auto", "how training batches are made: torch (a DataLoader, the augmentation per "
                                          "sample on the CPU), resident (the labelled images held once as one uint8 "
                                          "tensor on the training device, augmented by batched tensor ops there: "
                                          "simclr_dist.data.classifier_batches; in-memory datasets only), auto "
                                          "(resident on a CUDA device for an in-memory dataset, else torch). The "
                                          "same augmentation distribution, other random draws",
                                  choices=CLASSIFIER_LOADERS, what="loader")
    # cluster, checkpoints (as pretraining)
    ray: bool = flag(True, "train under Ray Train (DDP workers); --no-ray: the same loop in this process")
    num_workers: int = flag(2, "Ray Train workers (one process each, DDP)", ge=1)
    use_gpu: bool | None = flag(None, "one GPU per worker (default: when the cluster has GPUs)")
    cpus_per_worker: float = flag(1.0, "CPUs Ray reserves for each worker (also its torch thread count)", gt=0)
    ray_address: str | None = flag(None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    threads: int = flag(0, "with --no-ray: torch CPU threads (0: torch's default)", ge=0)
    storage_path: str = flag("./runs", "checkpoint storage: a local/NFS directory, s3://bucket/prefix or gs://...")
    name: str | None = flag(None, "run name; rerunning with the same storage path and name resumes (default: "
                                "supervised-<dataset>-<arch>-<fraction>, finetune-... with --init-checkpoint or "
                                "--init-pretrained)")
    checkpoint_every: int = flag(1, "save a checkpoint every K epochs (and always after the last); 0: none (the "
                                    "results file only, as the experiments' model-selection runs)", ge=0)
    num_to_keep: int = flag(2, "checkpoints kept in storage", ge=1)
    max_failures: int = flag(0, "worker failures Ray Train recovers from (restarting from the last checkpoint)",
                             ge=-1)
    verbose: bool = flag(False, "show Ray Train's INFO logs")
    chaos_kill_epoch: int = flag(-1, "fault drill: SIGKILL the last worker once, after epoch N's checkpoint (-1: off)")

    def check(self) -> None:
        if self.init_pretrained is not None:
            if self.init_checkpoint is not None:
                bad("init_pretrained", "give at most one of --init-checkpoint DIR and --init-pretrained FORMAT:PATH")
            try:
                fmt, _ = parse_weights_spec(self.init_pretrained)
            except PretrainedError as e:
                raise PretrainedError(str(e).replace("--pretrained", "--init-pretrained", 1)) from None
            if self.dataset is None and fmt != "simclr-dist":
                bad("dataset", f"required with --init-pretrained {fmt}:... (the dataset to fine-tune the encoder on)")
        if self.augment is not None:
            try:
                classifier_components(self.augment)
            except ValueError as e:
                bad("augment", str(e))
        if self.patience is not None:
            if self.val_split is None:
                bad("patience", "early stopping needs a validation split: give --val-split K (a final run trains "
                                "for a fixed --epochs)")
            if self.steps is not None:
                bad("patience", "stops on validation, --steps fixes the budget: give --epochs (the maximum) instead")
        if self.classifier_loader == "resident" and self.dataset is not None and self.dataset not in SPLIT_IMAGES:
            bad("classifier_loader", f"resident holds in-memory datasets only ({', '.join(SPLIT_IMAGES)}); "
                                     f"{self.dataset} is read from files: choose torch or auto")
        check_plain_name(self.name)
        if self.chaos_kill_epoch >= 0 and not self.ray:
            bad("chaos_kill_epoch", "is a Ray Train fault drill: it needs --ray")

    # ---------------------------------------------------------------- derived values
    def from_pretrained(self) -> bool:
        return self.init_checkpoint is not None or self.init_pretrained is not None

    def init_source(self) -> str | None:
        """Where the encoder starts from: the SimCLR checkpoint, the import's FORMAT:PATH, or None (random)."""
        return self.init_checkpoint or self.init_pretrained

    def world(self) -> int:
        return self.num_workers if self.ray else 1

    def selecting(self) -> bool:
        """A model-selection run: it trains without its validation split, reports on it and never reads test."""
        return self.val_split is not None

    def early_stopping(self) -> bool:
        """A selection run that stops when its validation top-1 stops improving (``--patience``)."""
        return self.patience is not None and self.val_split is not None

    def schedule_name(self) -> str:
        """The schedule in effect: the one given, else constant with early stopping, cosine otherwise."""
        return self.schedule or ("constant" if self.early_stopping() else "cosine")

    def experiment_key(self) -> dict[str, Any]:
        """What defines the result (cluster layout and bookkeeping excluded)."""
        # an import is known by its weights (init_digest) where they were hashed, not by the path they were read at
        path_free = {"init_pretrained"} if self.init_digest else set()
        return {k: v for k, v in self.to_dict().items() if k not in CLUSTER_FIELDS and k not in path_free}

    def resume_fields(self, saved: "SupervisedConfig") -> tuple[str, ...]:
        """The fields a resumed run must keep: the import's digest instead of its path when both runs hashed it."""
        if self.init_digest and saved.init_digest:
            return tuple("init_digest" if k == "init_pretrained" else k for k in RESUME_FIELDS)
        return RESUME_FIELDS


def default_name(scfg: SupervisedConfig) -> str:
    prefix = "finetune" if scfg.from_pretrained() else "supervised"
    return f"{prefix}-{scfg.dataset}-{scfg.arch}-{scfg.fraction:g}"


def classifier_components(spec: str) -> tuple[str, ...]:
    """The components of a classifier augmentation spec (an alias is returned as itself, one element): ``padcrop``
    (with ``flip`` only) or SimCLR components of :mod:`simclr_dist.data.augment`. ValueError (one line) otherwise."""
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if len(names) == 1 and names[0] in AUGMENT_ALIASES:
        return (names[0],)
    if any(n in AUGMENT_ALIASES for n in names):
        raise ValueError(f"{'/'.join(AUGMENT_ALIASES)} is a whole recipe: give it alone")
    if PADCROP in names:
        others = set(names) - {PADCROP, "flip", "none"}
        if others:
            raise ValueError(f"{PADCROP} combines with flip only, got {sorted(others)[0]!r}")
        return (PADCROP,) + (("flip",) if "flip" in names else ())
    try:
        return parse_components(names)
    except ValueError as e:
        raise ValueError(str(e).replace(" or 'none'", f", {PADCROP} or 'none'")) from None


def resolve_augment(spec: str | None, dataset: str) -> str:
    """The canonical component list of a classifier augmentation: ``None``/``supervised`` -> pad-crop + flip
    (pad-crop alone on digits: a mirrored digit is another symbol); ``simclr`` -> SimCLR's crop (the dataset's
    RandomResizedCrop scale) + flip except on digits; a list -> itself in canonical order ("none" for nothing)."""
    digits = dataset == "digits"
    parts = classifier_components(spec or "supervised")
    if parts == ("supervised",):
        parts = (PADCROP,) if digits else (PADCROP, "flip")
    elif parts == ("simclr",):
        parts = ("crop",) if digits else ("crop", "flip")
    return ",".join(parts) or "none"


def augment_tag(components: str) -> str:
    """A run-name-safe short form of a canonical component list (``padcrop,flip`` -> ``padcrop+flip``)."""
    return components.replace(",", "+")

