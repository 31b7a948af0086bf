"""Storage fault drills against real components (issue 24): an S3-compatible server on loopback (moto) that stops
in the middle of a checkpoint upload, a real tmpfs that fills up, damaged checkpoint files, two writers of one run,
and an evaluation watcher beside training that prunes. The drills themselves live in ``bench.faults`` (the same
code measures the table in docs/cluster.md); these tests assert what each must guarantee.

The default suite drives the checkpoint/storage layer in-process (the uploader Ray Train calls, the resume's
fallback, the lease); the ``drill`` tests (``make test-cluster``, CI's second stage) run the same faults under real
pretraining runs (on the session's Ray, or their own local Ray where the workers need the S3 server's address);
the watcher under load is ``slow``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import faults
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import latest_checkpoint, list_complete_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- retry with backoff (unit)
def test_retry_backs_off_then_succeeds_and_says_so():
    calls, waits, lines = [], [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise OSError("AWS Error NETWORK_CONNECTION: Could not connect to server")
        return "ok"

    assert storage.retry(flaky, "upload x", budget_s=60, log=lines.append, sleep=waits.append) == "ok"
    assert waits == [1.0, 2.0, 4.0]                       # exponential backoff
    assert len(lines) == 2 and "retrying" in lines[0] and "after 4 attempts" in lines[1]


def test_retry_gives_up_in_one_line_and_never_retries_a_full_disk():
    def down() -> None:
        raise OSError("Could not connect to server")

    with pytest.raises(storage.StorageError) as e:
        storage.retry(down, "upload y", budget_s=0.5, sleep=lambda s: None, first_wait_s=0.2)
    assert "\n" not in str(e.value) and "upload y: storage unreachable" in str(e.value)

    calls = []

    def full() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        storage.retry(full, "upload z", budget_s=60, sleep=lambda s: None)
    assert calls == [1]


# ---------------------------------------------------------------------------- S3 server stopped mid-upload
@pytest.mark.drill  # CI's second stage (make test-cluster): the outage lasts 30 s by definition
def test_s3_stopped_mid_upload_for_30s_upload_retried_training_goes_on():
    row = faults.s3_outage(outage_s=30)
    assert row["survived"], row
    assert row["training_steps_during_outage"] > 100          # the training thread never waited for storage
    assert not row["registered_before_restart"]               # complete (manifest in) only after every byte landed
    assert row["upload_s"] >= 30 and row["recovery_s"] < 20   # retried through the outage, then landed promptly
    assert any("retrying with backoff" in line for line in row["lines"])


def test_s3_that_stays_down_ends_in_one_line_after_a_bounded_wait():
    row = faults.s3_down(budget_s=5)
    assert row["survived"], row
    err = row["error"]
    assert "\n" not in err and "checkpoint at step 20 not saved" in err and "checkpoint_1 is intact" in err
    assert "storage unreachable" in err
    assert row["ended_after_s"] < 5 + 45                      # budget + one pyarrow attempt + removing the partial


# ---------------------------------------------------------------------------- a real small filesystem
def test_full_tmpfs_keeps_the_previous_checkpoint_and_says_so():
    row = faults.disk_full()
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert row["survived"], row
    assert row["leftovers"] == ["checkpoint_1"]               # the failed save's partial files are gone
    err = row["error"]
    assert "\n" not in err and "No space left on device" in err and "checkpoint_1 is intact" in err


# ---------------------------------------------------------------------------- damaged newest checkpoint
def test_corrupt_newest_checkpoint_resume_falls_back_and_deletes_nothing():
    rows = faults.corrupt()["rows"]
    assert [r["drill"] for r in rows] == ["corrupt-truncated", "corrupt-bit-flipped"]
    for r in rows:
        assert r["survived"] and r["nothing_deleted"], r
    assert "truncated" in rows[0]["lines"][0] and "checksum mismatch" in rows[1]["lines"][0]


def test_no_loadable_checkpoint_is_one_line(tmp_path):
    import ray.train

    from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE, CheckpointError
    from simclr_dist.run.train.resume import load_resumable

    run = str(tmp_path / "run")
    faults.upload_state(run, "checkpoint_1", faults.drill_state(10))
    path = tmp_path / "run" / "checkpoint_1" / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        load_resumable(ray.train.Checkpoint.from_directory(str(path.parent)), run)
    assert "\n" not in str(e.value) and "no checkpoint loads: checkpoint_1" in str(e.value)
    assert path.exists()


# ---------------------------------------------------------------------------- one writer per run
def test_second_writer_refused_crashed_writer_taken_over_after_expiry():
    rows = faults.lease(ttl_s=4)["rows"]
    assert [r["drill"] for r in rows] == ["lease-s3", "lease-local"]
    for r in rows:
        assert r["survived"], r
        assert "\n" not in r["refusal"] and "one writer per run" in r["refusal"]
        assert 2 <= r["recovery_s"] <= 4 + 5                  # not before the lease expired, soon after it


@pytest.mark.ray
def test_pretrain_of_a_run_leased_by_another_writer_is_refused_in_one_line(ray_cluster, tiny_args, tmp_path, capsys):
    from simclr_dist import pretrain

    run = tmp_path / "runs" / "leased"
    holder = subprocess.Popen([sys.executable, "-c", faults._HOLD_LEASE, str(run), "60"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert pretrain.main(tiny_args("leased", "--epochs", "1")) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being written by another run" in err[0] and "one writer per run" in err[0]
    assert not list(run.glob("checkpoint_*"))                 # the second run wrote no checkpoint


def test_lease_is_renewed_while_held_and_released_at_the_end(tmp_path):
    lease = storage.Lease(str(tmp_path), ttl_s=1.5, settle_s=0).acquire()
    first = lease.holder()["expires_at"]
    import time
    time.sleep(1.2)
    assert lease.holder()["expires_at"] > first              # renewed every ttl/3
    with pytest.raises(storage.LeaseError):
        storage.Lease(str(tmp_path), ttl_s=1.5, settle_s=0).acquire()
    lease.release()
    assert not (tmp_path / storage.LEASE_FILE).exists()
    storage.Lease(str(tmp_path), ttl_s=1.5, settle_s=0).acquire().release()


# ---------------------------------------------------------------------------- under real pretraining runs
def _pretrain(tiny_args, name: str, *extra: str):
    from simclr_dist import pretrain
    from simclr_dist.config import parse_config

    return pretrain.run(parse_config(tiny_args(name, *extra)))


@pytest.mark.drill  # CI's second stage (make test-cluster): 3 real runs on the session's Ray and a 4 MB tmpfs
@pytest.mark.ray
def test_full_disk_under_a_real_run_then_rerun_resumes_and_survives_a_truncated_newest(ray_cluster, tiny_args,
                                                                                           tmp_path):
    from simclr_dist import pretrain
    from simclr_dist.config import parse_config
    from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE

    disk = tmp_path / "runs"
    why = faults._mount_tmpfs(disk, "4m")                     # 2 digits checkpoints (~1.5 MB each) fit, 3 do not
    if why:
        pytest.skip(why)
    try:
        args = ("--epochs", "3", "--max-failures", "0", "--num-to-keep", "5")
        with pytest.raises(pretrain.RunError) as e:
            pretrain.run(parse_config(tiny_args("full", *args)))
        assert "\n" not in str(e.value) and "No space left on device" in str(e.value) and "is intact" in str(e.value)
        kept = list_complete_checkpoints(str(disk / "full"))
        assert kept and all(load_checkpoint(r.uri) for r in kept)
        before = kept[-1]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)   # space freed
        summary = pretrain.run(parse_config(tiny_args("full", *args)))
        assert summary["resumed_from_step"] == before.step
        assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]

        newest = list_complete_checkpoints(str(disk / "full"))[-1]
        target = Path(newest.uri) / CHECKPOINT_FILE
        target.write_bytes(target.read_bytes()[:1000])          # the newest truncated after it was registered
        summary = pretrain.run(parse_config(tiny_args("full", "--epochs", "4", "--num-to-keep", "10")))
        assert summary["resumed_from_step"] < newest.step       # fell back to the newest that loads
        assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
        assert target.exists() and target.stat().st_size == 1000  # nothing deleted
    finally:
        faults._umount(disk)


@pytest.mark.drill  # CI's second stage (make test-cluster): its own local Ray, a 30 s outage
def test_s3_stopped_30s_under_a_real_pretraining_run():
    """Ray's own writes (its checkpoint index) go through the retrying filesystem too: the run finishes with no
    worker restart, and a checkpoint lands after the outage."""
    row = faults.s3_outage_ray(outage_s=30)
    assert row["survived"], json.dumps(row)
    assert row["steps_lost"] == 0 and row["stopped_s"] >= 30


@pytest.mark.drill  # CI's second stage (make test-cluster): its own local Ray, a store that never comes back
def test_s3_down_for_good_under_a_real_run_ends_in_one_line_keeping_the_last_complete(tmp_path):
    """A real 2-worker pretraining run checkpointing to moto's S3 every 10 steps; the server stops once the first
    checkpoint is complete and stays down. With a short retry budget (SIMCLR_STORAGE_RETRY_S) the command ends
    after a bounded wait, exit 1, its last stderr line the one error line (no traceback at the end); the server
    back, the checkpoint that was complete before the outage is still listed complete and loads."""
    budget_s = 8
    with faults.S3Server() as s3:
        run = f"s3://{faults.DRILL_BUCKET}/runs/down-ray"
        env = {**os.environ, "PYTHONPATH": str(ROOT), storage.RETRY_ENV: str(budget_s),
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        env.pop("RAY_ADDRESS", None)
        cmd = faults._cmd(tmp_path, "down-ray", tmp_path / "summary.json", 30, 10, "--max-failures", "0",
                          "--num-to-keep", "5")
        cmd[cmd.index("--storage-path") + 1] = f"s3://{faults.DRILL_BUCKET}/runs"
        with open(tmp_path / "stdout.log", "w") as out, open(tmp_path / "stderr.log", "w") as err:
            train = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
            try:
                deadline = time.monotonic() + 600
                while not faults._complete_quietly(run) and time.monotonic() < deadline and train.poll() is None:
                    time.sleep(0.2)
                assert train.poll() is None, (tmp_path / "stderr.log").read_text()[-3000:]
                before = [r.name for r in faults._complete_quietly(run)]
                assert before, "no complete checkpoint within 10 minutes"
                s3.stop()
                stopped = time.monotonic()
                code = train.wait(timeout=600)
                ended_s = time.monotonic() - stopped
            finally:
                if train.poll() is None:
                    train.kill()
        s3.start()  # back, to see what the store kept
        kept = list_complete_checkpoints(run)
        assert before[-1] in [r.name for r in kept], (before, kept)
        assert load_checkpoint(f"{run}/{before[-1]}")                          # verified by its manifest
    stderr = (tmp_path / "stderr.log").read_text()
    # Ray forwards its processes' log lines to the driver's stderr asynchronously, each with a prefix: "(Name pid=N)"
    # or "(Name pid=N, ip=A)" for actors and tasks (coloured on a terminal), "(pid=N)" for an unnamed worker,
    # "(raylet)" for the raylet; they may land after this command's own last line, so it is judged on its own lines
    forwarded = re.compile(r"^(?:\x1b\[[\d;]*m)?\((?:raylet\b|autoscaler \+|(?:[^()]|\([^()]*\))*?\bpid=\d+)")
    own = [line for line in stderr.splitlines() if line.strip() and not forwarded.match(line)]
    tail = own[-5:]
    print(f"ended {ended_s:.1f} s after the store went down; kept {[r.name for r in kept]}; last line: {tail[-1:]}")
    assert code == 1, stderr[-3000:]
    assert tail[-1].startswith("error: ") and "storage unreachable" in tail[-1], tail
    assert not any("Traceback" in line or line.startswith(" ") for line in tail), tail
    assert ended_s < 120 + 3 * budget_s, ended_s   # the budget per blocked write, Ray's teardown: bounded


@pytest.mark.slow
def test_watcher_training_pruning_short():
    """The 20-minute drill of ``python -m bench.faults watcher``, for 1.5 minutes."""
    row = faults.watcher_load(minutes=1.5)
    assert row["survived"], json.dumps(row)
    assert row["checkpoints_seen"] >= 5 and row["evaluated_twice"] == 0 and row["partial_reads"] == 0
    assert row["unaccounted"] == []


def test_command_line_drill_writes_a_report(tmp_path):
    out = tmp_path / "faults-corrupt.json"
    res = subprocess.run([sys.executable, "-m", "bench.faults", "corrupt", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["storage"]
    assert [r["survived"] for r in rows] == [True, True]


def test_a_run_without_a_ray_checkpoint_resumes_from_the_newest_that_loads(tmp_path):
    """--no-ray (and a Ray rerun of such a run) resume through the same fallback as a Ray restart."""
    from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE
    from simclr_dist.run.train.resume import load_newest

    run = str(tmp_path / "run")
    assert load_newest(run) == (None, "")
    faults.upload_state(run, "checkpoint_1", faults.drill_state(10))
    faults.upload_state(run, "checkpoint_2", faults.drill_state(20))
    path = tmp_path / "run" / "checkpoint_2" / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a bit flip: complete by its sizes, refused by its checksum
    path.write_bytes(bytes(data))
    lines: list[str] = []
    state, where = load_newest(run, log=lines.append)
    assert where.endswith("checkpoint_1") and state["step"] == 10 and path.exists()
    assert len(lines) == 1 and "checkpoint_2 is unreadable" in lines[0] and "nothing was deleted" in lines[0]
