"""Multi-node and shared-storage fault tolerance on a real two-node Ray cluster (cluster/local-cluster.sh) with
checkpoints on a real S3-compatible server on loopback (moto). Training runs as `python -m simclr_dist.pretrain`
subprocesses joined to the cluster through RAY_ADDRESS, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simclr_dist.run.eval import store as eval_store
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import latest_checkpoint, list_complete_checkpoints
from simclr_dist.core.optim import WarmupCosine, scale_lr

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # `make test-cluster`: CI's second stage
ROOT = Path(__file__).resolve().parents[2]
SECRET = "simclr-test-secret-must-never-be-written"
STEPS = 1437 // 64  # digits train split at global batch 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """moto S3 server + a head and a second node, each with 1 CPU (so 2 workers must span both nodes)."""
    s3_port, ray_port, dash_port = free_port(), free_port(), free_port()
    log_dir = tmp_path_factory.mktemp("cluster-logs")
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=open(log_dir / "moto.log", "w"), stderr=subprocess.STDOUT)
    aws = {"AWS_ACCESS_KEY_ID": "simclr-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)  # this process reads the bucket through simclr_dist.storage too
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", s3_port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3
    boto3.client("s3").create_bucket(Bucket="simclr")

    env = {**os.environ, "RAY_PORT": str(ray_port), "DASHBOARD_PORT": str(dash_port),
           "RAY": str(Path(sys.executable).parent / "ray"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # reports every 0.2 s, not 2 s: step checkpoints of ~1 s epochs
    script = str(ROOT / "cluster" / "local-cluster.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True, timeout=180)
    address = f"127.0.0.1:{ray_port}"
    run_env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    _wait_for_nodes(run_env, 2)
    yield {"env": run_env, "script": script, "script_env": env, "log_dir": log_dir}
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)
    moto.terminate()
    moto.wait(timeout=30)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _wait_for_nodes(env, n: int, timeout: float = 60) -> None:
    code = "import ray; ray.init(); print(sum(x['Alive'] for x in ray.nodes()))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        if out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise AssertionError(f"cluster did not reach {n} alive nodes")


def wait_registered(run_dir: Path, timeout: float = 300) -> None:
    """Until Ray has *registered* a checkpoint (its snapshot lists it), which is what a restart resumes from;
    a checkpoint directory that is uploaded but not yet registered would be lost by a fault right now."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snapshot.exists():
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return
            except json.JSONDecodeError:
                pass  # being rewritten
        time.sleep(0.5)
    raise AssertionError(f"no registered checkpoint in {run_dir} after {timeout}s")


def pretrain_cmd(storage_path: str, name: str, summary: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simclr_dist.pretrain", "--dataset", "digits", "--image-size", "16",
            "--width", "0.125", "--batch-size", "64", "--num-workers", "2", "--knn-every", "-1",
            "--log-every", "5", "--storage-path", storage_path, "--name", name,
            "--summary-json", str(summary), *extra]


def run_logged(cmd, env, log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, f"{cmd[2]} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}"
    return out


def assert_continuous(history: list[dict], epochs: int, cfg: dict) -> None:
    """Every epoch once, in order, and the LR of an uninterrupted run at each epoch end."""
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert [h["step"] for h in history] == [STEPS * e for e in range(1, epochs + 1)]
    lr = scale_lr(cfg["base_lr"], cfg["batch_size"], cfg["lr_scaling"])
    import torch
    sched = WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr), lr,
                         round(cfg["warmup_epochs"] * STEPS), epochs * STEPS)
    for h in history:
        assert h["lr"] == pytest.approx(sched.lr_at(h["step"] - 1), rel=1e-9)


