"""The per-worker SimCLR training loop that Ray Train runs in every worker (one readable loop).

Each worker: builds the model from the seed (identical on every rank), wraps it in DDP, restores the latest
checkpoint Ray hands back (after a restart or a rerun of the same run name), and trains epoch by epoch.
Both views go through one forward pass (BatchNorm statistics are shared by the two views of a worker's batch;
``--sync-bn`` shares them across workers too). The NT-Xent loss all-gathers projections, so every anchor sees
the negatives of all workers with exact gradients. Checkpoints are taken at epoch ends and, with
``--checkpoint-every-steps/-minutes``, mid-epoch: a resume then goes on at the next batch of the same seeded
epoch and reaches the weights of an uninterrupted run. Rank 0's state is copied in memory and uploaded in the
background (:class:`simclr_dist.run.store.checkpoint.AsyncCheckpointer`); every rank reports metrics.

The same loop runs without Ray (``--no-ray``, :func:`train_local`): one process is the only worker, its
:class:`LocalCheckpointer` writes the same checkpoint directories into the same run directory (so evaluation,
experiments and a later Ray rerun read them unchanged), and a rerun resumes from the newest complete one.
What differs between the two is gathered in a :class:`Worker`.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from simclr_dist.config import PretrainConfig
from simclr_dist.console import emit
from simclr_dist.core.dist import mean_across
from simclr_dist.core.knn import extract_features_distributed, knn_accuracy
from simclr_dist.core.probe import probe_accuracy
from simclr_dist.core.precision import Precision, use_channels_last
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.data.loader import LoaderSpec, PretrainLoader, build_pretrain_loader
from simclr_dist.data.splits import fixed_subset, labelled_splits, validation_split
from simclr_dist.core.optim import WarmupCosine, build_optimizer, scale_lr
from simclr_dist import storage
from simclr_dist.run.store.chaos import chaos_kill, chaos_once
from simclr_dist.run.store.checkpoint import (
    AsyncCheckpointer,
    PretrainState,
    list_complete_checkpoints,
    save_checkpoint,
)
from simclr_dist.run.train.metrics import WorkerMetrics
from simclr_dist.run.train.online_probe import ProbeStream
from simclr_dist.run.train.resume import Position, load_newest, load_resumable, restore, resumed_schedule
from simclr_dist.run.train.tracking import StepWindow, Tracker, numeric, open_tracker, tracking_summary
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


# ---------------------------------------------------------------------------- where the loop runs
class Checkpointer(Protocol):
    """What the loop needs of a checkpoint writer: Ray's asynchronous one or :class:`LocalCheckpointer`."""

    blocked_s: list[float]

    def busy(self) -> bool: ...

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> float: ...


class LocalCheckpointer:
    """``--no-ray``: checkpoints written by this process into the run directory, in the directories a Ray run
    makes (``checkpoint_<date>``, ``checkpoint.pt`` then ``manifest.json`` last), keeping the newest
    ``num_to_keep``. Synchronous: with one process there is no upload thread to hide behind, and a save that has
    returned is on disk when a kill comes. Never busy, so no save is deferred."""

    def __init__(self, run_uri: str, num_to_keep: int):
        self.run_uri, self.num_to_keep = run_uri, num_to_keep
        self.blocked_s: list[float] = []

    def busy(self) -> bool:
        return False

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> float:
        """Write ``state`` (``None``: a metrics-only report, nothing to write); the seconds it took."""
        if state is None:
            return 0.0
        t0 = time.perf_counter()
        name = f"checkpoint_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"  # Ray Train's naming
        save_checkpoint(storage.join(self.run_uri, name), state)
        for old in list_complete_checkpoints(self.run_uri)[:-self.num_to_keep]:
            fs, path = storage.resolve(old.uri)
            fs.delete_dir(path)
        self.blocked_s.append(time.perf_counter() - t0)
        return self.blocked_s[-1]


