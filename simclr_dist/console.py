"""Console output shared by the CLIs and the Ray Train workers."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def emit(msg: str) -> None:
    """One progress line to stdout, flushed. ``sys.stdout`` directly: inside a Ray Train worker ``print`` is patched
    into Ray's logger, which would show each line twice."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()
