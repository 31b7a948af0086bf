"""``python -m simclr_dist.evaluate``: linear probe, kNN and fine-tuning of a SimCLR checkpoint in shared storage.

Why these three: the linear probe on frozen features is the paper's headline metric; kNN needs no training and
matches the online monitor of pretraining; fine-tuning on 1%/10%/100% of the labels answers the project's
question (self-supervised pretraining vs. a supervised model on few labels). Results are JSON files written next
to the checkpoint (``<checkpoint>/eval/<protocol>.json``, atomically), so an evaluator that watches a run is
idempotent: it can be stopped and restarted, and never evaluates a checkpoint twice.

Protocol hygiene, because each one is a classic way to inflate numbers:
- the encoder of the linear probe and kNN is frozen (eval mode, no gradient) and its features are computed once;
- the probe's L2 strength is chosen on a validation split carved from the labelled *train* split
  (:func:`select_l2` never sees test data), then the probe is refit on train+val;
- fine-tuning reports the *last* epoch's test accuracy (no early stopping on test), on class-stratified label
  subsets drawn with a fixed seed, whose indices are saved with the results.

``--pretrained FORMAT:PATH_OR_URI`` evaluates an imported encoder instead (:mod:`simclr_dist.run.pretrained`: SimCLR v1
converted, Spijkervet/SimCLR, torchvision ImageNet weights, or our own checkpoint) with the same protocols, on
``--dataset``, with the input normalisation the importer records (SimCLR v1: raw [0, 1] pixels, no mean/std).

The protocol functions are importable (``simclr_dist.experiments`` reuses them for Experiments A/B and the
supervised baselines): :func:`compute_features`, :func:`linear_probe`, :func:`linear_probe_features`,
:func:`knn_eval`, :func:`finetune`, :func:`balanced_subset`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simclr_dist.run import storage
from simclr_dist.run.checkpoint import (
    latest_checkpoint,
    list_complete_checkpoints,
    read_complete,
)
from simclr_dist.config import ConfigError, PretrainConfig, build_parser, flag
from simclr_dist.console import Log, emit
from simclr_dist.data.augment import (
    build_eval_transform,
    build_view_transform,
    default_augment,
)
from simclr_dist.data.datasets import DatasetError, dataset_info, load_dataset
from simclr_dist.core.knn import knn_accuracy
from simclr_dist.core.optim import WarmupCosine, scale_lr
from simclr_dist.config import FORMATS, PretrainedError, parse_spec
from simclr_dist.run.pretrained import PretrainedEncoder, load_pretrained
from simclr_dist.run.checkpoint import MANIFEST_FILE, load_checkpoint
from simclr_dist.run.step import build_model
from simclr_dist.core.models import Classifier
from simclr_dist.core.precision import Precision
from simclr_dist.data.splits import balanced_subset, labelled_splits, stratified_split

PROTOCOLS = ("linear", "knn", "finetune")
RESULTS_DIR = "eval"
RESULT_FORMAT = 1
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)



class EvalError(ValueError):
    """Bad input for the evaluator (flags, missing checkpoint, empty run); one line for the user."""




# ---------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    checkpoint: str | None = flag(None, "one checkpoint directory (local path, s3:// or gs:// URI)")
    run: str | None = flag(None, "a run directory STORAGE/NAME: evaluate its latest complete checkpoint")
    pretrained: str | None = flag(None, "an imported encoder FORMAT:PATH_OR_URI, FORMAT one of "
                                      f"{', '.join(FORMATS)} (see simclr_dist.run.pretrained)")
    strict: bool = flag(True, "with --pretrained: refuse a partial load (any missing/unexpected key or shape "
                            "mismatch); --no-strict loads the matching tensors and warns")
    dataset: str | None = flag(None, "with --pretrained: dataset to evaluate on (default: a simclr-dist "
                                   "checkpoint's own; required for the other formats)")
    image_size: int | None = flag(None, "with --pretrained: evaluation resolution (default: the simclr-dist "
                                      "checkpoint's, else the dataset's: 224 imagenet, 96 stl10, 32 cifar, 24 digits)")
    results_dir: str | None = flag(None, "with --pretrained: result files go to RESULTS_DIR/eval/ (default: next to a "
                                       "simclr-dist checkpoint evaluated on its own data, else "
                                       "./runs/pretrained-eval/<format>-<file>-<dataset>-<size>px)")
    watch: bool = flag(False, "with --run: poll the run and evaluate every new complete checkpoint once")
    interval: float = flag(60.0, "seconds between polls of --watch")
    watch_until_epoch: int | None = flag(None, "stop --watch once a checkpoint of this epoch (or later) is evaluated")
    protocols: str = flag("linear,knn", "comma-separated protocols: linear, knn, finetune")
    force: bool = flag(False, "re-evaluate even when a result file already exists")
    data_root: str | None = flag(None, "dataset directory on this machine (default: the pretraining run's)")
    batch_size: int = flag(256, "images per forward pass when extracting features and testing")
    loader_workers: int = flag(0, "DataLoader worker processes (0: load in this process)")
    threads: int = flag(0, "torch CPU threads (0: torch's default, one per core; 1 is much faster for small "
                         "models on a shared, busy machine)")
    seed: int = flag(0, "seed of the validation split, label subsets, head init and data order")
    # kNN
    knn_k: int = flag(200, "kNN neighbours")
    knn_temperature: float = flag(0.1, "temperature of the kNN weighted vote")
    # linear probe
    l2_grid: str = flag(",".join(f"{v:g}" for v in DEFAULT_L2_GRID),
                      "L2 strengths of the logistic-regression sweep (chosen on a validation split of train)")
    val_fraction: float = flag(0.2, "fraction of the labelled train split held out to choose the L2 strength")
    linear_max_iter: int = flag(300, "L-BFGS iterations of each logistic-regression fit")
    # fine-tuning
    label_fractions: str = flag("0.01,0.1,1.0", "fractions of the train labels to fine-tune on, each in (0, 1]")
    finetune_epochs: int | None = flag(None, "fine-tuning epochs (default: paper's 60 for <=1%% labels, 30 above; "
                                           "digits: 30)")
    finetune_batch_size: int = flag(64, "fine-tuning batch size (capped at the subset size)")
    finetune_lr: float | None = flag(None, "fine-tuning SGD (Nesterov) learning rate per 256 images, scaled "
                                         "linearly to the batch (default: paper's 0.05; digits: 0.4)")

    def validate(self) -> "EvalConfig":
        """Raise :class:`EvalError` for the first bad flag; returns self for chaining."""
        def bad(flag: str, msg: str) -> None:
            raise EvalError(f"--{flag.replace('_', '-')}: {msg}")

        if sum(x is not None for x in (self.checkpoint, self.run, self.pretrained)) != 1:
            bad("checkpoint", "give exactly one of --checkpoint DIR, --run STORAGE/NAME or --pretrained FORMAT:PATH")
        if self.pretrained is not None:
            try:
                fmt, _ = parse_spec(self.pretrained)
            except PretrainedError as e:
                raise EvalError(str(e)) from None
            if self.dataset is None and fmt != "simclr-dist":
                bad("dataset", f"required with --pretrained {fmt}:... (the dataset to evaluate the encoder on)")
        else:
            for name in ("dataset", "image_size", "results_dir"):
                if getattr(self, name) is not None:
                    bad(name, "only applies with --pretrained (a checkpoint is evaluated on its own data)")
        if self.dataset is not None:
            try:
                dataset_info(self.dataset)
            except DatasetError as e:
                bad("dataset", str(e))
        if self.image_size is not None and self.image_size < 8:
            bad("image_size", f"must be >= 8 pixels, got {self.image_size}")
        if self.watch and self.run is None:
            bad("watch", "needs --run STORAGE/NAME (it polls a run for new checkpoints)")
        if self.watch_until_epoch is not None and not self.watch:
            bad("watch_until_epoch", "only applies with --watch")
        if not (self.interval > 0 and math.isfinite(self.interval)):
            bad("interval", f"must be > 0 seconds, got {self.interval}")
        self.protocol_list()
        for f in self.label_fractions_list():
            if not 0 < f <= 1:
                bad("label_fractions", f"each fraction must be in (0, 1], got {f:g}")
        for v in self.l2_values():
            if not (v >= 0 and math.isfinite(v)):
                bad("l2_grid", f"each L2 strength must be >= 0, got {v:g}")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        for name in ("batch_size", "finetune_batch_size", "knn_k", "linear_max_iter"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.finetune_epochs is not None and self.finetune_epochs < 1:
            bad("finetune_epochs", f"must be >= 1, got {self.finetune_epochs}")
        if self.finetune_lr is not None and not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            bad("finetune_lr", f"must be > 0, got {self.finetune_lr}")
        if not self.knn_temperature > 0:
            bad("knn_temperature", f"must be > 0, got {self.knn_temperature}")
        if self.threads < 0:
            bad("threads", f"must be >= 0, got {self.threads}")
        if self.loader_workers < 0:
            bad("loader_workers", f"must be >= 0, got {self.loader_workers}")
        return self

    def protocol_list(self) -> tuple[str, ...]:
        names = [p.strip().lower() for p in self.protocols.split(",") if p.strip()]
        unknown = [p for p in names if p not in PROTOCOLS]
        if unknown or not names:
            culprit = (unknown or [""])[0]
            raise EvalError(f"--protocols: unknown protocol {culprit!r}; choose from {', '.join(PROTOCOLS)}")
        return tuple(p for p in PROTOCOLS if p in names)

    def label_fractions_list(self) -> tuple[float, ...]:
        return parse_floats("label_fractions", self.label_fractions)

    def l2_values(self) -> tuple[float, ...]:
        return parse_floats("l2_grid", self.l2_grid)

    def epochs_for(self, fraction: float, dataset: str) -> int:
        """The paper fine-tunes 60 epochs on 1% of ImageNet and 30 on 10%; digits is tiny: 30 throughout."""
        if self.finetune_epochs is not None:
            return self.finetune_epochs
        return 30 if dataset == "digits" or fraction > 0.01 else 60

    def lr_for(self, dataset: str) -> float:
        """The paper's 0.05 per 256 images suits ImageNet; the tiny digits networks want ~8x more (a sweep of
        0.05/0.4/1.6 on a pretrained digits checkpoint: 0.4 is best at 1% and 10% labels)."""
        if self.finetune_lr is not None:
            return self.finetune_lr
        return 0.4 if dataset == "digits" else 0.05


def parse_floats(flag: str, text: str, error: type[Exception] = EvalError) -> tuple[float, ...]:
    """A comma-separated list of numbers from flag ``--flag``; ``error`` names the culprit in one line."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise error(f"--{flag.replace('_', '-')}: {part!r} is not a number") from None
    return tuple(out)


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    parser = build_parser(EvalConfig, "python -m simclr_dist.evaluate",
                          "Linear probe, kNN and fine-tuning of SimCLR checkpoints in shared storage.")
    return EvalConfig(**vars(parser.parse_args(argv)))


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """The labelled splits of a dataset at the checkpoint's resolution."""

    dataset: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def eval_transform(self) -> Callable:
        return build_eval_transform(self.image_size, self.mean, self.std)


