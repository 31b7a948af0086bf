"""Fault-injection table on a real two-node Ray cluster on this machine (cluster/local-cluster.sh).

    python -m bench.faults [--out results/faults.json] [--epochs 3] [--every-steps 5]

Drills, each on a fresh 2-worker digits run; "epoch" rows checkpoint at epoch ends only (the old default), "step"
rows also every ``--every-steps`` steps (``--checkpoint-every-steps``), so each fault's cost is measured before and
after mid-epoch checkpoints:
  worker-kill    SIGKILL one worker mid-epoch (--chaos-kill-step), Ray restarts the group (max_failures)
  upload-crash   rank 0 dies halfway through uploading epoch 2's checkpoint (--chaos-kill-in-upload)
  driver-kill    SIGKILL the `python -m simclr_dist.pretrain` driver, then rerun the same command
  node-stop      kill the second node's raylet and workers, then rejoin a fresh node
  watcher        `evaluate --watch` SIGKILLed after its first result and restarted, while training prunes old
                 checkpoints (--num-to-keep 1): results kept (index) vs what results-inside-checkpoints would keep
For each training drill: survived, epochs duplicated or skipped in the final history (must be 0), the step it
resumed from, steps recomputed (known for the drills that fire at a step) and recovery time = when the resumed
attempt had restored its checkpoint minus when the fault happened. The last table is what a step checkpoint
costs the training thread (seconds blocked per save in the runs, and in this process the in-memory copy) against
serialising and uploading the same state synchronously, as every save did before; ``--cost-only`` runs just that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
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


def _cmd(runs: Path, name: str, summary: Path, epochs: int, every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simclr_dist.pretrain", "--dataset", "digits", "--image-size", "16",
            "--width", "0.125", "--batch-size", "64", "--num-workers", "2", "--knn-every", "-1",
            "--epochs", str(epochs), "--storage-path", str(runs), "--name", name,
            "--checkpoint-every-steps", str(every), "--summary-json", str(summary), *extra]


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


def _row(drill: str, every: int, summary: dict, fault_at: float, fault_step: int | None, epochs: int) -> dict:
    seen = [h["epoch"] for h in summary["history"]]
    return {
        "drill": drill, "checkpoints": f"every {every} steps" if every else "epoch ends",
        "survived": seen[-1:] == [epochs], "epochs_duplicated": len(seen) - len(set(seen)),
        "epochs_skipped": len(set(range(1, epochs + 1)) - set(seen)),
        "resumed_from_step": summary["resumed_from_step"],
        # known exactly for the drills that fire at a step; for external kills only its bound (one interval) is
        "steps_recomputed": None if fault_step is None else max(0, fault_step - summary["resumed_from_step"]),
        "checkpoint_interval_steps": every or STEPS,
        "recovery_s": round(summary["attempt_started_at"] - fault_at, 1),
        "blocked_s_per_save": statistics.median(summary["checkpoint_blocked_s"] or [float("nan")]),
    }


def _run(cmd: list[str], env: dict) -> None:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed:\n{(out.stdout + out.stderr)[-3000:]}")


def worker_kill(runs: Path, env: dict, E: int, every: int) -> dict:
    name, kill_step = f"kill-{every}", STEPS + STEPS // 2
    s = runs / f"{name}.json"
    _run(_cmd(runs, name, s, E, every, "--max-failures", "1", "--chaos-kill-step", str(kill_step)), env)
    marker = runs / name / ".chaos-kill-done"  # "done at step N": later than asked if a checkpoint was deferred
    return _row("worker-kill", every, json.loads(s.read_text()), marker.stat().st_mtime,
                int(marker.read_text().split()[-1]), E)


def upload_crash(runs: Path, env: dict, E: int, every: int) -> dict:
    name = f"upload-{every}"
    s = runs / f"{name}.json"
    _run(_cmd(runs, name, s, E, every, "--max-failures", "1", "--chaos-kill-in-upload", "2"), env)
    return _row("upload-crash", every, json.loads(s.read_text()),
                (runs / name / ".chaos-upload-done").stat().st_mtime, 2 * STEPS, E)


def driver_kill(runs: Path, env: dict, E: int, every: int) -> dict:
    name = f"driver-{every}"
    s = runs / f"{name}.json"
    cmd = _cmd(runs, name, s, E, every)
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    _wait_registered(runs / name)
    fault_at = time.time()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(5)  # let the cluster reap the orphaned controller and workers
    _run(cmd, env)
    return _row("driver-kill", every, json.loads(s.read_text()), fault_at, None, E)


def node_stop(runs: Path, env: dict, cenv: dict, script: str, E: int, every: int) -> dict:
    name = f"node-{every}"
    s = runs / f"{name}.json"
    p = subprocess.Popen(_cmd(runs, name, s, E, every, "--max-failures", "2"), env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_registered(runs / name)
    fault_at = time.time()
    subprocess.run(["bash", script, "stop-node"], env=cenv, check=True, capture_output=True)
    time.sleep(5)
    subprocess.run(["bash", script, "start-node"], env=cenv, check=True, capture_output=True)
    assert p.wait(timeout=900) == 0, "node-stop run failed"
    return _row("node-stop", every, json.loads(s.read_text()), fault_at, None, E)


def watcher(runs: Path, env: dict, E: int) -> dict:
    """Training with --num-to-keep 1 and an evaluator watching it, SIGKILLed after its first result, restarted."""
    from simclr_dist.run.eval.store import read_index

    name = "watch"
    run = runs / name
    train = subprocess.Popen(_cmd(runs, name, runs / "watch.json", E, 0, "--num-to-keep", "1"), env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ev = [sys.executable, "-m", "simclr_dist.evaluate", "--run", str(run), "--watch", "--interval", "1",
          "--protocols", "knn", "--threads", "1", "--watch-until-epoch", str(E)]
    w = subprocess.Popen(ev, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 600
    while not read_index(str(run), log=lambda m: None) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(w.pid, signal.SIGKILL)
    w.wait()
    restarted = subprocess.run(ev, env=env, cwd=ROOT, capture_output=True, text=True)
    assert train.wait(timeout=900) == 0 and restarted.returncode == 0, restarted.stderr[-2000:]
    entries = read_index(str(run), log=lambda m: None)
    evaluated = {e["checkpoint"] for e in entries}
    alive = {p.name for p in run.glob("checkpoint_*")}
    return {"drill": "watcher-restart", "checkpoints": "epoch ends, num_to_keep 1",
            "checkpoints_evaluated": len(evaluated), "results_kept_inside_checkpoints": len(evaluated & alive),
            "results_kept_index": len(entries), "evaluated_twice": len(entries) - len(evaluated)}


def state_costs(what: str, state: dict, repeats: int = 3) -> list[dict]:
    """In this process: median seconds of the in-memory copy a save holds training for, and of serialising and
    uploading the same state to local storage in the calling thread (what every save did before)."""
    import ray.train

    from simclr_dist.run.store.checkpoint import make_uploader, plain, save_checkpoint

    copy_s, save_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            t0 = time.perf_counter()
            plain(state, copy=True)
            copy_s.append(time.perf_counter() - t0)
            local = Path(tmp) / f"local{i}"
            t0 = time.perf_counter()
            save_checkpoint(str(local), state)
            make_uploader(str(Path(tmp) / "store"))(ray.train.Checkpoint.from_directory(str(local)), f"c{i}")
            save_s.append(time.perf_counter() - t0)
    return [{"what": f"{what}: in-memory copy (what a save now holds training for)", "seconds": statistics.median(copy_s)},
            {"what": f"{what}: serialise + upload to local disk in the training thread (before)",
             "seconds": statistics.median(save_s)}]


def cost_rows() -> list[dict]:
    """The copy vs the synchronous save for the digits state and an ImageNet-size one (ResNet-50, LARS momentum)."""
    import torch

    from simclr_dist.config import PretrainConfig
    from simclr_dist.core.optim import build_optimizer
    from simclr_dist.run.store.weights import build_model

    rows = []
    for what, cfg in (("digits r18 x0.125", PretrainConfig(dataset="digits", image_size=16, width=0.125)),
                      ("imagenet r50 x1", PretrainConfig(dataset="imagenet", arch="resnet50"))):
        cfg = cfg.resolved()
        model = build_model(cfg)
        opt = build_optimizer(model, "lars", 0.1, weight_decay=1e-6, momentum=0.9)
        model(torch.randn(2, 3, 32, 32))[1].sum().backward()
        opt.step()  # momentum buffers exist, as in a real checkpoint
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1, "step": 1,
                 "config": cfg.to_dict(), "history": []}
        rows += state_costs(what, state)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = base_parser("bench.faults", "fault-injection drills on a local two-node Ray cluster")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every-steps", type=int, default=5, help="--checkpoint-every-steps of the 'step' rows")
    ap.add_argument("--cost-only", action="store_true", help="only the in-process checkpoint cost table (no cluster)")
    ap.add_argument("--report-interval", type=float, default=0.2,
                    help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S of the cluster (how often Ray takes a report)")
    args = ap.parse_args(argv)
    machine = machine_info()
    cost_cols = [("what", "checkpoint cost", ""), ("seconds", "seconds", ".4f")]
    if args.cost_only:
        write_report("faults-cost", args.out, {"checkpoint_cost": (cost_rows(), cost_cols)}, machine=machine)
        return 0
    ray_port, dash_port = _free_port(), _free_port()
    script = str(ROOT / "cluster" / "local-cluster.sh")
    cenv = {**os.environ, "RAY_PORT": str(ray_port), "DASHBOARD_PORT": str(dash_port),
            "RAY": str(Path(sys.executable).parent / "ray"),
            # Ray Train's controller takes one report per poll (default 2 s); digits steps take ~0.1 s, so at the
            # default most checkpoints every 5 steps would be deferred (docs/cluster.md "Checkpoints, resume and failures")
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(args.report_interval)}
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ray_port}", "RAY_AUTH_MODE": "token"}
    subprocess.run(["bash", script, "start"], env=cenv, check=True, capture_output=True)
    rows, E, N = [], args.epochs, args.every_steps
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            for every in (0, N):
                rows.append(worker_kill(runs, env, E, every))
                rows.append(upload_crash(runs, env, E, every))
            rows.append(driver_kill(runs, env, E, 0))
            rows.append(node_stop(runs, env, cenv, script, E, 0))
            watch_row = watcher(runs, env, E)
            step_saves = [r["blocked_s_per_save"] for r in rows if r["checkpoints"] != "epoch ends"]
            cost = [{"what": "digits, in the runs above: blocked per save (copy + ray.train.report)",
                     "seconds": statistics.median(step_saves)}, *cost_rows()]
    finally:
        subprocess.run(["bash", script, "stop"], env=cenv, capture_output=True)
    columns = [("drill", "drill", ""), ("checkpoints", "checkpoints", ""), ("survived", "survived", ""),
               ("epochs_duplicated", "dup epochs", ""), ("epochs_skipped", "skipped epochs", ""),
               ("resumed_from_step", "resumed from step", ""), ("steps_recomputed", "steps redone", ""),
               ("checkpoint_interval_steps", "ckpt interval", ""), ("recovery_s", "recovery s", ".1f")]
    watch_cols = [("drill", "drill", ""), ("checkpoints", "checkpoints", ""),
                  ("checkpoints_evaluated", "evaluated", ""),
                  ("results_kept_inside_checkpoints", "kept inside checkpoint dirs (before)", ""),
                  ("results_kept_index", "kept in eval/index.jsonl (after)", ""),
                  ("evaluated_twice", "evaluated twice", "")]
    write_report("faults", args.out, {"faults": (rows, columns), "watcher": ([watch_row], watch_cols),
                                      "checkpoint_cost": (cost, cost_cols)},
                 machine=machine, epochs=E, every_steps=N, report_interval_s=args.report_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
