"""Progress where a person waits: a real bar on a terminal, plain lines at a bounded rate on a pipe, nothing under
pytest unless asked; and the places that use it (feature extraction, the probe's L2 grid, dataset conversion)."""

from __future__ import annotations

import fcntl
import io
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

from simclr_dist import console
from simclr_dist.console import PROGRESS_ENV, Progress, progress, progress_mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A child process that counts 40 items under the console's default mode (no PYTEST_CURRENT_TEST in its
# environment: what a user's shell sees), with the plain-line interval lowered so a line is due every few items.
CHILD = """
import sys, time
from simclr_dist import console
console.LINE_INTERVAL_S = 0.05
for _ in console.progress(range(40), desc="work", unit="img"):
    time.sleep(0.01)
print("finished", flush=True)
"""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", PROGRESS_ENV)}
    return env


def read_all(fd: int, proc: subprocess.Popen, timeout: float = 60.0) -> bytes:
    """Everything the child writes to ``fd``'s other end until it exits (a pty's master raises EIO at the end)."""
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=timeout)
    return out


@pytest.mark.parametrize("rows, columns", [(24, 100), (0, 0)])
def test_a_terminal_gets_a_redrawn_bar(rows, columns):
    """On a 24 x 100 terminal, and on a pty that reports no size (``script`` without a terminal of its own)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=slave, stderr=slave, env=child_env())
    os.close(slave)
    try:
        out = read_all(master, proc).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.returncode == 0, out
    assert "\r" in out and "work:" in out and "40/40" in out and "100%|" in out  # tqdm's bar, redrawn in place
    assert "done," not in out  # not the plain-line format


def drain(master: int) -> str:
    """Everything written to a pty whose slave end is closed (Linux answers EIO at the end), then closes it."""
    chunks = []
    try:
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    except OSError:
        pass
    os.close(master)
    return b"".join(chunks).decode()


def test_a_line_written_during_a_bar_lands_on_a_cleared_line():
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    with os.fdopen(slave, "w") as tty:
        bar = Progress(10, "grid", mode="bar", stream=tty)
        bar.update(3)
        with bar.interrupt():
            tty.write("[eval] a log line\n")
            tty.flush()
        bar.update(7)
        bar.close()
        tty.flush()
    out = drain(master)  # the slave end is closed: read to the end (one read may return only a part)
    before, after = out.split("[eval] a log line", 1)
    assert before.endswith(" " * 20 + "\r")  # the bar was blanked out and the cursor returned to column 0
    assert "30%|" in after and "10/10" in after  # and redrawn below the line


def test_a_pipe_gets_plain_lines_at_a_bounded_rate():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.decode().strip() == "finished"
    lines = err.decode().splitlines()
    assert "\r" not in err.decode() and lines, err
    # 40 items x 10 ms = 0.4 s at a 0.05 s interval: a handful of lines, far fewer than the 40 updates
    assert 2 <= len(lines) <= 12, lines
    assert all(line.startswith("work: ") for line in lines)
    assert "/40 img (" in lines[0] and "img/s" in lines[0]
    assert lines[-1].startswith("work: done, 40 img in ")


def test_lines_are_bounded_by_the_interval_and_quick_work_is_silent():
    now = [0.0]
    out = io.StringIO()
    bar = Progress(100, "extract", unit="img", mode="lines", stream=out, interval=10.0, clock=lambda: now[0])
    for _ in range(100):  # one update a second for 100 s
        now[0] += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # one every 10 s, and the closing line
    assert lines[0] == "extract: 10/100 img (10%) in 10 s, 1 img/s, ~1 min 30 s left"
    assert lines[-1] == "extract: done, 100 img in 1 min 40 s, 1 img/s"

    quick = io.StringIO()
    with Progress(100, "quick", mode="lines", stream=quick, interval=10.0, clock=lambda: now[0]) as bar:
        bar.update(100)  # no time passes: nothing worth a line
    assert quick.getvalue() == ""


def test_pytest_is_silent_unless_asked(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    tty = open(os.devnull, "w")
    tty.isatty = lambda: True  # type: ignore[method-assign]
    assert os.environ.get("PYTEST_CURRENT_TEST")
    assert progress_mode(tty) == "off"
    assert progress_mode(tty, "auto") == "bar" and progress_mode(io.StringIO(), "auto") == "lines"
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    assert progress_mode(tty) == "lines"
    monkeypatch.setenv(PROGRESS_ENV, "auto")
    assert progress_mode(tty) == "bar"
    monkeypatch.setenv(PROGRESS_ENV, "loud")
    with pytest.raises(ValueError, match=r"^\$SIMCLR_DIST_PROGRESS: unknown progress mode 'loud'; choose from"):
        progress_mode(tty)
    tty.close()


def test_off_writes_nothing_and_the_iterable_is_unchanged():
    out = io.StringIO()
    assert list(progress(iter(range(5)), 5, "x", mode="off", stream=out, interval=0.0)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""


# ---------------------------------------------------------------------------- where it is used
def test_feature_extraction_reports_progress_in_images(monkeypatch, capsys):
    from simclr_dist.core.knn import extract_features
    from simclr_dist.core.models import build_backbone
    from simclr_dist.data.augment import build_eval_transform
    from simclr_dist.data.datasets import dataset_info, load_dataset

    monkeypatch.setattr(console, "LINE_INTERVAL_S", 0.0)  # a line per batch
    info = dataset_info("digits")
    data = load_dataset("digits", "test", image_size=16)
    encoder, _ = build_backbone("resnet18", cifar_stem=True, width=0.125)
    feats, labels = extract_features(encoder, data, build_eval_transform(16, info.mean, info.std),
                                     indices=range(100), batch_size=32, progress="lines", desc="digits/test")
    assert feats.shape == (100, encoder.feat_dim) and labels.shape == (100,)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" in ")[0] for ln in lines[:4]] == [
        "digits/test: 32/100 img (32%)", "digits/test: 64/100 img (64%)", "digits/test: 96/100 img (96%)",
        "digits/test: 100/100 img (100%)"]
    assert lines[-1].startswith("digits/test: done, 100 img")

    extract_features(encoder, data, build_eval_transform(16, info.mean, info.std), indices=range(10))
    assert capsys.readouterr().err == ""  # the default under pytest: silent


def test_the_probe_grid_reports_one_step_per_fit(monkeypatch, capsys):
    from simclr_dist.core.probe import select_l2

    monkeypatch.setattr(console, "LINE_INTERVAL_S", 0.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.arange(60) % 3
    best, accs = select_l2(x[:40], y[:40], x[40:], y[40:], num_classes=3, l2_grid=[1e-3, 1e-1, 10.0], max_iter=20,
                           progress="lines")
    assert best in (1e-3, 1e-1, 10.0) and set(accs) == {"0.001", "0.1", "10"}
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" in ")[0] for ln in lines[:3]] == [f"linear probe: L2 grid: {i}/3 fit ({p}%)"
                                                         for i, p in ((1, 33), (2, 67), (3, 100))]


def test_dataset_conversion_reports_progress_through_ffcvs_writer(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv")
    from simclr_dist.data.ffcv.convert import ConvertSpec, convert, progress_mode_of

    monkeypatch.setattr(console, "LINE_INTERVAL_S", 0.0)
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    res = convert(ConvertSpec(dataset="digits", split="test", out=str(tmp_path / "d.beton"), image_size=16,
                              write_mode="raw", num_workers=1))
    assert res.num_samples == 360
    err = capsys.readouterr().err
    assert "digits/test -> d.beton: done, 360 img" in err and "\r" not in err

    quiet = ConvertSpec(dataset="digits", split="test", out="e.beton", progress=False)  # --no-progress
    assert progress_mode_of(quiet) == "off" and Progress(1, mode=progress_mode_of(quiet)).mode == "off"
