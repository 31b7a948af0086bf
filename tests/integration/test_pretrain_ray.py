"""End-to-end pretraining on a real local Ray instance with real gloo process groups (no mocks).

Each test is a 2-worker digits run of a few seconds per epoch; they share one Ray instance (see conftest).
"""

from __future__ import annotations

import glob
import os

import pytest

from simclr_dist import pretrain
from simclr_dist.config import parse_config
from simclr_dist.core.optim import WarmupCosine, scale_lr
from simclr_dist.run.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.ray
STEPS_PER_EPOCH = 1437 // 64  # digits train split, global batch 64, last partial batch dropped
# Ray Train's controller takes one report per worker per poll (default every 2 s); a digits epoch lasts ~2 s, so
# checkpoints every few steps would mostly be deferred (docs/cluster.md "Checkpoints, resume and failures"). Set before the session's Ray starts
# (collection precedes fixtures), which its controller inherits.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def expected_lr(cfg, step: int) -> float:
    """The LR an uninterrupted run has after ``step`` optimizer steps (the schedule is per iteration)."""
    lr = scale_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
    total = cfg.epochs * STEPS_PER_EPOCH
    sched = WarmupCosine(__import__("torch").optim.SGD([__import__("torch").zeros(1, requires_grad=True)], lr=lr),
                         lr, round(cfg.warmup_epochs * STEPS_PER_EPOCH), total)
    return sched.lr_at(step - 1)


def checkpoints(run_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "checkpoint_2*")))


def test_run_checkpoint_then_resume_after_driver_failure(ray_cluster, tiny_args, tmp_path):
    # 1) the first attempt dies in epoch 2 with no retries left: epoch 1's checkpoint must survive
    kill_at = STEPS_PER_EPOCH + 3
    args = tiny_args("resume", "--epochs", "3", "--max-failures", "0", "--chaos-kill-step", str(kill_at))
    with pytest.raises(pretrain.RunError, match="training failed"):
        pretrain.run(parse_config(args))
    run_dir = tmp_path / "runs" / "resume"
    [ckpt] = checkpoints(run_dir)
    state = load_checkpoint(ckpt)
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)
    assert {"model", "optimizer", "schedule", "scaler", "config", "history"} <= set(state)

    # 2) rerunning the same command (storage path + name) resumes at epoch 2 with the uninterrupted schedule
    summary = pretrain.run(parse_config(tiny_args("resume", "--epochs", "3", "--knn-every", "0")))
    cfg = parse_config(tiny_args("resume", "--epochs", "3")).resolved()
    history = summary["history"]
    assert summary["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in history] == [1, 2, 3]          # no epoch skipped or repeated
    assert [h["step"] for h in history] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    for h in history:
        assert h["lr"] == pytest.approx(expected_lr(cfg, h["step"]), rel=1e-9)
    assert all(0 < h["loss"] < 10 for h in history)
    assert 0.1 < summary["knn_top1"] <= 1.0                     # evaluated after the last epoch
    assert summary["checkpoint"] and load_checkpoint(summary["checkpoint"])["epoch"] == 3
    assert len(checkpoints(run_dir)) <= 2                        # --num-to-keep 2

    # rank 0 alone tracks: one TensorBoard writer (one process) per attempt that trained, not one per worker (two
    # attempts trained here, each with 2 workers: 4 writers if every rank logged). Names end .<host>.<pid>.<n>.
    writers = {f.rsplit(".", 2)[-2] for f in glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))}
    assert 1 <= len(writers) <= 2, writers

    # 3) a third run of a finished run trains nothing and still reports the result
    again = pretrain.run(parse_config(tiny_args("resume", "--epochs", "3")))
    assert again["resumed_from_epoch"] == 3 and [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["knn_top1"] == summary["knn_top1"]


@pytest.mark.drill  # CI's second stage (make test-cluster): a Ray worker group killed and restarted, ~1.5 min
def test_worker_killed_mid_epoch_run_finishes(ray_cluster, tiny_args, tmp_path):
    kill_at = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2         # the middle of epoch 2
    summary = pretrain.run(parse_config(tiny_args("kill", "--epochs", "2", "--max-failures", "1",
                                                  "--chaos-kill-step", str(kill_at))))
    assert (tmp_path / "runs" / "kill" / ".chaos-kill-done").exists()   # the worker really was killed
    assert summary["resumed_from_epoch"] == 1                             # from epoch 1's checkpoint
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][-1]["step"] == 2 * STEPS_PER_EPOCH
    assert load_checkpoint(summary["checkpoint"])["epoch"] == 2


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(ray_cluster, tiny_args, tmp_path):
    bad = STEPS_PER_EPOCH + 2
    with pytest.raises(pretrain.RunError, match=f"non-finite loss at step {bad} \\(epoch 2\\)"):
        pretrain.run(parse_config(tiny_args("nan", "--epochs", "3", "--chaos-nan-step", str(bad))))
    [ckpt] = checkpoints(tmp_path / "runs" / "nan")
    assert load_checkpoint(ckpt)["epoch"] == 1


@pytest.mark.drill  # CI's second stage (make test-cluster): 4 Ray runs, ~3 min
@pytest.mark.parametrize("loader", ["torch", "ffcv"])
def test_worker_killed_mid_epoch_resumes_at_next_batch_bit_identical(ray_cluster, tiny_args, tmp_path, loader):
    """Step checkpoints every 4 steps, a worker killed at step 34 (batch 12 of epoch 2; a little later if a due
    checkpoint was still deferred while uploads caught up): the restarted group goes on from the last step
    checkpoint, mid-epoch, and ends with the weights and losses of an uninterrupted run, bit for bit."""
    import torch

    every, kill_at = 4, STEPS_PER_EPOCH + 12
    common = ("--epochs", "2", "--loader", loader, "--checkpoint-every-steps", str(every), "--max-failures", "1")
    ref = pretrain.run(parse_config(tiny_args(f"ref-{loader}", *common)))
    killed = pretrain.run(parse_config(tiny_args(f"kill-{loader}", *common, "--chaos-kill-step", str(kill_at))))
    marker = (tmp_path / "runs" / f"kill-{loader}" / ".chaos-kill-done").read_text()   # a worker really died
    died_at, resumed = int(marker.split()[-1]), killed["resumed_from_step"]
    assert kill_at <= died_at < 2 * STEPS_PER_EPOCH and STEPS_PER_EPOCH < resumed < died_at  # mid-epoch 2
    assert (killed["resumed_from_epoch"], killed["resumed_from_batch"]) == (1, resumed - STEPS_PER_EPOCH)
    assert [h["epoch"] for h in killed["history"]] == [1, 2]
    assert [h["loss"] for h in killed["history"]] == [h["loss"] for h in ref["history"]]  # exactly, both epochs
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(killed["checkpoint"])
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH and a["batch"] == b["batch"] == 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(x, b["optimizer"]["state"][k][n]) for n, x in v.items() if torch.is_tensor(x)), k
    assert ref["checkpoint_blocked_s"] and all(s >= 0 for s in ref["checkpoint_blocked_s"])  # one entry per save
