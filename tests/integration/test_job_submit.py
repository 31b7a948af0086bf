"""The cluster path of docs/cluster.md, for real: `ray start --head`, then `ray job submit -- python -m simclr_dist.pretrain`
and a sweep as a job, with token authentication on.

The head runs in its own processes (its own temp dir and free loopback ports, never the session's `ray_cluster`),
started from a shell whose PATH begins with this venv's bin/ (what `. .venv/bin/activate` does): a job's entrypoint
`python` is the one on the head's PATH. The token is handed over in RAY_AUTH_TOKEN, so ~/.ray is left alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import secrets
from pathlib import Path

import pytest
from ray_procs import RayHead

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # `make test-cluster`: CI's second stage
EXCLUDES = json.dumps({"excludes": [".venv", "runs", "build"]})   # as in docs/cluster.md
TINY = ["--dataset", "digits", "--image-size", "16", "--width", "0.125", "--batch-size", "64",
        "--epochs", "1", "--knn-every", "-1", "--log-every", "5"]


@pytest.fixture(scope="module")
def head():
    """A token-authenticated head with 2 CPUs on loopback, started like docs/cluster.md does (and stating, as the
    shipped cluster configs do, what the cluster can grow to); stopped afterwards."""
    head = RayHead(num_cpus=2, SIMCLR_MAX_CLUSTER_CPUS="3")
    yield head
    head.stop()


def submit_cmd(head: RayHead, sid: str, *entrypoint: str) -> list[str]:
    return ["job", "submit", "--address", head.dashboard, "--submission-id", sid, "--working-dir", ".",
            "--runtime-env-json", EXCLUDES, "--", *entrypoint]


def submit(head: RayHead, *entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit` as in docs/cluster.md (blocks, streams the job's log); returns the job's status line."""
    sid = f"simclr-test-{secrets.token_hex(4)}"
    out = head.cli(*submit_cmd(head, sid, *entrypoint), timeout=timeout)
    status = head.cli("job", "status", "--address", head.dashboard, sid)
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
    import subprocess
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "disabled"
    refused = subprocess.run(["ray", "job", "list", "--address", head.dashboard], env=env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "Unauthorized" in refused.stderr, refused.stdout + refused.stderr
    assert head.cli("job", "list", "--address", head.dashboard).returncode == 0


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
                                        knn_every=1, temperature="[0.5]", proj_normalize="[true]", num_workers=1,
                                        cpus_per_worker=1, use_gpu="false", study="job-sweep").items()]
    submit(head, "python", "-m", "simclr_dist.sweep", "tune/temperature.yaml",
           *[a for s in sets for a in ("--set", s)], "--storage-path", str(sweeps), "--max-concurrent", "1")
    study = sweeps / "job-sweep"
    rows = list(csv.DictReader((study / "trials.csv").read_text().splitlines()))  # results.csv: the cells
    assert [r["status"] for r in rows] == ["OK"], rows
    assert 0.0 < float(rows[0]["val_knn_top1"]) <= 1.0 and rows[0]["epochs_done"] == "1", rows
    trials = list((study / "train").iterdir())
    assert len(trials) == 1 and complete_checkpoints(trials[0]), trials


def test_a_job_beyond_what_the_cluster_can_grow_to_fails_at_once(head, tmp_path):
    """The head's SIMCLR_MAX_CLUSTER_CPUS (set on `ray start`, as the shipped configs do) reaches the job's driver."""
    sid = f"simclr-test-{secrets.token_hex(4)}"
    out = head.cli(*submit_cmd(head, sid, "python", "-m", "simclr_dist.pretrain", *TINY, "--num-workers", "4",
                               "--storage-path", str(tmp_path / "runs"), "--name", "too-big"), timeout=300)
    assert out.returncode != 0
    assert ("--num-workers 4 x --cpus-per-worker 1 needs 4 CPUs; the Ray cluster has 2 and can grow to 3 "
            "(SIMCLR_MAX_CLUSTER_CPUS)") in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