@dataclass
class Worker:
    """What differs between a Ray Train worker and the ``--no-ray`` process; the loop itself is the same."""

    rank: int
    world: int
    device: torch.device
    resume: dict[str, Any] | None  # the loaded checkpoint to go on from (None: a fresh run)
    resume_from: str               # where it was read (for errors)
    saver: Checkpointer
    on_ray: bool                   # Prometheus series through Ray's metrics agent; the chaos drill through Ray


def ray_worker(cfg: PretrainConfig) -> Worker:
    """This Ray Train worker: Ray's checkpoint after a restart or a rerun, else the newest complete one in the run
    directory (a run begun with ``--no-ray``, whose checkpoints Ray never registered)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, run_uri = ctx.get_world_rank(), storage.join(cfg.storage_path, cfg.name)
    state, where = None, ""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # Ray's newest; an unreadable one falls back to the newest that loads, in one line
        state, where = load_resumable(checkpoint, run_uri, log=emit if rank == 0 else (lambda msg: None))
    else:  # a run begun with --no-ray
        state, where = load_newest(run_uri, log=emit if rank == 0 else (lambda msg: None))
    saver = AsyncCheckpointer(run_uri, rank, kill_in_upload_epoch=cfg.chaos_kill_in_upload)
    return Worker(rank, ctx.get_world_size(), ray.train.torch.get_device(), state, where, saver, on_ray=True)


def local_worker(cfg: PretrainConfig) -> Worker:
    """This process as the only worker (``--no-ray``): the GPU when there is one (unless ``--no-use-gpu``), else
    the CPU; resumed from the newest complete checkpoint of the run directory."""
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    run_uri = storage.join(cfg.storage_path, cfg.name)
    state, where = load_newest(run_uri, log=emit)
    return Worker(0, 1, device, state, where, LocalCheckpointer(run_uri, cfg.num_to_keep), on_ray=False)


# ---------------------------------------------------------------------------- what the loop carries
@dataclass
class Trainer:
    """One worker's training state and the checkpoint bookkeeping around it: what :func:`train_one_epoch` advances
    and :meth:`save` writes. Every rank holds one; rank 0's clock and upload thread decide for all of them."""

    cfg: PretrainConfig
    rank: int
    world: int
    device: torch.device
    raw: torch.nn.Module                  # the SimCLRModel itself: what a checkpoint holds
    ddp: torch.nn.Module                  # what the step runs: DDP(raw) over >1 worker, else raw (compiled: --compile)
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: torch.amp.GradScaler
    precision: Precision
    channels_last: bool
    loader: PretrainLoader
    saver: Checkpointer
    mon: WorkerMetrics | None             # Prometheus series (Ray runs; without Ray there is no metrics agent)
    log: Callable[[str], None]
    step: int = 0                         # global steps done (all epochs)
    history: list[dict[str, Any]] = field(default_factory=list)   # one metrics dict per finished epoch
    init_knn: dict[str, float] = field(default_factory=dict)      # kNN of the initial encoder, reported once
    last_save: float = field(default_factory=time.monotonic)
    pending: bool = False                 # a step/time checkpoint deferred while rank 0's last upload still runs
    drilled: bool = False                 # the chaos kill fired in this attempt (the marker in storage: in the run)
    tracker: Tracker | None = None        # rank 0's curves (--tracking); None elsewhere and with --tracking none
    window: StepWindow = field(default_factory=StepWindow)  # the tracker's per-step window
    probe: ProbeStream | None = None      # --online-probe: the linear head on detached features, and its data

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def per_worker(self) -> int:
        return self.cfg.batch_size // self.world

    def state(self, *, epochs_done: int, batch: int, sums: list[torch.Tensor] | None) -> PretrainState:
        return PretrainState(model=self.raw.state_dict(), optimizer=self.optimizer.state_dict(),
                             scaler=self.scaler.state_dict(), config=self.cfg.to_dict(), epoch=epochs_done,
                             step=self.step, history=self.history, batch=batch, steps_per_epoch=self.steps_per_epoch,
                             schedule=self.schedule.state_dict(), epoch_loss_sums=sums, init_knn=self.init_knn,
                             tracking={"mlflow_run_id": self.tracker.run_id} if self.tracker and self.tracker.run_id
                             else {}, online_probe=self.probe.state_dict() if self.probe is not None else {})

    def start_epoch(self, epoch: int) -> None:
        """Open the metrics windows (Prometheus, tracking) at the start of ``epoch``."""
        if self.mon is not None:
            self.mon.start_epoch(epoch, self.step)
        self.window.start(self.step)

    def observe(self, *, lr: float, data_wait_s: float, loss_sum: torch.Tensor) -> None:
        """A log point: close the windows; ``data_wait_s``, ``loss_sum``: this attempt's running sums of the epoch."""
        if self.mon is not None:
            self.mon.observe(step=self.step, lr=lr, data_wait_s=data_wait_s, loss_sum=loss_sum)
        if self.tracker is not None:
            self.tracker.log_metrics(self.window.close(step=self.step, lr=lr, data_wait_s=data_wait_s,
                                                       loss_sum=float(loss_sum), samples_per_step=self.cfg.batch_size),
                                     self.step)

    def save(self, metrics: dict[str, Any], *, epochs_done: int, batch: int, loss_sum: torch.Tensor | None) -> None:
        """Every rank calls this at the same step; rank 0's state goes to storage in the background."""
        sums = gather_all(loss_sum) if batch else None  # the epoch's running loss of every rank, to go on from
        state = self.state(epochs_done=epochs_done, batch=batch, sums=sums).to_dict() if self.rank == 0 else None
        blocked = self.saver.report(metrics, state)
        if self.mon is not None:
            self.mon.checkpoint_saved(blocked)
        self.last_save, self.pending = time.monotonic(), False

    def time_due(self) -> bool:
        """``--checkpoint-every-minutes`` has passed since the last save (by this rank's clock)."""
        every_s = self.cfg.checkpoint_every_minutes * 60
        return every_s > 0 and time.monotonic() - self.last_save >= every_s

    def drill(self) -> None:
        """``--chaos-kill-step``: SIGKILL the last worker once, when the step is reached and no save is pending."""
        cfg = self.cfg
        if cfg.chaos_kill_step >= 0 and self.step >= cfg.chaos_kill_step and not (self.pending or self.drilled):
            self.drilled = True  # once per attempt; the marker in storage makes it once per run
            if self.rank == self.world - 1:
                run_uri = storage.join(cfg.storage_path, cfg.name)
                if self.mon is not None:  # a Ray worker: after every reported checkpoint is registered
                    chaos_kill(run_uri, self.step)
                else:  # --no-ray: every save has returned, so it is on disk
                    chaos_once(run_uri, "kill", step=self.step)


