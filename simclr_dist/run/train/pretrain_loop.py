"""The per-worker SimCLR training loop that Ray Train runs in every worker (one readable loop).

Each worker: builds the model from the seed (identical on every rank), wraps it in DDP, restores the latest
checkpoint Ray hands back (after a restart or a rerun of the same run name), and trains epoch by epoch.
Both views go through one forward pass (BatchNorm statistics are shared by the two views of a worker's batch;
``--sync-bn`` shares them across workers too). The NT-Xent loss all-gathers projections, so every anchor sees
the negatives of all workers with exact gradients. Checkpoints are taken at epoch ends and, with
``--checkpoint-every-steps/-minutes``, mid-epoch: a resume then goes on at the next batch of the same seeded
epoch and reaches the weights of an uninterrupted run. Rank 0's state is copied in memory and uploaded in the
background (:class:`simclr_dist.run.store.checkpoint.AsyncCheckpointer`); every rank reports metrics.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from simclr_dist.config import PretrainConfig
from simclr_dist.console import emit
from simclr_dist.core.dist import mean_across
from simclr_dist.core.knn import extract_features_distributed, knn_accuracy
from simclr_dist.core.probe import probe_accuracy
from simclr_dist.core.precision import Precision
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.data.loader import LoaderSpec, build_pretrain_loader
from simclr_dist.data.splits import fixed_subset, labelled_splits, validation_split
from simclr_dist.core.optim import WarmupCosine, build_optimizer, scale_lr
from simclr_dist import storage
from simclr_dist.run.store.chaos import chaos_kill
from simclr_dist.run.store.checkpoint import FORMAT_VERSION, AsyncCheckpointer, load_checkpoint
from simclr_dist.run.train.metrics import WorkerMetrics
from simclr_dist.run.train.resume import Position, restore, resumed_schedule
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.train.step import pretrain_step


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------- evaluation
def online_knn(encoder: torch.nn.Module, cfg: PretrainConfig, device: torch.device, channels_last: bool) -> dict:
    """kNN top-1/top-5 of the frozen encoder: labelled train split as memory bank, held-out test split as queries.
    With ``--knn-split val`` the queries are a fixed class-stratified 20% of the labelled train split and the bank
    the rest (metrics ``val_knn_top1/5``): a held-out signal for model selection that never touches the test split.
    With ``--linear-probe`` a logistic-regression probe is also fitted on the bank's features and scored on the
    queries (``linear_top1/5``). Runs on every rank (each embeds a shard) so no worker idles at a barrier."""
    info = dataset_info(cfg.dataset)
    bank_split, query_split = labelled_splits(cfg.dataset)
    transform = build_eval_transform(cfg.image_size, info.mean, info.std)
    kw = dict(device=device, channels_last=channels_last)
    bank = fixed_subset(load_dataset(cfg.dataset, bank_split, root=cfg.data_root, image_size=cfg.image_size),
                        cfg.train_subset)  # --train-subset: the images pretrained on
    if cfg.knn_split == "val":
        bank, query = validation_split(bank)
    else:
        query = load_dataset(cfg.dataset, query_split, root=cfg.data_root, image_size=cfg.image_size)
    bank_f, bank_y = extract_features_distributed(encoder, bank, transform, **kw)
    query_f, query_y = extract_features_distributed(encoder, query, transform, **kw)
    num_classes = info.num_classes or int(bank_y.max()) + 1
    acc = knn_accuracy(bank_f, bank_y, query_f, query_y, num_classes=num_classes,
                       k=cfg.knn_k, temperature=cfg.knn_temperature)
    if cfg.linear_probe:  # the same features, a logistic-regression probe fitted on the bank
        acc.update(probe_accuracy(bank_f, bank_y, query_f, query_y, num_classes=num_classes))
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
        from simclr_dist.run.store.pretrained import init_from_pretrained
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
        num_workers=cfg.loader_workers, pin_memory=on_gpu, backend=cfg.loader, beton=cfg.beton,
        augment2=cfg.augment2, subset=cfg.train_subset))
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    lr = scale_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(model, cfg.optimizer, lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    schedule = WarmupCosine(optimizer, lr, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                            total_steps=total_steps)

    # -- resume: the checkpoint Ray hands back (after a restart, or a rerun of the same run name)
    pos = Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        pos = restore(state, cfg, model=model, optimizer=optimizer, scaler=scaler, steps_per_epoch=steps_per_epoch,
                      rank=rank, world=world)
        schedule = resumed_schedule(schedule, state.get("schedule"), pos.step, total_steps, log=log)
        where = f"epoch {pos.epoch}" + (f" + {pos.batch}/{steps_per_epoch} batches" if pos.batch else "")
        log(f"[simclr] resumed from {where} (step {pos.step}, lr {schedule.lr_at(pos.step):.5f})")

    step, history, init_knn = pos.step, pos.history, pos.init_knn
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
    saver = AsyncCheckpointer(storage.join(cfg.storage_path, cfg.name), rank,
                              kill_in_upload_epoch=cfg.chaos_kill_in_upload)
    every_s = cfg.checkpoint_every_minutes * 60
    last_save, pending = time.monotonic(), False  # pending: a step/time checkpoint deferred while uploads catch up
    drilled = pos.step >= cfg.chaos_kill_step

    def save(metrics: dict[str, Any], *, epochs_done: int, batch: int, loss_sum: torch.Tensor | None) -> None:
        """Every rank calls this at the same step; rank 0's state goes to storage in the background."""
        nonlocal last_save, pending
        sums = gather_all(loss_sum) if batch else None  # the epoch's running loss of every rank, to go on from
        state = None
        if rank == 0:
            state = {"format_version": FORMAT_VERSION, "model": raw.state_dict(),
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epochs_done, "batch": batch, "step": step,
                     "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict(), "history": history,
                     "epoch_loss_sums": sums, "init_knn": init_knn}
        mon.checkpoint_saved(saver.report(metrics, state))
        last_save, pending = time.monotonic(), False

    result: dict[str, Any] = {"status": "ok"}
    if step == 0 and cfg.knn_every >= 0:  # the baseline the trained encoder must beat
        init_knn = {f"{k}_init": v for k, v in online_knn(raw.encoder, cfg, device, channels_last).items()}
        init = "imported (--pretrained)" if cfg.pretrained else "randomly initialised"
        log(f"[simclr] kNN top-1 of the {init} encoder: {next(iter(init_knn.values())):.3f}")
    for epoch in range(pos.epoch, cfg.epochs):
        first = pos.batch if epoch == pos.epoch else 0  # a mid-epoch resume goes on at this batch of the epoch
        loader.set_epoch(epoch, start_batch=first)
        ddp.train()
        loss_sum = torch.zeros((), device=device)
        if first and pos.loss_sum is not None:
            loss_sum = pos.loss_sum.to(device)
        loss_before = loss_sum.clone()  # what the metrics windows of this attempt must not count
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        data_wait = 0.0
        t_epoch = t_ready = time.perf_counter()
        mon.start_epoch(epoch, step)
        for i, (v1, v2, _) in enumerate(loader, start=first):
            data_wait += time.perf_counter() - t_ready
            cur_lr = schedule.apply(step)
            loss = pretrain_step(ddp, optimizer, scaler, v1, v2, temperature=cfg.temperature, precision=precision,
                                 device=device, channels_last=channels_last, poison=step == cfg.chaos_nan_step,
                                 normalize=cfg.proj_normalize)
            # no host sync per step: remember the first non-finite step on the device
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.full_like(bad_step, step), bad_step)
            loss_sum += loss
            step += 1
            if cfg.chaos_kill_step >= 0 and step >= cfg.chaos_kill_step and not (pending or drilled):
                drilled = True  # once per attempt; the marker in storage makes it once per run
                if rank == world - 1:
                    chaos_kill(storage.join(cfg.storage_path, cfg.name), step)
            end_of_epoch = i + 1 == steps_per_epoch
            save_due = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0 and not end_of_epoch
            if step % cfg.log_every == 0 or end_of_epoch or save_due or pending:
                late = every_s > 0 and not end_of_epoch and time.monotonic() - last_save >= every_s
                # rank 0's clock and upload thread decide for everyone
                first_bad, time_due, busy = max_over_ranks(bad_step, late, saver.busy())
                if first_bad >= 0:
                    result = {"status": "nonfinite", "step": first_bad, "epoch": epoch}
                    break
                if step % cfg.log_every == 0 or end_of_epoch:
                    log(f"[simclr] epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{steps_per_epoch} "
                        f"loss {loss.item():.4f} lr {cur_lr:.5f}")
                    mon.observe(step=step, lr=cur_lr, data_wait_s=data_wait, loss_sum=loss_sum - loss_before)
                pending = save_due or time_due or pending  # deferred while rank 0's last upload is still going
                if pending and not busy and not end_of_epoch:
                    save({"epoch": epoch, "step": step, "batch": i + 1, "status": "ok"},
                         epochs_done=epoch, batch=i + 1, loss_sum=loss_sum)
            t_ready = time.perf_counter()
        if result["status"] != "ok":
            log(f"[simclr] non-finite loss at step {result['step']} (epoch {epoch + 1}); stopping, the last good "
                "checkpoint is kept")
            saver.report({"epoch": epoch, "step": step, "status": "nonfinite", "bad_step": result["step"]}, None)
            break

        epoch_time = time.perf_counter() - t_epoch
        steps_run = steps_per_epoch - first
        mean_loss = mean_across(loss_sum / steps_per_epoch)
        metrics = {
            "epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": schedule.lr_at(step - 1),
            "samples_per_s": steps_run * cfg.batch_size / epoch_time,
            "worker_samples_per_s": steps_run * per_worker / epoch_time,
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
            + (f" | val kNN top-1 {metrics['val_knn_top1']:.3f}" if "val_knn_top1" in metrics else "")
            + (f" | val linear top-1 {metrics['val_linear_top1']:.3f}" if "val_linear_top1" in metrics else ""))

        step_due = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
        _, time_due, busy = max_over_ranks(torch.full((), -1, device=device),
                                           every_s > 0 and time.monotonic() - last_save >= every_s, saver.busy())
        pending = step_due or time_due or pending
        if last or (epoch + 1) % cfg.checkpoint_every == 0 or (pending and not busy):
            save(metrics, epochs_done=epoch + 1, batch=0, loss_sum=None)  # waits only for an --checkpoint-every save
        else:
            saver.report(metrics, None)

    if pos.epoch >= cfg.epochs:
        log(f"[simclr] run already complete ({pos.epoch}/{cfg.epochs} epochs): nothing to train")
    return {**result, "history": history, "resumed_from_epoch": pos.epoch, "resumed_from_batch": pos.batch,
            "resumed_from_step": pos.step, "attempt_started_at": attempt_started_at,
            "checkpoint_blocked_s": saver.blocked_s,
            "epochs_done": history[-1]["epoch"] if history else pos.epoch}


def max_over_ranks(first_bad: torch.Tensor, *flags: bool) -> tuple[int, ...]:
    """(max over ranks of ``first_bad``, then rank 0's ``flags`` as bools) in one all-reduce: the loop's sync
    point, where every rank learns what rank 0 decided (a checkpoint due by its clock, its upload still busy)."""
    t = torch.tensor([0, *map(int, flags)], device=first_bad.device)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        t.zero_()
    t = torch.cat([first_bad.reshape(1).long(), t[1:]])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    bad, *raised = t.tolist()
    return (int(bad), *map(bool, raised))


def gather_all(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (on CPU), in rank order."""
    t = t.detach()
    if not (dist.is_available() and dist.is_initialized()):
        return [t.cpu()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


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


