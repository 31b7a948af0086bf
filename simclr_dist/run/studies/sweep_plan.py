"""A sweep's plan, checked before any trial starts: every trial's resolved config, what the cluster fits, a listing.

Why separate from the parse (:mod:`simclr_dist.config.sweep`): these checks resolve each trial as the pretraining
job would (data on disk, .beton files, flag combinations) and ask Ray what the cluster holds, so a study that cannot
run - an objective the trainable does not report, ASHA without rungs to compare at, a trial bigger than the
cluster - costs one line and no trial.
"""

from __future__ import annotations

import math
from typing import Any

from simclr_dist.config import ConfigError, PretrainConfig
from simclr_dist.config.sweep import ONLINE_OBJECTIVES, OBJECTIVES, Dimension, SweepError, SweepSpec, fail, suggest
from simclr_dist.data.datasets import DatasetError
from simclr_dist.run.jobs.capacity import Capacity, CapacityError, Growth, capacity
from simclr_dist.run.jobs.pretrain_job import check_config


def reported_metrics(cfg: PretrainConfig) -> set[str]:
    """What ``train_loop_per_worker`` reports every epoch (plus the kNN monitor and the probe where they run)."""
    out = {"epoch", "step", "loss", "lr", "samples_per_s", "worker_samples_per_s", "epoch_time_s", "data_wait_s",
           "world_size", "training_iteration"}
    if cfg.knn_every >= 0:
        prefix = "val_" if cfg.knn_split == "val" else ""
        out |= {f"{prefix}knn_top1", f"{prefix}knn_top5"}
        if cfg.linear_probe:
            out |= {f"{prefix}linear_top1", f"{prefix}linear_top5"}
    if cfg.online_probe:  # every epoch, on the validation split
        out |= {"online_probe_top1", "online_probe_loss", "rankme"}
    return out


def point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v.describe() if isinstance(v, Dimension) else v}" for k, v in point.items())


def check_spec(spec: SweepSpec) -> list[PretrainConfig]:
    """Every trial's resolved config, validated (flags, data, objective, scheduler), or one :class:`SweepError`."""
    cfgs = []
    for i, point in enumerate(spec.trial_configs()):
        # a random dimension is checked at both ends of its range
        randoms = {k: d for k, d in point.items() if isinstance(d, Dimension)}
        variants = [{**point, **{k: d.values[j] for k, d in randoms.items()}} for j in ((0, 1) if randoms else (0,))]
        for variant in variants:
            label = f"{spec.source}: trial {i + 1} ({point_label(variant)})"
            try:
                cfg = check_config(PretrainConfig.from_dict(spec.trial_dict(variant)))
            except (ConfigError, DatasetError) as e:
                raise SweepError(f"{label}: {e}") from None
            except (TypeError, ValueError) as e:
                raise SweepError(f"{label}: {type(e).__name__}: {e}") from None
        cfgs.append(cfg)
    cfg = cfgs[0]
    reported = reported_metrics(cfg)
    online = spec.metric in ONLINE_OBJECTIVES  # measured every epoch by the online probe, not by the kNN monitor
    if cfg.knn_every < 0 and not online:
        fail(f"{spec.source}: knn_every", "-1 turns off the kNN monitor the objective is measured with")
    if spec.metric not in reported:
        fail(f"{spec.source}: objective.metric", f"the trainable does not report {spec.metric!r}"
                                                  f"{suggest(spec.metric, reported)}; it reports "
                                                  f"{', '.join(sorted(reported))}")
    if spec.metric not in OBJECTIVES:
        fail(f"{spec.source}: objective.metric", f"{spec.metric!r} is not an accuracy on the held-out validation "
                                                  f"split; a sweep selects on one of {', '.join(OBJECTIVES)}")
    if spec.scheduler:
        sch = spec.scheduler
        where = f"{spec.source}: scheduler"
        if sch["time_attr"] not in reported:
            fail(f"{where}.time_attr", f"the trainable does not report {sch['time_attr']!r}; use epoch")
        max_epochs = max(c.epochs for c in cfgs)
        if sch["max_t"] is not None and sch["max_t"] > max_epochs and sch["time_attr"] == "epoch":
            fail(f"{where}.max_t", f"{sch['max_t']} exceeds the trials' {max_epochs} epochs")
        if min(c.knn_every for c in cfgs) == 0 and not online:
            fail(where, "ASHA compares trials at its rungs, but knn_every 0 measures the objective only after the "
                        "last epoch: set knn_every (e.g. to the grace period)")
    return cfgs


def trial_resources(cfg: PretrainConfig, gpus: bool) -> dict[str, float]:
    """What one trial's Train run claims; ``gpus``: whether the cluster has (or is stated to grow) GPUs."""
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(cfg.num_workers)
    return need


