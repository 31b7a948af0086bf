"""What a resume restores, and what it may change: the position (mid-epoch included) and the LR schedule.

Why its own module: a resume must reproduce the uninterrupted run (same batches, same weights, same loss), so every
piece of state the loop carries from step to step is listed here, next to the rule for the one setting a resume
may change, ``--epochs``. That rule: the cosine schedule is *extended* from the current step (the steps done keep
their LR, the decay is stretched or shortened to the new end, no jump), the old and new schedule are printed; a
run that already finished its schedule is refused, since more epochs would train at the final LR.

Which checkpoint: the one Ray hands back (the newest registered), unless it cannot be read (truncated, corrupt,
deleted by hand): then :func:`load_resumable` falls back to the newest complete checkpoint that loads, says so in
one line naming the bad one, and deletes nothing (the bad file is evidence, and Ray prunes it in its turn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from simclr_dist.config import ConfigError, PretrainConfig
from simclr_dist.core.optim import WarmupCosine
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import (CheckpointError, PretrainState, UnsafeCheckpointError,
                                              latest_checkpoint, list_complete_checkpoints, load_checkpoint)


@dataclass
class Position:
    """Where training stands: ``epoch`` epochs completed, then ``batch`` batches of the next one (``step`` in all),
    with that epoch's running loss sum of this rank and the kNN baseline still to be reported with it."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    init_knn: dict[str, float] = field(default_factory=dict)


def load_resumable(checkpoint: Any, run_uri: str,
                   log: Callable[[str], None] = lambda msg: None) -> tuple[dict[str, Any], str]:
    """(loaded ``checkpoint.pt``, where it came from) to resume from: Ray's ``checkpoint`` (a ``ray.train.Checkpoint``)
    when it loads; else the newest other complete checkpoint of ``run_uri`` that loads, announced in one line naming
    the bad one.

    Why: Ray registers a checkpoint once its upload returned, so its newest can still be damaged afterwards (a
    disk or a hand that truncated it, a bit flip); refusing to resume would turn one bad file into a lost run,
    while silently taking an older one would hide the loss. Raises :class:`CheckpointError` when no checkpoint
    loads, and at once for an unsafe one (a pickle that would run code is refused, never worked around).
    """
    with checkpoint.as_directory() as d:
        try:
            return load_checkpoint(d), d
        except UnsafeCheckpointError:
            raise
        except (CheckpointError, OSError, KeyError, ValueError) as e:
            bad, why = str(checkpoint.path).rstrip("/").rsplit("/", 1)[-1], storage.reason(e)
    return fallback_checkpoint(run_uri, bad, why, log)


def load_newest(run_uri: str, log: Callable[[str], None] = lambda msg: None) -> tuple[dict[str, Any] | None, str]:
    """(loaded state, where) of the newest complete checkpoint of ``run_uri`` that loads, ``(None, "")`` for a run
    with none: the resume of a run Ray holds no checkpoint for (``--no-ray``, or a Ray rerun of one), with the same
    fallback as :func:`load_resumable`."""
    latest = latest_checkpoint(run_uri)
    if latest is None:
        return None, ""
    try:
        return load_checkpoint(latest), latest
    except UnsafeCheckpointError:
        raise
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        return fallback_checkpoint(run_uri, latest.rstrip("/").rsplit("/", 1)[-1], storage.reason(e), log)


def fallback_checkpoint(run_uri: str, bad: str, why: str,
                        log: Callable[[str], None] = lambda msg: None) -> tuple[dict[str, Any], str]:
    """The newest complete checkpoint of ``run_uri`` other than ``bad`` that loads (see :func:`load_resumable`)."""
    tried = []
    for ref in reversed(list_complete_checkpoints(run_uri)):
        if ref.name == bad:
            continue
        try:
            state = load_checkpoint(ref.uri)
        except UnsafeCheckpointError:
            raise
        except (CheckpointError, OSError, KeyError, ValueError) as e:
            tried.append(f"{ref.name} ({storage.reason(e)})")
            continue
        log(f"[simclr] newest checkpoint {bad} is unreadable ({why}); resuming from {ref.name} (step {ref.step}) "
            "instead" + (f", after {', '.join(tried)}" if tried else "") + "; nothing was deleted")
        return state, ref.uri
    raise CheckpointError(f"{run_uri}: no checkpoint loads: {bad} ({why})" + "".join(f", {t}" for t in tried)
                          + "; nothing was deleted")


