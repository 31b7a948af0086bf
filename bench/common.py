"""Helpers shared by the benchmark scripts: machine description, interleaved timing, peak memory,
aligned tables and the JSON report.

Timings on a shared machine are noisy, so every comparison is measured in one process with the
candidates interleaved (round-robin, rotating order) and summarised by the median; report ratios
between candidates measured this way rather than absolute numbers from separate runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Row = dict[str, Any]
Column = tuple[str, str, str]  # (row key, header, format spec, e.g. ".2f"; "" = str())


# ---------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (and how busy the machine was when the script started)."""
    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_device_count": torch.cuda.device_count() if cuda else 0,
        "cuda_runtime": torch.version.cuda,
    }


def mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (CUDA is asynchronous; CPU ops have finished when they return)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that machine noise hits all alike.

    Each round runs every function once, in an order rotated by one per round (no fixed position
    advantage). ``warmup`` untimed rounds come first (allocator, caches, lazy init).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (autograd's saved tensors and grads included).

    The CPU counterpart of ``torch.cuda.max_memory_allocated`` minus the starting value: every aten
    op's outputs are recorded by storage, and a weakref finalizer subtracts a storage when it is freed.
    Tensors that existed before entering (inputs, weights) are not counted; scratch space that a
    kernel allocates and frees internally is invisible to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._live:
                    self._live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory one call of ``fn`` allocates beyond what was live before it (its result is dropped)."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


# ---------------------------------------------------------------------------- output
def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """Plain-text table with right-aligned columns (missing values print as '-')."""
    cells = [[h for _, h, _ in columns]] + [[_cell(r.get(k), s) for k, _, s in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="a seconds-long subset (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON report path (default: results/{prog.rsplit('.', 1)[-1]}.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). On a shared, loaded CPU box use 1: "
                             "OpenMP barriers of 2+ threads stall whenever a core is taken by another process")
    return parser


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def write_report(
    name: str,
    out: Path | None,
    tables: Mapping[str, tuple[Sequence[Row], Sequence[Column]]],
    *,
    machine: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Print each table and write ``{"benchmark", "machine", <table name>: rows, **extra}`` as JSON.

    Pass ``machine=machine_info()`` taken when the run started, so its load average is the one the
    measurements saw at their start."""
    payload: dict[str, Any] = {"benchmark": name, "machine": machine or machine_info(), **extra}
    for title, (rows, columns) in tables.items():
        print(f"\n== {title}\n{format_table(rows, columns)}")
        payload[title] = list(rows)
    path = out or Path("results") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return payload
