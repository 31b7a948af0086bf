"""Plan and drive one classifier run: fill a :class:`SupervisedConfig`'s defaults from its initialisation, check
everything that needs no Ray, then train under Ray Train (DDP) or in this process, and keep the result.

Why apart from the loop: what a run *is* (its network, data, recipe, label subset) is decided once in the driver,
before any worker starts, so a bad input costs one line and no cluster time; and a finished run is recognised by
its results file, so a rerun of the same experiment (``simclr_dist.supervised`` or an arm of
``simclr_dist.experiments``) trains nothing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from simclr_dist.config import ConfigError, PretrainConfig, PretrainedError, is_uri, parse_weights_spec
from simclr_dist.config.evaluate import EvalConfig
from simclr_dist.config.supervised import RESUME_FIELDS, SupervisedConfig, default_name, resolve_augment
from simclr_dist.console import Log, emit
from simclr_dist.data.datasets import check_available, load_dataset
from simclr_dist.data.splits import LabelSplit, SelectionError, label_split, labelled_splits, subset_digest
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import latest_checkpoint, load_checkpoint, read_complete, MANIFEST_FILE
from simclr_dist.run.train.classify_loop import (
    LocalSession,
    batch_layout,
    load_initial,
    run_uri,
    train_classifier,
    train_loop_per_worker,
)
from simclr_dist.run.train.evaluation import EvalData
from simclr_dist.run.jobs.launch import fit
from simclr_dist.run.store.pretrained import PretrainedEncoder, load_pretrained

RUN_CONFIG_FILE = "supervised_config.json"
RESULTS_FILE = "results.json"
FORMAT_VERSION = 1


def absolute(uri: str | None) -> str | None:
    """Local paths made absolute: Ray workers, which read them, need not share this process's cwd."""
    return uri if uri is None or is_uri(uri) else os.path.abspath(os.path.expanduser(uri))


def absolute_spec(spec: str) -> str:
    """``FORMAT:PATH`` with a local path made absolute; URIs and torch-hub names (``torchvision:resnet50``) are
    kept as given. The format is lower-cased."""
    fmt, path = parse_weights_spec(spec)
    local = os.path.expanduser(path)
    if not is_uri(path) and os.path.exists(local):
        path = os.path.abspath(local)
    return f"{fmt}:{path}"


def require_complete(checkpoint_uri: str, flag: str = "--checkpoint") -> None:
    """One-line error unless the directory holds a completely written checkpoint."""
    if read_complete(checkpoint_uri) is not None:
        return
    if not storage.exists(checkpoint_uri):
        raise ConfigError(f"{flag} {checkpoint_uri}: no such checkpoint directory")
    if not storage.exists(storage.join(checkpoint_uri, MANIFEST_FILE)):
        raise ConfigError(f"{flag} {checkpoint_uri}: incomplete checkpoint (no {MANIFEST_FILE}): it is still "
                          "being written, or it is not a checkpoint directory")
    raise ConfigError(f"{flag} {checkpoint_uri}: checkpoint file missing or not fully copied yet")


def pretraining_config(checkpoint: str, flag: str = "--checkpoint") -> PretrainConfig:
    """The network and data of a SimCLR pretraining checkpoint (verified), or a one-line error."""
    require_complete(checkpoint, flag)
    try:
        state = load_checkpoint(checkpoint)
    except ValueError as e:  # checksum mismatch: a corrupt or half-copied checkpoint
        raise ConfigError(f"{flag} {checkpoint}: {e}") from None
    if "config" not in state or "model" not in state or state.get("kind") == "supervised":
        raise ConfigError(f"{flag} {checkpoint}: not a simclr-dist pretraining checkpoint")
    return PretrainConfig.from_dict(state["config"])


def pretrained_model_config(pre: PretrainedEncoder, *, dataset: str | None, image_size: int | None,
                            data_root: str | None) -> PretrainConfig:
    """The network and data of an imported encoder: architecture, width and stem from the import; the dataset
    given (default: a simclr-dist checkpoint's own) at ``image_size`` (default: the checkpoint's when it is its own
    dataset, else the dataset's); the data root given (default: the checkpoint's on its own dataset)."""
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


