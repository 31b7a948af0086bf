"""The README's cluster path, for real: `ray start --head`, then `ray job submit -- python -m simclr_dist.pretrain`
and a sweep as a job, with token authentication on.

The head runs in its own processes (its own temp dir and free loopback ports, never the session's `ray_cluster`),
started from a shell whose PATH begins with this venv's bin/ (what `. .venv/bin/activate` does): a job's entrypoint
`python` is the one on the head's PATH. The token is handed over in RAY_AUTH_TOKEN, so ~/.ray is left alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent          # not resolved: a venv's python is a symlink to the base one
EXCLUDES = json.dumps({"excludes": [".venv", "runs", "build"]})   # as in the README
TINY = ["--dataset", "digits", "--image-size", "16", "--width", "0.125", "--batch-size", "64",
        "--epochs", "1", "--knn-every", "-1", "--log-every", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """A token-authenticated head with 2 CPUs on loopback, started like the README does; stopped afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")   # short: Ray's socket paths must stay < 108 chars
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}   # no RAY_ADDRESS of another cluster
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=str(ROOT))
    start = ray_cli(env, "start", "--head", "--num-cpus", "2", "--port", str(port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(free_port()),
                    "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dir,
                    "--disable-usage-stats", timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    address = f"http://127.0.0.1:{dash}"
    yield {"env": env, "address": address}
    # `ray stop` would stop every Ray on this machine (the session's `ray_cluster` too); stop only this head:
    # its processes are the ones whose command line names its temp dir or its GCS port.
    import psutil
    mine = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
            and any(temp_dir in a or a.endswith(f":{port}") or a == f"--gcs_server_port={port}"
                    for a in p.info["cmdline"])]
    victims = {q.pid: q for p in mine for q in [p, *p.children(recursive=True)] if q.pid != os.getpid()}
    for p in victims.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=5)
    for p in alive:
        p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: dict, *entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit` as in the README (blocks, streams the job's log); returns the job's status line."""
    sid = f"simclr-test-{secrets.token_hex(4)}"
    out = ray_cli(head["env"], "job", "submit", "--address", head["address"], "--submission-id", sid,
                  "--working-dir", ".", "--runtime-env-json", EXCLUDES, "--", *entrypoint, timeout=timeout)
    status = ray_cli(head["env"], "job", "status", "--address", head["address"], sid)
    log = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, f"job {sid} failed:\n{log}"
    assert f"Job '{sid}' succeeded" in status.stdout, status.stdout + status.stderr + log
    return out.stdout


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories whose manifest names the size and SHA-256 of the checkpoint.pt beside it."""
    done = []
    for d in sorted(run_dir.glob("checkpoint_*")):
        if (d / "manifest.json").is_file() and (d / "checkpoint.pt").is_file():
            manifest, data = json.loads((d / "manifest.json").read_text()), (d / "checkpoint.pt").read_bytes()
            if manifest["bytes"] == len(data) and manifest["sha256"] == hashlib.sha256(data).hexdigest():
                done.append(d)
    return done


def test_token_auth_is_on(head):
    """The negative control: without the token the dashboard refuses the same request."""
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "disabled"
    refused = ray_cli(env, "job", "list", "--address", head["address"])
    assert refused.returncode != 0
    assert ray_cli(head["env"], "job", "list", "--address", head["address"]).returncode == 0


def test_pretrain_as_a_job_writes_a_complete_checkpoint(head, tmp_path):
    runs = tmp_path / "runs"
    log = submit(head, "python", "-m", "simclr_dist.pretrain", *TINY, "--num-workers", "2",
                 "--storage-path", str(runs), "--name", "job")
    assert "SimCLR pretraining finished" in log
    ckpts = complete_checkpoints(runs / "job")
    assert ckpts, sorted(p.name for p in (runs / "job").iterdir())
    manifest = json.loads((ckpts[-1] / "manifest.json").read_text())
    assert manifest["epoch"] == 1, manifest


def test_sweep_as_a_job_records_the_trial_and_its_checkpoint(head, tmp_path):
    sweeps = tmp_path / "sweeps"
    sets = [f"{k}={v}" for k, v in dict(dataset="digits", epochs=1, batch_size=64, image_size=16, width=0.125,
                                        knn_every=1, temperature="[0.5]", num_workers=1, cpus_per_worker=1,
                                        use_gpu="false", study="job-sweep").items()]
    submit(head, "python", "-m", "simclr_dist.sweep", "tune/temperature.yaml",
           *[a for s in sets for a in ("--set", s)], "--storage-path", str(sweeps), "--max-concurrent", "1")
    study = sweeps / "job-sweep"
    rows = list(csv.DictReader((study / "results.csv").read_text().splitlines()))
    assert [r["status"] for r in rows] == ["OK"], rows
    assert 0.0 < float(rows[0]["val_knn_top1"]) <= 1.0 and rows[0]["epochs_done"] == "1", rows
    trials = list((study / "train").iterdir())
    assert len(trials) == 1 and complete_checkpoints(trials[0]), trials