def plan_concurrency(spec: SweepSpec, cfgs: list[PretrainConfig], cap: Capacity | None,
                     max_concurrent: int | None) -> tuple[int, list[str]]:
    """(trials at once, notes). Planned against what the cluster can grow to (an autoscaling cluster adds nodes as
    the trials ask for them); raises :class:`SweepError` when a trial needs more than it can ever reach."""
    limit = min(spec.concurrency, max_concurrent or spec.concurrency)
    notes = [f"sweep file {spec.concurrency}" + (f", --max-concurrent {max_concurrent}" if max_concurrent else "")]
    if cap is None:
        return limit, notes + ["cluster not checked (no Ray connection: pass --ray-address or set RAY_ADDRESS)"]
    fits, fits_now = math.inf, math.inf
    for i, cfg in enumerate(cfgs):
        need = trial_resources(cfg, cap.gpus_possible())
        if cfg.sync_bn and cfg.num_workers > 1 and "GPU" not in need:
            raise SweepError(f"{spec.source}: trial {i + 1}: --sync-bn needs GPU workers (SyncBatchNorm synchronises "
                             "over NCCL) and this cluster has none: drop sync_bn")
        for res, amount in need.items():
            have, most = cap.now.get(res, 0.0), cap.ceiling.get(res, 0.0)
            if amount > most:
                grow = f" and can grow to {most:g}" if most > have else ""
                raise SweepError(
                    f"{spec.source}: trial {i + 1} needs {amount:g} {res} ({cfg.num_workers} Ray Train worker(s) x "
                    f"{cfg.cpus_per_worker:g} CPU{' + 1 GPU' if 'GPU' in need else ''}); the Ray cluster has "
                    f"{have:g} {res}{grow} ({cap.why[res]}): lower resources.num_workers/cpus_per_worker or use a "
                    "bigger cluster")
            if amount:
                fits = min(fits, math.inf if math.isinf(most) else int(most // amount))
                fits_now = min(fits_now, int(have // amount))
    if fits < limit:
        notes.append(f"the cluster fits {fits} at once")
        limit = int(fits)
    if fits_now < limit:
        notes.append(f"{fits_now} fit today, the others start as the autoscaler adds nodes")
    return max(1, limit), notes


def asha_max_t(spec: SweepSpec, cfgs: list[PretrainConfig]) -> int | None:
    """The ASHA horizon: the file's ``max_t``, else the longest trial's epochs; None without ASHA."""
    return (spec.scheduler["max_t"] or max(c.epochs for c in cfgs)) if spec.scheduler else None


def describe(spec: SweepSpec, cfgs: list[PretrainConfig], concurrency: int, notes: list[str],
             cap: Capacity | None) -> str:
    """The plan as text: trials, objective, scheduler, storage, and one line per trial with its resources."""
    points = spec.trial_configs()
    sch = spec.scheduler
    lines = [f"sweep {spec.study!r} ({spec.source}): {len(points)} trial(s); objective {spec.metric} ({spec.mode}) "
             f"on the validation split; scheduler "
             + (f"ASHA(time_attr={sch['time_attr']}, max_t={asha_max_t(spec, cfgs)}, "
                f"grace_period={sch['grace_period']}, reduction_factor={sch['reduction_factor']})" if sch else "none"),
             f"  storage: {spec.experiment_uri} (Train runs under {spec.train_storage}/<trial_id>)",
             f"  at once: {concurrency} trial(s) ({'; '.join(notes)})"]
    cols = list(dict.fromkeys(list(spec.search) + (["seed"] if spec.seeds else []) + ["epochs", "batch_size",
                                                                                       "resources"]))
    rows = []
    for i, (point, cfg) in enumerate(zip(points, cfgs)):
        need = trial_resources(cfg, cap is not None and cap.gpus_possible())
        res = f"{cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU" + (" + 1 GPU" if "GPU" in need else "") \
            + (" (+1 GPU each if the cluster has GPUs)" if cfg.use_gpu is None and cap is None else "")
        vals = {**{k: getattr(cfg, k) for k in ("epochs", "batch_size")},
                **{k: (v.describe() if isinstance(v, Dimension) else v) for k, v in point.items()}, "resources": res}
        rows.append([str(i + 1)] + [str(vals[c]) for c in cols])
    header = ["#"] + cols
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def cluster_capacity(cfgs: list[PretrainConfig], address: str | None, connect: bool) -> Capacity | None:
    """The cluster's capacity (None without a Ray connection); the stated maximum comes from the trials' common
    ``max_cluster_cpus/gpus`` (``--set``), else SIMCLR_MAX_CLUSTER_CPUS/GPUS."""
    import ray
    if not ray.is_initialized():
        if not connect:
            return None
        from simclr_dist.run.jobs.launch import connect_ray
        connect_ray(address)
    first = cfgs[0]
    try:
        return capacity(Growth.resolve(first.max_cluster_cpus, first.max_cluster_gpus, first.resource_timeout))
    except CapacityError as e:
        raise SweepError(str(e)) from None
