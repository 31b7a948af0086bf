"""The pretraining job as a function: check a config, then run it on Ray Train (or, ``--no-ray``, in this process)
and summarise the run.

Why here and not in the command: the pretraining CLI, the sweep's Tune trainable and the experiments driver all
run the same job, and a command module is never imported by another. Everything that can be checked without Ray
(flags, data, storage, a resume's architecture) is checked first, so a bad input costs one line and no cluster time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from simclr_dist.config import ConfigError, PretrainConfig
from simclr_dist.data.datasets import check_available
from simclr_dist import storage
from simclr_dist.run.jobs.capacity import CapacityError, Growth
from simclr_dist.run.jobs.launch import Placement, RunError, fit, place
from simclr_dist.run.store.checkpoint import latest_checkpoint
from simclr_dist.run.train.resume import plan_resume
from simclr_dist.run.train.tracking import check_tracking

RUN_CONFIG_FILE = "simclr_config.json"



def check_config(cfg: PretrainConfig) -> PretrainConfig:
    """The checks that need neither Ray nor writes to storage (flags, data, .beton files): the resolved config or a
    one-line error. The sweep driver runs it on every trial's config before any trial starts."""
    cfg = cfg.validate().resolved().validate()
    check_tracking(cfg)
    if not (cfg.beton and cfg.knn_every < 0):  # training from a .beton without kNN reads no raw dataset
        check_available(cfg.dataset, cfg.split, cfg.data_root, cfg.download)
    if cfg.loader == "ffcv" and cfg.beton:  # files exist, complete, image+label fields, >= one global batch
        from simclr_dist.data.ffcv.beton import check_beton
        check_beton(cfg.beton, world_size=cfg.num_workers, batch_size=cfg.batch_size // cfg.num_workers)
    return cfg


def preflight(cfg: PretrainConfig) -> PretrainConfig:
    """Every check that needs no Ray: returns the resolved config or raises a one-line error."""
    cfg = check_config(cfg)
    storage.check_writable(cfg.storage_path)
    run_uri = storage.join(cfg.storage_path, cfg.name)
    cfg_uri = storage.join(run_uri, RUN_CONFIG_FILE)
    if storage.exists(cfg_uri):
        saved = PretrainConfig.from_dict(storage.read_json(cfg_uri))
        if saved.arch_signature() != cfg.arch_signature():
            diff = ", ".join(f"{k}={saved.arch_signature()[k]!r} (now {v!r})"
                             for k, v in cfg.arch_signature().items() if saved.arch_signature()[k] != v)
            raise ConfigError(f"run {run_uri} was started with {diff}: resume with the same architecture "
                              "or choose a new --name")
        if saved.batch_size != cfg.batch_size or saved.dataset != cfg.dataset:
            raise ConfigError(f"run {run_uri} was started with dataset={saved.dataset} batch_size={saved.batch_size}; "
                              "a resume must keep them (the schedule is in steps): choose a new --name")
        note = plan_resume(cfg, run_uri, saved)  # a changed --epochs: extended schedule, or refused
        if note:
            print(note)
    else:
        storage.write_json(cfg_uri, cfg.to_dict())
    return cfg


def download_data(cfg: PretrainConfig) -> None:
    """Download once in the driver so workers never race each other for the same files."""
    if cfg.download:
        from simclr_dist.data.datasets import load_dataset
        load_dataset(cfg.dataset, cfg.split, root=cfg.data_root, download=True, image_size=cfg.image_size)


def check_placement(cfg: PretrainConfig, where: Placement) -> None:
    """What only the cluster decides: with CPU workers (gloo), --sync-bn would crash at the first forward."""
    if cfg.sync_bn and cfg.num_workers > 1 and not where.use_gpu:
        raise ConfigError("--sync-bn: needs GPU workers (SyncBatchNorm synchronises over NCCL) and this cluster has "
                          "none (CPU workers use gloo): drop --sync-bn, or pass --use-gpu / --max-cluster-gpus when "
                          "an autoscaler adds GPU nodes")


def run(cfg: PretrainConfig, *, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary with the checkpoint path, history and kNN accuracy.
    ``callbacks``: Ray Train callbacks (the sweep's Tune reporter); a ``--no-ray`` run has none."""
    from simclr_dist.run.train.pretrain_loop import train_local, train_loop_per_worker

    cfg = preflight(cfg)
    if not cfg.ray:
        if callbacks:
            raise ConfigError("--no-ray: Ray Train callbacks (a Tune sweep) need a Ray run")
        download_data(cfg)
        t0 = time.perf_counter()
        ret = train_local(cfg)
        return summarize(cfg, ret, latest_checkpoint(storage.join(cfg.storage_path, cfg.name)),
                         time.perf_counter() - t0)
    try:
        growth = Growth.resolve(cfg.max_cluster_cpus, cfg.max_cluster_gpus, cfg.resource_timeout)
    except CapacityError as e:
        raise ConfigError(str(e)) from None
    download_data(cfg)
    where = place(cfg, growth)
    check_placement(cfg, where)
    t0 = time.perf_counter()
    result = fit(train_loop_per_worker, cfg.to_dict(), cfg, where=where, callbacks=callbacks)
    return summarize(cfg, result.return_value or {}, result.checkpoint.path if result.checkpoint else None,
                     time.perf_counter() - t0)


def run_local(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain in this process, without Ray (``--no-ray``): the entry point for a notebook or a script.

    ``cfg`` is a :class:`PretrainConfig` (its ``ray`` field is ignored). The run writes and resumes the same
    checkpoints as ``python -m simclr_dist.pretrain`` under ``cfg.storage_path/cfg.name``, so calling it again
    resumes (or, once complete, reports) the run. Returns the summary :func:`run` returns: ``run``,
    ``checkpoint`` (the newest checkpoint directory, for ``simclr_dist.evaluate --checkpoint``), ``history`` (one
    metrics dict per epoch), ``epochs_done``, ``wall_time_s``, ``knn_top1`` and friends, ``config``. A bad
    input raises :class:`ConfigError` (or ``DatasetError``/``StorageError``) in one line; a non-finite loss,
    :class:`RunError`."""
    return run(dataclasses.replace(cfg, ray=False))


def summarize(cfg: PretrainConfig, ret: dict[str, Any], checkpoint: str | None, wall: float) -> dict[str, Any]:
    """The run's summary from what the rank-0 loop returned and the newest checkpoint; a non-finite loss raises."""
    history = ret.get("history", [])
    summary = {
        "run": storage.join(cfg.storage_path, cfg.name),
        "checkpoint": checkpoint,
        "status": ret.get("status", "ok"), "wall_time_s": wall, "history": history,
        "epochs_done": ret.get("epochs_done"), "resumed_from_epoch": ret.get("resumed_from_epoch"),
        "resumed_from_step": ret.get("resumed_from_step"), "attempt_started_at": ret.get("attempt_started_at"),
        "resumed_from_batch": ret.get("resumed_from_batch"), "checkpoint_blocked_s": ret.get("checkpoint_blocked_s"),
        "tracking": ret.get("tracking"), "config": cfg.to_dict(),
    }
    if summary["status"] == "nonfinite":
        raise RunError(f"non-finite loss at step {ret['step']} (epoch {ret['epoch'] + 1}); stopped. "
                       f"Last good checkpoint: {summary['checkpoint'] or 'none'}. Lower --base-lr or raise --temperature")
    last_knn = next((h for h in reversed(history) if "knn_top1" in h), None)
    for key in ("knn_top1", "knn_top5", "knn_top1_init"):
        summary[key] = (last_knn or {}).get(key)
    last_val = next((h for h in reversed(history) if "val_knn_top1" in h), {})  # --knn-split val
    summary.update({k: last_val.get(k) for k in ("val_knn_top1", "val_knn_top5")})
    for key in ("linear_top1", "linear_top5", "val_linear_top1", "val_linear_top5"):  # --linear-probe
        summary[key] = next((h[key] for h in reversed(history) if key in h), None)
    if history and "knn_top1_init" in history[0]:
        summary["knn_top1_init"] = history[0]["knn_top1_init"]
    return summary