def test_two_nodes_s3_worker_killed_mid_epoch_then_evaluate_reads_s3(cluster, tmp_path):
    run = "s3://simclr/runs"
    summary_path = tmp_path / "summary.json"
    kill_at, every = STEPS + STEPS // 2, 10  # killed at step 33, step checkpoints at 10, 20, 30, ...
    out = run_logged(pretrain_cmd(run, "kill", summary_path, "--epochs", "2", "--max-failures", "1",
                                  "--checkpoint-every-steps", str(every), "--chaos-kill-step", str(kill_at)),
                     cluster["env"], tmp_path / "log")
    summary = json.loads(summary_path.read_text())
    history = summary["history"]
    assert len(set(history[-1]["node_ids"])) == 2, history[-1]["node_ids"]   # one worker per node
    died_at = int(storage.read_bytes(f"{run}/kill/.chaos-kill-done").split()[-1])  # a worker really was killed
    # from a step checkpoint uploaded to S3 in the background, mid-epoch 2 (step 30, or a little later if uploads
    # were catching up; the kill then waits for it): not epoch 1's end, 11 steps back
    resumed = summary["resumed_from_step"]
    assert kill_at <= died_at and STEPS < resumed < died_at and summary["resumed_from_batch"] == resumed - STEPS
    assert_continuous(history, 2, summary["config"])
    complete = list_complete_checkpoints(f"{run}/kill")
    assert [c.epoch for c in complete][-1] == 2 and len(complete) <= 2

    ev = run_logged([sys.executable, "-m", "simclr_dist.evaluate", "--run", f"{run}/kill", "--protocols", "knn",
                     "--threads", "1"], cluster["env"], tmp_path / "eval.log")
    name = latest_checkpoint(f"{run}/kill").rsplit("/", 1)[-1]
    result = storage.read_json(eval_store.result_uri(f"{run}/kill", name, "knn"))  # RUN/eval/<checkpoint>/knn.json
    assert 0.1 < result["top1"] <= 1.0, result
    assert [(e["checkpoint"], e["protocol"]) for e in eval_store.read_index(f"{run}/kill")] == [(name, "knn")]
    assert "history of" in ev.stdout and name in ev.stdout[ev.stdout.index("history of"):]
    # no credential in anything we wrote or printed
    fs, root = storage.resolve(f"{run}/kill")
    import pyarrow.fs as pafs
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                assert SECRET.encode() not in f.read(), info.path
    assert SECRET not in out.stdout + out.stderr + ev.stdout + ev.stderr


def test_upload_crash_resumes_previous_complete_checkpoint(cluster, tmp_path):
    runs = tmp_path / "runs"
    summary_path = tmp_path / "summary.json"
    run_logged(pretrain_cmd(str(runs), "upload", summary_path, "--epochs", "3", "--max-failures", "1",
                            "--chaos-kill-in-upload", "2"), cluster["env"], tmp_path / "log")
    summary = json.loads(summary_path.read_text())
    assert summary["resumed_from_epoch"] == 1          # epoch 2's half-uploaded checkpoint was never loaded
    assert_continuous(summary["history"], 3, summary["config"])
    dirs = sorted(p for p in (runs / "upload").glob("checkpoint_2*"))
    partial = [d for d in dirs if not (d / "manifest.json").exists()]
    assert len(partial) == 1 and (partial[0] / "checkpoint.pt").exists()   # the torn upload is still there ...
    assert latest_checkpoint(str(runs / "upload")) != str(partial[0])      # ... and nothing reads it
    assert list_complete_checkpoints(str(runs / "upload"))[-1].epoch == 3


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(cluster, tmp_path):
    runs = tmp_path / "runs"
    summary_path = tmp_path / "summary.json"
    cmd = pretrain_cmd(str(runs), "driver", summary_path, "--epochs", "3")
    driver = subprocess.Popen(cmd, env=cluster["env"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    wait_registered(runs / "driver")
    os.killpg(driver.pid, signal.SIGKILL)   # the driver and everything it started locally
    driver.wait()
    assert not summary_path.exists()
    time.sleep(5)                            # let the cluster reap the orphaned controller and workers
    run_logged(cmd, cluster["env"], tmp_path / "log")
    summary = json.loads(summary_path.read_text())
    assert summary["resumed_from_epoch"] >= 1
    assert_continuous(summary["history"], 3, summary["config"])


@pytest.mark.slow
def test_node_stopped_mid_run_then_replaced(cluster, tmp_path):
    runs = tmp_path / "runs"
    summary_path = tmp_path / "summary.json"
    cmd = pretrain_cmd(str(runs), "node", summary_path, "--epochs", "3", "--max-failures", "2")
    driver = subprocess.Popen(cmd, env=cluster["env"], cwd=ROOT, stdout=open(tmp_path / "log", "w"),
                              stderr=subprocess.STDOUT)
    wait_registered(runs / "node")
    script, env = cluster["script"], cluster["script_env"]
    subprocess.run(["bash", script, "stop-node"], env=env, check=True, capture_output=True, timeout=60)
    time.sleep(5)
    subprocess.run(["bash", script, "start-node"], env=env, check=True, capture_output=True, timeout=120)
    assert driver.wait(timeout=600) == 0, (tmp_path / "log").read_text()[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["resumed_from_epoch"] >= 1
    assert_continuous(summary["history"], 3, summary["config"])
