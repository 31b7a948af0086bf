"""A request larger than today's cluster waits for it to grow; one beyond what it can ever reach fails at once.

On a real cluster on loopback (tests/ray_procs.py): a head with 1 CPU, pretraining asking for 2 workers x 1 CPU with
`--max-cluster-cpus 2` (what an operator states for an autoscaling cluster, or SIMCLR_MAX_CLUSTER_CPUS). The driver
prints what it waits for; a second node joins late (`ray start --address`, what an autoscaler does) and the run
finishes on both nodes. The same cluster refuses 4 workers with one line, before any wait, and refuses --sync-bn on
its CPU workers.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import pytest
from ray_procs import ROOT, RayHead

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # `make test-cluster`: CI's second stage
TINY = ["--dataset", "digits", "--image-size", "16", "--width", "0.125", "--batch-size", "64", "--epochs", "1",
        "--knn-every", "-1", "--log-every", "5"]


@pytest.fixture(scope="module")
def head():
    head = RayHead(num_cpus=1)
    yield head
    head.stop()


def pretrain(head: RayHead, tmp_path, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simclr_dist.pretrain", *TINY, "--storage-path", str(tmp_path / "runs"), *flags]
    return subprocess.run(cmd, env=head.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_beyond_the_stated_maximum_fails_at_once(head, tmp_path):
    # a generous resource timeout: only an immediate refusal ends before the subprocess timeout
    out = pretrain(head, tmp_path, "--num-workers", "4", "--name", "too-big", "--max-cluster-cpus", "3",
                   "--resource-timeout", "600")
    err = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1, out.stdout + out.stderr
    assert err == ("error: --num-workers 4 x --cpus-per-worker 1 needs 4 CPUs; the Ray cluster has 1 and can grow "
                   "to 3 (--max-cluster-cpus)"), err
    assert "waiting for" not in out.stdout


def test_no_autoscaler_and_no_stated_maximum_fails_at_once(head, tmp_path):
    out = pretrain(head, tmp_path, "--num-workers", "2", "--name", "no-max", "--resource-timeout", "600")
    err = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "needs 2 CPUs; the Ray cluster has 1 (no autoscaler" in err, out.stderr
    assert "--max-cluster-cpus" in err and "waiting for" not in out.stdout


def test_sync_bn_on_cpu_workers_is_refused_before_training(head, tmp_path):
    out = pretrain(head, tmp_path, "--num-workers", "2", "--cpus-per-worker", "0.5", "--sync-bn", "--name", "sbn")
    err = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and err.startswith("error: --sync-bn: needs GPU workers"), out.stdout + out.stderr
    assert "RayTrainWorker" not in out.stdout + out.stderr      # no worker ever started


def test_waits_for_a_node_that_joins_late_then_trains_on_both(head, tmp_path):
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "simclr_dist.pretrain", *TINY, "--num-workers", "2", "--name", "grows",
           "--storage-path", str(tmp_path / "runs"), "--max-cluster-cpus", "2", "--resource-timeout", "300",
           "--summary-json", str(summary)]
    driver = subprocess.Popen(cmd, env=head.client_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in driver.stdout], daemon=True).start()
    log: list[str] = []
    try:
        deadline = time.monotonic() + 120       # a guard against a hang, not a measurement
        while not any(ln.startswith("waiting for ") for ln in log):
            assert time.monotonic() < deadline and driver.poll() is None, "".join(log)[-3000:]
            try:
                log.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        waiting = next(ln for ln in log if ln.startswith("waiting for "))
        assert waiting.startswith("waiting for 2 CPUs (cluster has 1, may grow to 2): 0 s of 300 s"), waiting
        head.add_node(num_cpus=1)                # the "autoscaler" adds a machine
        assert driver.wait(timeout=600) == 0, "".join(log)[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(0.5)
    while not lines.empty():
        log.append(lines.get())
    assert any("2 CPUs available after" in ln for ln in log), "".join(log)[-3000:]
    result = json.loads(summary.read_text())
    assert result["epochs_done"] == 1 and result["checkpoint"]
    assert len(set(result["history"][-1]["node_ids"])) == 2      # one worker on each node: the new one was used
