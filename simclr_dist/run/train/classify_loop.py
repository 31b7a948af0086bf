"""The one classifier-training loop: from scratch, supervised on all labels, and fine-tuning, in a Ray Train worker
(DDP) or in this process.

Why one loop: Experiments A and B compare arms that must differ only in their initialisation and the
hyper-parameters each one chose on its own validation split; two loops drift (they did: one synced with the host
twice a step and had no GradScaler). So every trained arm is this function, configured by a
:class:`SupervisedConfig`:

- the labelled images are the class-balanced subset of ``fraction`` drawn with ``subset_seed``; a selection run
  (``val_split``) trains without that split's validation images and reports on them, never reading the test split;
  a final run trains on the whole subset and reads the test split once, after the last step;
- the budget is ``steps`` optimiser updates, ``epochs``, or (a selection run with ``patience``) early stopping: the
  run evaluates validation top-1 at the end of every epoch, stops when it has not improved for ``patience`` epochs
  (or at ``epochs``, the maximum: ``hit_max_epochs``, the budget was too small), restores the best epoch's weights
  and reports that epoch (``best_epoch``), which the experiments' final run then trains for;
- the peak LR is ``lr * batch_size / 256``: the nominal batch, so capping the batch at a small label count does not
  shrink the LR behind the user's back (the rule is printed). Schedule: a per-step cosine decay to 0 over a fixed
  budget; constant under early stopping (the default there), because the stopping epoch is not known in advance: a
  cosine over the maximum would make the best epoch depend on how far the budget reaches, and a final run that
  retrains for the chosen number of epochs at the same constant LR follows the trajectory the choice was made on;
- the training augmentation is the supervised recipe (pad-crop + flip, :func:`classifier_transform`) unless the
  config names SimCLR components; its batches come from a DataLoader of that per-sample transform (``torch``) or,
  for an in-memory dataset, from the images held once on the training device and augmented there by batched ops
  (``resident``, :mod:`simclr_dist.data.classifier_batches`: the same samples in the same batches, the same
  distribution, other draws); ``classifier_loader`` ``auto`` is resident on CUDA and torch on the CPU;
- each step is :func:`run.step.classify_step` (no host sync, GradScaler for fp16); losses are summed on the device
  and read once per epoch and at the curve points (validation accuracy at ``CURVE_POINTS`` evenly spaced steps of
  a fixed budget, at every epoch's end under early stopping). A selection run whose loss turns non-finite stops and
  reports ``diverged`` (with its best validation so far, 0 when it has none) instead of failing the study; a final
  run raises.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from simclr_dist.config import PretrainConfig
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.console import Log, emit
from simclr_dist.core.dist import all_sum, broadcast_buffers
from simclr_dist.core.knn import TransformedSubset
from simclr_dist.core.models import Classifier
from simclr_dist.core.optim import WarmupCosine, scale_lr
from simclr_dist.core.precision import Precision, to_memory_format, use_channels_last
from simclr_dist.data.augment import PADCROP, augment_seed, build_view_transform, default_augment
from simclr_dist.data.classifier_batches import ResidentClassifierBatches, loader_kind
from simclr_dist.data.datasets import dataset_info
from simclr_dist.data.splits import LabelSplit
from simclr_dist import storage
from simclr_dist.run.store.chaos import chaos_kill
from simclr_dist.run.store.checkpoint import (
    FORMAT_VERSION,
    latest_checkpoint,
    list_complete_checkpoints,
    load_checkpoint,
    make_uploader,
    save_checkpoint,
)
from simclr_dist.run.train.evaluation import EvalData, load_eval_data, predict, select_device
from simclr_dist.run.store.pretrained import Normalization, init_from_pretrained
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.train.step import classify_step

CURVE_POINTS = 6


def run_uri(scfg: SupervisedConfig) -> str:
    return storage.join(scfg.storage_path, scfg.name)


# ---------------------------------------------------------------------------- where the loop runs
class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def restore(self) -> dict[str, Any] | None: ...
    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None: ...
    def after_report(self, epoch: int) -> None: ...


class LocalSession:
    """This process as the only worker; with a ``run_dir`` checkpoints go to ``RUN/checkpoint_local_<epoch>`` (and a
    rerun resumes from them), without one nothing is written (evaluate's fine-tuning protocol)."""

    def __init__(self, run_dir: str | None = None, num_to_keep: int = 2, device: torch.device | None = None):
        self.run_dir, self.num_to_keep = run_dir, num_to_keep
        self.rank, self.world, self.device = 0, 1, device or select_device()

    def restore(self) -> dict[str, Any] | None:
        latest = latest_checkpoint(self.run_dir) if self.run_dir else None
        return load_checkpoint(latest) if latest else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None or self.run_dir is None:
            return
        save_checkpoint(storage.join(self.run_dir, f"checkpoint_local_{state['epoch']:06d}"), state)
        for old in list_complete_checkpoints(self.run_dir)[:-self.num_to_keep]:
            fs, path = storage.resolve(old.uri)
            fs.delete_dir(path)

    def after_report(self, epoch: int) -> None:
        pass


class RaySession:
    """A Ray Train worker: checkpoints through ``ray.train.report`` and the manifest-last uploader."""

    def __init__(self, run_dir: str, chaos_kill_epoch: int = -1):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.run_dir, self.chaos_kill_epoch = run_dir, chaos_kill_epoch
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict[str, Any] | None:
        """Ray's checkpoint after a worker failure or a rerun; else the newest complete one in the run directory
        (a run begun with --no-ray, whose checkpoints Ray never registered)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                return load_checkpoint(d)
        latest = latest_checkpoint(self.run_dir)
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
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=make_uploader(self.run_dir))

    def after_report(self, epoch: int) -> None:
        if epoch == self.chaos_kill_epoch and self.rank == self.world - 1:
            chaos_kill(self.run_dir)  # once per run (a marker in the run directory), after it registers


# ---------------------------------------------------------------------------- what the loop trains on
def batch_layout(label_count: int, batch_size: int, world: int) -> tuple[int, int]:
    """(global batch, per-worker batch): the batch is capped at the label count and split evenly over workers."""
    global_batch = min(batch_size, label_count) // world * world
    return global_batch, global_batch // world


def epoch_steps(fit_count: int, batch_size: int, world: int) -> int:
    """Optimiser steps in one epoch over ``fit_count`` labels: the loop's DataLoader length (each worker's share of
    the DistributedSampler, the last partial batch dropped when the subset exceeds one batch)."""
    global_batch, per_worker = batch_layout(fit_count, batch_size, world)
    share = math.ceil(fit_count / world)
    return share // per_worker if fit_count > global_batch else math.ceil(share / per_worker)


def classifier_transform(components: str, data: EvalData) -> Any:
    """The training transform of a classifier: ``padcrop[,flip]`` is the supervised recipe (resize to the data's
    size, ``RandomCrop(size, padding=size // 8)``, optional horizontal flip, normalise), built here until
    :mod:`simclr_dist.data.augment` has the component; anything else is SimCLR components (``crop`` is SimCLR's
    RandomResizedCrop at the dataset's scale)."""
    parts = [c for c in components.split(",") if c and c != "none"]
    if PADCROP not in parts:
        aug = default_augment(dataset_info(data.dataset), parts, image_size=data.image_size)
        return build_view_transform(dataclasses.replace(aug, mean=data.mean, std=data.std))
    s = data.image_size
    ops: list[Any] = [v2.ToImage(), v2.Resize(s, antialias=True), v2.CenterCrop(s), v2.RandomCrop(s, padding=s // 8)]
    if "flip" in parts:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std), v2.ToPureTensor()]
    return v2.Compose(ops)


def training_batches(kind: str, scfg: SupervisedConfig, data: EvalData, split: LabelSplit, components: str, *,
                     rank: int, world: int, device: torch.device) -> tuple[Any, Any, int, int]:
    """(batches, the object whose ``set_epoch`` orders an epoch, global batch, per-worker batch) of the fit images.
    ``torch``: a DataLoader of :func:`classifier_transform` over a DistributedSampler (x, y on the CPU);
    ``resident``: :class:`ResidentClassifierBatches`, the same samples in the same batches, augmented by batched
    ops on ``device`` (x, y there). Both cut an epoch alike: the last partial batch is dropped when the subset
    exceeds one global batch."""
    global_batch, per_worker = batch_layout(len(split.fit), scfg.batch_size, world)
    drop_last = len(split.fit) > global_batch
    if kind == "resident":
        index = torch.as_tensor(split.fit, dtype=torch.long)
        images = data.train.images  # (N, 3, S, S) uint8; a grey set's three planes are one (stride 0): keep one
        images = images[:, :1] if images.stride(1) == 0 else images
        batches = ResidentClassifierBatches(
            images.index_select(0, index), data.train.targets.index_select(0, index),
            components=components, dataset=data.dataset, image_size=data.image_size, mean=data.mean, std=data.std,
            batch_size=per_worker, drop_last=drop_last, seed=scfg.seed, rank=rank, world=world, device=device)
        return batches, batches, global_batch, per_worker
    train_set = TransformedSubset(data.train, classifier_transform(components, data), split.fit.tolist())
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=scfg.seed)
    loader = DataLoader(train_set, batch_size=per_worker, sampler=sampler, drop_last=drop_last,
                        num_workers=scfg.loader_workers)
    return loader, sampler, global_batch, per_worker


def load_initial(scfg: SupervisedConfig, mcfg: PretrainConfig, log: Log | None = None
                 ) -> tuple[torch.nn.Module, Normalization | None]:
    """(encoder, input normalisation): a random encoder seeded by ``seed`` (identical on every rank), the SimCLR
    checkpoint's, or the ``--init-pretrained`` import's (verified), whose input normalisation then replaces the
    dataset's; None: the dataset's."""
    torch.manual_seed(scfg.seed)
    model = build_model(mcfg)
    if scfg.init_checkpoint is not None:
        model.load_state_dict(load_checkpoint(scfg.init_checkpoint)["model"])
    elif scfg.init_pretrained is not None:
        pre = init_from_pretrained(model, scfg.init_pretrained, strict=scfg.init_strict, log=log)
        return model.encoder, pre.mean_std()
    return model.encoder, None


# ---------------------------------------------------------------------------- the loop
def train_classifier(scfg: SupervisedConfig, mcfg: PretrainConfig, session: Session, split: LabelSplit, *,
                     data: EvalData | None = None, encoder: torch.nn.Module | None = None,
                     log: Log = emit) -> dict[str, Any]:
    """Train encoder + linear head for ``scfg.steps`` updates, ``epochs``, or until early stopping (``patience``,
    a selection run), report and checkpoint every epoch, resume from the session's checkpoint. ``split``: the
    labelled images, drawn once by the caller (the loop never redraws them). ``data``/``encoder``: already loaded
    (in-process callers; a given encoder is trained in place and, under early stopping, left holding the best
    epoch's weights). Returns rank 0's view: per-epoch history, the validation curve, the split's sizes, the images
    processed and the final scores (validation for a selection run; test, with its predictions, for a final run)."""
    rank, world, device = session.rank, session.world, torch.device(session.device)
    log = log if rank == 0 else (lambda msg: None)
    data = data if data is not None else load_eval_data(mcfg, scfg.data_root)
    if (split.fraction, split.subset_seed, split.val_split) != (scfg.fraction, scfg.subset_seed, scfg.val_split):
        raise ValueError(f"the label split handed down (fraction {split.fraction:g}, subset seed {split.subset_seed}, "
                         f"split {split.val_split}) is not this run's: a caller bug")
    given = encoder is not None
    if encoder is None:
        encoder, norm = load_initial(scfg, mcfg, log=log)
        if norm is not None:  # the import's input normalisation, in the training and the evaluation transforms
            data = dataclasses.replace(data, mean=tuple(norm[0]), std=tuple(norm[1]))
    torch.manual_seed(scfg.seed)  # the head is zero-initialised; this seeds nothing else but keeps runs replayable
    channels_last = use_channels_last(None)  # the measured default (bench.memory_format)
    model = to_memory_format(Classifier(encoder, encoder.feat_dim, data.num_classes).to(device), channels_last)
    components = scfg.augment or "none"
    kind = loader_kind(scfg.classifier_loader, device, data.train, data.image_size)
    loader, sampler, global_batch, per_worker = training_batches(kind, scfg, data, split, components, rank=rank,
                                                                 world=world, device=device)
    steps_per_epoch = len(loader)
    early = scfg.patience is not None and split.val is not None  # stop on validation, keep the best weights
    total_steps = scfg.steps or scfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    schedule_name = scfg.schedule or ("constant" if early else "cosine")
    peak_lr = scale_lr(scfg.lr, scfg.batch_size, "linear")  # the nominal batch: a cap does not shrink the LR
    precision = Precision.of("auto", device)
    scaler = precision.scaler()
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=scfg.momentum, nesterov=scfg.momentum > 0,
                                weight_decay=scfg.weight_decay)
    # constant: a "cosine" from the peak to the peak
    schedule = WarmupCosine(optimizer, peak_lr, warmup_steps=0, total_steps=total_steps,
                            final_lr=peak_lr if schedule_name == "constant" else 0.0)
    n_points = min(CURVE_POINTS, total_steps)
    curve_at = set() if early else {round(total_steps * i / n_points) for i in range(1, n_points + 1)}

    start_epoch, step, history, curve = 0, 0, [], []
    stop: dict[str, Any] = {"best_epoch": 0, "best_val": None, "bad_epochs": 0, "stopped_epoch": None,
                            "reason": None}
    best_state: dict[str, torch.Tensor] | None = None
    state = session.restore()
    if state is not None:
        saved = state.get("supervised_config", {})
        if state.get("kind") != "supervised" or saved.get("fraction") != scfg.fraction:
            raise ValueError("the run directory holds a checkpoint of another run: choose a new --name")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, history, curve = state["epoch"], state["step"], state["history"], state.get("curve", [])
        if state.get("classifier_loader", "torch") != kind:  # a checkpoint from before the field: the torch path
            log(f"[supervised] resumed under the {kind} loader, trained so far under the "
                f"{state.get('classifier_loader', 'torch')} loader: the remaining epochs draw other augmentations "
                "(the same distribution), so the run is not the one an uninterrupted run would give")
        saved_stop = dict(state.get("early_stop") or {})
        best_state = saved_stop.pop("best_model", None)
        stop.update(saved_stop)
        log(f"[supervised] resumed from epoch {start_epoch} (step {step})")
    resumed_from = start_epoch
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None) if world > 1 else model)
    init = (f"SimCLR {scfg.init_checkpoint}" if scfg.init_checkpoint else
            f"imported {scfg.init_pretrained}" if scfg.init_pretrained else "the given encoder" if given else
            "random init")
    lr_rule = (f"peak lr {scfg.lr:g} x {scfg.batch_size}/256 = {peak_lr:.4g}"
               + (f" (batch capped at {global_batch} labels; the LR keeps the nominal batch {scfg.batch_size})"
                  if global_batch < scfg.batch_size else ""))
    what = (f"fit {len(split.fit)} + validation {len(split.val)} (split {scfg.val_split} of {split.folds})"
            if split.val is not None else f"all {len(split.fit)}")
    budget = (f"up to {epochs} epochs, early stopping (patience {scfg.patience}) = {steps_per_epoch} steps/epoch"
              if early else
              f"{total_steps} steps = {steps_per_epoch} steps/epoch x {total_steps / steps_per_epoch:.3g} epochs")
    log(f"[supervised] {mcfg.arch} x{mcfg.width} + linear head on {what} labels ({100 * scfg.fraction:g}% of "
        f"{len(data.train_labels)}, subset seed {scfg.subset_seed}) from {init}, seed {scfg.seed} | {world} "
        f"worker(s) x {per_worker} = batch {global_batch} | {budget} | {lr_rule}, {schedule_name} | wd "
        f"{scfg.weight_decay:g} | augment {components}" + (" (resident batches)" if kind == "resident" else "")
        + f" | {device.type}")

    segment = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n since the last curve point
    train_time = sum(h["epoch_time_s"] for h in history)
    diverged = stop["reason"] == "diverged"
    complete = start_epoch >= epochs or stop["stopped_epoch"] is not None  # a finished run resumed: nothing to do
    for epoch in range(start_epoch, epochs if not complete else start_epoch):
        sampler.set_epoch(epoch)
        torch.manual_seed(augment_seed(scfg.seed, rank, epoch))  # this epoch's augmentation draws
        ddp.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        t0 = time.perf_counter()
        for x, y in loader:
            if step >= total_steps:
                break
            schedule.apply(step)
            out = classify_step(ddp, optimizer, scaler, x, y, precision=precision, device=device,
                                channels_last=channels_last)
            sums += out
            segment += out
            step += 1
            if step in curve_at:
                curve.append(curve_point(model, segment, data, split, scfg, step, steps_per_epoch, schedule,
                                         rank=rank, world=world, device=device))
                segment.zero_()
                ddp.train()
        sums = all_sum(sums).cpu()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        train_loss = float(sums[0] / sums[2])
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_acc": float(sums[1] / sums[2]),
                   "lr": schedule.lr_at(step - 1), "epoch_time_s": epoch_time, "images": int(sums[2]),
                   "world_size": world}
        if not math.isfinite(train_loss):
            if split.val is None:
                raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}: lower --lr")
            # a selection run: this grid point diverged; the study goes on with the others
            diverged = True
            metrics["train_loss"] = None
            stop.update(stopped_epoch=epoch + 1, reason="diverged")
            log(f"[supervised] non-finite training loss in epoch {epoch + 1}: lr {scfg.lr:g} diverged; stopping "
                f"(validation top-1 {stop['best_val'] or 0.0:.4f}, the best before it)")
        elif early:
            point = curve_point(model, segment, data, split, scfg, step, steps_per_epoch, schedule, rank=rank,
                                world=world, device=device)
            segment.zero_()
            curve.append(point)
            if stop["best_val"] is None or point["val_top1"] > stop["best_val"]:
                stop.update(best_val=point["val_top1"], best_epoch=epoch + 1, bad_epochs=0)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                stop["bad_epochs"] += 1
                if stop["bad_epochs"] >= scfg.patience:
                    stop.update(stopped_epoch=epoch + 1, reason="patience")
        else:
            broadcast_buffers(model)
        if curve and curve[-1]["step"] == step and "val_top1" in curve[-1] and not diverged:
            metrics["val_top1"] = curve[-1]["val_top1"]
        history.append(metrics)
        last = epoch + 1 == epochs or stop["stopped_epoch"] is not None
        if early and last:
            if stop["stopped_epoch"] is None:
                stop.update(stopped_epoch=epoch + 1, reason="max_epochs")
            if best_state is not None:  # the best epoch's weights: what the selection run reports on
                model.load_state_dict(best_state)
        if last or (epoch + 1) % max(1, epochs // 10) == 0:
            log(f"[supervised] epoch {epoch + 1}/{epochs} (step {step}/{total_steps}): loss {train_loss:.4f} train "
                f"acc {metrics['train_acc']:.3f}" + (f" val top-1 {metrics['val_top1']:.4f}" if "val_top1" in metrics
                                                     else "") + f" | {epoch_time:.1f}s")
        if early and last:
            if stop["reason"] == "patience":
                log(f"[supervised] early stop after epoch {stop['stopped_epoch']}: no better validation top-1 for "
                    f"{scfg.patience} epochs; best {stop['best_val']:.4f} at epoch {stop['best_epoch']} (its weights "
                    "restored)")
            elif stop["reason"] == "max_epochs":
                log(f"[supervised] reached the maximum of {epochs} epochs still improving within the last "
                    f"{scfg.patience}: the budget was too small (best {stop['best_val']:.4f} at epoch "
                    f"{stop['best_epoch']}, its weights restored)")
        state = None
        if scfg.checkpoint_every and (last or (epoch + 1) % scfg.checkpoint_every == 0):
            state = {"format_version": FORMAT_VERSION, "kind": "supervised", "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                     "step": step, "steps_per_epoch": steps_per_epoch, "config": mcfg.to_dict(),
                     "supervised_config": scfg.to_dict(), "history": history, "curve": curve,
                     "classifier_loader": kind}
            if early:
                state["early_stop"] = {**stop, "best_model": best_state}
        session.report(metrics, state)
        session.after_report(epoch + 1)
        if stop["stopped_epoch"] is not None:
            break
    if complete:
        log(f"[supervised] run already complete ({start_epoch}/{epochs} epochs): nothing to train")

    out = {"history": history, "curve": curve, "subset_indices": split.subset.tolist(), "fit_size": len(split.fit),
           "val_size": 0 if split.val is None else len(split.val), "folds": split.folds,
           "resumed_from_epoch": resumed_from, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
           "steps": step if early else total_steps, "epochs": epochs, "peak_lr": peak_lr, "lr_rule": lr_rule,
           "schedule": schedule_name, "num_classes": data.num_classes, "device": device.type,
           "train_time_s": train_time, "images_seen": sum(h.get("images", 0) for h in history),
           "diverged": diverged, "normalization": {"mean": list(data.mean), "std": list(data.std)},
           "classifier_loader": kind}
    if early:
        out.update(best_epoch=stop["best_epoch"], stopped_epoch=stop["stopped_epoch"], max_epochs=epochs,
                   patience=scfg.patience, converged=stop["reason"] == "patience",
                   hit_max_epochs=stop["reason"] == "max_epochs")
    if split.val is not None:
        if early:
            out["val_top1"] = stop["best_val"] if stop["best_val"] is not None else 0.0
        else:
            out["val_top1"] = 0.0 if diverged else curve[-1]["val_top1"] if curve else None
        return out
    t1 = time.perf_counter()  # the one read of the test split, after the last step
    top1, top5, preds = predict(model, data.test, data.eval_transform(), rank=rank, world=world, device=device,
                                batch_size=scfg.eval_batch_size)
    return {**out, "top1": top1, "top5": top5, "test_size": len(data.test), "predictions": preds.tolist(),
            "test_time_s": time.perf_counter() - t1}


def validate(model: torch.nn.Module, data: EvalData, split: LabelSplit, scfg: SupervisedConfig, *, rank: int,
             world: int, device: torch.device) -> tuple[float, float]:
    """(top-1, top-5) on the run's validation images (train-split images held out of its fit part)."""
    top1, top5, _ = predict(model, data.train, data.eval_transform(), split.val.tolist(), rank=rank, world=world,
                            device=device, batch_size=scfg.eval_batch_size)
    return top1, top5


def curve_point(model: torch.nn.Module, segment: torch.Tensor, data: EvalData, split: LabelSplit,
                scfg: SupervisedConfig, step: int, steps_per_epoch: int, schedule: WarmupCosine, *, rank: int,
                world: int, device: torch.device) -> dict[str, Any]:
    """Training loss/accuracy since the previous point and, for a selection run, the validation top-1 now."""
    seg = all_sum(segment).cpu()
    point = {"step": step, "epoch": step / steps_per_epoch, "lr": schedule.lr_at(step - 1),
             "train_loss": float(seg[0] / seg[2]), "train_acc": float(seg[1] / seg[2])}
    if split.val is not None:
        broadcast_buffers(model)
        point["val_top1"], point["val_top5"] = validate(model, data, split, scfg, rank=rank, world=world,
                                                        device=device)
    return point


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (one per worker)."""
    scfg = SupervisedConfig.from_dict(config["supervised"])
    torch.set_num_threads(max(1, int(scfg.cpus_per_worker)))
    return train_classifier(scfg, PretrainConfig.from_dict(config["model"]),
                            RaySession(run_uri(scfg), scfg.chaos_kill_epoch), LabelSplit.from_dict(config["split"]))
