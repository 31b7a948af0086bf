"""Console output shared by the CLIs and the Ray Train workers."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from typing import NoReturn

Log = Callable[[str], None]


def emit(msg: str) -> None:
    """One progress line to stdout, flushed. ``sys.stdout`` directly: inside a Ray Train worker ``print`` is patched
    into Ray's logger, which would show each line twice."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class CommandParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: unrecognized arguments: --epoch 5 (did you mean --epochs?); see
    python -m simclr_dist.pretrain --help`` on stderr and exit 2, instead of the whole usage text before the line
    that matters. ``on_error``: raise instead (a command that turns it into its own error type)."""

    def __init__(self, *args, on_error: Callable[[str], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_error = on_error

    def suggestion(self, message: str) -> str:
        """`` (did you mean --x?)`` for the first unknown ``--flag`` in ``message`` with a close known one."""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        for word in message.replace(",", " ").split():
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""

    def error(self, message: str) -> NoReturn:
        line = f"{message}{self.suggestion(message)}; see {self.prog} --help"
        if self.on_error is not None:
            self.on_error(line)
        self.exit(2, f"error: {line}\n")
