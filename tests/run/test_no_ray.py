"""``--no-ray`` pretraining: the same loop in one process, the same checkpoints, the same exact resume.

No Ray is started here: the run is this process (or a child process that SIGKILLs itself at a chosen step, the
crash a resume must survive). The comparison is bit for bit, the tolerance the Ray resume tests hold
(tests/integration/test_pretrain_ray.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from simclr_dist import evaluate as ev
from simclr_dist import pretrain
from simclr_dist.config import ConfigError, parse_config
from simclr_dist.run.store.checkpoint import list_complete_checkpoints, load_checkpoint

STEPS_PER_EPOCH = 1437 // 64  # digits train split, batch 64, last partial batch dropped
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def args(tmp_path, name: str, *extra: str) -> list[str]:
    """A seconds-per-epoch digits run in this process: 16 px, ResNet-18 at 1/8 width, batch 64, one thread."""
    return ["--no-ray", "--threads", "1", "--dataset", "digits", "--image-size", "16", "--width", "0.125",
            "--batch-size", "64", "--storage-path", str(tmp_path / "runs"), "--name", name, "--knn-every", "-1",
            "--log-every", "5", "--epochs", "2", "--checkpoint-every-steps", "4", *extra]


def test_killed_mid_epoch_and_rerun_equals_uninterrupted_bit_for_bit(tmp_path):
    ref = pretrain.run(parse_config(args(tmp_path, "ref", "--epochs", "1")))
    assert [h["epoch"] for h in ref["history"]] == [1] and ref["resumed_from_step"] == 0

    # a crash: the child process SIGKILLs itself at step 14, before that step's log point; the last save is step 12
    kill_at = 14
    crashed = subprocess.run([sys.executable, "-m", "simclr_dist.pretrain",
                              *args(tmp_path, "kill", "--epochs", "1", "--chaos-kill-step", str(kill_at))],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]                 # really killed, not finished
    run_dir = tmp_path / "runs" / "kill"
    assert (run_dir / ".chaos-kill-done").read_text().split()[-1] == str(kill_at)
    newest = list_complete_checkpoints(str(run_dir))[-1]
    assert (newest.epoch, newest.batch, newest.step) == (0, 12, 12)          # the last step save before it
    assert len(list_complete_checkpoints(str(run_dir))) == 2                 # --num-to-keep 2

    # rerunning the same command resumes at the next batch of the same epoch and ends where the reference ended
    done = pretrain.run(parse_config(args(tmp_path, "kill", "--epochs", "1", "--chaos-kill-step", str(kill_at))))
    assert (done["resumed_from_epoch"], done["resumed_from_batch"], done["resumed_from_step"]) == (0, 12, 12)
    assert [h["loss"] for h in done["history"]] == [h["loss"] for h in ref["history"]]  # the epoch's mean, exactly
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(done["checkpoint"])
    assert a["step"] == b["step"] == STEPS_PER_EPOCH and a["batch"] == b["batch"] == 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(x, b["optimizer"]["state"][k][n]) for n, x in v.items() if torch.is_tensor(x)), k


def test_notebook_entry_point_checkpoint_read_by_evaluation(tmp_path, capsys):
    from simclr_dist.pretrain import PretrainConfig, run_local

    cfg = PretrainConfig(dataset="digits", image_size=16, width=0.125, batch_size=64, epochs=1, knn_every=-1,
                         storage_path=str(tmp_path / "runs"), name="nb", threads=1)  # ray=True: ignored
    summary = run_local(cfg)
    run_dir = tmp_path / "runs" / "nb"
    assert summary["epochs_done"] == 1 and os.path.dirname(summary["checkpoint"]) == str(run_dir)
    assert os.path.basename(summary["checkpoint"]).startswith("checkpoint_2")  # Ray Train's directory naming
    assert json.loads((run_dir / "simclr_config.json").read_text())["ray"] is False
    again = run_local(cfg)                                     # a second call resumes the finished run
    assert again["resumed_from_epoch"] == 1 and again["history"] == summary["history"]

    assert ev.main(["--run", str(run_dir), "--protocols", "knn", "--threads", "1"]) == 0
    knn = json.loads((run_dir / "eval" / os.path.basename(summary["checkpoint"]) / "knn.json").read_text())
    assert knn["checkpoint_epoch"] == 1 and 0.1 < knn["top1"] <= 1.0


@pytest.mark.parametrize("extra, culprit", [(("--ray-address", "auto"), "--ray-address"),
                                            (("--chaos-kill-in-upload", "1"), "--chaos-kill-in-upload")])
def test_ray_only_flags_refused_without_ray(tmp_path, extra, culprit):
    with pytest.raises(ConfigError, match=f"^{culprit}: is for a Ray Train run"):
        pretrain.check_config(parse_config(args(tmp_path, "x", *extra)))
