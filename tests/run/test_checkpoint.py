"""The checkpoint format without Ray: read with weights_only (a pickled object is refused in one line, and never
runs), old format-1 files still load and resume, the state is checked at save time, uploads put the manifest last,
and the --epochs rule of a resume (extend the schedule from the current step, refuse a finished run)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_dist.config import ConfigError, PretrainConfig, PretrainedError
from simclr_dist.core.optim import WarmupCosine
from simclr_dist.core.precision import Precision
from simclr_dist.run.store.checkpoint import (CHECKPOINT_FILE, FORMAT_VERSION, MANIFEST_FILE, CheckpointError, PretrainState,
                                        load_checkpoint, make_uploader, plain, read_complete, save_checkpoint)
from simclr_dist.run.store.pretrained import load_pretrained
from simclr_dist.run.train.resume import Position, check_extendable, plan_resume, restore, resumed_schedule
from simclr_dist.run.store.weights import build_model
from simclr_dist.core.optim import build_optimizer

FORMAT1 = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint-format1"  # written by commit 1af4297's training loop


class RunsCode:
    """What an attacker would put into a shared checkpoint: unpickling it would run a command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_state(**extra) -> dict:
    cfg = PretrainConfig(dataset="digits", image_size=16, width=0.125, proj_out_dim=16, epochs=2).resolved()
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, "lars", 0.1, weight_decay=1e-6, momentum=0.9)
    return {"format_version": FORMAT_VERSION, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "schedule": {"base_lr": 0.1, "warmup_steps": 2, "total_steps": 20, "final_lr": 0.0},
            "scaler": {}, "epoch": 1, "batch": 3, "step": 13, "steps_per_epoch": 10, "config": cfg.to_dict(),
            "history": [{"epoch": 1, "loss": np.float32(4.5), "knn_top1": np.float64(0.5)}], **extra}


def write_raw(directory: Path, obj) -> Path:
    """A checkpoint directory whose manifest matches its bytes: only the weights_only check can refuse it."""
    directory.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    (directory / CHECKPOINT_FILE).write_bytes(data)
    (directory / MANIFEST_FILE).write_text(json.dumps({"format_version": 2, "sha256": hashlib.sha256(data).hexdigest(),
                                                       "bytes": len(data), "epoch": 1, "step": 10}))
    return directory


def test_pickled_object_is_refused_in_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    state = plain(tiny_state())
    state["history"].append(RunsCode(str(marker)))
    d = write_raw(tmp_path / "run" / "checkpoint_evil", state)
    assert read_complete(str(d)) is not None  # complete and checksummed: completeness is not origin
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d))
    msg = str(e.value)
    assert "\n" not in msg and str(d / CHECKPOINT_FILE) in msg and "weights_only=True" in msg
    assert "posix.system" in msg or "os.system" in msg  # names what was smuggled in
    assert not marker.exists()
    # the same file named in --pretrained simclr-dist:... (someone else's run) is refused the same way
    with pytest.raises(PretrainedError) as e:
        load_pretrained(f"simclr-dist:{d}")
    assert "\n" not in str(e.value) and "weights_only=True" in str(e.value)
    assert not marker.exists()