@dataclass
class EpochResult:
    loss_sum: torch.Tensor   # this rank's loss summed over the epoch (the part before a mid-epoch resume included)
    steps_run: int           # steps this attempt ran in the epoch
    seconds: float
    data_wait_s: float       # time the step waited for the loader
    bad_step: int = -1       # first non-finite step over all ranks (-1: none; the epoch stopped there)


def train_one_epoch(tr: Trainer, epoch: int, first: int, loss_sum: torch.Tensor) -> EpochResult:
    """Batches ``first``.. of ``epoch`` (``first`` > 0 after a mid-epoch resume): step, watch for a non-finite loss
    without a host sync per step, log, and take the step/time checkpoints that fall inside the epoch."""
    cfg, device = tr.cfg, tr.device
    tr.loader.set_epoch(epoch, start_batch=first)
    tr.ddp.train()
    loss_before = loss_sum.clone()  # what the metrics windows of this attempt must not count
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    data_wait = 0.0
    t_epoch = t_ready = time.perf_counter()
    tr.start_epoch(epoch)
    for i, (v1, v2, _) in enumerate(tr.loader, start=first):  # v1, v2: (B, 3, S, S) two views of B images
        data_wait += time.perf_counter() - t_ready
        cur_lr = tr.schedule.apply(tr.step)
        loss = pretrain_step(tr.ddp, tr.optimizer, tr.scaler, v1, v2, temperature=cfg.temperature,
                             precision=tr.precision, device=device, channels_last=tr.channels_last,
                             poison=tr.step == cfg.chaos_nan_step, normalize=cfg.proj_normalize)
        if tr.probe is not None:  # the online probe's own step: detached features, its own labelled images
            tr.probe.update(tr.raw.encoder, tr.step)
        # no host sync per step: remember the first non-finite step on the device
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.full_like(bad_step, tr.step), bad_step)
        loss_sum += loss
        tr.step += 1
        tr.drill()
        end_of_epoch = i + 1 == tr.steps_per_epoch
        save_due = (bool(cfg.checkpoint_every_steps) and tr.step % cfg.checkpoint_every_steps == 0
                    and not end_of_epoch)
        if tr.step % cfg.log_every == 0 or end_of_epoch or save_due or tr.pending:
            late = not end_of_epoch and tr.time_due()
            first_bad, time_due, busy = max_over_ranks(bad_step, late, tr.saver.busy())  # rank 0 decides for all
            if first_bad >= 0:
                return EpochResult(loss_sum, i + 1 - first, time.perf_counter() - t_epoch, data_wait, first_bad)
            if tr.step % cfg.log_every == 0 or end_of_epoch:
                tr.log(f"[simclr] epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{tr.steps_per_epoch} "
                       f"loss {loss.item():.4f} lr {cur_lr:.5f}")
                tr.observe(lr=cur_lr, data_wait_s=data_wait, loss_sum=loss_sum - loss_before)
            tr.pending = save_due or time_due or tr.pending
            if tr.pending and not busy and not end_of_epoch:
                tr.save({"epoch": epoch, "step": tr.step, "batch": i + 1, "status": "ok"},
                        epochs_done=epoch, batch=i + 1, loss_sum=loss_sum)
        t_ready = time.perf_counter()
    return EpochResult(loss_sum, tr.steps_per_epoch - first, time.perf_counter() - t_epoch, data_wait)


