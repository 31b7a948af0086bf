"""Fault-injection drills: a real two-node Ray cluster on this machine (cluster/local-cluster.sh), and storage
faults against real components (an S3-compatible server on loopback, a small tmpfs, damaged files, a second run).

    python -m bench.faults [cluster] [--out results/faults.json] [--epochs 3] [--every-steps 5]
    python -m bench.faults storage [--outage-s 30]     every storage drill below, in this process
    python -m bench.faults s3-outage | s3-down | disk-full | corrupt | lease     one of them
    python -m bench.faults s3-outage-ray [--outage-s 30] the S3 outage under a real pretraining run
    python -m bench.faults watcher [--minutes 20]       evaluation watcher + training + pruning under load

Cluster drills, each on a fresh 2-worker digits run; "epoch" rows checkpoint at epoch ends only (the old default),
"step" rows also every ``--every-steps`` steps (``--checkpoint-every-steps``), so each fault's cost is measured
before and after mid-epoch checkpoints:
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

Storage drills (each returns one row: survived, steps of data lost, recovery seconds, and what it checked):
  s3-outage      moto's S3 server on loopback stopped right after a checkpoint's weights landed and before its
                 manifest, restarted ``--outage-s`` later: training steps go on meanwhile, the upload is retried
                 with backoff, the checkpoint is not complete during the outage, it and the next one land after
  s3-down        the server stops and stays down: the upload ends in one line after the retry budget
                 (SIMCLR_STORAGE_RETRY_S), and the last complete checkpoint is intact once the server is back
  disk-full      a 4 MB tmpfs as storage: the save that does not fit fails in one line naming the intact previous
                 checkpoint, its partial files are removed, and once space is freed the resume takes the previous
  corrupt        the newest checkpoint truncated, then bit-flipped: the resume falls back to the newest complete
                 one in one line naming the bad one; no file is deleted
  lease          two writers of one run: the second is refused in one line; a writer SIGKILLed while holding the
                 lease is taken over by its successor once the lease expires
  watcher        (--minutes) a real pretraining run checkpointing every few seconds with --num-to-keep 2 and
                 `evaluate --watch` on it: every checkpoint that became complete is evaluated exactly once or was
                 pruned before its evaluation; no checksum mismatch (partial file) is ever read
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


# ---------------------------------------------------------------------------- storage drills (real components)
DRILL_BUCKET = "simclr-drill"


def drill_state(step: int, *, epoch: int = 0, kib: int = 256) -> dict:
    """A pretraining-shaped checkpoint state of about ``kib`` KiB of weights (what the checkpoint code writes and
    verifies; the size is what matters to a disk, not what the weights mean)."""
    import torch

    gen = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(kib * 256, generator=gen)}, "optimizer": {}, "scaler": {},
            "config": {"epochs": 3, "dataset": "digits"}, "epoch": epoch, "step": step, "history": []}


def upload_state(run_uri: str, name: str, state: dict, *, previous: str | None = None, log=lambda m: None) -> float:
    """Serialise and upload ``state`` as ``RUN/name`` through the checkpoint uploader Ray Train calls (weights
    first, manifest last, each file retried); returns the seconds it took."""
    import ray.train

    from simclr_dist.run.store.checkpoint import make_uploader

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="simclr-drill-") as local:
        make_uploader(run_uri, state=state, previous=previous, log=log)(
            ray.train.Checkpoint.from_directory(local), name)
    return time.monotonic() - t0


class S3Server:
    """moto's S3 server on a loopback port, in this process so that stopping it (its socket closes: clients get
    'connection refused') and starting it again keeps the buckets, as a restarted S3-compatible store does. The
    AWS_* variables point pyarrow and boto3 at it while it is in use."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.server = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> S3Server:
        env = {"AWS_ACCESS_KEY_ID": "drill", "AWS_SECRET_ACCESS_KEY": "drill", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.start()
        import boto3
        boto3.client("s3").create_bucket(Bucket=DRILL_BUCKET)
        return self

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train_meanwhile(stop: threading.Event, steps: list[float]) -> None:
    """A real (tiny) training loop in its own thread, as the training thread of a worker goes on while Ray's upload
    thread retries: one SGD step of a small MLP per iteration, the time of each step appended to ``steps``."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    while not stop.is_set():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        steps.append(time.monotonic())
        time.sleep(0.01)


def s3_outage(outage_s: float = 30.0) -> dict:
    """moto stopped between a checkpoint's weights and its manifest, restarted ``outage_s`` later."""
    from simclr_dist import storage
    from simclr_dist.run.store.checkpoint import list_complete_checkpoints, load_checkpoint

    lines: list[str] = []
    with S3Server() as s3:
        run = f"s3://{DRILL_BUCKET}/runs/outage"
        upload_state(run, "checkpoint_1", drill_state(10))
        real_write, marks = storage.write_bytes, {}

        def stop_after_weights(uri: str, data: bytes) -> None:  # the store goes away in the middle of the upload
            real_write(uri, data)
            if uri.endswith("/checkpoint_2/checkpoint.pt") and "stopped" not in marks:
                s3.stop()
                marks["stopped"] = time.monotonic()
                threading.Timer(outage_s, lambda: (s3.start(), marks.setdefault("restarted", time.monotonic()))).start()

        steps: list[float] = []
        stop = threading.Event()
        trainer = threading.Thread(target=_train_meanwhile, args=(stop, steps), daemon=True)
        trainer.start()
        storage.write_bytes = stop_after_weights
        try:
            upload_state(run, "checkpoint_2", drill_state(20), previous="checkpoint_1", log=lines.append)
        finally:
            storage.write_bytes = real_write
        landed = time.monotonic()
        stop.set()
        trainer.join()
        refs = {r.name: r for r in list_complete_checkpoints(run)}
        upload_state(run, "checkpoint_3", drill_state(30), previous="checkpoint_2")  # the next one, after
        after = [r.name for r in list_complete_checkpoints(run)]
        load_checkpoint(f"{run}/checkpoint_2")  # every byte: the checksum of the manifest matches
    outage = (marks["stopped"], marks["restarted"])
    return {"drill": "s3-outage", "fault": f"S3 server stopped {outage_s:g} s mid-upload (weights in, manifest not)",
            "survived": refs.keys() == {"checkpoint_1", "checkpoint_2"} and after[-1] == "checkpoint_3",
            "steps_lost": 0, "recovery_s": round(landed - outage[1], 1),
            "upload_s": round(landed - outage[0], 1),
            "training_steps_during_outage": sum(outage[0] <= t <= outage[1] for t in steps),
            "registered_before_restart": landed < outage[1], "lines": lines}


def s3_down(budget_s: float = 20.0) -> dict:
    """The server stops and stays down: one line after the retry budget; the last complete checkpoint survives."""
    from simclr_dist import storage
    from simclr_dist.run.store.checkpoint import list_complete_checkpoints, load_checkpoint

    with S3Server() as s3:
        run = f"s3://{DRILL_BUCKET}/runs/down"
        upload_state(run, "checkpoint_1", drill_state(10))
        s3.stop()
        old = os.environ.get(storage.RETRY_ENV)
        os.environ[storage.RETRY_ENV] = str(budget_s)
        t0, error = time.monotonic(), None
        try:
            upload_state(run, "checkpoint_2", drill_state(20), previous="checkpoint_1")
        except storage.StorageError as e:
            error = str(e)
        finally:
            if old is None:
                os.environ.pop(storage.RETRY_ENV)
            else:
                os.environ[storage.RETRY_ENV] = old
        ended_after = time.monotonic() - t0
        s3.start()  # back, to see what storage kept
        t1 = time.monotonic()
        kept = [r.name for r in list_complete_checkpoints(run)]
        load_checkpoint(f"{run}/checkpoint_1")
        resume_s = time.monotonic() - t1
    return {"drill": "s3-down", "fault": f"S3 server stopped for good (retry budget {budget_s:g} s)",
            "survived": error is not None and kept == ["checkpoint_1"], "steps_lost": 10,
            "recovery_s": round(resume_s, 1), "ended_after_s": round(ended_after, 1), "error": error}


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; the reason when this machine does not allow it (not root, a
    container without CAP_SYS_ADMIN), else None."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    return None if out.returncode == 0 else f"mount -t tmpfs not allowed here: {(out.stderr or out.stdout).strip()}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def disk_full(root: Path | None = None) -> dict:
    """A 4 MB tmpfs as storage: a save that does not fit fails in one line, the previous checkpoint stays intact,
    and the resume after space is freed takes it."""
    from simclr_dist import storage
    from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE, latest_checkpoint, load_checkpoint

    root = Path(tempfile.mkdtemp(prefix="simclr-tmpfs-")) if root is None else root
    why = _mount_tmpfs(root, "4m")
    if why:
        return {"drill": "disk-full", "skipped": why}
    try:
        run = str(root / "runs" / "full")
        upload_state(run, "checkpoint_1", drill_state(10, kib=1024))          # ~1 MB: fits
        filler = root / "filler"
        st = os.statvfs(root)
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 2**19))        # others fill it: 512 KiB left
        error = None
        try:
            upload_state(run, "checkpoint_2", drill_state(20, kib=1024), previous="checkpoint_1")
        except storage.StorageFullError as e:
            error = str(e)
        leftovers = sorted(p.name for p in (root / "runs" / "full").iterdir())
        intact = load_checkpoint(f"{run}/checkpoint_1")["step"] == 10
        filler.unlink()                                                       # space freed: the rerun
        t0 = time.monotonic()
        resumed = load_checkpoint(latest_checkpoint(run))["step"]
        resume_s = time.monotonic() - t0
        upload_state(run, "checkpoint_2", drill_state(20, kib=1024), previous="checkpoint_1")
        saved_after = (root / "runs" / "full" / "checkpoint_2" / CHECKPOINT_FILE).exists()
    finally:
        _umount(root)
        shutil.rmtree(root, ignore_errors=True)
    return {"drill": "disk-full", "fault": "tmpfs of 4 MB full during a save", "survived":
            error is not None and intact and resumed == 10 and saved_after, "steps_lost": 10,
            "recovery_s": round(resume_s, 2), "leftovers": leftovers, "error": error}


