"""Console output shared by the CLIs and the Ray Train workers: progress lines, one-line argument errors, and
progress bars where a person waits (:class:`Progress`, :func:`progress`)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, NoReturn, TextIO, TypeVar

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
        if not message.startswith("unrecognized arguments"):  # "argument --epochs: invalid int value" names a known flag
            return ""
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


# ---------------------------------------------------------------------------- progress where a person waits
PROGRESS_ENV = "SIMCLR_DIST_PROGRESS"
PROGRESS_MODES = ("auto", "bar", "lines", "off")
LINE_INTERVAL_S = 10.0  # plain-line mode: at most one line per this many seconds (a log file stays readable)
T = TypeVar("T")


def progress_mode(stream: TextIO | None = None, mode: str | None = None) -> str:
    """``bar``, ``lines`` or ``off``: the explicit ``mode``, else ``$SIMCLR_DIST_PROGRESS``, else the default.

    Why the default is what it is: a bar redraws one line with ``\\r``, which a terminal shows and a log file or a
    pipe turns into noise, so a bar only where ``stream`` is a terminal and plain lines elsewhere; and nothing under
    pytest (``PYTEST_CURRENT_TEST`` set) unless asked, so test output stays the tests'. ``auto`` (passed, or in the
    variable) asks for the terminal test even under pytest. An unknown value raises ``ValueError`` in one line."""
    stream = sys.stderr if stream is None else stream
    chosen = mode if mode is not None else os.environ.get(PROGRESS_ENV, "").strip().lower() or None
    if chosen is not None and chosen not in PROGRESS_MODES:
        source = "mode" if mode is not None else f"${PROGRESS_ENV}"
        raise ValueError(f"{source}: unknown progress mode {chosen!r}; choose from {', '.join(PROGRESS_MODES)}")
    if chosen is None and os.environ.get("PYTEST_CURRENT_TEST"):
        return "off"
    if chosen in (None, "auto"):
        isatty = getattr(stream, "isatty", None)
        return "bar" if callable(isatty) and isatty() else "lines"
    return chosen


def terminal_size(stream: TextIO) -> tuple[int, int]:
    """(columns, rows) of the terminal behind ``stream``; zeros when it reports none or is not a terminal."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0, 0
    return size.columns, size.lines


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """A counter that shows itself: a tqdm bar on a terminal, a plain line at most every ``interval`` seconds
    elsewhere (the first one only once the work has taken that long, so quick work prints nothing; a closing line
    when any was printed), nothing when ``mode`` resolves to ``off`` (see :func:`progress_mode`).

    The constructor takes tqdm's ``total=`` keyword and the object has ``update(n)``, ``close()`` and ``n``, so it
    can stand in where a library builds its own tqdm (FFCV's writer); use it as a context manager otherwise."""

    def __init__(self, total: int | None = None, desc: str = "", *, unit: str = "it", unit_scale: bool = False,
                 mode: str | None = None, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, **_tqdm_kwargs: Any) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(self.stream, mode)
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.interval = LINE_INTERVAL_S if interval is None else interval  # read now: a test may lower it
        self.clock = clock
        self.n = 0
        self.lines_written = 0
        self.closed = False
        self.start = self.last_line = clock()
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm  # imported here: only a terminal needs it

            # a terminal that reports no size (a bare pty, `script` run without a terminal) would make tqdm draw a
            # bar of no width or, with 0 rows, nothing at all: give it tqdm's usual size instead
            sized = all(terminal_size(self.stream))
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=self.stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                            mininterval=0.1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines":
            now = self.clock()
            if now - self.last_line >= self.interval:
                self.last_line = now
                self._line(self._status(now))

    @contextlib.contextmanager
    def interrupt(self) -> Iterator[None]:
        """Write a line of your own while the bar is shown: the bar is cleared first and redrawn after, so the line
        does not land in the middle of it (a terminal shows stdout and stderr on one screen)."""
        if self.bar is not None:
            self.bar.clear()
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.refresh()

    def close(self) -> None:
        """Finish the bar, or write the closing line when plain lines were written; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and self.lines_written:
            elapsed = self.clock() - self.start
            rate = f", {self._count(self.n / elapsed)} {self.unit}/s" if elapsed > 0 else ""
            self._line(f"{self.desc}: done, {self._count(self.n)} {self.unit} in {_duration(elapsed)}{rate}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, value: float) -> str:
        if self.unit_scale and value >= 1000:
            for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
                if value >= scale:
                    return f"{value / scale:.1f}{prefix}"
        return f"{value:,.0f}" if value >= 10 or float(value).is_integer() else f"{value:.2f}"

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self._count(self.n)}"
        if self.total:
            done += f"/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}"
        eta = (f", ~{_duration((self.total - self.n) / rate)} left"
               if self.total and rate > 0 and self.n < self.total else "")
        return f"{self.desc}: {done} in {_duration(elapsed)}, {self._count(rate)} {self.unit}/s{eta}"

    def _line(self, text: str) -> None:
        self.lines_written += 1
        self.stream.write(text + "\n")
        self.stream.flush()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", *, unit: str = "it",
             mode: str | None = None, stream: TextIO | None = None, interval: float | None = None) -> Iterator[T]:
    """Yield ``iterable``'s items while a :class:`Progress` counts one per item (``total`` defaults to ``len``)."""
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    with Progress(total, desc, unit=unit, mode=mode, stream=stream, interval=interval) as bar:
        for item in iterable:
            yield item
            bar.update(1)