def resolve_pretrained(scfg: SupervisedConfig) -> PretrainConfig:
    """The network of ``--init-pretrained`` (read and verified here); a conflicting architecture flag is an error."""
    scfg.init_pretrained = absolute_spec(scfg.init_pretrained)
    try:
        pre = load_pretrained(scfg.init_pretrained, strict=scfg.init_strict)
    except PretrainedError as e:
        raise ConfigError(str(e).replace("--pretrained", "--init-pretrained", 1)) from None
    # pinned to what was read (a run directory's latest checkpoint, a torch-hub name's file): every worker, a resume
    # and the results cache then see the same weights
    scfg.init_pretrained = f"{pre.format}:{pre.uri}"
    scfg.init_digest = pre.weights_digest()
    for key, got in (("arch", pre.arch), ("width", float(pre.width)), ("cifar_stem", bool(pre.cifar_stem))):
        want = getattr(scfg, key)
        if want is not None and want != got:
            raise ConfigError(f"--{key.replace('_', '-')} {want}: --init-pretrained {scfg.init_pretrained} is a "
                              f"{key}={got!r} network; drop the flag or pick another import")
    return pretrained_model_config(pre, dataset=scfg.dataset, image_size=scfg.image_size, data_root=scfg.data_root)


def resolve(scfg: SupervisedConfig) -> tuple[SupervisedConfig, PretrainConfig]:
    """(config with every default filled, the network's PretrainConfig). With ``--init-checkpoint`` the network,
    dataset and resolution are the checkpoint's, and a conflicting flag is a one-line error."""
    scfg = dataclasses.replace(scfg.validate())
    if scfg.init_checkpoint is not None:
        scfg.init_checkpoint = absolute(scfg.init_checkpoint)
        mcfg = pretraining_config(scfg.init_checkpoint, "--init-checkpoint")
        mine = {"dataset": scfg.dataset, "image_size": scfg.image_size, "arch": scfg.arch, "width": scfg.width,
                "cifar_stem": scfg.cifar_stem}
        for key, want in mine.items():
            if want is not None and want != getattr(mcfg, key):
                raise ConfigError(f"--{key.replace('_', '-')} {want}: --init-checkpoint {scfg.init_checkpoint} was "
                                  f"trained with {key}={getattr(mcfg, key)!r}; drop the flag or pick another checkpoint")
        if scfg.data_root is not None:
            mcfg.data_root = scfg.data_root
    elif scfg.init_pretrained is not None:
        mcfg = resolve_pretrained(scfg)
    else:
        mcfg = PretrainConfig(dataset=scfg.dataset or "digits", data_root=scfg.data_root,
                              image_size=scfg.image_size, arch=scfg.arch or "resnet18", width=scfg.width,
                              cifar_stem=scfg.cifar_stem).validate().resolved()
    for key in ("dataset", "image_size", "arch", "width", "cifar_stem"):
        setattr(scfg, key, getattr(mcfg, key))
    scfg.data_root = mcfg.data_root
    big = scfg.dataset in ("imagenet", "imagefolder")
    if scfg.epochs is None and scfg.steps is None:
        scfg.epochs = EvalConfig().epochs_for(scfg.fraction, scfg.dataset)
    if scfg.lr is None:
        scfg.lr = 0.4 if scfg.dataset == "digits" else (0.05 if scfg.from_pretrained() else 0.1)
    if scfg.weight_decay is None:
        scfg.weight_decay = 0.0 if scfg.from_pretrained() else (1e-4 if big else 5e-4)
    scfg.augment = resolve_augment(scfg.augment, scfg.dataset)  # default: the supervised recipe, padcrop(,flip)
    scfg.name = scfg.name or default_name(scfg)
    scfg.storage_path = absolute(scfg.storage_path)
    return scfg, mcfg


