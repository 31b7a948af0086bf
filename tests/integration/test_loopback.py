"""A Ray this project starts itself listens on loopback only (issue 24).

Ray's GCS, raylet (node and object manager), core workers, dashboard, dashboard agent (metrics export) and
runtime-env agent all bind to every interface unless the node IP is 127.0.0.1 (Ray 2.60's rule);
``simclr_dist.run.jobs.launch.bind_to_loopback`` makes it so for every Ray the project starts (``pretrain`` and
the other commands without ``RAY_ADDRESS``, the tests' session Ray). The train workers' process group does too:
torch 2.14's TCPStore server (rank 0's rendezvous) binds ``::`` whatever MASTER_ADDR says, so on a loopback Ray
``simclr_dist.run.jobs.rendezvous`` hands it a socket bound to 127.0.0.1 and pins gloo to the loopback interface.
These tests list the listening TCP sockets of the processes of a real local run and fail on any address that is
not loopback.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_WORKER = "ray::RayTrainWorker"  # the process title of a Ray Train worker (and of the tasks it runs)


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and an IPv4-mapped loopback (::ffff:127.0.0.1: a dual-stack socket bound to 127.0.0.1)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listening(root: int) -> set[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of ``root`` and its descendants."""
    try:
        top = psutil.Process(root)
        procs = {p.pid: p for p in [top, *top.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.NoSuchProcess:
                continue
            out.add((c.laddr.ip, c.laddr.port, name))
    return out


def test_is_loopback():
    from simclr_dist.run.jobs.rendezvous import is_loopback_address

    for check in (is_loopback, is_loopback_address):
        assert all(map(check, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.1.1"]))
        assert not any(map(check, ["0.0.0.0", "::", "192.0.2.2", "fd00::2"]))
    assert not is_loopback_address("not-an-ip")


def test_process_group_store_binds_the_address_it_is_given():
    """The store rank 0 serves on a loopback Ray listens on 127.0.0.1 only (torch's own binds '::'); a client of
    another process reaches it there. In a child process: the store lives as long as its process."""
    code = f"""
import datetime, os, psutil, subprocess, sys
from simclr_dist.run.jobs import rendezvous as r
import torch.distributed as dist
port = r.serve_store("127.0.0.1", 2, 30)
mine = {{(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections() if c.status == psutil.CONN_LISTEN}}
assert mine == {{("127.0.0.1", port)}}, mine
subprocess.run([sys.executable, "-c", "import datetime, torch.distributed as d; "
                f"d.TCPStore('127.0.0.1', {{port}}, 2, False, datetime.timedelta(seconds=30)).set('k', 'v')"],
               check=True)
assert dist.TCPStore("127.0.0.1", port, 2, False, datetime.timedelta(seconds=30)).get("k") == b"v"
print("ok", r.interface_of("127.0.0.1"))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]


@pytest.mark.drill  # CI stage 2 (make test-cluster): its own Ray start + 2 epochs, 50-140 s on a loaded 2-core box
def test_local_pretrain_run_listens_on_loopback_only(tmp_path):
    """``python -m simclr_dist.pretrain`` without RAY_ADDRESS starts its own Ray: sampled every 0.5 s while it
    trains, no process of it (driver, GCS, raylet, dashboard, agents, train workers and their process group's
    store) listens beyond loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing inherited from the tests
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "simclr_dist.pretrain", "--dataset", "digits", "--image-size", "16", "--width",
           "0.125", "--batch-size", "64", "--num-workers", "2", "--knn-every", "-1", "--epochs", "2",
           "--storage-path", str(tmp_path / "runs"), "--name", "loopback"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, int, str]] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(listening(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, sorted(seen)            # the sampler saw Ray's own servers
    assert any(n.startswith("ray::") for n in names), sorted(seen)   # and its workers / agents
    assert any(n.startswith(TRAIN_WORKER) for n in names), sorted(seen)  # rank 0's store (and gloo) seen
    exposed = sorted(s for s in seen if not is_loopback(s[0]))
    assert exposed == [], f"listening beyond loopback: {exposed}"


@pytest.mark.ray
def test_session_ray_of_the_tests_listens_on_loopback_only(ray_cluster):
    """The tests' shared Ray (conftest) binds like a local run: every socket of this process tree on loopback."""
    @ray_cluster.remote
    def pid() -> int:
        return os.getpid()

    assert ray_cluster.get(pid.remote()) != os.getpid()                # a worker process exists
    seen = listening(os.getpid())
    assert {"gcs_server", "raylet"} <= {name for _, _, name in seen}, sorted(seen)
    exposed = sorted(s for s in seen if not is_loopback(s[0]))
    assert exposed == [], f"listening beyond loopback: {exposed}"