# ---------------------------------------------------------------------------- the loop
def build_trainer(cfg: PretrainConfig, worker: Worker, log: Callable[[str], None]) -> tuple[Trainer, Position]:
    """Model, optimizer, schedule and loader of this worker, restored from ``worker.resume`` (or fresh)."""
    rank, world, device = worker.rank, worker.world, worker.device
    on_gpu = device.type == "cuda"
    model = build_model(cfg)
    if cfg.pretrained and worker.resume is None:  # a fresh run's init; a resume restores its own
        from simclr_dist.run.store.pretrained import init_from_pretrained
        init_from_pretrained(model, cfg.pretrained, strict=cfg.pretrained_strict, log=log)
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = use_channels_last(cfg.channels_last)
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

    # resume: the checkpoint Ray hands back (after a restart, or a rerun of the same run name), or the run's newest
    pos = Position()
    if worker.resume is not None:
        state = PretrainState.from_dict(worker.resume, where=worker.resume_from)
        pos = restore(state, cfg, model=model, optimizer=optimizer, scaler=scaler, steps_per_epoch=steps_per_epoch,
                      rank=rank, world=world)
        schedule = resumed_schedule(schedule, state.schedule, pos.step, total_steps, log=log)
        where = f"epoch {pos.epoch}" + (f" + {pos.batch}/{steps_per_epoch} batches" if pos.batch else "")
        log(f"[simclr] resumed from {where} (step {pos.step}, lr {schedule.lr_at(pos.step):.5f})")

    if cfg.compile:
        model = torch.compile(model)
    ddp = DDP(model, device_ids=[device.index] if on_gpu else None) if world > 1 else model
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    log(f"[simclr] {cfg.arch} x{cfg.width} on {cfg.dataset}/{cfg.split} {cfg.image_size}px | {world} worker(s) x "
        f"{per_worker} = batch {cfg.batch_size} | {steps_per_epoch} steps/epoch | lr {lr:.4f} | {precision.name} on "
        f"{device.type}" + (" | channels_last" if channels_last else ""))
    mon = (WorkerMetrics(cfg.name, rank, socket.gethostname(), samples_per_step=per_worker, device=device,
                         model=raw, image_size=cfg.image_size)  # Prometheus series via Ray's metrics agent
           if worker.on_ray else None)
    probe = None
    if cfg.online_probe:
        probe = ProbeStream(cfg, raw.feat_dim, device=device, channels_last=channels_last, rank=rank, world=world)
        if worker.resume is not None and state.online_probe:
            probe.load_state_dict(state.online_probe)
    tr = Trainer(cfg=cfg, rank=rank, world=world, device=device, raw=raw, ddp=ddp, optimizer=optimizer,
                 schedule=schedule, scaler=scaler, precision=precision, channels_last=channels_last, loader=loader,
                 saver=worker.saver, mon=mon, log=log, step=pos.step, history=pos.history, init_knn=pos.init_knn,
                 drilled=pos.step >= cfg.chaos_kill_step, probe=probe)
    return tr, pos