def check_subset(scfg: SupervisedConfig, labels: np.ndarray, flag: str = "--fraction") -> LabelSplit:
    """The run's label split, drawn here once; one line when the batch layout or the validation split cannot work."""
    try:
        split = label_split(labels, fraction=scfg.fraction, subset_seed=scfg.subset_seed, val_split=scfg.val_split,
                            val_fraction=scfg.val_fraction)
    except SelectionError as e:
        raise ConfigError(f"{flag} {scfg.fraction:g} (subset seed {scfg.subset_seed}): {e}; raise the "
                          "fraction") from None
    except ValueError as e:  # --val-split beyond the subset's selection splits
        raise ConfigError(str(e)) from None
    check_batch(scfg, len(split.fit), flag)
    return split


def check_batch(scfg: SupervisedConfig, fit_count: int, flag: str = "--fraction") -> None:
    """BatchNorm needs >= 2 images per worker: one line naming the fraction or the batch size otherwise."""
    _, per_worker = batch_layout(fit_count, scfg.batch_size, scfg.world())
    if per_worker < 2:
        culprit = f"{flag} {scfg.fraction:g}" if fit_count < scfg.batch_size else f"--batch-size {scfg.batch_size}"
        raise ConfigError(f"{culprit}: {fit_count} labels in batches of {scfg.batch_size} give {per_worker} image(s) "
                          f"per worker over {scfg.world()} worker(s); BatchNorm needs >= 2 per worker")


def preflight(scfg: SupervisedConfig, labels: np.ndarray | None = None, split: LabelSplit | None = None,
              ) -> tuple[SupervisedConfig, PretrainConfig, LabelSplit]:
    """Every check that needs no Ray (flags, checkpoint, data, label subset, storage, a resume's config): the
    resolved configs and the run's label split, or a one-line error. ``labels``: the train labels, when the caller
    has them loaded; ``split``: the split the caller (the experiments plan) drew for this run, else drawn here.
    Writes the run's config file, as pretraining does."""
    scfg, mcfg = resolve(scfg)
    if split is not None:
        check_batch(scfg, len(split.fit))
    elif labels is None:
        for name in labelled_splits(scfg.dataset):  # not `split`: that is the run's label split (None here)
            check_available(scfg.dataset, name, scfg.data_root)
        labels = np.asarray(load_dataset(scfg.dataset, labelled_splits(scfg.dataset)[0], root=scfg.data_root,
                                         image_size=scfg.image_size).targets)
    if split is None:
        split = check_subset(scfg, labels)
    storage.check_writable(scfg.storage_path)
    cfg_uri = storage.join(run_uri(scfg), RUN_CONFIG_FILE)
    if storage.exists(cfg_uri):
        saved = SupervisedConfig.from_dict(storage.read_json(cfg_uri))
        diff = [f"{k}={getattr(saved, k)!r} (now {getattr(scfg, k)!r})" for k in scfg.resume_fields(saved)
                if getattr(saved, k) != getattr(scfg, k)]
        if diff:
            raise ConfigError(f"run {run_uri(scfg)} was started with {', '.join(diff)}: resume with the same "
                              "settings or choose a new --name")
    storage.write_json(cfg_uri, scfg.to_dict())
    return scfg, mcfg, split


def initial_encoder(scfg: SupervisedConfig, mcfg: PretrainConfig) -> torch.nn.Module:
    """A seeded random encoder (identical on every rank), the SimCLR checkpoint's, or the imported one."""
    return load_initial(scfg, mcfg)[0]


def cached_result(scfg: SupervisedConfig) -> dict[str, Any] | None:
    """The run's results file if it holds a finished run of the same experiment (so a rerun trains nothing)."""
    uri = storage.join(run_uri(scfg), RESULTS_FILE)
    if not storage.exists(uri):
        return None
    saved = storage.read_json(uri)
    if SupervisedConfig.from_dict(saved.get("config", {})).experiment_key() != scfg.experiment_key():
        return None
    return {**saved, "cached": True}


