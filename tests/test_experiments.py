"""Supervised baselines (simclr_dist.supervised) and Experiments A/B (simclr_dist.experiments) on tiny digits runs.

The experiments CLI runs on a tiny SimCLR checkpoint written in the test (no Ray, trained arms in-process); the
supervised trainer is also run once under Ray Train (2 DDP workers, killed after epoch 1, resumed by a rerun).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from simclr_dist import evaluate as ev
from simclr_dist.data.splits import balanced_subset, stratified_split
from simclr_dist import experiments as exp
from simclr_dist import supervised as sup
from simclr_dist.config import PretrainConfig
from simclr_dist.run.checkpoint import load_checkpoint, save_checkpoint
from simclr_dist.run.step import build_model

TINY = dict(image_size=16, width=0.125)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_simclr_checkpoint(directory) -> str:
    """A randomly initialised tiny SimCLR checkpoint with a short fake pretraining history (no Ray, no training)."""
    cfg = PretrainConfig(dataset="digits", epochs=2, **TINY).resolved()
    torch.manual_seed(0)
    history = [{"epoch": e, "loss": 5.0 - e / 2, "epoch_time_s": 3.0} for e in (1, 2)]
    history[-1]["knn_top1"] = 0.8
    save_checkpoint(str(directory), {
        "format_version": 1, "model": build_model(cfg).state_dict(), "optimizer": {}, "schedule": {}, "scaler": {},
        "epoch": 2, "step": 20, "steps_per_epoch": 10, "config": cfg.to_dict(), "history": history})
    return str(directory)


def read(path) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- supervised trainer
def test_supervised_local_learns_then_rerun_resumes_and_reuses(tmp_path):
    args = ["--no-ray", "--fraction", "1", "--batch-size", "32", "--storage-path", str(tmp_path), "--name", "s",
            "--image-size", "16", "--width", "0.125"]
    assert sup.main([*args, "--epochs", "1"]) == 0
    first = read(tmp_path / "s" / "results.json")
    assert first["epochs_done"] == 1 and first["resumed_from_epoch"] == 0

    assert sup.main([*args, "--epochs", "2"]) == 0  # same name, more epochs: continues from epoch 1's checkpoint
    result = read(tmp_path / "s" / "results.json")
    assert result["resumed_from_epoch"] == 1 and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][0] == first["history"][0]
    assert result["top1"] > 0.3  # chance is 0.1
    assert result["subset_indices"] == list(range(1437)) and result["label_count"] == 1437
    assert load_checkpoint(result["checkpoint"])["epoch"] == 2

    stamp = os.stat(tmp_path / "s" / "results.json").st_mtime_ns
    again = sup.run(sup.parse_args([*args, "--epochs", "2"]), log=lambda m: None)  # finished: nothing retrains
    assert again["cached"] and again["top1"] == result["top1"]
    assert os.stat(tmp_path / "s" / "results.json").st_mtime_ns == stamp


@pytest.mark.ray
def test_supervised_on_ray_ddp_learns_and_checkpoints(ray_cluster, tmp_path):
    cfg = sup.SupervisedConfig(fraction=1.0, epochs=2, batch_size=32, num_workers=2, storage_path=str(tmp_path),
                               name="ray", **TINY)
    result = sup.run(cfg)
    assert result["workers"] == 2 and all(h["world_size"] == 2 for h in result["history"])
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["resumed_from_epoch"] == 0
    assert result["top1"] > 0.3  # chance is 0.1
    assert result["label_count"] == 1437 and result["subset_sha256"] == sup.subset_digest(np.arange(1437))
    assert read(tmp_path / "ray" / "results.json")["top1"] == result["top1"]
    assert len(glob.glob(str(tmp_path / "ray" / "checkpoint_2*"))) == 2  # Ray's directories, one per epoch
    state = load_checkpoint(result["checkpoint"])
    assert state["kind"] == "supervised" and state["epoch"] == 2 and state["step"] == 2 * (1437 // 32)
    assert result["checkpoint"] == max(glob.glob(str(tmp_path / "ray" / "checkpoint_2*")))


@pytest.mark.ray
@pytest.mark.slow
def test_supervised_on_ray_resumes_after_a_kill_by_rerunning(ray_cluster, tmp_path):
    from simclr_dist.pretrain import RunError

    cfg = sup.SupervisedConfig(fraction=1.0, epochs=2, batch_size=32, num_workers=2, storage_path=str(tmp_path),
                               name="ray", chaos_kill_epoch=1, **TINY)
    with pytest.raises(RunError, match="training failed"):  # a worker is SIGKILLed after epoch 1's checkpoint
        sup.run(cfg)
    [ckpt] = glob.glob(str(tmp_path / "ray" / "checkpoint_2*"))
    assert load_checkpoint(ckpt)["epoch"] == 1

    result = sup.run(cfg)  # the same command again: resumes (the drill fires once per run)
    assert result["resumed_from_epoch"] == 1 and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["top1"] > 0.3
    state = load_checkpoint(max(glob.glob(str(tmp_path / "ray" / "checkpoint_2*"))))
    assert state["epoch"] == 2 and state["step"] == 2 * (1437 // 32)


@pytest.mark.parametrize("args, needle", [
    (["--fraction", "0"], "--fraction: must be in (0, 1], got 0"),
    (["--epochs", "ten"], "invalid int value: 'ten'"),
    (["--init-checkpoint", "{tmp}/nope"], "--init-checkpoint {tmp}/nope: no such checkpoint directory"),
    (["--init-checkpoint", "{ckpt}", "--width", "0.5"], "was trained with width=0.125"),
    (["--fraction", "0.001", "--num-workers", "8"], "BatchNorm needs >= 2 per worker"),
    (["--augment", "crop,warp"], "unknown augmentation component 'warp'"),
    (["--no-ray", "--chaos-kill-epoch", "1"], "needs --ray"),
])
def test_supervised_bad_input_one_line_error(tmp_path, capsys, args, needle):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt) for a in args]
    assert sup.main([*args, "--storage-path", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err
    assert not captured.out and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- experiments CLI
def test_experiments_cli_writes_report_plots_results_on_one_shared_subset(tmp_path, capsys):
    ckpt = write_simclr_checkpoint(tmp_path / "runs" / "simclr" / "checkpoint_000002")
    out = tmp_path / "exp"
    args = ["--checkpoint", ckpt, "--fractions", "0.1,1", "--small-fraction", "0.1", "--epochs", "1",
            "--batch-size", "32", "--no-ray", "--threads", "1", "--l2-grid", "1e-4,1e-2", "--out", str(out)]
    assert exp.main(args) == 0
    stdout = capsys.readouterr().out
    assert "[exp] (1/6) SimCLR + linear head on 142 labels" in stdout and "report.md" in stdout

    report = (out / "report.md").read_text()
    for needle in ("## Experiment A: 10% of the labels", "## Experiment B", "## Label-fraction sweep",
                   "| SimCLR fine-tuned | 142 (10%) |", "| supervised from scratch | 1437 (100%) |",
                   "![accuracy vs label fraction](accuracy_vs_fraction.png)"):
        assert needle in report
    for name in ("accuracy_vs_fraction.png", "training_curves.png", "accuracy_vs_time.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name

    summary = read(out / "results.json")
    assert summary["complete"] and summary["fractions"] == [0.1, 1.0] and summary["ray"] is False
    got = {(r["arm"], r["fraction"]) for r in summary["results"]}
    assert got == {(a, f) for a in exp.ARMS for f in (0.1, 1.0)}
    for r in summary["results"]:
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["train_time_s"] > 0
        assert r["time_with_pretraining_s"] == pytest.approx(r["train_time_s"] + (6.0 if r["arm"] != "supervised"
                                                                                  else 0.0))
        assert len(r["history"]) == (0 if r["arm"] == "linear" else 1)
    assert summary["pretraining"]["train_time_s"] == 6.0 and summary["pretraining"]["epoch"] == 2
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,fraction,label_count,top1,top5") and len(rows) == 1 + 6

    # fairness: one class-balanced subset per fraction, nested, and the very images every arm trained on
    labels = ev.load_eval_data(PretrainConfig(dataset="digits", **TINY).resolved()).train_labels
    subsets = {float(f): idx for f, idx in summary["subsets"].items()}
    assert set(subsets[0.1]) < set(subsets[1.0]) and len(subsets[0.1]) == 142
    assert subsets[0.1] == balanced_subset(labels, 0.1, seed=0).tolist()
    assert np.bincount(labels[subsets[0.1]]).min() >= 14
    for f, idx in subsets.items():
        digests = {r["subset_sha256"] for r in summary["results"] if r["fraction"] == f}
        assert digests == {sup.subset_digest(idx)}
        for arm in ("finetune", "supervised"):  # the trainer's own record of the indices it used
            assert read(out / "runs" / f"{arm}-{f:g}-1ep-b32" / "results.json")["subset_indices"] == idx
        assert read(out / "linear" / f"linear-{f:g}.json")["subset_indices"] == idx
    finetune = read(out / "runs" / "finetune-0.1-1ep-b32" / "results.json")
    assert finetune["init_checkpoint"] == ckpt and finetune["params"]["weight_decay"] == 0
    assert read(out / "runs" / "supervised-0.1-1ep-b32" / "results.json")["init_checkpoint"] is None

    assert exp.main(args) == 0  # a rerun reuses every finished arm
    assert all(r["reused"] for r in read(out / "results.json")["results"])
    assert "reused" in capsys.readouterr().out

    other = write_simclr_checkpoint(tmp_path / "runs" / "simclr" / "checkpoint_000003")  # same --out, other model
    assert exp.main([*args[:1], other, *args[2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "was fine-tuned from" in err and "\n" not in err


def test_order_puts_experiment_a_then_b_first(tmp_path):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    plan = exp.make_plan(exp.parse_args(["--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--no-ray"]))
    assert plan.fractions == (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    order = exp.run_order(plan)
    assert order[:4] == [("linear", 0.1), ("finetune", 0.1), ("supervised", 0.1), ("supervised", 1.0)]
    assert sorted(order) == sorted((a, f) for a in exp.ARMS for f in plan.fractions)
    for small, big in zip(plan.fractions, plan.fractions[1:]):
        assert set(plan.subsets[small]) <= set(plan.subsets[big])
    cfgs = {a: exp.arm_config(plan, a, 0.01, ckpt) for a in ("finetune", "supervised")}
    assert cfgs["finetune"].init_checkpoint == ckpt and cfgs["supervised"].init_checkpoint is None
    assert cfgs["finetune"].epochs == cfgs["supervised"].epochs == 30 and not cfgs["supervised"].ray
    assert [exp.arm_config(plan, "supervised", f, ckpt).epochs for f in (0.2, 0.5, 1.0)] == [30, 30, 15]
    assert exp.arm_config(plan, "finetune", 0.5, ckpt).name == "finetune-0.5-30ep-b64"


def test_linear_probe_with_one_label_per_class_uses_strongest_l2():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(10)
    x = torch.randn(10, 8, generator=gen) + 3 * torch.eye(10, 8)
    feats = ev.Features(x, y, x + 0.01 * torch.randn(10, 8, generator=gen), y)
    out = ev.linear_probe_features(feats, num_classes=10, l2_grid=(1e-4, 1e-2), log=lambda m: None)
    assert out["l2"] == 1e-2 and out["val_size"] == 0 and out["val_top1"] is None and out["top1"] > 0.5


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "{tmp}/nope"], "--checkpoint {tmp}/nope: no such checkpoint directory"),
    (["--checkpoint", "{ckpt}", "--run", "{tmp}/runs/x"], "at most one of --checkpoint"),
    (["--checkpoint", "{ckpt}", "--pretrain"], "--pretrain: pretrains a --run"),
    (["--checkpoint", "{ckpt}", "--fractions", "0.1,1.5"], "--fractions: each fraction must be in (0, 1], got 1.5"),
    (["--checkpoint", "{ckpt}", "--fractions", "ten"], "--fractions: 'ten' is not a number"),
    (["--checkpoint", "{ckpt}", "--arms", "linear,svm"], "--arms: unknown arm 'svm'"),
    (["--checkpoint", "{ckpt}", "--dataset", "cifar10"], "pretrained on digits"),
    (["--checkpoint", "{ckpt}", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--checkpoint", "{ckpt}", "--ray", "--fractions", "0.001", "--num-workers", "8"], "BatchNorm needs >= 2"),
    (["--checkpoint", "{ckpt}", "--out", "nosuchscheme://bucket/x"], "cannot open storage"),
    (["--run", "{tmp}/runs/fresh", "--pretrain-args", "--name other"], "--name comes from --run"),
    (["--run", "{tmp}/runs/fresh", "--pretrain-args", "--epochs 0"], "--pretrain-args: --epochs: must be >= 1"),
    (["--run", "{tmp}/runs/fresh", "--pretrain-args", "--optimiser lars"], "unrecognized arguments: --optimiser"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_experiments_bad_input_one_line_error_before_work(tmp_path, capsys, args, needle):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt) for a in args]
    assert exp.main([*args, "--out", str(tmp_path / "out")] if "--out" not in args else args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err
    assert not captured.out and not (tmp_path / "out").exists() and not (tmp_path / "runs" / "fresh").exists()