def epoch_metrics(tr: Trainer, epoch: int, ep: EpochResult, node_ids: list[str]) -> dict[str, Any]:
    """What an epoch reports (every rank; rank 0's go to the history), the kNN monitor included when due."""
    cfg = tr.cfg
    mean_loss = mean_across(ep.loss_sum / tr.steps_per_epoch)
    metrics = {
        "epoch": epoch + 1, "step": tr.step, "loss": mean_loss, "lr": tr.schedule.lr_at(tr.step - 1),
        "samples_per_s": ep.steps_run * cfg.batch_size / ep.seconds,
        "worker_samples_per_s": ep.steps_run * tr.per_worker / ep.seconds,
        "epoch_time_s": ep.seconds, "data_wait_s": ep.data_wait_s, "rank": tr.rank, "node": socket.gethostname(),
        "node_id": ray_node_id(), "world_size": tr.world, "status": "ok", "node_ids": node_ids, **tr.init_knn,
    }
    tr.init_knn = {}
    last = epoch + 1 == cfg.epochs
    if (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0) or (last and cfg.knn_every >= 0):
        metrics.update(online_knn(tr.raw.encoder, cfg, tr.device, tr.channels_last))
    if tr.probe is not None:
        metrics.update(tr.probe.evaluate(tr.raw.encoder, ep.steps_run))
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """What Ray Train runs in every worker."""
    cfg = PretrainConfig.from_dict(config)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if not cfg.verbose:
        quiet_report_log()
    worker = ray_worker(cfg)
    return train_worker(cfg, worker, emit if worker.rank == 0 else (lambda msg: None))


def train_local(cfg: PretrainConfig, log: Callable[[str], None] = emit) -> dict[str, Any]:
    """``--no-ray``: the same loop in this process, with ``--threads`` torch threads (restored afterwards, so a
    notebook keeps its own setting); returns what a Ray worker returns."""
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return train_worker(cfg, local_worker(cfg), log)
    finally:
        torch.set_num_threads(before)


def train_worker(cfg: PretrainConfig, worker: Worker, log: Callable[[str], None]) -> dict[str, Any]:
    """Build (or restore) this worker's trainer, then train epoch by epoch; the run's outcome and history."""
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    tr, pos = build_trainer(cfg, worker, log)
    attempt_started_at = time.time()  # after restore: fault-recovery time = this - the fault's time
    node_ids = all_node_ids()  # where every rank runs: proves multi-node placement in tests and logs
    if worker.rank == 0 and cfg.tracking != "none":  # rank 0 records the curves; a resume continues its run
        resumed = worker.resume is not None
        tr.tracker = open_tracker(cfg, (worker.resume or {}).get("tracking") or {}, pos.step if resumed else None)
        if not resumed:
            tr.tracker.log_params(cfg.to_dict())
    try:
        result = train_epochs(tr, pos, node_ids, log)
    except BaseException:
        if tr.tracker is not None:
            tr.tracker.close("FAILED")
        raise
    if tr.tracker is not None:
        tr.tracker.close("FAILED" if result["status"] != "ok" else "FINISHED")
    return {**result, "history": tr.history, "resumed_from_epoch": pos.epoch, "resumed_from_batch": pos.batch,
            "resumed_from_step": pos.step, "attempt_started_at": attempt_started_at,
            "checkpoint_blocked_s": tr.saver.blocked_s, "tracking": tracking_summary(tr.tracker),
            "epochs_done": tr.history[-1]["epoch"] if tr.history else pos.epoch}