def restore(state: PretrainState, cfg: PretrainConfig, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any, steps_per_epoch: int, rank: int, world: int) -> Position:
    """Load ``state`` (a checkpoint of format 1 or 2) into the model, optimizer and scaler; the position to go on
    from. Raises ``ValueError`` (one line) when the run cannot continue from it."""
    saved = PretrainConfig.from_dict(state.config)
    if saved.arch_signature() != cfg.arch_signature():
        raise ValueError(f"checkpoint architecture {saved.arch_signature()} != requested {cfg.arch_signature()}")
    if (state.steps_per_epoch or steps_per_epoch) != steps_per_epoch:
        raise ValueError(f"checkpoint has {state.steps_per_epoch} steps/epoch, this run {steps_per_epoch}: "
                         "resume with the same --batch-size and dataset")
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scaler.load_state_dict(state.scaler)
    pos = Position(epoch=state.epoch, batch=state.batch, step=state.step, history=state.history,
                   init_knn=dict(state.init_knn))
    sums = state.epoch_loss_sums  # one per rank; another world size gets their mean (not bit-exact)
    if pos.batch and sums is not None:
        pos.loss_sum = sums[rank].clone() if len(sums) == world else torch.stack(list(sums)).mean()
    return pos


def resumed_schedule(schedule: WarmupCosine, saved: dict[str, Any] | None, step: int, total_steps: int,
                     log=lambda msg: None) -> WarmupCosine:
    """The schedule to go on with after ``step`` steps: the checkpoint's own (``saved``) when the run length is
    unchanged; stretched to ``total_steps`` from ``step`` on (and said so) when ``--epochs`` changed."""
    if saved is None:  # a checkpoint without a schedule: the config's, as before
        return schedule
    schedule.load_state_dict(saved)
    if schedule.total_steps == total_steps or step >= total_steps:
        return schedule
    check_extendable(schedule.total_steps, total_steps, step, schedule.lr_at(schedule.total_steps - 1))
    new = schedule.extended(total_steps, step)
    log(f"[simclr] --epochs changed: the LR schedule is extended from step {step} (LR {schedule.lr_at(step):.5f}): "
        f"{describe(schedule)} -> {describe(new)}")
    return new


def describe(s: WarmupCosine) -> str:
    head = (f"cosine from LR {s.restart_lr:.5f} at step {s.restart_step}" if s.restart_lr is not None else
            f"warm-up {s.warmup_steps} steps to LR {s.base_lr:.5f}, cosine")
    return f"[{head} to {s.final_lr:g} at step {s.total_steps}]"


def check_extendable(old_total: int, new_total: int, step: int, final_lr: float, run: str = "the run") -> None:
    """The one refused change: more steps for a run that already finished its schedule."""
    if step >= old_total and new_total > old_total:
        raise ConfigError(f"--epochs: {run} already finished its schedule ({step} of {old_total} steps, LR decayed "
                          f"to {final_lr:g}); more epochs would train at that LR. Start a new --name with "
                          "--pretrained simclr-dist:RUN to train on from its weights")


def plan_resume(cfg: PretrainConfig, run_uri: str, saved_cfg: PretrainConfig) -> str | None:
    """Driver-side preflight of a rerun: the line to print when ``--epochs`` differs from the latest checkpoint's
    (the workers then extend the schedule), ``ConfigError`` when the change is refused, ``None`` otherwise."""
    refs = list_complete_checkpoints(run_uri)
    if not refs:
        return None
    ref = refs[-1]
    old_epochs = int(ref.manifest.get("epochs", saved_cfg.epochs))  # format 1 manifests: the run's first config
    if old_epochs == cfg.epochs:
        return None
    steps_per_epoch = int(ref.manifest.get("steps_per_epoch") or 0) or (ref.step // ref.epoch if ref.epoch else 0)
    if not steps_per_epoch:
        return None  # nothing completed yet to size the schedule with: the workers decide and log it
    old_total, new_total = old_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    check_extendable(old_total, new_total, ref.step, 0.0, run=f"run {run_uri}")
    if ref.step >= new_total:
        return f"[simclr] --epochs {cfg.epochs}: run {run_uri} already has {ref.step} steps; nothing to train"
    return (f"[simclr] --epochs {old_epochs} -> {cfg.epochs}: the cosine schedule is extended from step {ref.step} "
            f"(of {old_total}) to end at step {new_total}; the steps done keep their LR")
