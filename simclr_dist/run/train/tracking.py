"""Experiment tracking of a pretraining run: TensorBoard event files in the run directory (the default), an MLflow
run in a real tracking store, or nothing (``--tracking tensorboard|mlflow|none``).

Why one small interface (:class:`Tracker`): the loop says *what* to record (per log point: loss, LR, samples/s,
data wait; per epoch: what the epoch line prints, kNN, probe; the config once as hyper-parameters) and never *where*;
only rank 0 holds a tracker, so a run of N workers writes one set of curves.

A resumed run continues the same tracking run, with no step recorded twice:

- **MLflow**: the run id is kept in the checkpoint (``PretrainState.tracking``) and, for a crash before the first
  checkpoint, in ``tracking.json`` in the run directory. Reopened, the tracker reads the run's last recorded step of
  every metric back from the store and drops points at or before it: the steps a killed attempt logged after its
  last checkpoint are replayed by the resume (same batches, same weights: the same loss and LR) and stay recorded once.
- **TensorBoard**: a reopened writer starts with a ``purge_step`` one past the checkpoint's step, so TensorBoard
  (and ``EventAccumulator``) hides what the killed attempt wrote after it and shows the resume's points instead.

The MLflow store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file ``mlflow.db`` beside the runs
(``STORAGE/mlflow.db``; local storage only), experiment ``simclr-dist``, the run named after ``--name``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from simclr_dist.config import ConfigError, PretrainConfig, is_uri
from simclr_dist import storage
from simclr_dist.run.train.metrics import window_stats

TRACKING_FILE = "tracking.json"   # the MLflow run id, written when the run is created
TENSORBOARD_DIR = "tensorboard"   # event files, inside the run directory
MLFLOW_EXPERIMENT = "simclr-dist"
MLFLOW_DB = "mlflow.db"


class Tracker(Protocol):
    """Where a run's numbers go. ``run_id``: what a checkpoint keeps to continue the same tracking run."""

    kind: str
    run_id: str
    location: str  # where to look: the event directory, or the MLflow store URI

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def numeric(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of ``metrics`` (booleans, strings, lists dropped), keyed ``prefix/name``."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_dir(cfg: PretrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name)


def mlflow_uri(cfg: PretrainConfig) -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store beside the runs (one database for every run under a path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if is_uri(cfg.storage_path):
        raise ConfigError(f"--tracking mlflow: set MLFLOW_TRACKING_URI (the default SQLite store lives beside the "
                          f"runs, and {cfg.storage_path} is not a local directory)")
    return f"sqlite:///{os.path.join(cfg.storage_path, MLFLOW_DB)}"


def check_tracking(cfg: PretrainConfig) -> None:
    """What the chosen tracking needs from the run's storage, checked before any training: one line otherwise."""
    if cfg.tracking == "tensorboard" and is_uri(cfg.storage_path):
        raise ConfigError(f"--tracking tensorboard: writes event files in the run directory, and {cfg.storage_path} "
                          "is not a local directory; choose --tracking mlflow (MLFLOW_TRACKING_URI) or none")
    if cfg.tracking == "mlflow":
        mlflow_uri(cfg)


# ---------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker:
    """Event files in ``RUN/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``: ``tensorboard --logdir
    RUN_OR_STORAGE`` shows them. The config is written as hyper-parameters (the HPARAMS tab) and as a text table."""

    kind = "tensorboard"

    def __init__(self, log_dir: str, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.location, self.run_id = log_dir, ""
        # a resume replays the steps after its checkpoint: hide what the killed attempt wrote for them
        self.writer = SummaryWriter(log_dir, purge_step=None if resumed_step is None else resumed_step + 1)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        # SummaryWriter.add_hparams would open a second run directory; these three summaries keep it in this one
        for summary in hparams(flat, {"epoch/loss": float("nan")}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a kill must not lose the points of the steps a checkpoint already covers

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


# ---------------------------------------------------------------------------- MLflow
@dataclass
class MLflowTracker:
    """One MLflow run through ``MlflowClient`` (no global ``mlflow`` state: a notebook may track several runs)."""

    uri: str
    run_id: str
    logged: dict[str, int] = field(default_factory=dict)  # last step recorded per metric (a resumed run's)
    kind: str = "mlflow"

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.location = self.uri

    @classmethod
    def open(cls, cfg: PretrainConfig, run_id: str | None) -> MLflowTracker:
        """Continue run ``run_id`` (its last step per metric read back from the store), else create one."""
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        if run_id:
            logged = {key: max(m.step for m in client.get_metric_history(run_id, key))
                      for key in client.get_run(run_id).data.metrics}
            client.update_run(run_id, status="RUNNING")
            return cls(uri, run_id, logged)
        exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(MLFLOW_EXPERIMENT)
        run = client.create_run(exp_id, run_name=cfg.name, tags={"simclr.run": run_dir(cfg)})
        storage.write_json(storage.join(run_dir(cfg), TRACKING_FILE), {"mlflow_run_id": run.info.run_id, "uri": uri})
        return cls(uri, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The config, once: a resumed run keeps the values it started with (MLflow refuses to change a param;
        the one field a resume may change, ``epochs``, is in every checkpoint's config)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(todo), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=todo[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        todo = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if todo:
            self.client.log_batch(self.run_id, metrics=todo)
        for m in todo:
            self.logged[m.key] = step

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_tracker(cfg: PretrainConfig, saved: Mapping[str, str], resumed_step: int | None) -> Tracker | None:
    """Rank 0's tracker (``None`` for ``--tracking none``). ``saved``: the checkpoint's tracking ids (empty for a
    fresh run); ``resumed_step``: the checkpoint's step (``None``: a fresh run)."""
    if cfg.tracking == "tensorboard":
        return TensorBoardTracker(os.path.join(run_dir(cfg), TENSORBOARD_DIR), resumed_step)
    if cfg.tracking == "mlflow":
        run_id = saved.get("mlflow_run_id")
        marker = storage.join(run_dir(cfg), TRACKING_FILE)
        if not run_id and storage.exists(marker):  # created by an attempt that died before its first checkpoint
            run_id = storage.read_json(marker).get("mlflow_run_id")
        return MLflowTracker.open(cfg, run_id)
    return None


# ---------------------------------------------------------------------------- results logged into a run's tracking
def log_to_run(run_uri: str, metrics: Mapping[str, float], step: int) -> list[str]:
    """Log ``metrics`` (evaluation or study results of one of the run's checkpoints) at ``step`` into the tracking
    that pretraining run wrote: its TensorBoard event files (a second writer file in ``RUN/tensorboard``, so the
    training's own files are never reopened) and its MLflow run (the id in ``RUN/tracking.json``). Returns the
    kinds logged to; a run without tracking (``--tracking none``, an import, object storage for TensorBoard) gets
    nothing, and nothing fails: results are already saved beside the checkpoints."""
    done: list[str] = []
    if not metrics:
        return done
    tb_dir = os.path.join(run_uri, TENSORBOARD_DIR)
    if not is_uri(run_uri) and os.path.isdir(tb_dir):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tb_dir, filename_suffix=".results")
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.close()
        done.append("tensorboard")
    marker = storage.join(run_uri, TRACKING_FILE)
    if storage.exists(marker):
        saved = storage.read_json(marker)
        if saved.get("mlflow_run_id") and saved.get("uri"):
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            MlflowClient(tracking_uri=saved["uri"]).log_batch(
                saved["mlflow_run_id"], metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
            done.append("mlflow")
    return done


# ---------------------------------------------------------------------------- the per-step window
@dataclass
class StepWindow:
    """The numbers of one log window (from one log point to the next) that a tracker records per step."""

    t0: float = field(default_factory=time.perf_counter)
    step0: int = 0
    wait0: float = 0.0
    loss0: float = 0.0

    def start(self, step: int) -> None:
        """An epoch begins: the loop's per-epoch sums restart at 0."""
        self.t0, self.step0, self.wait0, self.loss0 = time.perf_counter(), step, 0.0, 0.0

    def close(self, *, step: int, lr: float, data_wait_s: float, loss_sum: float, samples_per_step: int,
              ) -> dict[str, float]:
        """``train/*`` of the window ending at ``step``; ``data_wait_s`` and ``loss_sum``: the epoch's running
        sums. Empty when no step ran since the last call."""
        now, steps = time.perf_counter(), step - self.step0
        if steps <= 0:
            return {}
        stats = window_stats(seconds=max(now - self.t0, 1e-9), steps=steps, samples_per_step=samples_per_step,
                             data_wait_s=data_wait_s - self.wait0)
        out = {"train/loss": (loss_sum - self.loss0) / steps, "train/lr": lr,
               "train/samples_per_s": stats["simclr_samples_per_second"],
               "train/data_wait_s": data_wait_s - self.wait0, "train/data_wait_ratio": stats["simclr_data_wait_ratio"],
               "train/step_time_s": stats["simclr_step_duration_seconds"]}
        self.t0, self.step0, self.wait0, self.loss0 = now, step, data_wait_s, loss_sum
        return out


# ---------------------------------------------------------------------------- reading a run's curves back
def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard event directory as ``{tag: [(step, value), ...]}``, read with
    TensorBoard's own ``EventAccumulator`` (purged points of a killed attempt excluded, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_scalars(log_dir: str, png: str, tags: tuple[str, ...] = ()) -> str:
    """Render a run's logged curves, read back from its event files, into ``png`` (one panel per tag; default: every
    ``train/`` and ``epoch/`` series that varies). What TensorBoard would draw, without a browser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(log_dir)
    chosen = [t for t in (tags or sorted(series)) if t in series and len(series[t]) > 1]
    if not chosen:
        raise ConfigError(f"{log_dir}: no scalar series with more than one point to plot")
    cols = 3
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, chosen):
        steps, values = zip(*series[tag])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(f"{os.path.basename(os.path.dirname(log_dir.rstrip('/')))}: rendered from the TensorBoard event "
                 "files", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def tracking_summary(tracker: Tracker | None) -> dict[str, Any] | None:
    """Where a run's curves are, for the summary and the final lines of the command."""
    if tracker is None:
        return None
    return {"kind": tracker.kind, "location": tracker.location, "run_id": tracker.run_id}