def load_eval_data(cfg: PretrainConfig, data_root: str | None = None) -> EvalData:
    """Train/test (ImageNet: train/val) splits of the pretraining dataset, labels read without decoding images."""
    info = dataset_info(cfg.dataset)
    train_split, test_split = labelled_splits(cfg.dataset)
    root = data_root or cfg.data_root
    train = load_dataset(cfg.dataset, train_split, root=root, image_size=cfg.image_size)
    test = load_dataset(cfg.dataset, test_split, root=root, image_size=cfg.image_size)
    labels = np.asarray(train.targets, dtype=np.int64)
    num_classes = info.num_classes or len(train.classes)
    return EvalData(cfg.dataset, train, test, labels, num_classes, cfg.image_size, info.mean, info.std)


class TransformedSubset(Dataset):
    """``(transform(image), label)`` of the chosen items of a ``(image, label)`` dataset."""

    def __init__(self, base: Dataset, transform: Callable, indices: Sequence[int] | None = None):
        self.base, self.transform = base, transform
        self.indices = range(len(base)) if indices is None else indices  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.base[self.indices[i]]
        return self.transform(img), int(label)


# ---------------------------------------------------------------------------- features
@dataclass
class Features:
    """Frozen-encoder features (raw, not normalised) of the labelled splits; computed once, shared by protocols."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@torch.no_grad()
def embed(encoder: nn.Module, dataset: Dataset, transform: Callable, *, device: torch.device | str = "cpu",
          batch_size: int = 256, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """(features float32 on CPU, labels) of every item through the frozen encoder in eval mode (BatchNorm uses
    its running statistics and they are not updated); the encoder's train/eval mode is restored afterwards."""
    device = torch.device(device)
    loader = DataLoader(TransformedSubset(dataset, transform), batch_size=batch_size, num_workers=num_workers)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            with Precision.of("auto", device).autocast():
                feats.append(encoder(x.to(device)).float().cpu())
            labels.append(y)
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def compute_features(encoder: nn.Module, data: EvalData, *, device: torch.device | str = "cpu",
                     batch_size: int = 256, num_workers: int = 0, log: Log = emit) -> Features:
    t0 = time.perf_counter()
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers)
    train_x, train_y = embed(encoder, data.train, data.eval_transform(), **kw)
    test_x, test_y = embed(encoder, data.test, data.eval_transform(), **kw)
    log(f"[eval] features of {len(train_x)} train + {len(test_x)} test images ({train_x.shape[1]}-d) "
        f"in {time.perf_counter() - t0:.1f}s")
    return Features(train_x, train_y, test_x, test_y)