def test_own_state_round_trips_with_weights_only(tmp_path):
    state = tiny_state(epoch_loss_sums=[torch.tensor(1.5), torch.tensor(2.5)], init_knn={"knn_top1_init": 0.3})
    save_checkpoint(str(tmp_path / "c"), state)
    back = load_checkpoint(str(tmp_path / "c"))  # weights_only=True inside
    assert back["history"][0]["loss"] == 4.5 and type(back["history"][0]["knn_top1"]) is float  # numpy -> Python
    assert torch.equal(back["model"]["encoder.conv1.weight"], state["model"]["encoder.conv1.weight"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    manifest = json.loads((tmp_path / "c" / MANIFEST_FILE).read_text())
    assert (manifest["epoch"], manifest["batch"], manifest["step"], manifest["epochs"]) == (1, 3, 13, 2)


def test_unloadable_state_fails_at_save_naming_the_key(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint state\['history'\]\[1\]: a .*RunsCode cannot be saved"):
        save_checkpoint(str(tmp_path / "c"), tiny_state(history=[{}, RunsCode("x")]))
    assert not (tmp_path / "c" / MANIFEST_FILE).exists()


def test_plain_copy_is_a_snapshot():
    w = torch.ones(3)
    snap = plain({"w": w, "n": np.int64(3)}, copy=True)
    w.add_(1)  # training goes on while the upload thread serialises the snapshot
    assert snap["w"].tolist() == [1.0, 1.0, 1.0] and type(snap["n"]) is int


def test_format1_checkpoint_from_old_code_loads_and_resumes(tmp_path):
    """Written by 1af4297's loop (a real 1-epoch digits run): loads with weights_only=True and resumes as an
    epoch-end checkpoint (no mid-epoch position, no loss sums)."""
    d = tmp_path / "checkpoint_old"
    shutil.copytree(FORMAT1, d)
    state = load_checkpoint(str(d))
    assert state["format_version"] == 1 and (state["epoch"], state["step"]) == (1, 22)
    cfg = PretrainConfig.from_dict(state["config"]).resolved()
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optimizer, 0.1, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    pos = restore(PretrainState.from_dict(state), cfg, model=model, optimizer=opt, scaler=Precision.of("fp32", torch.device("cpu")).scaler(),
                  steps_per_epoch=22, rank=0, world=2)
    assert (pos.epoch, pos.batch, pos.step, pos.loss_sum) == (1, 0, 22, None)
    assert torch.equal(model.state_dict()["encoder.conv1.weight"], state["model"]["encoder.conv1.weight"])
    sched = resumed_schedule(WarmupCosine(opt, 0.1, 2, 22), state["schedule"], 22, 22)
    assert sched.state_dict() == state["schedule"]


def test_newer_format_is_refused(tmp_path):
    d = tmp_path / "c"
    save_checkpoint(str(d), tiny_state(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="newer than this simclr-dist reads"):
        load_checkpoint(str(d))


def test_restore_mid_epoch_position_and_loss_sums():
    state = plain(tiny_state(epoch_loss_sums=[torch.tensor(1.5), torch.tensor(2.5)]))
    cfg = PretrainConfig.from_dict(state["config"])
    for world, rank, want in ((2, 1, 2.5), (4, 3, 2.0)):  # another world size: their mean
        model = build_model(cfg)
        opt = build_optimizer(model, "lars", 0.1, weight_decay=1e-6, momentum=0.9)
        pos = restore(PretrainState.from_dict(state), cfg, model=model, optimizer=opt, scaler=Precision.of("fp32", torch.device("cpu")).scaler(),
                      steps_per_epoch=10, rank=rank, world=world)
        assert (pos.epoch, pos.batch, pos.step) == (1, 3, 13) and pos.loss_sum.item() == want
    with pytest.raises(ValueError, match="10 steps/epoch, this run 11"):
        restore(PretrainState.from_dict(state), cfg, model=model, optimizer=opt, scaler=Precision.of("fp32", torch.device("cpu")).scaler(),
                steps_per_epoch=11, rank=0, world=2)


def test_uploader_serialises_then_uploads_manifest_last(tmp_path, monkeypatch):
    import ray.train
    import threading

    from simclr_dist import storage

    order = []
    write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (order.append(uri.rsplit("/", 1)[-1]),
                                                                    write(uri, data)))
    local = tmp_path / "local"
    local.mkdir()
    done = threading.Event()
    up = make_uploader(str(tmp_path / "run"), state=tiny_state(), done=done)
    out = up(ray.train.Checkpoint.from_directory(str(local)), "checkpoint_x")
    assert order == [CHECKPOINT_FILE, MANIFEST_FILE, CHECKPOINT_FILE, MANIFEST_FILE]  # local copy, then storage
    assert done.is_set() and out.path == str(tmp_path / "run" / "checkpoint_x")
    assert load_checkpoint(out.path)["batch"] == 3


# ---------------------------------------------------------------------------- --epochs on resume
def test_extended_schedule_is_continuous_and_ends_at_new_total():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    old = WarmupCosine(opt, 1.0, 10, 100)
    for at in (40, 5):  # after and during warm-up
        new = old.extended(200, at)
        assert new.lr_at(at) == pytest.approx(old.lr_at(at))  # the next step keeps its LR: no jump
        if at < 10:  # during warm-up: the warm-up goes on unchanged
            assert [new.lr_at(s) for s in range(10)] == [old.lr_at(s) for s in range(10)]
        assert new.lr_at(199) == pytest.approx(0.0, abs=1e-12) and new.total_steps == 200
        lrs = [new.lr_at(s) for s in range(max(at, 10), 200)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically, no jump back up
    again = WarmupCosine(opt, 1.0, 10, 100)
    again.load_state_dict(old.extended(200, 40).state_dict())  # survives the next checkpoint
    assert again.lr_at(120) == old.extended(200, 40).lr_at(120)


def test_resumed_schedule_rules():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    saved = WarmupCosine(opt, 1.0, 10, 100).state_dict()
    lines = []
    same = resumed_schedule(WarmupCosine(opt, 1.0, 20, 100), saved, 50, 100, log=lines.append)
    assert same.state_dict() == saved and lines == []  # unchanged length: the checkpoint's own schedule
    longer = resumed_schedule(WarmupCosine(opt, 1.0, 20, 300), saved, 50, 300, log=lines.append)
    assert longer.total_steps == 300 and longer.lr_at(50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 89)))
    assert len(lines) == 1 and "extended from step 50" in lines[0] and "at step 100" in lines[0] \
        and "at step 300" in lines[0]
    with pytest.raises(ConfigError, match="already finished its schedule"):
        resumed_schedule(WarmupCosine(opt, 1.0, 20, 300), saved, 100, 300)
    check_extendable(100, 50, 100, 0.0)  # fewer epochs than done: nothing to train, not an error


def test_plan_resume_in_the_driver(tmp_path):
    run = tmp_path / "run"
    state = tiny_state()  # epochs 2 x 10 steps, at step 13
    save_checkpoint(str(run / "checkpoint_a"), state)
    saved = PretrainConfig.from_dict(state["config"])
    same = PretrainConfig.from_dict({**state["config"]})
    assert plan_resume(same, str(run), saved) is None
    more = PretrainConfig.from_dict({**state["config"], "epochs": 5})
    assert "--epochs 2 -> 5: the cosine schedule is extended from step 13 (of 20) to end at step 50" in \
        plan_resume(more, str(run), saved)
    save_checkpoint(str(run / "checkpoint_b"), {**state, "epoch": 2, "batch": 0, "step": 20})
    with pytest.raises(ConfigError, match=r"^--epochs: run .* already finished its schedule \(20 of 20 steps"):
        plan_resume(more, str(run), saved)
    assert Position().batch == 0


def test_pretrain_state_schema_round_trip_and_refusal(tmp_path):
    """The typed state is the one schema: what the loop writes reads back field for field, a format-1 dict reads
    with the defaults of the fields it lacks, and a dict that is not a pretraining state is refused in one line."""
    raw = tiny_state(epoch_loss_sums=[torch.tensor(1.5)], init_knn={"knn_top1_init": 0.1})
    typed = PretrainState.from_dict(raw)
    save_checkpoint(str(tmp_path / "c"), typed.to_dict())
    back = PretrainState.from_dict(load_checkpoint(str(tmp_path / "c")))
    assert (back.epoch, back.batch, back.step, back.steps_per_epoch) == (1, 3, 13, 10)
    assert back.init_knn == {"knn_top1_init": 0.1} and back.epoch_loss_sums[0].item() == 1.5
    assert torch.equal(back.model["encoder.conv1.weight"], raw["model"]["encoder.conv1.weight"])
    old = {k: raw[k] for k in PretrainState.REQUIRED + ("history",)}
    fmt1 = PretrainState.from_dict(old)
    assert (fmt1.format_version, fmt1.batch, fmt1.schedule, fmt1.epoch_loss_sums) == (1, 0, None, None)
    with pytest.raises(CheckpointError, match=r"not a pretraining checkpoint \(no optimizer, scaler\)"):
        PretrainState.from_dict({k: v for k, v in raw.items() if k not in ("optimizer", "scaler")}, where="x")
