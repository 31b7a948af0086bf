"""What a Ray cluster has, what it can grow to, and waiting for it to grow: the resource check of every launch.

Why: an autoscaling cluster (the launcher's or KubeRay's, GPU workers from 0) has, when a job starts, less than the
job needs; comparing the request with today's nodes would refuse every job before the autoscaler could act. So a
request is compared with the cluster's *ceiling*: refused at once (one line) only when it exceeds what the cluster
can ever reach, otherwise awaited, with a timeout and a progress line naming what it waits for.

Where the ceiling comes from, in order: ``--max-cluster-cpus/--max-cluster-gpus``, else ``SIMCLR_MAX_CLUSTER_CPUS/
SIMCLR_MAX_CLUSTER_GPUS`` (the shipped cluster configs set them on the head), else, when an autoscaler runs,
"unknown" (wait up to the timeout), else what the cluster has now (nothing will add nodes). Ray 2.60 has no public
API for the autoscaler's maximum: ``ray._private.state`` reads a GCS key that its open-source autoscalers do not
write, and ``ray.autoscaler.v2.sdk.get_cluster_status`` does not report infeasible requests; so the operator states it.

How the wait asks for nodes: a placement group of the job's own worker bundles (``ray.util.placement_group``). A
pending placement group is demand every autoscaler acts on, adds up across concurrent jobs (unlike
``request_resources``, which the last caller overwrites), and is ready exactly when the workers would fit. It is
removed as soon as it is ready, and Ray Train places its workers on what it found.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from simclr_dist.console import Log, emit

ENV_MAX = {"CPU": "SIMCLR_MAX_CLUSTER_CPUS", "GPU": "SIMCLR_MAX_CLUSTER_GPUS"}
ENV_TIMEOUT = "SIMCLR_RESOURCE_TIMEOUT_S"
FLAG_MAX = {"CPU": "--max-cluster-cpus", "GPU": "--max-cluster-gpus"}
DEFAULT_TIMEOUT_S = 600.0


class CapacityError(RuntimeError):
    """The request can never fit, or did not fit in time; one line for the user."""


def amount(n: float, resource: str) -> str:
    """``2 GPUs``, ``1 CPU``, ``0.5 CPUs``."""
    return f"{n:g} {resource}" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class Growth:
    """How far the cluster may grow (per resource; absent: not stated) and how long a launch waits for it."""

    max: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)     # resource -> the flag or variable that stated it
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def resolve(cls, max_cpus: float | None = None, max_gpus: float | None = None,
                timeout_s: float | None = None) -> "Growth":
        """Flags first, then the environment (a bad value there is a one-line error naming the variable)."""
        stated, source = {}, {}
        for res, flag_value in (("CPU", max_cpus), ("GPU", max_gpus)):
            if flag_value is not None:
                stated[res], source[res] = float(flag_value), FLAG_MAX[res]
            elif os.environ.get(ENV_MAX[res], "").strip():
                stated[res], source[res] = _env_number(ENV_MAX[res]), ENV_MAX[res]
        if timeout_s is None:
            timeout_s = _env_number(ENV_TIMEOUT) if os.environ.get(ENV_TIMEOUT, "").strip() else DEFAULT_TIMEOUT_S
        return cls(stated, source, float(timeout_s))


def _env_number(name: str) -> float:
    raw = os.environ[name]
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise CapacityError(f"{name}={raw!r}: expected a number >= 0")
    return value


@dataclass(frozen=True)
class Capacity:
    """What the cluster has now and the most it can reach, per resource (``inf``: an autoscaler, maximum unknown)."""

    now: dict[str, float]
    ceiling: dict[str, float]
    why: dict[str, str]              # resource -> why the ceiling is what it is, for messages

    def gpus_possible(self) -> bool:
        """GPUs now, or GPUs the operator says the cluster can grow to (an unknown ceiling does not count)."""
        return self.now.get("GPU", 0) > 0 or (math.isfinite(self.ceiling.get("GPU", 0))
                                              and self.ceiling.get("GPU", 0) > 0)


def autoscaler_running() -> bool:
    """Whether an autoscaler (v2: the launcher's default since Ray 2.50, KubeRay's v2 mode) manages this cluster."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # no GCS key, an older cluster: treat as not autoscaling (state the maximum instead)
        return False


