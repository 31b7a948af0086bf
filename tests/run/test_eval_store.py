"""Evaluation results of a run outlive its checkpoints: ``RUN/eval/<checkpoint>/<protocol>.json`` plus the
append-only ``RUN/eval/index.jsonl``, kept by ``evaluate --watch`` across checkpoint pruning (``--num-to-keep``) and
watcher restarts, printed by ``evaluate --run``; the index on a real S3-compatible server on loopback (moto)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from simclr_dist import evaluate as ev
from simclr_dist.config import PretrainConfig
from simclr_dist.run.eval import store as eval_store
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import save_checkpoint
from simclr_dist.run.store.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_checkpoint(directory, epoch: int) -> str:
    cfg = PretrainConfig(dataset="digits", image_size=16, width=0.125, epochs=3).resolved()
    torch.manual_seed(epoch)
    save_checkpoint(str(directory), {
        "model": build_model(cfg).state_dict(), "optimizer": {}, "schedule": {}, "scaler": {},
        "epoch": epoch, "step": 10 * epoch, "steps_per_epoch": 10, "config": cfg.to_dict(), "history": []})
    return str(directory)


def watch(run, until: int) -> list[dict]:
    """One watcher process's life: start, evaluate what it finds, stop once epoch ``until`` is done."""
    cfg = ev.parse_args(["--run", str(run), "--watch", "--watch-until-epoch", str(until), "--interval", "0.01",
                         "--protocols", "knn"]).validate()
    return ev.watch_run(str(run), cfg, log=lambda m: None, sleep=lambda s: None)


def test_results_survive_pruning_and_watcher_restarts(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    write_checkpoint(run / "checkpoint_000001", epoch=1)
    assert [r["cached"] for r in watch(run, until=1)] == [False]
    index = run / "eval" / "index.jsonl"
    assert [(e["checkpoint"], e["protocol"], e["epoch"]) for e in eval_store.read_index(str(run))] == \
        [("checkpoint_000001", "knn", 1)]

    # training goes on: checkpoint 2 is registered and Ray prunes checkpoint 1 (--num-to-keep 1) with its directory
    write_checkpoint(run / "checkpoint_000002", epoch=2)
    shutil.rmtree(run / "checkpoint_000001")
    assert [(r["checkpoint_epoch"], r["cached"]) for r in watch(run, until=2)] == [(2, False)]  # a new watcher
    first = run / "eval" / "checkpoint_000001" / "knn.json"
    assert json.loads(first.read_text())["checkpoint_epoch"] == 1  # pruning did not take the result along
    entries = eval_store.read_index(str(run))
    assert [(e["checkpoint"], e["epoch"]) for e in entries] == [("checkpoint_000001", 1), ("checkpoint_000002", 2)]
    assert entries[0]["result"] == "eval/checkpoint_000001/knn.json" and 0 < entries[1]["top1"] <= 1

    # restarted again: nothing recomputed, nothing appended twice
    before = index.read_bytes()
    assert [r["cached"] for r in watch(run, until=2)] == [True]
    assert index.read_bytes() == before

    # a watcher killed between writing a result and appending its line: the restart appends it
    index.write_text(before.decode().splitlines()[0] + "\n")
    watch(run, until=2)
    assert index.read_bytes() == before

    # evaluate --run prints the whole history, the pruned checkpoint included
    capsys.readouterr()
    assert ev.main(["--run", str(run), "--protocols", "knn"]) == 0
    out = capsys.readouterr().out
    history = out[out.index("history of"):]
    assert "checkpoint_000001" in history and "checkpoint_000002" in history and "knn" in history


def test_index_skips_a_line_that_does_not_parse(tmp_path):
    run = str(tmp_path / "r")
    eval_store.append_index(run, [{"checkpoint": "a", "protocol": "knn"}])
    with open(eval_store.index_uri(run), "a") as f:
        f.write("{not json")  # a hand edit, no newline
    eval_store.append_index(run, [{"checkpoint": "b", "protocol": "knn"}])
    warnings = []
    assert [e["checkpoint"] for e in eval_store.read_index(run, log=warnings.append)] == ["a", "b"]
    assert len(warnings) == 1 and "line 2" in warnings[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server on loopback with bucket ``evals``."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(tmp_path / "moto.log", "w"), stderr=subprocess.STDOUT)
    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    import boto3
    boto3.client("s3").create_bucket(Bucket="evals")
    yield "s3://evals"
    server.terminate()
    server.wait(timeout=30)


def test_index_and_results_on_s3(s3):
    run = f"{s3}/runs/r"
    assert eval_store.read_index(run) == []
    uri = eval_store.result_uri(run, "checkpoint_1", "finetune-0.1")
    assert uri == f"{run}/eval/checkpoint_1/finetune-0.1.json"
    storage.write_json(uri, {"top1": 0.5})
    result = {"checkpoint_epoch": 1, "checkpoint_step": 10, "top1": 0.5, "top5": 0.9, "label_count": 140}
    assert eval_store.record(f"{run}/checkpoint_1", {"finetune-0.1": result}) == 1
    assert eval_store.record(f"{run}/checkpoint_1", {"finetune-0.1": result}) == 0  # idempotent
    assert eval_store.record(f"{run}/checkpoint_2", {"knn": {**result, "checkpoint_epoch": 2}}) == 1
    entries = eval_store.read_index(run)
    assert [(e["checkpoint"], e["protocol"], e["epoch"]) for e in entries] == \
        [("checkpoint_1", "finetune-0.1", 1), ("checkpoint_2", "knn", 2)]
    assert storage.read_json(uri) == {"top1": 0.5}
    assert "checkpoint_2" in eval_store.format_history(entries)
