"""How a command fails: one line on stderr, exit 2 for bad input (a flag, a file a flag names, storage), 1 for a run
that started and failed. One rule, so every command reads the same to a user and to a script."""

from __future__ import annotations

import sys

from simclr_dist.config import ConfigError
from simclr_dist.data.datasets import DatasetError
from simclr_dist.run.jobs.launch import RunError
from simclr_dist.run.store.checkpoint import CheckpointError
from simclr_dist.storage import StorageError

# a checkpoint a flag names that is incomplete, corrupt or unsafe (a pickle that would run code) is bad input too
BAD_INPUT = (ConfigError, DatasetError, StorageError, CheckpointError)
FAILURES = (*BAD_INPUT, RunError)


def fail(e: BaseException) -> int:
    """Print ``error: <one line>`` and return the exit code."""
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, BAD_INPUT) else 1
