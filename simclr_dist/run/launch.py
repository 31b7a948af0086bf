"""Start a Ray Train job: join (or start) Ray, check the request fits, run a TorchTrainer, fail in one line.

Why shared: pretraining and classifier training (scratch, supervised, fine-tuning) scale the same way, so they are
launched by the same code: the same ScalingConfig/RunConfig, resume by rerunning with the same storage path and
name, and the same rule for errors: keep the cause, drop Ray's wall of text.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol


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


def connect_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS, or the job's cluster under ``ray job submit``), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray instance for a laptop; quiet its dashboard/metrics noise but keep worker logs streaming.
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def wants_gpu(cfg: ClusterFields) -> bool:
    """``--use-gpu`` as given, else whether the (connected) cluster has GPUs."""
    import ray

    return cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0


def check_resources(cfg: ClusterFields, use_gpu: bool) -> None:
    """One line when the cluster cannot hold the request (every worker's CPUs, one GPU each)."""
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if need_cpu > res.get("CPU", 0):
        raise RunError(f"--num-workers {cfg.num_workers} x --cpus-per-worker {cfg.cpus_per_worker} needs "
                       f"{need_cpu:g} CPUs; the Ray cluster has {res.get('CPU', 0):g}")
    if use_gpu and cfg.num_workers > res.get("GPU", 0):
        raise RunError(f"--num-workers {cfg.num_workers} with --use-gpu needs {cfg.num_workers} GPUs; "
                       f"the Ray cluster has {res.get('GPU', 0):g}")


def one_line(e: BaseException) -> str:
    """The last line of the root cause: what a user needs from a TrainingFailedError."""
    cause = e.__cause__ or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500] if str(cause).strip() else ''}"


def fit(loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], cfg: ClusterFields, *,
        callbacks: list | None = None) -> Any:
    """Run ``loop`` on ``cfg.num_workers`` Ray Train workers (DDP over gloo, or NCCL with GPUs); returns Ray's
    ``Result``. Resumes from ``STORAGE/NAME`` when it holds a checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray(cfg.ray_address)
    use_gpu = wants_gpu(cfg)
    check_resources(cfg, use_gpu)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            callbacks=callbacks or None),
    )
    try:
        return trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: keep the cause, drop Ray's wall of text
        raise RunError(f"training failed: {one_line(e)}") from e