def train_epochs(tr: Trainer, pos: Position, node_ids: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """The epochs from ``pos`` to the end: train, report (and track) the epoch, checkpoint; the run's status."""
    cfg, device = tr.cfg, tr.device

    result: dict[str, Any] = {"status": "ok"}
    if tr.step == 0 and cfg.knn_every >= 0:  # the baseline the trained encoder must beat
        tr.init_knn = {f"{k}_init": v for k, v in online_knn(tr.raw.encoder, cfg, device, tr.channels_last).items()}
        init = "imported (--pretrained)" if cfg.pretrained else "randomly initialised"
        log(f"[simclr] kNN top-1 of the {init} encoder: {next(iter(tr.init_knn.values())):.3f}")
    for epoch in range(pos.epoch, cfg.epochs):
        first = pos.batch if epoch == pos.epoch else 0  # a mid-epoch resume goes on at this batch of the epoch
        loss_sum = pos.loss_sum.to(device) if first and pos.loss_sum is not None else torch.zeros((), device=device)
        ep = train_one_epoch(tr, epoch, first, loss_sum)
        if ep.bad_step >= 0:
            result = {"status": "nonfinite", "step": ep.bad_step, "epoch": epoch}
            log(f"[simclr] non-finite loss at step {ep.bad_step} (epoch {epoch + 1}); stopping, the last good "
                "checkpoint is kept")
            tr.saver.report({"epoch": epoch, "step": tr.step, "status": "nonfinite", "bad_step": ep.bad_step}, None)
            break

        metrics = epoch_metrics(tr, epoch, ep, node_ids)
        tr.history.append({k: v for k, v in metrics.items() if k not in ("rank", "node", "node_id")})
        log(f"[simclr] epoch {epoch + 1}/{cfg.epochs} done: loss {metrics['loss']:.4f} | "
            f"{metrics['samples_per_s']:.1f} samples/s | {ep.seconds:.1f}s (data wait {ep.data_wait_s:.1f}s)"
            + (f" | kNN top-1 {metrics['knn_top1']:.3f}" if "knn_top1" in metrics else "")
            + (f" | val kNN top-1 {metrics['val_knn_top1']:.3f}" if "val_knn_top1" in metrics else "")
            + (f" | val linear top-1 {metrics['val_linear_top1']:.3f}" if "val_linear_top1" in metrics else "")
            + (f" | online probe val top-1 {metrics['online_probe_top1']:.3f}, RankMe {metrics['rankme']:.1f}"
               if "online_probe_top1" in metrics else ""))
        if tr.mon is not None:
            tr.mon.epoch_end(metrics)
        if tr.tracker is not None:  # everything the epoch line prints, and the monitors
            skip = ("rank", "world_size", "step")
            tr.tracker.log_metrics(numeric({k: v for k, v in metrics.items() if k not in skip}, "epoch"), tr.step)

        # the epoch-end checkpoint: every --checkpoint-every epochs, the last, or a step/time one that fell due
        step_due = bool(cfg.checkpoint_every_steps) and tr.step % cfg.checkpoint_every_steps == 0
        _, time_due, busy = max_over_ranks(torch.full((), -1, device=device), tr.time_due(), tr.saver.busy())
        tr.pending = step_due or time_due or tr.pending
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.checkpoint_every == 0 or (tr.pending and not busy):
            tr.save(metrics, epochs_done=epoch + 1, batch=0, loss_sum=None)  # waits only for a --checkpoint-every save
        else:
            tr.saver.report(metrics, None)

    if pos.epoch >= cfg.epochs:
        log(f"[simclr] run already complete ({pos.epoch}/{cfg.epochs} epochs): nothing to train")
    return result


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
    """This process's Ray node, or "" outside Ray (``--no-ray``: importing Ray for it would only cost time)."""
    if "ray" not in sys.modules:
        return ""
    import ray
    if not ray.is_initialized():
        return ""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


