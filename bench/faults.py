"""Fault-injection table on a real two-node Ray cluster on this machine (cluster/local-cluster.sh).

    python -m bench.faults [--out results/faults.json] [--epochs 3]

Drills, each on a fresh 2-worker digits run with checkpoints every epoch:
  worker-kill    SIGKILL one worker mid-epoch (--chaos-kill-step), Ray restarts the group (max_failures)
  upload-crash   rank 0 dies halfway through uploading a checkpoint (--chaos-kill-in-upload)
  driver-kill    SIGKILL the `python -m simclr_dist.pretrain` driver, then rerun the same command
  node-stop      kill the second node's raylet and workers, then rejoin a fresh node
For each: survived, epochs duplicated or skipped in the final history (must be 0), steps recomputed (bounded
by one checkpoint interval), and recovery time = when the resumed attempt had restored its checkpoint minus
when the fault happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import base_parser, machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
STEPS = 1437 // 64  # digits train split at global batch 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(runs: Path, name: str, summary: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simclr_dist.pretrain", "--dataset", "digits", "--image-size", "16",
            "--width", "0.125", "--batch-size", "64", "--num-workers", "2", "--knn-every", "-1",
            "--epochs", str(epochs), "--storage-path", str(runs), "--name", name,
            "--summary-json", str(summary), *extra]


def _wait_registered(run_dir: Path, timeout: float = 300) -> None:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if snap.exists() and json.loads(snap.read_text()).get("checkpoint_results"):
                return
        except json.JSONDecodeError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no registered checkpoint in {run_dir}")


def _row(drill: str, summary: dict, fault_at: float, fault_step: int | None, epochs: int) -> dict:
    seen = [h["epoch"] for h in summary["history"]]
    return {
        "drill": drill, "survived": seen[-1:] == [epochs],
        "epochs_duplicated": len(seen) - len(set(seen)),
        "epochs_skipped": len(set(range(1, epochs + 1)) - set(seen)),
        "resumed_from_epoch": summary["resumed_from_epoch"],
        # known exactly for the drills that fire at a step; for external kills only its bound (one interval) is
        "steps_recomputed": None if fault_step is None else max(0, fault_step - summary["resumed_from_step"]),
        "checkpoint_interval_steps": STEPS,
        "recovery_s": round(summary["attempt_started_at"] - fault_at, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = base_parser("bench.faults", "fault-injection drills on a local two-node Ray cluster")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    machine = machine_info()
    ray_port, dash_port = _free_port(), _free_port()
    script = str(ROOT / "cluster" / "local-cluster.sh")
    cenv = {**os.environ, "RAY_PORT": str(ray_port), "DASHBOARD_PORT": str(dash_port),
            "RAY": str(Path(sys.executable).parent / "ray")}
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ray_port}", "RAY_AUTH_MODE": "token"}
    subprocess.run(["bash", script, "start"], env=cenv, check=True, capture_output=True)
    rows, E = [], args.epochs
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            # worker-kill: the marker file's mtime is the moment of the kill
            kill_step = STEPS + STEPS // 2
            s = runs / "kill.json"
            subprocess.run(_cmd(runs, "kill", s, E, "--max-failures", "1", "--chaos-kill-step", str(kill_step)),
                           env=env, check=True, capture_output=True, cwd=ROOT)
            summary = json.loads(s.read_text())
            rows.append(_row("worker-kill", summary, (runs / "kill" / ".chaos-kill-done").stat().st_mtime,
                             kill_step, E))
            # upload-crash at the end of epoch 2
            s = runs / "upload.json"
            subprocess.run(_cmd(runs, "upload", s, E, "--max-failures", "1", "--chaos-kill-in-upload", "2"),
                           env=env, check=True, capture_output=True, cwd=ROOT)
            summary = json.loads(s.read_text())
            rows.append(_row("upload-crash", summary, (runs / "upload" / ".chaos-upload-done").stat().st_mtime,
                             2 * STEPS, E))
            # driver-kill: after the first registered checkpoint
            s = runs / "driver.json"
            cmd = _cmd(runs, "driver", s, E)
            p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            _wait_registered(runs / "driver")
            fault_at = time.time()
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
            summary = json.loads(s.read_text())
            rows.append(_row("driver-kill", summary, fault_at, None, E))
            # node-stop: kill node b after the first registered checkpoint, rejoin a fresh node 5 s later
            s = runs / "node.json"
            p = subprocess.Popen(_cmd(runs, "node", s, E, "--max-failures", "2"), env=env, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_registered(runs / "node")
            fault_at = time.time()
            subprocess.run(["bash", script, "stop-node"], env=cenv, check=True, capture_output=True)
            time.sleep(5)
            subprocess.run(["bash", script, "start-node"], env=cenv, check=True, capture_output=True)
            assert p.wait(timeout=900) == 0, "node-stop run failed"
            summary = json.loads(s.read_text())
            rows.append(_row("node-stop", summary, fault_at, None, E))
    finally:
        subprocess.run(["bash", script, "stop"], env=cenv, capture_output=True)
    columns = [("drill", "drill", ""), ("survived", "survived", ""), ("epochs_duplicated", "dup epochs", ""),
               ("epochs_skipped", "skipped epochs", ""), ("resumed_from_epoch", "resumed from", ""),
               ("steps_recomputed", "steps redone", ""), ("checkpoint_interval_steps", "ckpt interval", ""),
               ("recovery_s", "recovery s", ".1f")]
    write_report("faults", args.out, {"faults": (rows, columns)}, machine=machine, epochs=E)
    return 0


if __name__ == "__main__":
    sys.exit(main())