def corrupt(root: Path | None = None) -> dict:
    """The newest of three checkpoints truncated, then (restored and) bit-flipped: each resume falls back to the
    next newest in one line naming the bad one, and no file is deleted."""
    import ray.train

    from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE
    from simclr_dist.run.train.resume import load_resumable

    root = Path(tempfile.mkdtemp(prefix="simclr-corrupt-")) if root is None else root
    run = str(root / "runs" / "damaged")
    for i in (1, 2, 3):
        upload_state(run, f"checkpoint_{i}", drill_state(10 * i))
    newest = root / "runs" / "damaged" / "checkpoint_3" / CHECKPOINT_FILE
    good = newest.read_bytes()
    rows = []
    for how, bad in (("truncated", good[: len(good) // 2]),
                     ("bit-flipped", good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:])):
        newest.write_bytes(bad)
        files_before = sorted(str(p) for p in (root / "runs").rglob("*"))
        lines: list[str] = []
        t0 = time.monotonic()
        state, where = load_resumable(ray.train.Checkpoint.from_directory(str(newest.parent)), run, log=lines.append)
        took = time.monotonic() - t0
        files_after = sorted(str(p) for p in (root / "runs").rglob("*"))
        rows.append({"drill": f"corrupt-{how}", "fault": f"newest checkpoint {how}",
                     "survived": state["step"] == 20 and where.endswith("checkpoint_2") and len(lines) == 1
                     and "checkpoint_3" in lines[0], "steps_lost": 10, "recovery_s": round(took, 2),
                     "nothing_deleted": files_before == files_after and newest.read_bytes() == bad, "lines": lines})
        newest.write_bytes(good)
    shutil.rmtree(root, ignore_errors=True)
    return {"drill": "corrupt", "rows": rows}


_HOLD_LEASE = """
import sys, time
from simclr_dist import storage
storage.Lease(sys.argv[1], ttl_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def lease(ttl_s: float = 6.0) -> dict:
    """A run leased by a live writer refuses a second; a writer SIGKILLed with the lease is succeeded after expiry."""
    from simclr_dist import storage

    rows = []
    with S3Server():
        for where in (f"s3://{DRILL_BUCKET}/runs/leased", str(Path(tempfile.mkdtemp(prefix="simclr-lease-")))):
            holder = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, where, str(ttl_s)], cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert holder.stdout.readline().strip() == "held"
            refused = None
            try:
                storage.Lease(where, ttl_s=ttl_s).acquire()
            except storage.LeaseError as e:
                refused = str(e)
            holder.kill()                                                   # the first writer crashes
            holder.wait()
            crashed_at = time.monotonic()
            while True:                                                     # its successor retries until it may
                try:
                    successor = storage.Lease(where, ttl_s=ttl_s).acquire()
                    break
                except storage.LeaseError:
                    time.sleep(0.5)
            takeover_s = time.monotonic() - crashed_at
            third = None
            try:
                storage.Lease(where, ttl_s=ttl_s).acquire()
            except storage.LeaseError as e:
                third = str(e)
            successor.release()
            if not where.startswith("s3://"):
                shutil.rmtree(where, ignore_errors=True)
            rows.append({"drill": f"lease-{'s3' if where.startswith('s3://') else 'local'}",
                         "fault": "second run of one storage path and name; first writer SIGKILLed",
                         "survived": refused is not None and third is not None, "steps_lost": 0,
                         "recovery_s": round(takeover_s, 1), "refusal": refused})
    return {"drill": "lease", "rows": rows}


def watcher_load(minutes: float = 20.0, every_steps: int = 10, keep: int = 2) -> dict:
    """A real pretraining run (its own local Ray, 2 workers) checkpointing every ``every_steps`` steps (a few
    seconds) with ``--num-to-keep keep`` for ``minutes``, and ``evaluate --watch`` on it. An observer lists the
    complete checkpoints every 0.2 s (shorter than any checkpoint lives), so it sees every one that became
    complete. Afterwards each must be in the watcher's index exactly once, or have been pruned before its
    evaluation; a watcher line reporting a checksum mismatch or a truncated file would be a partial file read."""
    from simclr_dist.run.eval.store import read_index

    runs = Path(tempfile.mkdtemp(prefix="simclr-watch-"))
    run, name = runs / "watch", "watch"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    env.pop("RAY_ADDRESS", None)
    train_log, watch_log = open(runs / "train.log", "w"), open(runs / "watch.log", "w")
    train = subprocess.Popen(_cmd(runs, name, runs / "summary.json", 10_000, every_steps, "--num-to-keep", str(keep),
                                  "--log-every", "10"),
                             env=env, cwd=ROOT, stdout=train_log, stderr=subprocess.STDOUT, start_new_session=True)
    ev = [sys.executable, "-m", "simclr_dist.evaluate", "--run", str(run), "--watch", "--interval", "1",
          "--protocols", "knn", "--threads", "1"]
    watch = subprocess.Popen(ev, env=env, cwd=ROOT, stdout=watch_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    seen: dict[str, float] = {}
    gone: dict[str, float] = {}
    start, stop_at = time.time(), time.time() + 300 + minutes * 60  # until the first checkpoint: Ray starting
    try:
        while time.time() < stop_at and train.poll() is None:
            now = {r.name for r in _complete_quietly(str(run))}
            if now and not seen:  # the clock of the drill starts with training's first checkpoint
                start, stop_at = time.time(), time.time() + minutes * 60
            for n in now - seen.keys():
                seen[n] = time.time()
            for n in set(seen) - now - set(gone):
                gone[n] = time.time()
            time.sleep(0.2)
        trained_s = time.time() - start
        crashed = train.poll() is not None
        os.killpg(train.pid, signal.SIGINT)  # the driver shuts its local Ray down on the way out
        try:
            train.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(train.pid, signal.SIGKILL)
            train.wait()
        deadline = time.time() + 120  # the watcher catches up with what is left (at most ``keep`` checkpoints)
        while time.time() < deadline:
            now = {r.name for r in _complete_quietly(str(run))}
            for n in now - seen.keys():
                seen[n] = time.time()
            done = {e["checkpoint"] for e in read_index(str(run), log=lambda m: None)}
            if now <= done:
                break
            time.sleep(1)
    finally:
        for p in (train, watch):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        train_log.close()
        watch_log.close()
    entries = read_index(str(run), log=lambda m: None)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["checkpoint"]] = counts.get(e["checkpoint"], 0) + 1
    alive = {r.name for r in _complete_quietly(str(run))}
    pruned = sorted(n for n in seen if n not in counts and n not in alive)
    unaccounted = sorted(n for n in seen if n not in counts and n in alive)
    text = (runs / "watch.log").read_text()
    partial = sum(("checksum mismatch" in line or "truncated" in line) for line in text.splitlines())
    row = {"drill": "watcher-load", "fault": f"watch + train + prune (keep {keep}) for {minutes:g} min",
           "minutes": round(trained_s / 60, 1), "checkpoints_seen": len(seen), "evaluated_once": sum(
               c == 1 for c in counts.values()), "evaluated_twice": sum(c - 1 for c in counts.values()),
           "pruned_before_evaluation": len(pruned), "unaccounted": unaccounted, "partial_reads": partial,
           "training_crashed": crashed, "steps_lost": 0, "recovery_s": 0.0}
    row["survived"] = (not crashed and not unaccounted and row["evaluated_twice"] == 0 and partial == 0
                       and len(seen) >= 3)
    if row["survived"]:
        shutil.rmtree(runs, ignore_errors=True)
    else:
        row["logs"] = str(runs)
    return row


def _complete_quietly(run: str) -> list:
    """The run's complete checkpoints; [] while a listing races a deletion (an observer must not crash on it)."""
    from simclr_dist.run.store.checkpoint import list_complete_checkpoints

    try:
        return list_complete_checkpoints(run)
    except OSError:
        return []


def s3_outage_ray(outage_s: float = 30.0, epochs: int = 4, every_steps: int = 10) -> dict:
    """The S3 outage under a real pretraining run (its own local Ray, 2 workers, checkpoints on moto's S3 every
    ``every_steps`` steps): the server stops as soon as the first checkpoint is complete and starts again
    ``outage_s`` later; the run must finish with every epoch once and no worker restart (``resumed_from_step`` 0:
    no step lost), and a new checkpoint must land after the outage (recovery = its time - the restart)."""
    runs = Path(tempfile.mkdtemp(prefix="simclr-s3ray-"))
    with S3Server() as s3:
        run = f"s3://{DRILL_BUCKET}/runs/outage-ray"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        env.pop("RAY_ADDRESS", None)
        log = open(runs / "train.log", "w")
        cmd = _cmd(runs, "outage-ray", runs / "summary.json", epochs, every_steps)
        cmd[cmd.index("--storage-path") + 1] = f"s3://{DRILL_BUCKET}/runs"
        train = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while not _complete_quietly(run) and time.time() < deadline and train.poll() is None:
                time.sleep(0.2)
            before = {r.name for r in _complete_quietly(run)}
            s3.stop()
            stopped = time.time()
            time.sleep(outage_s)
            s3.start()
            restarted = time.time()
            landed = None
            while train.poll() is None or landed is None:
                names = {r.name for r in _complete_quietly(run)}
                if names - before and landed is None:
                    landed = time.time()
                if train.poll() is not None and landed is None:
                    break
                time.sleep(0.2)
            code = train.wait(timeout=900)
        finally:
            if train.poll() is None:
                train.kill()
            log.close()
    summary = json.loads((runs / "summary.json").read_text()) if (runs / "summary.json").exists() else {}
    seen = [h["epoch"] for h in summary.get("history", [])]
    row = {"drill": "s3-outage-ray", "fault": f"S3 server stopped {outage_s:g} s under a real 2-worker run",
           "survived": code == 0 and seen == list(range(1, epochs + 1)) and landed is not None,
           "steps_lost": summary.get("resumed_from_step"), "stopped_s": round(restarted - stopped, 1),
           "recovery_s": None if landed is None else round(landed - restarted, 1), "exit_code": code}
    if row["survived"]:
        shutil.rmtree(runs, ignore_errors=True)
    else:
        row["logs"] = str(runs)
    return row


def storage_rows(outage_s: float) -> list[dict]:
    """Every in-process storage drill, one row each (skipped ones say why)."""
    rows = [s3_outage(outage_s), s3_down()]
    rows.append(disk_full())
    rows += corrupt()["rows"]
    rows += lease()["rows"]
    return rows


DRILLS = ("cluster", "storage", "s3-outage", "s3-outage-ray", "s3-down", "disk-full", "corrupt", "lease", "watcher")
STORAGE_COLUMNS = [("drill", "drill", ""), ("fault", "fault", ""), ("survived", "survived", ""),
                   ("steps_lost", "data lost (steps)", ""), ("recovery_s", "recovery s", ""),
                   ("skipped", "skipped", "")]


def storage_drill(drill: str, args) -> list[dict]:
    """The rows of one storage drill (``storage``: all but the watcher)."""
    if drill == "storage":
        return storage_rows(args.outage_s)
    if drill == "s3-outage":
        return [s3_outage(args.outage_s)]
    if drill == "s3-outage-ray":
        return [s3_outage_ray(args.outage_s)]
    if drill == "s3-down":
        return [s3_down()]
    if drill == "disk-full":
        return [disk_full()]
    if drill in ("corrupt", "lease"):
        return (corrupt if drill == "corrupt" else lease)()["rows"]
    return [watcher_load(args.minutes)]


def main(argv: list[str] | None = None) -> int:
    ap = base_parser("bench.faults", "fault-injection drills: a local two-node Ray cluster, and storage faults")
    ap.add_argument("drill", nargs="?", default="cluster", choices=DRILLS, help="which drills (default: cluster)")
    ap.add_argument("--outage-s", type=float, default=30.0, help="s3-outage: how long the S3 server is stopped")
    ap.add_argument("--minutes", type=float, default=20.0, help="watcher: how long training runs under the watcher")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every-steps", type=int, default=5, help="--checkpoint-every-steps of the 'step' rows")
    ap.add_argument("--cost-only", action="store_true", help="only the in-process checkpoint cost table (no cluster)")
    ap.add_argument("--report-interval", type=float, default=0.2,
                    help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S of the cluster (how often Ray takes a report)")
    args = ap.parse_args(argv)
    machine = machine_info()
    cost_cols = [("what", "checkpoint cost", ""), ("seconds", "seconds", ".4f")]
    if args.drill != "cluster":
        rows = storage_drill(args.drill, args)
        write_report(f"faults-{args.drill}", args.out, {"storage": (rows, STORAGE_COLUMNS)}, machine=machine)
        return 0 if all(r.get("survived") or "skipped" in r for r in rows) else 1
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
