"""Fault drills: kill a worker at a chosen moment, once per run, to prove that resume works.

Why a marker in storage: a drill must fire once per *run*, not once per attempt, or the restarted worker would
kill itself again; the run directory is the one place every attempt (and every node) shares.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from simclr_dist.console import emit
from simclr_dist import storage


def chaos_once(run_uri: str, what: str, before: Callable[[], None] | None = None, *, step: int | None = None) -> None:
    """Kill this process the first time drill ``what`` fires in the run at ``run_uri``; the marker file records
    the global step it fired at (when given), for the benchmark's steps-lost count."""
    marker = storage.join(run_uri, f".chaos-{what}-done")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"done\n" if step is None else f"done at step {step}\n".encode())
    if before is not None:
        before()
    emit(f"[simclr] chaos ({what}): killing worker pid {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


def chaos_kill(run_uri: str, step: int) -> None:
    """SIGKILL this Ray Train worker (once per run) after every reported checkpoint is registered, so the drill
    always exercises "resume from the last checkpoint" rather than racing the controller's poll. The loop calls
    it at ``--chaos-kill-step`` or, when a checkpoint due before then is still deferred (uploads catching up), at
    the first step after that checkpoint was taken."""
    import ray.train

    if storage.exists(storage.join(run_uri, ".chaos-kill-done")):  # a restarted attempt: the drill already fired
        return
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    chaos_once(run_uri, "kill", step=step)
