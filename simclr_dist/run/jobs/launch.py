"""Start a Ray Train job: join (or start) Ray, place it (CPU or GPU workers, wait for an autoscaling cluster to
grow: run/jobs/capacity.py), run a TorchTrainer, fail in one line.

Why shared: pretraining and classifier training (scratch, supervised, fine-tuning) scale the same way, so they are
launched by the same code: the same ScalingConfig/RunConfig, resume by rerunning with the same storage path and
name, and the same rule for errors: keep the cause, drop Ray's wall of text.

Two rules every launch keeps: a Ray this code starts itself listens on loopback only (:func:`bind_to_loopback`;
the train workers' process group too: run/jobs/rendezvous.py), and a run directory has one writer at a time (a
:class:`simclr_dist.storage.Lease` held for the whole fit).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from simclr_dist import storage
from simclr_dist.console import Log, emit
from simclr_dist.run.jobs.capacity import Capacity, CapacityError, Growth, capacity, wait_for


class RunError(RuntimeError):
    """The run could not start or did not finish; one line for the user."""


class ClusterFields(Protocol):
    """The fields of a job config that say where and how it runs (PretrainConfig and SupervisedConfig have them)."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool | None
    ray_address: str | None
    storage_path: str
    name: str | None
    max_failures: int
    num_to_keep: int
    verbose: bool


# Ray 2.60 picks a node's IP (and with it every listening socket of GCS, raylet, object manager, workers, the
# dashboard and metrics agents) from this switch: when it is off, the node IP is 127.0.0.1 and each gRPC server
# binds loopback (Ray's own rule: they listen on all interfaces unless the node IP is 127.0.0.1). The name says
# Windows/OSX, but Ray reads it on every platform; `_node_ip_address="127.0.0.1"` is turned back into the
# machine's outward IP by ray.init, so it cannot do this.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def bind_to_loopback() -> None:
    """Make a Ray started by this process (and every process it starts) listen on 127.0.0.1 only.

    Why: a laptop or a shared box running ``pretrain`` locally must not expose Ray's unauthenticated ports to its
    network. Sets :data:`LOOPBACK_ENV` (inherited by GCS, raylet and workers) and, when Ray was imported before
    this call, the constant Ray read from it at import (the driver decides its own node IP from it). Only for a
    Ray started here: a driver joining a cluster keeps its outward address.
    """
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")  # already imported: its value was read at import
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS, or the job's cluster under ``ray job submit``), else start a local Ray
    listening on loopback only."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        bind_to_loopback()
    import ray

    # A local Ray instance for a laptop; quiet its dashboard/metrics noise but keep worker logs streaming.
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")


@dataclass(frozen=True)
class Placement:
    """Where a job runs: CPU or GPU workers, on a cluster of this capacity, waiting this long for it to grow."""

    use_gpu: bool
    capacity: Capacity
    growth: Growth


def place(cfg: ClusterFields, growth: Growth | None = None) -> Placement:
    """Join Ray and choose the workers' device: ``--use-gpu`` as given, else GPUs when the cluster has them or is
    stated to grow them (an autoscaling GPU cluster often starts with none). ``growth``: the stated maximum and
    timeout (default: SIMCLR_MAX_CLUSTER_CPUS/GPUS, SIMCLR_RESOURCE_TIMEOUT_S)."""
    connect_ray(cfg.ray_address)
    try:
        growth = growth or Growth.resolve()
    except CapacityError as e:
        raise RunError(str(e)) from None
    cap = capacity(growth)
    return Placement(cfg.use_gpu if cfg.use_gpu is not None else cap.gpus_possible(), cap, growth)


def worker_bundle(cfg: ClusterFields, use_gpu: bool) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def ensure_resources(cfg: ClusterFields, where: Placement, log: Log = emit) -> None:
    """One line when the cluster can never hold the workers; a wait (with progress lines) while it grows to them."""
    what = (f"--num-workers {cfg.num_workers} x --cpus-per-worker {cfg.cpus_per_worker:g}"
            + (" + 1 GPU each" if where.use_gpu else ""))
    try:
        wait_for([worker_bundle(cfg, where.use_gpu)] * cfg.num_workers, where.capacity, where.growth, what, log=log)
    except CapacityError as e:
        raise RunError(str(e)) from None


def one_line(e: BaseException) -> str:
    """The last line of the root cause: what a user needs from a TrainingFailedError."""
    cause = e.__cause__ or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500] if str(cause).strip() else ''}"


def fit(loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], cfg: ClusterFields, *,
        where: Placement | None = None, callbacks: list | None = None) -> Any:
    """Run ``loop`` on ``cfg.num_workers`` Ray Train workers (DDP over gloo, or NCCL with GPUs); returns Ray's
    ``Result``. Resumes from ``STORAGE/NAME`` when it holds a checkpoint. ``where``: from :func:`place`, when the
    caller checks the placement first (default: placed here)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from simclr_dist.run.jobs.rendezvous import torch_config

    where = where or place(cfg)
    use_gpu = where.use_gpu
    ensure_resources(cfg, where)
    storage_fs, storage_path = storage.ray_filesystem(cfg.storage_path)  # Ray's own writes retried too
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=torch_config("nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_bundle(cfg, use_gpu)),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            callbacks=callbacks or None),
    )
    lease = storage.Lease(storage.join(cfg.storage_path, cfg.name), log=emit) if cfg.name else None
    if lease is not None:
        lease.acquire()  # a second run of this storage path and name stops here, in one line (LeaseError)
    try:
        return trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: keep the cause, drop Ray's wall of text
        raise RunError(f"training failed: {one_line(e)}") from e
    finally:
        if lease is not None:
            lease.release()