def run_classifier(scfg: SupervisedConfig, *, data: EvalData | None = None, split: LabelSplit | None = None,
                   log: Log = emit, before_training: Callable[[str], None] | None = None,
                   equivalent: Callable[[SupervisedConfig, Log], dict[str, Any] | None] | None = None
                   ) -> dict[str, Any]:
    """Train (or resume, or read back a finished) classifier run; returns its results, also written to
    ``STORAGE/NAME/results.json`` with the label subset's indices. ``data``: the labelled splits, already loaded
    (an in-process caller that runs many arms); ``split``: its label split, drawn once by that caller's plan;
    ``equivalent(scfg, log)``: a finished run the caller knows to be this one under another name, or None (asked
    when this run is not finished); ``before_training(run)``: called when the run is not finished yet, before it
    trains (a study's time limit raises there)."""
    scfg, mcfg, split = preflight(scfg, None if data is None else data.train_labels, split)
    cached = cached_result(scfg)
    if cached is not None:
        score = "validation" if scfg.selecting() else "test"
        log(f"[supervised] {run_uri(scfg)}: already trained ({score} top-1 {cached['score']:.4f}); reusing it")
        return cached
    same = equivalent(scfg, log) if equivalent is not None else None
    if same is not None:
        return same
    if before_training is not None:
        before_training(run_uri(scfg))
    if not scfg.ray and scfg.threads:
        torch.set_num_threads(scfg.threads)
    t0 = time.perf_counter()
    if scfg.ray:
        result = fit(train_loop_per_worker, {"supervised": scfg.to_dict(), "model": mcfg.to_dict(),
                                             "split": split.to_dict()}, scfg)
        out = {**(result.return_value or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None}
    else:
        session = LocalSession(run_uri(scfg), scfg.num_to_keep)
        out = {**train_classifier(scfg, mcfg, session, split, data=data, log=log),
               "checkpoint": latest_checkpoint(run_uri(scfg))}
    history = out["history"]
    keep = ("top1", "top5", "val_top1", "predictions", "test_size", "fit_size", "val_size", "folds", "curve",
            "resumed_from_epoch", "normalization", "device", "train_time_s", "images_seen", "diverged", "best_epoch",
            "stopped_epoch", "converged", "hit_max_epochs", "checkpoint", "classifier_loader")
    result = {
        "format_version": FORMAT_VERSION, "kind": "supervised", "run": run_uri(scfg),
        "arm": "finetune" if scfg.from_pretrained() else "supervised", "init_checkpoint": scfg.init_checkpoint,
        "init_pretrained": scfg.init_pretrained, "dataset": scfg.dataset, "arch": mcfg.arch_signature(),
        "image_size": scfg.image_size, "label_fraction": scfg.fraction, "label_count": len(out["subset_indices"]),
        "subset_indices": out["subset_indices"], "subset_sha256": subset_digest(out["subset_indices"]),
        "score": out["val_top1"] if scfg.selecting() else out["top1"], "history": history,
        "epochs_done": history[-1]["epoch"] if history else 0, "wall_time_s": time.perf_counter() - t0,
        "workers": scfg.world(), **{k: out.get(k) for k in keep},
        "params": {"steps": out["steps"], "epochs": out["epochs"], "global_batch": out["global_batch"],
                   "nominal_batch": scfg.batch_size, "lr_per_256": scfg.lr, "peak_lr": out["peak_lr"],
                   "lr_rule": out["lr_rule"], "momentum": scfg.momentum, "nesterov": scfg.momentum > 0,
                   "weight_decay": scfg.weight_decay, "schedule": out.get("schedule", "cosine"),
                   "augment": scfg.augment, "patience": scfg.patience if scfg.early_stopping() else None,
                   "max_epochs": out["epochs"] if scfg.early_stopping() else None,
                   "seed": scfg.seed, "subset_seed": scfg.subset_seed, "val_split": scfg.val_split,
                   "steps_per_epoch": out["steps_per_epoch"]},
        "config": scfg.to_dict(), "cached": False,
    }
    storage.write_json(storage.join(run_uri(scfg), RESULTS_FILE), result)
    return result
