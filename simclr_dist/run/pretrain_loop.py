"""The per-worker SimCLR training loop that Ray Train runs in every worker (one readable loop).

Each worker: builds the model from the seed (identical on every rank), wraps it in DDP, restores the latest
checkpoint Ray hands back (after a restart or a rerun of the same run name), and trains epoch by epoch.
Both views go through one forward pass (BatchNorm statistics are shared by the two views of a worker's batch;
``--sync-bn`` shares them across workers too). The NT-Xent loss all-gathers projections, so every anchor sees
the negatives of all workers with exact gradients. Rank 0 writes the checkpoint; every rank reports metrics.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from simclr_dist.config import PretrainConfig
from simclr_dist.console import emit
from simclr_dist.core.dist import max_across, mean_across
from simclr_dist.core.knn import extract_features_distributed, knn_accuracy
from simclr_dist.core.precision import Precision
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from simclr_dist.data.splits import labelled_splits, validation_split
from simclr_dist.core.optim import WarmupCosine, build_optimizer, scale_lr
from simclr_dist.run import storage
from simclr_dist.run.chaos import chaos_kill
from simclr_dist.run.checkpoint import FORMAT_VERSION, load_checkpoint, make_uploader, save_checkpoint
from simclr_dist.run.metrics import WorkerMetrics
from simclr_dist.run.step import build_model, pretrain_step


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------- checkpoints
# ---------------------------------------------------------------------------- evaluation
def online_knn(encoder: torch.nn.Module, cfg: PretrainConfig, device: torch.device, channels_last: bool) -> dict:
    """kNN top-1/top-5 of the frozen encoder: labelled train split as memory bank, held-out test split as queries.
    With ``--knn-split val`` the queries are a fixed class-stratified 20% of the labelled train split and the bank
    the rest (metrics ``val_knn_top1/5``): a held-out signal for model selection that never touches the test split.
    Runs on every rank (each embeds a shard) so no worker idles at a barrier."""
    info = dataset_info(cfg.dataset)
    bank_split, query_split = labelled_splits(cfg.dataset)
    transform = build_eval_transform(cfg.image_size, info.mean, info.std)
    kw = dict(device=device, channels_last=channels_last)
    bank = load_dataset(cfg.dataset, bank_split, root=cfg.data_root, image_size=cfg.image_size)
    if cfg.knn_split == "val":
        bank, query = validation_split(bank)
    else:
        query = load_dataset(cfg.dataset, query_split, root=cfg.data_root, image_size=cfg.image_size)
    bank_f, bank_y = extract_features_distributed(encoder, bank, transform, **kw)
    query_f, query_y = extract_features_distributed(encoder, query, transform, **kw)
    num_classes = info.num_classes or int(bank_y.max()) + 1
    acc = knn_accuracy(bank_f, bank_y, query_f, query_y, num_classes=num_classes,
                       k=cfg.knn_k, temperature=cfg.knn_temperature)
    return {f"val_{k}": v for k, v in acc.items()} if cfg.knn_split == "val" else acc


# ---------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    log = emit if rank == 0 else (lambda msg: None)
    if not cfg.verbose:
        quiet_report_log()

    # -- model, loss precision, optimizer, schedule
    model = build_model(cfg)
    if cfg.pretrained and ray.train.get_checkpoint() is None:  # a fresh run's init; a resume restores its own
        from simclr_dist.run.pretrained import init_from_pretrained
        init_from_pretrained(model, cfg.pretrained, strict=cfg.pretrained_strict, log=log)
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = cfg.channels_last if cfg.channels_last is not None else on_gpu
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    precision = Precision.of(cfg.precision, device)
    scaler = precision.scaler()

    per_worker = cfg.batch_size // world
    loader = build_pretrain_loader(LoaderSpec(
        dataset=cfg.dataset, split=cfg.split, root=cfg.data_root, image_size=cfg.image_size, augment=cfg.augment,
        jitter_strength=cfg.jitter_strength, batch_size=per_worker, rank=rank, world_size=world, seed=cfg.seed,
        num_workers=cfg.loader_workers, pin_memory=on_gpu, backend=cfg.loader, beton=cfg.beton))
    steps_per_epoch = len(loader)
    lr = scale_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(model, cfg.optimizer, lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    schedule = WarmupCosine(optimizer, lr, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                            total_steps=cfg.epochs * steps_per_epoch)

    # -- resume
    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        saved = PretrainConfig.from_dict(state["config"])
        if saved.arch_signature() != cfg.arch_signature():
            raise ValueError(f"checkpoint architecture {saved.arch_signature()} != requested {cfg.arch_signature()}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            raise ValueError(f"checkpoint has {state['steps_per_epoch']} steps/epoch, this run {steps_per_epoch}: "
                             "resume with the same --batch-size and dataset")
        log(f"[simclr] resumed from epoch {start_epoch} (step {step}, lr {schedule.lr_at(step):.5f})")

    step0 = step
    attempt_started_at = time.time()  # after restore: fault-recovery time = this - the fault's time
    if cfg.compile:
        model = torch.compile(model)
    ddp = DDP(model, device_ids=[device.index] if on_gpu else None) if world > 1 else model
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model

    log(f"[simclr] {cfg.arch} x{cfg.width} on {cfg.dataset}/{cfg.split} {cfg.image_size}px | {world} worker(s) x "
        f"{per_worker} = batch {cfg.batch_size} | {steps_per_epoch} steps/epoch | lr {lr:.4f} | {precision.name} on "
        f"{device.type}")

    node = socket.gethostname()
    mon = WorkerMetrics(cfg.name, rank, node, samples_per_step=per_worker, device=device, model=raw,
                        image_size=cfg.image_size)  # Prometheus series via Ray's metrics agent (log points only)
    node_ids = all_node_ids()  # where every rank runs: proves multi-node placement in tests and logs
    result: dict[str, Any] = {"status": "ok"}
    init_knn = {}
    if start_epoch == 0 and cfg.knn_every >= 0:  # the baseline the trained encoder must beat
        init_knn = {f"{k}_init": v for k, v in online_knn(raw.encoder, cfg, device, channels_last).items()}
        init = "imported (--pretrained)" if cfg.pretrained else "randomly initialised"
        log(f"[simclr] kNN top-1 of the {init} encoder: {next(iter(init_knn.values())):.3f}")
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        ddp.train()
        loss_sum = torch.zeros((), device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        data_wait = 0.0
        t_epoch = t_ready = time.perf_counter()
        mon.start_epoch(epoch, step)
        for i, (v1, v2, _) in enumerate(loader):
            data_wait += time.perf_counter() - t_ready
            cur_lr = schedule.apply(step)
            loss = pretrain_step(ddp, optimizer, scaler, v1, v2, temperature=cfg.temperature, precision=precision,
                                 device=device, channels_last=channels_last, poison=step == cfg.chaos_nan_step)
            # no host sync per step: remember the first non-finite step on the device
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.full_like(bad_step, step), bad_step)
            loss_sum += loss
            step += 1
            if cfg.chaos_kill_step == step and rank == world - 1:
                chaos_kill(storage.join(cfg.storage_path, cfg.name))
            if step % cfg.log_every == 0 or i + 1 == steps_per_epoch:
                first_bad = max_across(bad_step)
                if first_bad >= 0:
                    result = {"status": "nonfinite", "step": first_bad, "epoch": epoch}
                    break
                log(f"[simclr] epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{steps_per_epoch} "
                    f"loss {loss.item():.4f} lr {cur_lr:.5f}")
                mon.observe(step=step, lr=cur_lr, data_wait_s=data_wait, loss_sum=loss_sum)
            t_ready = time.perf_counter()
        if result["status"] != "ok":
            log(f"[simclr] non-finite loss at step {result['step']} (epoch {epoch + 1}); stopping, the last good "
                "checkpoint is kept")
            ray.train.report({"epoch": epoch, "step": step, "status": "nonfinite", "bad_step": result["step"]})
            break

        epoch_time = time.perf_counter() - t_epoch
        mean_loss = mean_across(loss_sum / steps_per_epoch)
        metrics = {
            "epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": schedule.lr_at(step - 1),
            "samples_per_s": steps_per_epoch * cfg.batch_size / epoch_time,
            "worker_samples_per_s": steps_per_epoch * per_worker / epoch_time,
            "epoch_time_s": epoch_time, "data_wait_s": data_wait, "rank": rank, "node": node,
            "node_id": ray_node_id(), "world_size": world, "status": "ok", "node_ids": node_ids, **init_knn,
        }
        init_knn = {}
        last = epoch + 1 == cfg.epochs
        if (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0) or (last and cfg.knn_every >= 0):
            metrics.update(online_knn(raw.encoder, cfg, device, channels_last))
        history.append({k: v for k, v in metrics.items() if k not in ("rank", "node", "node_id")})
        log(f"[simclr] epoch {epoch + 1}/{cfg.epochs} done: loss {mean_loss:.4f} | "
            f"{metrics['samples_per_s']:.1f} samples/s | {epoch_time:.1f}s (data wait {data_wait:.1f}s)"
            + (f" | kNN top-1 {metrics['knn_top1']:.3f}" if "knn_top1" in metrics else "")
            + (f" | val kNN top-1 {metrics['val_knn_top1']:.3f}" if "val_knn_top1" in metrics else ""))

        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            t_save = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(tmp, {
                        "format_version": FORMAT_VERSION, "model": raw.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step,
                        "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict(), "history": history})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                metrics["checkpoint_save_s"] = time.perf_counter() - t_save
                mon.checkpoint_saved(metrics["checkpoint_save_s"])
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_fn=make_uploader(
                    storage.join(cfg.storage_path, cfg.name), kill_in_upload_epoch=cfg.chaos_kill_in_upload))
        else:
            ray.train.report(metrics)

    if start_epoch >= cfg.epochs:
        log(f"[simclr] run already complete ({start_epoch}/{cfg.epochs} epochs): nothing to train")
    return {**result, "history": history, "resumed_from_epoch": start_epoch, "resumed_from_step": step0,
            "attempt_started_at": attempt_started_at,
            "epochs_done": history[-1]["epoch"] if history else start_epoch}




def quiet_report_log() -> None:
    """Ray Train 2.60 logs every report (metrics dict included) at INFO through ``logging.getLogger(__file__)`` of
    its worker context module, a logger outside the ``ray.train`` tree that ``LoggingConfig`` sets; without
    ``--verbose`` that is two lines per epoch of noise around our own progress lines."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def all_node_ids() -> list[str]:
    ids = [ray_node_id()]
    if dist.is_available() and dist.is_initialized():
        ids = [None] * dist.get_world_size()
        dist.all_gather_object(ids, ray_node_id())
    return ids


def ray_node_id() -> str:
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