def capacity(growth: Growth, *, autoscaling: bool | None = None) -> Capacity:
    """The connected cluster's capacity under ``growth`` (needs ``ray.init`` done)."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    return capacity_of(now, growth, autoscaler_running() if autoscaling is None else autoscaling)


def capacity_of(now: dict[str, float], growth: Growth, autoscaling: bool) -> Capacity:
    """The rule (pure): a stated maximum, else unknown under an autoscaler, else what the cluster has."""
    ceiling, why = {}, {}
    for res in ("CPU", "GPU"):
        have = now.get(res, 0.0)
        if res in growth.max:
            ceiling[res], why[res] = max(have, growth.max[res]), growth.source[res]
        elif autoscaling:
            ceiling[res], why[res] = math.inf, f"an autoscaler runs; {FLAG_MAX[res]} or {ENV_MAX[res]} states its maximum"
        else:
            ceiling[res], why[res] = have, (f"no autoscaler; if it can grow, state how far with {FLAG_MAX[res]} "
                                            f"or {ENV_MAX[res]}")
    return Capacity(dict(now), ceiling, why)


def check_ceiling(need: dict[str, float], cap: Capacity, what: str) -> None:
    """Raise :class:`CapacityError` when ``need`` exceeds what the cluster can ever reach."""
    for res, n in need.items():
        if n > cap.ceiling.get(res, 0.0):
            most = cap.ceiling.get(res, 0.0)
            grow = "" if most <= cap.now.get(res, 0.0) else f" and can grow to {most:g}"
            raise CapacityError(f"{what} needs {amount(n, res)}; the Ray cluster has {cap.now.get(res, 0.0):g}{grow} "
                                f"({cap.why[res]})")


def _describe(need: dict[str, float], now: dict[str, float], ceiling: dict[str, float]) -> str:
    """``2 GPUs (cluster has 0, may grow to 8)``: the resources still short (all of them once none is)."""
    short = [r for r, n in need.items() if n > now.get(r, 0.0)] or list(need)
    return " and ".join(f"{amount(need[r], r)} (cluster has {now.get(r, 0.0):g}, may grow to "
                        f"{'?' if math.isinf(ceiling[r]) else format(ceiling[r], 'g')})" for r in short)


def wait_for(bundles: list[dict[str, float]], cap: Capacity, growth: Growth, what: str, *,
             log: Log = emit, poll_s: float = 2.0, every_s: float = 30.0) -> float:
    """Make sure ``bundles`` (one per worker) can be placed: refuse at once when the cluster can never hold them,
    return at once when it holds them today, else wait (asking the autoscaler for them) up to ``growth.timeout_s``.
    Returns the seconds waited."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    need: dict[str, float] = {}
    for b in bundles:
        for r, n in b.items():
            need[r] = need.get(r, 0.0) + n
    check_ceiling(need, cap, what)
    if all(n <= cap.now.get(r, 0.0) for r, n in need.items()):
        return 0.0
    label = _describe(need, cap.now, cap.ceiling)
    if growth.timeout_s <= 0:
        raise CapacityError(f"{what} needs {label}; not waiting (resource timeout 0)")
    pg = placement_group(bundles, strategy="PACK")          # pending demand: what makes an autoscaler add nodes
    t0 = time.monotonic()
    log(f"waiting for {label}: 0 s of {growth.timeout_s:g} s")
    last = 0.0
    try:
        while True:
            ready, _ = ray.wait([pg.ready()], timeout=poll_s)
            waited = time.monotonic() - t0
            if ready:
                log(f"{' and '.join(amount(n, r) for r, n in need.items())} available after {waited:.0f} s")
                return waited
            if waited >= growth.timeout_s:
                now = {k: float(v) for k, v in ray.cluster_resources().items()}
                has = ", ".join(f"{now.get(r, 0.0):g} {r}" for r in need)
                raise CapacityError(f"waited {growth.timeout_s:g} s for {what}: the cluster still has {has}; "
                                    f"raise --resource-timeout or check the autoscaler (ray status)")
            if waited - last >= every_s:
                now = {k: float(v) for k, v in ray.cluster_resources().items()}
                log(f"waiting for {_describe(need, now, cap.ceiling)}: "
                    f"{waited:.0f} s of {growth.timeout_s:g} s")
                last = waited
    finally:
        remove_placement_group(pg)
