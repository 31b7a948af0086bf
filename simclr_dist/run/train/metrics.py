"""Prometheus metrics of every Ray Train worker, exported through Ray's own metrics pipeline.

Why Ray's pipeline (``ray.util.metrics``) rather than ``prometheus_client``: a worker is a Ray actor that may land
on any node and be restarted on another, so a per-worker HTTP endpoint would need a port per worker and a
discovery mechanism of its own. Ray already runs one metrics agent per node, which collects what every worker
process on that node records, and its dashboard keeps ``prom_metrics_service_discovery.json`` listing those agents;
Prometheus scrapes them with a plain ``file_sd_configs``. The price is Ray's export cadence
(``metrics_report_interval_ms``, 10 s by default), harmless for alerts with 5-10 minute windows.

Cost per training step: none. The loop hands this module its existing per-epoch accumulators only at log
intervals (where it already synchronises with the device), and every gauge/counter update happens there.

Naming follows Prometheus conventions: base units (seconds, bytes, ratios in 0..1, FLOP/s), counters end in
``_total``; Ray prefixes every name with ``ray_``. :data:`METRICS` is the single list docs/monitoring.md, the Grafana
dashboard and the alert rules are checked against (``tests/integration/test_monitoring.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

RAY_PREFIX = "ray_"
LABELS = ("run", "rank", "node")


@dataclass(frozen=True)
class MetricSpec:
    name: str                                # as declared to Ray; Prometheus sees ``ray_`` + name
    kind: Literal["gauge", "counter"]
    help: str
    gpu: bool = False                        # exported only by workers that train on a GPU

    @property
    def exported(self) -> str:
        return RAY_PREFIX + self.name


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("simclr_samples_per_second", "gauge",
               "Samples (source images) this worker trained on per second over the last log window."),
    MetricSpec("simclr_images_per_second", "gauge",
               "Augmented images (two views per sample) through this worker's encoder per second, last log window."),
    MetricSpec("simclr_step_duration_seconds", "gauge",
               "Mean wall time of one training step over the last log window, data wait included."),
    MetricSpec("simclr_data_wait_ratio", "gauge",
               "Share (0..1) of the last log window this worker spent blocked on its data loader."),
    MetricSpec("simclr_loss", "gauge",
               "Mean NT-Xent loss of this worker's anchors over the last log window."),
    MetricSpec("simclr_learning_rate", "gauge", "Learning rate of the latest step."),
    MetricSpec("simclr_epoch", "gauge", "Epoch being trained (1-based, as in the logs)."),
    MetricSpec("simclr_step", "gauge", "Global optimizer steps done (continues across resumes)."),
    MetricSpec("simclr_checkpoint_save_duration_seconds", "gauge",
               "Wall time of the latest checkpoint serialisation to local disk (rank 0, the writer, only)."),
    MetricSpec("simclr_samples_total", "counter", "Samples this worker process trained on."),
    MetricSpec("simclr_data_wait_seconds_total", "counter",
               "Seconds this worker process spent blocked on its data loader."),
    MetricSpec("simclr_online_probe_top1", "gauge",
               "Top-1 (0..1) of the online linear probe on the validation split, at the last epoch end "
               "(--online-probe)."),
    MetricSpec("simclr_rankme", "gauge",
               "RankMe (effective rank) of the encoder's validation features at the last epoch end; a collapse "
               "drives it towards 1 (--online-probe)."),
    MetricSpec("simclr_gpu_utilization_ratio", "gauge",
               "GPU utilisation (0..1) reported by NVML at the log point.", gpu=True),
    MetricSpec("simclr_gpu_memory_used_bytes", "gauge",
               "Bytes in use on the whole GPU as NVML reports them (CUDA context, NCCL buffers, other processes).",
               gpu=True),
    MetricSpec("simclr_gpu_memory_total_bytes", "gauge", "The GPU's memory, as NVML reports it.", gpu=True),
    MetricSpec("simclr_gpu_memory_allocated_bytes", "gauge", "Bytes held by live tensors on the GPU.", gpu=True),
    MetricSpec("simclr_gpu_memory_reserved_bytes", "gauge",
               "Bytes reserved by PyTorch's caching allocator on the GPU.", gpu=True),
    MetricSpec("simclr_model_flops_per_second", "gauge",
               "Achieved model FLOP/s: forward FLOPs per image x 3 (forward+backward) x 2 views x samples/s.",
               gpu=True),
)


def exported_names() -> frozenset[str]:
    """Every series name Prometheus receives from this module (Ray adds the ``ray_`` prefix)."""
    return frozenset(m.exported for m in METRICS)


def window_stats(*, seconds: float, steps: int, samples_per_step: int, data_wait_s: float,
                 flops_per_sample: float | None = None) -> dict[str, float]:
    """Rates of one log window (pure, so the arithmetic is unit-testable without Ray)."""
    samples_per_s = steps * samples_per_step / seconds
    stats = {
        "simclr_samples_per_second": samples_per_s,
        "simclr_images_per_second": 2 * samples_per_s,
        "simclr_step_duration_seconds": seconds / steps,
        "simclr_data_wait_ratio": min(1.0, max(0.0, data_wait_s / seconds)),
    }
    if flops_per_sample is not None:
        stats["simclr_model_flops_per_second"] = flops_per_sample * samples_per_s
    return stats


class WorkerMetrics:
    """The series of one Ray Train worker, labelled ``run``/``rank``/``node``.

    The training loop calls :meth:`start_epoch` before an epoch's first batch, :meth:`observe` at each log point
    and :meth:`checkpoint_saved` after a save; windows run from one call to the next, so the time spent between
    epochs (kNN evaluation, checkpoint upload) never dilutes the throughput.
    """

    def __init__(self, run: str, rank: int, node: str, *, samples_per_step: int, device: torch.device,
                 model: torch.nn.Module | None = None, image_size: int | None = None) -> None:
        from ray.util.metrics import Counter, Gauge

        self.rank = rank
        self.samples_per_step = samples_per_step
        self.device = device
        self.on_gpu = device.type == "cuda"
        tags = {"run": run, "rank": str(rank), "node": node}
        self._m = {s.name: (Gauge if s.kind == "gauge" else Counter)(s.name, s.help, LABELS).set_default_tags(tags)
                   for s in METRICS if self.on_gpu or not s.gpu}
        self.flops_per_sample: float | None = None
        if self.on_gpu and model is not None and image_size is not None:
            from simclr_dist.core.models import forward_flops
            try:  # monitoring must never stop training: without a count the FLOP/s series is just absent
                self.flops_per_sample = 3 * 2 * forward_flops(model, (3, image_size, image_size))
            except Exception as e:
                print(f"[simclr] metrics: no FLOP count ({type(e).__name__}: {e}); FLOP/s not exported")
        self.nvml = NvmlProbe(device) if self.on_gpu else None
        if self.nvml is not None and not self.nvml.available:
            print(f"[simclr] metrics: no GPU utilisation ({self.nvml.reason}); its series are not exported")
        self._t0, self._step0, self._wait0, self._loss0 = time.perf_counter(), 0, 0.0, 0.0

    def start_epoch(self, epoch: int, step: int) -> None:
        """Open a window at the start of ``epoch`` (0-based); the loop's per-epoch accumulators restart at 0."""
        self._t0, self._step0, self._wait0, self._loss0 = time.perf_counter(), step, 0.0, 0.0
        self._m["simclr_epoch"].set(epoch + 1)
        self._m["simclr_step"].set(step)

    def observe(self, *, step: int, lr: float, data_wait_s: float, loss_sum: torch.Tensor) -> None:
        """Close the window at a log point. ``data_wait_s`` and ``loss_sum`` are the loop's running sums for the
        epoch; reading ``loss_sum`` is the only device sync, at a point where the loop has just synchronised."""
        now = time.perf_counter()
        steps = step - self._step0
        if steps <= 0:
            return
        loss_total = float(loss_sum)
        wait = data_wait_s - self._wait0
        stats = window_stats(seconds=max(now - self._t0, 1e-9), steps=steps, samples_per_step=self.samples_per_step,
                             data_wait_s=wait, flops_per_sample=self.flops_per_sample)
        stats.update(simclr_loss=(loss_total - self._loss0) / steps, simclr_learning_rate=lr, simclr_step=step)
        if self.on_gpu:
            stats.update(self._gpu_stats())
        for name, value in stats.items():
            self._m[name].set(value)
        self._m["simclr_samples_total"].inc(steps * self.samples_per_step)
        if wait > 0:  # Ray counters refuse increments <= 0
            self._m["simclr_data_wait_seconds_total"].inc(wait)
        self._t0, self._step0, self._wait0, self._loss0 = now, step, data_wait_s, loss_total

    def epoch_end(self, metrics: dict[str, float]) -> None:
        """The per-epoch series: the online probe's validation top-1 and RankMe, when the epoch measured them."""
        for key in ("online_probe_top1", "rankme"):
            if key in metrics:
                self._m[f"simclr_{key}"].set(float(metrics[key]))

    def checkpoint_saved(self, seconds: float) -> None:
        """Only rank 0 serialises the checkpoint; the other ranks' timings would be of an empty directory."""
        if self.rank == 0:
            self._m["simclr_checkpoint_save_duration_seconds"].set(seconds)

    def _gpu_stats(self) -> dict[str, float]:
        stats = {"simclr_gpu_memory_allocated_bytes": float(torch.cuda.memory_allocated(self.device)),
                 "simclr_gpu_memory_reserved_bytes": float(torch.cuda.memory_reserved(self.device))}
        if self.nvml is not None:
            stats.update(self.nvml.read())
        return stats


class NvmlProbe:
    """Utilisation and memory of one CUDA device as NVML sees it, through nvidia-ml-py (``pynvml``).

    NVML numbers the machine's GPUs, CUDA only the visible ones (Ray sets CUDA_VISIBLE_DEVICES per worker), so the
    device is matched by UUID, not index. Without pynvml, without an NVIDIA driver, or for a device NVML cannot match,
    ``available`` is False, ``reason`` says why in one line, and :meth:`read` returns nothing: the series stay
    absent and training goes on.
    """

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        self.reason = ""
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception as e:  # no driver (NVMLError_LibraryNotFound), no CUDA device, unknown UUID
            self.reason = f"NVML unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()

    @property
    def available(self) -> bool:
        return self.handle is not None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        except Exception as e:  # the driver went away mid-run: stop asking, keep training
            self.handle, self.reason = None, f"NVML read failed: {type(e).__name__}"
            return {}
        return {"simclr_gpu_utilization_ratio": util.gpu / 100.0, "simclr_gpu_memory_used_bytes": float(mem.used),
                "simclr_gpu_memory_total_bytes": float(mem.total)}
