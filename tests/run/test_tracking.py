"""Tracking, read back from the real stores: TensorBoard event files through TensorBoard's own EventAccumulator,
an MLflow SQLite store through MLflow's client. No Ray: the runs are ``--no-ray`` (the same loop)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from simclr_dist import pretrain
from simclr_dist.config import ConfigError, parse_config
from simclr_dist.run.store.checkpoint import latest_checkpoint, load_checkpoint
from simclr_dist.run.train.tracking import TensorBoardTracker, plot_scalars, read_scalars

STEPS_PER_EPOCH = 1437 // 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def args(tmp_path, name: str, *extra: str) -> list[str]:
    return ["--no-ray", "--threads", "1", "--dataset", "digits", "--image-size", "16", "--width", "0.125",
            "--batch-size", "64", "--storage-path", str(tmp_path / "runs"), "--name", name, "--knn-every", "-1",
            "--log-every", "5", "--epochs", "2", *extra]


def log_points(epochs: int) -> list[int]:
    """Global steps of the log points: every 5 steps and each epoch's last step."""
    return sorted({s for s in range(5, epochs * STEPS_PER_EPOCH + 1, 5)} |
                  {e * STEPS_PER_EPOCH for e in range(1, epochs + 1)})


def test_tensorboard_default_event_files_hold_steps_epochs_and_config(tmp_path):
    summary = pretrain.run(parse_config(args(tmp_path, "tb", "--epochs", "1", "--knn-every", "1")))
    log_dir = tmp_path / "runs" / "tb" / "tensorboard"
    assert summary["tracking"] == {"kind": "tensorboard", "location": str(log_dir), "run_id": ""}
    scalars = read_scalars(str(log_dir))
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait_s"):
        assert [s for s, _ in scalars[tag]] == log_points(1), tag
    assert all(v > 0 for _, v in scalars["train/samples_per_s"])
    [(step, loss)] = scalars["epoch/loss"]
    h = summary["history"][0]
    assert step == STEPS_PER_EPOCH and loss == pytest.approx(h["loss"], rel=1e-6)     # what the epoch line prints
    assert scalars["epoch/knn_top1"][0][1] == pytest.approx(h["knn_top1"], rel=1e-6)  # and the kNN monitor
    assert scalars["epoch/knn_top1_init"][0][1] == pytest.approx(h["knn_top1_init"], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["batch_size"].number_value == 64 and hp["dataset"].string_value == "digits"

    png = plot_scalars(str(log_dir), str(tmp_path / "curves.png"))
    assert os.path.getsize(png) > 10_000


def test_tensorboard_resume_hides_what_a_killed_attempt_wrote_after_its_checkpoint(tmp_path):
    first = TensorBoardTracker(str(tmp_path / "tb"), resumed_step=None)
    for step in range(1, 11):
        first.log_metrics({"train/loss": float(step)}, step)      # the killed attempt reached step 10
    first.close()
    again = TensorBoardTracker(str(tmp_path / "tb"), resumed_step=6)  # its last checkpoint: step 6
    for step in range(7, 13):
        again.log_metrics({"train/loss": 100.0 + step}, step)
    again.close()
    points = read_scalars(str(tmp_path / "tb"))["train/loss"]
    assert [s for s, _ in points] == list(range(1, 13))                 # each step once
    assert [v for _, v in points] == [*map(float, range(1, 7)), *(100.0 + s for s in range(7, 13))]


def test_mlflow_kill_and_resume_continue_one_run_without_duplicated_steps(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    kill_at = 14  # before step 14's log point; the last checkpoint is step 12's
    common = ("--epochs", "1", "--tracking", "mlflow", "--checkpoint-every-steps", "4", "--chaos-kill-step",
              str(kill_at))
    crashed = subprocess.run([sys.executable, "-m", "simclr_dist.pretrain", *args(tmp_path, "ml", *common)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    run_dir = tmp_path / "runs" / "ml"
    run_id = load_checkpoint(latest_checkpoint(str(run_dir)))["tracking"]["mlflow_run_id"]

    summary = pretrain.run(parse_config(args(tmp_path, "ml", *common)))
    assert summary["tracking"]["run_id"] == run_id and summary["resumed_from_step"] == 12

    client = MlflowClient(tracking_uri=uri)
    [exp] = [e for e in client.search_experiments() if e.name == "simclr-dist"]
    [run] = client.search_runs([exp.experiment_id])                    # one run, continued
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.info.run_name == "ml"
    assert run.data.params["batch_size"] == "64" and run.data.params["tracking"] == "mlflow"
    for key in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait_s"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == log_points(1), key                       # every log point, each once
    loss = client.get_metric_history(run_id, "epoch/loss")
    assert sorted((m.step, m.value) for m in loss) == [(STEPS_PER_EPOCH * (i + 1), pytest.approx(h["loss"]))
                                                       for i, h in enumerate(summary["history"])]
    assert not [k for k in run.data.metrics if Counter(m.step for m in client.get_metric_history(run_id, k))
                .most_common(1)[0][1] > 1]                                # no metric has a step twice


def test_tensorboard_on_object_storage_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="^--tracking tensorboard: writes event files in the run directory"):
        pretrain.check_config(parse_config(args(tmp_path, "x", "--tracking", "tensorboard",
                                                "--storage-path", "s3://bucket/runs")))


def test_evaluation_results_land_in_the_runs_own_tracking(tmp_path, monkeypatch):
    """An evaluation of a run's checkpoint logs its results into that run's MLflow run and TensorBoard files, at
    the checkpoint's step: one place for a run's curves and its evaluations."""
    from mlflow.tracking import MlflowClient

    from simclr_dist import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = pretrain.run(parse_config(args(tmp_path, "ev", "--epochs", "1", "--tracking", "mlflow")))
    run = tmp_path / "runs" / "ev"
    ckpt = latest_checkpoint(str(run))
    step = load_checkpoint(ckpt)["step"]
    os.makedirs(run / "tensorboard", exist_ok=True)  # a run that also has event files gets them there too
    assert evaluate.main(["--checkpoint", ckpt, "--protocols", "knn", "--threads", "1"]) == 0
    client = MlflowClient(tracking_uri=summary["tracking"]["location"])
    [point] = client.get_metric_history(summary["tracking"]["run_id"], "eval/knn/top1")
    result = __import__("json").loads((run / "eval" / os.path.basename(ckpt) / "knn.json").read_text())
    assert point.step == step and point.value == pytest.approx(result["top1"])
    assert read_scalars(str(run / "tensorboard"))["eval/knn/top1"] == [(step, pytest.approx(result["top1"]))]
    # read back from the result file a second time: nothing logged twice
    assert evaluate.main(["--checkpoint", ckpt, "--protocols", "knn", "--threads", "1"]) == 0
    assert len(client.get_metric_history(summary["tracking"]["run_id"], "eval/knn/top1")) == 1


def test_online_probe_lands_in_tensorboard_once_per_epoch(tmp_path):
    """``--online-probe``'s per-epoch validation top-1, RankMe and probe loss are in the run's event files (read back
    with TensorBoard's EventAccumulator) at each epoch's last step, equal to what the run's history reports."""
    summary = pretrain.run(parse_config(args(tmp_path, "probe", "--online-probe")))   # 2 epochs, TensorBoard default
    scalars = read_scalars(str(tmp_path / "runs" / "probe" / "tensorboard"))
    ends = [STEPS_PER_EPOCH * (e + 1) for e in range(2)]
    for key in ("online_probe_top1", "rankme", "online_probe_loss"):
        assert scalars[f"epoch/{key}"] == [(s, pytest.approx(h[key], rel=1e-6))
                                           for s, h in zip(ends, summary["history"], strict=True)], key
    assert all(0.1 < v <= 1.0 for _, v in scalars["epoch/online_probe_top1"])   # 10 classes: chance is 0.1
    assert all(1.0 < v <= 64 for _, v in scalars["epoch/rankme"])                # 64-dim features at width 1/8
    assert [s for s, _ in scalars["train/loss"]] == log_points(2)                # the step series beside them