def _topk(logits: Tensor, y: Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y.unsqueeze(1)
    return hit[:, 0].float().mean().item(), hit.any(1).float().mean().item()


# ---------------------------------------------------------------------------- linear probe
@dataclass
class LogisticRegression:
    """Multinomial logistic regression on standardised features (standardising makes one L2 grid fit every
    encoder width and feature scale)."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.device)
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def fit_logistic(x: Tensor, y: Tensor, *, num_classes: int, l2: float, max_iter: int = 300,
                 device: torch.device | str = "cpu") -> LogisticRegression:
    """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias not penalised) with full-batch L-BFGS: the problem is
    convex and small (N x D features), so a deterministic exact solver beats tuning SGD epochs and rates."""
    x, y = x.to(device, torch.float32), y.to(device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(mean, std, weight.detach(), bias.detach())


def select_l2(fit_x: Tensor, fit_y: Tensor, val_x: Tensor, val_y: Tensor, *, num_classes: int,
              l2_grid: Sequence[float] = DEFAULT_L2_GRID, max_iter: int = 300,
              device: torch.device | str = "cpu", log: Log = emit) -> tuple[float, dict[str, float]]:
    """(best L2, validation top-1 of every L2). It sees only the labelled train split's fit/val parts, by
    signature: test data cannot leak into the choice. Ties go to the stronger regularisation."""
    val_acc: dict[str, float] = {}
    for l2 in l2_grid:
        clf = fit_logistic(fit_x, fit_y, num_classes=num_classes, l2=l2, max_iter=max_iter, device=device)
        val_acc[f"{l2:g}"] = _topk(clf.logits(val_x), val_y.to(clf.weight.device))[0]
        log(f"[eval] linear probe: L2 {l2:g} -> validation top-1 {val_acc[f'{l2:g}']:.4f}")
    best = max(l2_grid, key=lambda l2: (val_acc[f"{l2:g}"], l2))
    return best, val_acc


def linear_probe_features(features: Features, *, num_classes: int, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                          val_fraction: float = 0.2, seed: int = 0, max_iter: int = 300,
                          device: torch.device | str = "cpu", log: Log = emit) -> dict[str, Any]:
    """Choose L2 on a stratified validation split of train, refit on all of train, report test top-1/top-5."""
    t0 = time.perf_counter()
    fit_idx, val_idx = stratified_split(features.train_y.numpy(), val_fraction, seed)
    fit_idx, val_idx = torch.as_tensor(fit_idx), torch.as_tensor(val_idx)
    if len(val_idx):
        best, val_acc = select_l2(features.train_x[fit_idx], features.train_y[fit_idx],
                                  features.train_x[val_idx], features.train_y[val_idx], num_classes=num_classes,
                                  l2_grid=l2_grid, max_iter=max_iter, device=device, log=log)
    else:  # one label per class (a 1% subset): no validation data, every L2 ties, the tie rule takes the strongest
        best, val_acc = max(l2_grid), {}
    clf = fit_logistic(features.train_x, features.train_y, num_classes=num_classes, l2=best, max_iter=max_iter,
                       device=device)
    train_top1 = _topk(clf.logits(features.train_x), features.train_y.to(clf.weight.device))[0]
    top1, top5 = _topk(clf.logits(features.test_x), features.test_y.to(clf.weight.device))
    log(f"[eval] linear probe: chose L2 {best:g} (validation top-1 {val_acc.get(f'{best:g}', float('nan')):.4f}); "
        f"test top-1 {top1:.4f}")
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "l2": best, "val_top1_by_l2": val_acc,
            "val_top1": val_acc.get(f"{best:g}"), "fit_size": len(fit_idx), "val_size": len(val_idx),
            "label_count": len(features.train_y), "test_size": len(features.test_y),
            "feature_dim": int(features.train_x.shape[1]), "wall_time_s": time.perf_counter() - t0,
            "params": {"l2_grid": list(l2_grid), "val_fraction": val_fraction, "seed": seed, "max_iter": max_iter,
                       "solver": "lbfgs", "standardize": True}}


def linear_probe(encoder: nn.Module, data: EvalData, *, device: torch.device | str = "cpu", batch_size: int = 256,
                 num_workers: int = 0, log: Log = emit, **probe_kw: Any) -> dict[str, Any]:
    """Linear evaluation of a frozen encoder: its features (eval transform, no gradient) feed a logistic
    regression; the encoder itself is never updated."""
    features = compute_features(encoder, data, device=device, batch_size=batch_size, num_workers=num_workers,
                                log=log)
    return linear_probe_features(features, num_classes=data.num_classes, device=device, log=log, **probe_kw)


# ---------------------------------------------------------------------------- kNN
def knn_eval(features: Features, *, num_classes: int, k: int = 200, temperature: float = 0.1) -> dict[str, Any]:
    """Cosine kNN (the pretraining monitor's, on the same L2-normalised features) of test against train."""
    t0 = time.perf_counter()
    acc = knn_accuracy(F.normalize(features.train_x, dim=1), features.train_y,
                       F.normalize(features.test_x, dim=1), features.test_y,
                       num_classes=num_classes, k=k, temperature=temperature)
    return {"top1": acc["knn_top1"], "top5": acc["knn_top5"], "label_count": len(features.train_y),
            "test_size": len(features.test_y), "wall_time_s": time.perf_counter() - t0,
            "params": {"k": k, "temperature": temperature}}


# ---------------------------------------------------------------------------- fine-tuning
def finetune_components(dataset: str) -> str:
    """The paper fine-tunes with random crop + flip only; digits drop the flip (a mirrored digit is not one)."""
    return "crop" if dataset == "digits" else "crop,flip"


@torch.no_grad()
def classify(model: nn.Module, dataset: Dataset, transform: Callable, *, device: torch.device | str = "cpu",
             batch_size: int = 256, num_workers: int = 0) -> tuple[float, float]:
    """(top-1, top-5) of ``model`` on ``dataset`` in eval mode; the model's mode is restored."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in DataLoader(TransformedSubset(dataset, transform), batch_size=batch_size, num_workers=num_workers):
            with Precision.of("auto", device).autocast():
                logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    return _topk(torch.cat(logits), torch.cat(labels))


def finetune(encoder: nn.Module, data: EvalData, *, fraction: float, epochs: int, batch_size: int = 64,
             lr: float = 0.05, momentum: float = 0.9, seed: int = 0, device: torch.device | str = "cpu",
             num_workers: int = 0, eval_batch_size: int = 256, log: Log = emit) -> dict[str, Any]:
    """Fine-tune the whole network (``encoder`` in place + a new linear head) on a class-stratified ``fraction``
    of the train labels: SGD with Nesterov momentum, no weight decay, per-step cosine decay from
    ``lr * batch / 256`` (the paper's recipe). Pass a copy to keep the original encoder. Reports the last
    epoch's test accuracy and per-epoch train loss/accuracy and test top-1."""
    t0 = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(seed)  # head init, data order and augmentation draws
    subset = balanced_subset(data.train_labels, fraction, seed)
    components = finetune_components(data.dataset)
    aug = default_augment(dataset_info(data.dataset), components, image_size=data.image_size)
    aug = dataclasses.replace(aug, mean=data.mean, std=data.std)  # the encoder's normalisation (an import's)
    batch = min(batch_size, len(subset))
    loader = DataLoader(TransformedSubset(data.train, build_view_transform(aug), subset.tolist()), batch_size=batch,
                        shuffle=True, drop_last=len(subset) > batch, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    model = Classifier(encoder, encoder.feat_dim, data.num_classes).to(device)
    peak_lr = scale_lr(lr, batch, "linear")
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    schedule = WarmupCosine(optimizer, peak_lr, warmup_steps=0, total_steps=epochs * len(loader))
    log(f"[eval] fine-tune on {len(subset)} labels ({fraction:g} of {len(data.train_labels)}): {epochs} epochs x "
        f"{len(loader)} steps, batch {batch}, lr {peak_lr:.4g}")
    history, step = [], 0
    for epoch in range(epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            schedule.apply(step)
            x, y = x.to(device), y.to(device)
            with Precision.of("auto", device).autocast():
                logits = model(x).float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        test_top1, test_top5 = classify(model, data.test, data.eval_transform(), device=device,
                                        batch_size=eval_batch_size, num_workers=num_workers)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_top1": test_top1, "test_top5": test_top5, "lr": schedule.lr_at(step - 1)})
        log(f"[eval] fine-tune {fraction:g}: epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.4f} "
            f"train acc {correct / seen:.3f} test top-1 {test_top1:.4f}")
    last = history[-1]
    return {"top1": last["test_top1"], "top5": last["test_top5"], "label_fraction": fraction,
            "label_count": len(subset), "test_size": len(data.test), "history": history,
            "subset_indices": subset.tolist(), "wall_time_s": time.perf_counter() - t0,
            "params": {"fraction": fraction, "epochs": epochs, "batch_size": batch, "lr_per_256": lr,
                       "peak_lr": peak_lr, "momentum": momentum, "nesterov": True, "weight_decay": 0.0,
                       "schedule": "cosine", "augment": components, "seed": seed}}


# ---------------------------------------------------------------------------- one checkpoint
def result_name(protocol: str, fraction: float | None = None) -> str:
    return f"finetune-{fraction:g}" if protocol == "finetune" else protocol


def result_uri(checkpoint_uri: str, name: str) -> str:
    return storage.join(checkpoint_uri, RESULTS_DIR, f"{name}.json")


def planned_results(ecfg: EvalConfig) -> list[tuple[str, float | None]]:
    """(protocol, label fraction) of every result file the config asks for."""
    plan: list[tuple[str, float | None]] = []
    for p in ecfg.protocol_list():
        plan += [(p, f) for f in ecfg.label_fractions_list()] if p == "finetune" else [(p, None)]
    return plan


def require_complete(checkpoint_uri: str) -> None:
    """One-line error unless the directory holds a completely written checkpoint."""
    if read_complete(checkpoint_uri) is not None:
        return
    if not storage.exists(checkpoint_uri):
        raise EvalError(f"--checkpoint {checkpoint_uri}: no such checkpoint directory")
    if not storage.exists(storage.join(checkpoint_uri, MANIFEST_FILE)):
        raise EvalError(f"--checkpoint {checkpoint_uri}: incomplete checkpoint (no {MANIFEST_FILE}): it is still "
                        "being written, or it is not a checkpoint directory")
    raise EvalError(f"--checkpoint {checkpoint_uri}: checkpoint file missing or not fully copied yet")


def _cached_results(out_uri: str, ecfg: EvalConfig) -> tuple[list, dict, list]:
    """(plan, results already on disk, protocols still to run) of the result files under ``out_uri``/eval/."""
    plan, results, todo = planned_results(ecfg), {}, []
    for protocol, fraction in plan:
        uri = result_uri(out_uri, result_name(protocol, fraction))
        if not ecfg.force and storage.exists(uri):
            results[(protocol, fraction)] = {**storage.read_json(uri), "cached": True}
        else:
            todo.append((protocol, fraction))
    return plan, results, todo


def run_protocols(encoder: nn.Module, data: EvalData, ecfg: EvalConfig, todo: Sequence[tuple[str, float | None]],
                  *, out_uri: str, common: dict[str, Any], device: torch.device, log: Log = emit
                  ) -> dict[tuple[str, float | None], dict[str, Any]]:
    """Run ``todo`` on a frozen/fine-tuned ``encoder`` and write each result to ``out_uri``/eval/<name>.json."""
    results = {}
    features = None
    if any(p in ("linear", "knn") for p, _ in todo):
        features = compute_features(encoder, data, device=device, batch_size=ecfg.batch_size,
                                    num_workers=ecfg.loader_workers, log=log)
    for protocol, fraction in todo:
        if protocol == "linear":
            out = linear_probe_features(features, num_classes=data.num_classes, l2_grid=ecfg.l2_values(),
                                        val_fraction=ecfg.val_fraction, seed=ecfg.seed,
                                        max_iter=ecfg.linear_max_iter, device=device, log=log)
        elif protocol == "knn":
            out = knn_eval(features, num_classes=data.num_classes, k=ecfg.knn_k, temperature=ecfg.knn_temperature)
            log(f"[eval] kNN (k={ecfg.knn_k}): test top-1 {out['top1']:.4f}")
        else:
            out = finetune(copy.deepcopy(encoder), data, fraction=fraction,
                           epochs=ecfg.epochs_for(fraction, data.dataset), batch_size=ecfg.finetune_batch_size,
                           lr=ecfg.lr_for(data.dataset), seed=ecfg.seed, device=device,
                           num_workers=ecfg.loader_workers, eval_batch_size=ecfg.batch_size, log=log)
        result = {**common, "protocol": protocol, **out,
                  "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        storage.write_json(result_uri(out_uri, result_name(protocol, fraction)), result)
        results[(protocol, fraction)] = {**result, "cached": False}
    return results


def evaluate_checkpoint(checkpoint_uri: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu",
                        log: Log = emit) -> list[dict[str, Any]]:
    """Run the config's protocols on one checkpoint and write each result next to it. A result whose file
    already exists is read back instead of recomputed (unless ``force``), which makes watching idempotent."""
    device = torch.device(device)
    plan, results, todo = _cached_results(checkpoint_uri, ecfg)
    if not todo:
        log(f"[eval] {checkpoint_uri}: already evaluated ({', '.join(result_name(*p) for p in plan)}); skipping")
        return [results[p] for p in plan]

    state = load_checkpoint(checkpoint_uri, map_location="cpu")
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    encoder = model.encoder.to(device)
    data = load_eval_data(cfg, ecfg.data_root)
    common = {"format_version": RESULT_FORMAT, "checkpoint": checkpoint_uri, "checkpoint_epoch": state["epoch"],
              "checkpoint_step": state["step"], "dataset": cfg.dataset, "arch": cfg.arch_signature(),
              "image_size": cfg.image_size, "device": device.type}
    log(f"[eval] {checkpoint_uri}: epoch {state['epoch']} of {cfg.arch} x{cfg.width} on {cfg.dataset}; "
        f"running {', '.join(result_name(*p) for p in todo)} on {device.type}")
    results.update(run_protocols(encoder, data, ecfg, todo, out_uri=checkpoint_uri, common=common, device=device,
                                 log=log))
    return [results[p] for p in plan]


# ---------------------------------------------------------------------------- an imported encoder
def pretrained_eval_data(pre: PretrainedEncoder, ecfg: EvalConfig) -> EvalData:
    """The labelled splits of ``--dataset`` (default: a simclr-dist checkpoint's own) at ``--image-size``, with
    the input normalisation the importer recorded instead of the dataset's (SimCLR v1: identity on [0, 1])."""
    own = (pre.checkpoint or {}).get("config")
    base = PretrainConfig.from_dict(own) if own else None
    dataset = ecfg.dataset or base.dataset
    same = base is not None and dataset == base.dataset
    cfg = PretrainConfig(dataset=dataset, image_size=ecfg.image_size or (base.image_size if same else None),
                         data_root=base.data_root if same else None).resolved()
    mean, std = pre.mean_std()
    return dataclasses.replace(load_eval_data(cfg, ecfg.data_root), mean=mean, std=std)


def pretrained_results_dir(pre: PretrainedEncoder, data: EvalData, ecfg: EvalConfig) -> str:
    """``--results-dir``; by default a simclr-dist checkpoint evaluated on its own data and resolution keeps its
    results next to it (the same files as ``--checkpoint``), other data go to ``<checkpoint>/transfer/...``, and
    external files to ``./runs/pretrained-eval/<format>-<file>-<dataset>-<size>px``."""
    if ecfg.results_dir:
        return ecfg.results_dir
    tag = f"{data.dataset}-{data.image_size}px"
    own = (pre.checkpoint or {}).get("config")
    if own is not None:
        if own.get("dataset") == data.dataset and own.get("image_size") == data.image_size:
            return pre.uri
        return storage.join(pre.uri, "transfer", tag)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in pre.uri.rstrip("/").rsplit("/", 1)[-1])
    return os.path.abspath(os.path.join("runs", "pretrained-eval", f"{pre.format}-{name}-{tag}"))


def evaluate_pretrained(spec: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu",
                        log: Log = emit) -> list[dict[str, Any]]:
    """Import ``FORMAT:PATH_OR_URI`` (verified; ``ecfg.strict`` refuses partial loads), print what was loaded,
    and run the config's protocols on ``ecfg.dataset`` with the importer's input normalisation."""
    device = torch.device(device)
    pre = load_pretrained(spec, strict=ecfg.strict, log=log)
    data = pretrained_eval_data(pre, ecfg)
    out_uri = pretrained_results_dir(pre, data, ecfg)
    plan, results, todo = _cached_results(out_uri, ecfg)
    if not todo:
        log(f"[eval] {pre.source} on {data.dataset}: already evaluated ({', '.join(result_name(*p) for p in plan)}) "
            f"in {out_uri}; skipping")
        return [results[p] for p in plan]
    own = (pre.checkpoint or {}).get("config")
    arch = (PretrainConfig.from_dict(own).arch_signature() if own else
            {"arch": pre.arch, "width": pre.width, "cifar_stem": pre.cifar_stem})
    common = {"format_version": RESULT_FORMAT, "checkpoint": pre.uri if own else pre.source,
              "checkpoint_epoch": pre.epoch, "checkpoint_step": (pre.checkpoint or {}).get("step"),
              "dataset": data.dataset, "arch": arch, "image_size": data.image_size, "device": device.type,
              "pretrained": pre.summary()}
    log(f"[eval] {pre.source} on {data.dataset} {data.image_size}px (input normalisation: "
        f"{pre.normalization_text()}): running {', '.join(result_name(*p) for p in todo)} on {device.type}; "
        f"results in {out_uri}")
    results.update(run_protocols(pre.encoder.to(device), data, ecfg, todo, out_uri=out_uri, common=common,
                                 device=device, log=log))
    return [results[p] for p in plan]


# ---------------------------------------------------------------------------- a run
def evaluate_latest(run_uri: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu",
                    log: Log = emit) -> list[dict[str, Any]]:
    latest = latest_checkpoint(run_uri)
    if latest is None:
        raise EvalError(f"--run {run_uri}: no complete checkpoint (checkpoint_*/ with {MANIFEST_FILE}) yet")
    return evaluate_checkpoint(latest, ecfg, device=device, log=log)


def watch_run(run_uri: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu", log: Log = emit,
              sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """Poll the run every ``ecfg.interval`` s and evaluate each complete checkpoint once, oldest first, until one
    of epoch >= ``watch_until_epoch`` is evaluated (or forever: stop with Ctrl-C). A checkpoint that fails to
    load (Ray deleted it under ``num_to_keep``, or its bytes are still arriving) is retried at the next poll."""
    done: set[str] = set()
    results: list[dict[str, Any]] = []
    log(f"[eval] watching {run_uri} every {ecfg.interval:g}s"
        + (f" until epoch {ecfg.watch_until_epoch}" if ecfg.watch_until_epoch is not None else " (Ctrl-C stops)"))
    while True:
        for ref in list_complete_checkpoints(run_uri):
            if ref.uri in done:
                continue
            try:
                results += evaluate_checkpoint(ref.uri, ecfg, device=device, log=log)
            except (EvalError, DatasetError, ConfigError):
                raise
            except (ValueError, OSError) as e:  # checksum mismatch, deleted or unreachable files
                log(f"[eval] {ref.uri}: not readable now ({str(e).splitlines()[0]}); retrying at the next poll")
                continue
            done.add(ref.uri)
            if ecfg.watch_until_epoch is not None and ref.epoch >= ecfg.watch_until_epoch:
                return results
        sleep(ecfg.interval)


# ---------------------------------------------------------------------------- CLI
def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per result: checkpoint, epoch, protocol, labels, top-1, top-5, wall time (cached = read back)."""
    names = [str(r["checkpoint"]).rstrip("/").rsplit("/", 1)[-1] for r in results]
    w = max([len("checkpoint"), *map(len, names)])
    header = f"{'checkpoint':<{w}} {'epoch':>5} {'protocol':<14} {'labels':>7} {'top-1':>7} {'top-5':>7} {'time':>8}"
    rows = [header, "-" * len(header)]
    for name, r in zip(names, results):
        proto = result_name(r["protocol"], r.get("label_fraction"))
        when = "cached" if r.get("cached") else f"{r['wall_time_s']:.1f}s"
        epoch = "-" if r.get("checkpoint_epoch") is None else r["checkpoint_epoch"]  # imported: no epoch
        rows.append(f"{name:<{w}} {epoch:>5} {proto:<14} {r['label_count']:>7} {r['top1']:>7.4f} "
                    f"{r['top5']:>7.4f} {when:>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    try:
        ecfg = parse_args(argv).validate()
        device = select_device()
        if ecfg.threads:
            torch.set_num_threads(ecfg.threads)
        if ecfg.watch:
            results = watch_run(ecfg.run, ecfg, device=device)
        elif ecfg.run is not None:
            results = evaluate_latest(ecfg.run, ecfg, device=device)
        elif ecfg.pretrained is not None:
            results = evaluate_pretrained(ecfg.pretrained, ecfg, device=device)
        else:
            require_complete(ecfg.checkpoint)
            results = evaluate_checkpoint(ecfg.checkpoint, ecfg, device=device)
    except (EvalError, ConfigError, DatasetError, storage.StorageError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        emit("\n[eval] interrupted; every result completed so far is saved next to its checkpoint")
        return 130
    emit("\n" + format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
