"""The classifier trainer (simclr_dist.supervised) and Experiments A/B (simclr_dist.experiments) on tiny digits runs.

The experiments CLI runs on a tiny SimCLR checkpoint written in the test (no Ray, trained arms in-process); the
supervised trainer is also run under Ray Train (2 DDP workers, killed after epoch 1, resumed by a rerun). The
protocol's invariants (equal steps, selection without test data, separate seeds) are in test_experiments_protocol.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import time

import numpy as np
import pytest

import simclr_dist.results as results_cmd
from simclr_dist.report import readme_table
from simclr_dist.report.results_file import read_results
import torch

from simclr_dist import experiments as exp
from simclr_dist import supervised as sup
from simclr_dist.config import PretrainConfig
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.data.splits import balanced_subset
from simclr_dist.run.studies import experiment_run
from simclr_dist.run.store.checkpoint import load_checkpoint, save_checkpoint
from simclr_dist.data.splits import subset_digest
from simclr_dist.run.jobs.classify_job import run_classifier
from simclr_dist.run.train.evaluation import Features, linear_probe_features, load_eval_data
from simclr_dist.run.studies.experiment_plan import arm_config, make_plan
from simclr_dist.run.jobs.launch import RunError
from simclr_dist.run.store.weights import build_model

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
def test_supervised_local_learns_then_rerun_resumes_and_reuses(tmp_path, capsys):
    args = ["--no-ray", "--fraction", "1", "--batch-size", "32", "--storage-path", str(tmp_path), "--name", "s",
            "--image-size", "16", "--width", "0.125"]
    assert sup.main([*args, "--epochs", "1"]) == 0
    first = read(tmp_path / "s" / "results.json")
    assert first["epochs_done"] == 1 and first["resumed_from_epoch"] == 0

    assert sup.main([*args, "--epochs", "2"]) == 0  # same name, more epochs: continues from epoch 1's checkpoint
    result = read(tmp_path / "s" / "results.json")
    assert result["resumed_from_epoch"] == 1 and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][0] == first["history"][0]
    assert result["top1"] > 0.3 and result["score"] == result["top1"]  # chance is 0.1
    assert all("test_top1" not in h for h in result["history"])  # the test split is read once, at the end
    assert result["subset_indices"] == list(range(1437)) and result["label_count"] == 1437
    assert len(result["predictions"]) == result["test_size"] == 360
    assert result["params"]["steps"] == 2 * (1437 // 32) and load_checkpoint(result["checkpoint"])["epoch"] == 2
    assert "test top-1" in capsys.readouterr().out

    stamp = os.stat(tmp_path / "s" / "results.json").st_mtime_ns
    again = run_classifier(sup.parse_args([*args, "--epochs", "2"]), log=lambda m: None)  # finished: no retraining
    assert again["cached"] and again["top1"] == result["top1"]
    assert os.stat(tmp_path / "s" / "results.json").st_mtime_ns == stamp


def test_supervised_selection_run_reports_validation_and_caps_batch_without_shrinking_lr(tmp_path, capsys):
    args = ["--no-ray", "--fraction", "0.1", "--val-split", "0", "--steps", "6", "--batch-size", "256", "--lr",
            "0.4", "--storage-path", str(tmp_path), "--name", "v", "--image-size", "16", "--width", "0.125"]
    assert sup.main(args) == 0
    out = capsys.readouterr().out
    r = read(tmp_path / "v" / "results.json")
    assert r["top1"] is None and r["predictions"] is None and 0 <= r["val_top1"] == r["score"] <= 1
    assert r["fit_size"] + r["val_size"] == r["label_count"] == 142 and r["val_size"] == 30  # 20% of each class (3 of 14-15)
    p = r["params"]
    assert p["global_batch"] == 112 and p["steps"] == 6 and p["peak_lr"] == pytest.approx(0.4 * 256 / 256)
    assert "batch capped at 112 labels; the LR keeps the nominal batch 256" in out
    assert "the test split was not read" in out
    assert [c["step"] for c in r["curve"]] == [1, 2, 3, 4, 5, 6] and all("val_top1" in c for c in r["curve"])


@pytest.mark.ray
def test_supervised_on_ray_ddp_learns_and_checkpoints(ray_cluster, tmp_path):
    cfg = SupervisedConfig(fraction=1.0, epochs=2, batch_size=32, num_workers=2, storage_path=str(tmp_path),
                           name="ray", **TINY)
    result = run_classifier(cfg)
    assert result["workers"] == 2 and all(h["world_size"] == 2 for h in result["history"])
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["resumed_from_epoch"] == 0
    assert result["top1"] > 0.3  # chance is 0.1
    assert result["label_count"] == 1437 and result["subset_sha256"] == subset_digest(np.arange(1437))
    assert len(result["predictions"]) == 360 and min(result["predictions"]) >= 0  # every rank's share gathered
    assert read(tmp_path / "ray" / "results.json")["top1"] == result["top1"]
    assert len(glob.glob(str(tmp_path / "ray" / "checkpoint_2*"))) == 2  # Ray's directories, one per epoch
    state = load_checkpoint(result["checkpoint"])
    assert state["kind"] == "supervised" and state["epoch"] == 2 and state["step"] == 2 * (1437 // 32)
    assert result["checkpoint"] == max(glob.glob(str(tmp_path / "ray" / "checkpoint_2*")))


@pytest.mark.ray
@pytest.mark.slow
def test_supervised_on_ray_resumes_after_a_kill_by_rerunning(ray_cluster, tmp_path):
    cfg = SupervisedConfig(fraction=1.0, epochs=2, batch_size=32, num_workers=2, storage_path=str(tmp_path),
                           name="ray", chaos_kill_epoch=1, **TINY)
    with pytest.raises(RunError, match="training failed"):  # a worker is SIGKILLed after epoch 1's checkpoint
        run_classifier(cfg)
    [ckpt] = glob.glob(str(tmp_path / "ray" / "checkpoint_2*"))
    assert load_checkpoint(ckpt)["epoch"] == 1

    result = run_classifier(cfg)  # the same command again: resumes (the drill fires once per run)
    assert result["resumed_from_epoch"] == 1 and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["top1"] > 0.3
    state = load_checkpoint(max(glob.glob(str(tmp_path / "ray" / "checkpoint_2*"))))
    assert state["epoch"] == 2 and state["step"] == 2 * (1437 // 32)


@pytest.mark.parametrize("args, needle", [
    (["--fraction", "0"], "--fraction: must be > 0, got 0.0"),
    (["--epochs", "ten"], "invalid int value: 'ten'"),
    (["--init-checkpoint", "{tmp}/nope"], "--init-checkpoint {tmp}/nope: no such checkpoint directory"),
    (["--init-checkpoint", "{ckpt}", "--width", "0.5"], "was trained with width=0.125"),
    (["--fraction", "0.001", "--num-workers", "8"], "BatchNorm needs >= 2 per worker"),
    (["--augment", "crop,warp"], "unknown augmentation component 'warp'"),
    (["--no-ray", "--chaos-kill-epoch", "1"], "needs --ray"),
    (["--no-ray", "--fraction", "0.01", "--val-split", "0"],
     "--fraction 0.01 (subset seed 0): class 0 has 1 label in the subset: model selection needs at least 2"),
    (["--no-ray", "--fraction", "0.1", "--val-split", "3"], "--val-split 3: the subset has 1 selection split(s)"),
])
def test_supervised_bad_input_one_line_error(tmp_path, capsys, args, needle):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt) for a in args]
    assert sup.main([*args, "--storage-path", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err, err
    assert not captured.out and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- experiments CLI
def test_experiments_cli_writes_report_plots_results_on_shared_subsets(tmp_path, capsys):
    ckpt = write_simclr_checkpoint(tmp_path / "runs" / "simclr" / "checkpoint_000002")
    os.makedirs(tmp_path / "runs" / "simclr" / "tensorboard")  # the pretraining run's tracking: the study logs there
    out = tmp_path / "exp"
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--seeds", "2", "--steps", "3", "--batch-size", "32",
            "--lr-grid", "0.1,0.4", "--wd-grid", "0", "--no-ray", "--threads", "1", "--l2-grid", "1e-4,1e-2",
            "--knn-k", "3,5,400", "--out", str(out), "--runs-cache", str(tmp_path / "cache")]
    assert exp.main(args) == 0
    stdout = capsys.readouterr().out
    assert "[exp] budget: 2 replicate(s)" in stdout and "s/step here" in stdout and "report.md" in stdout

    report = (out / "report.md").read_text()
    for needle in ("## Experiment A: 10% of the labels (142 images)", "## Experiment B", "sign-flip p (Holm; min)",
                   "| SimCLR fine-tuned | 142 |", "| from scratch | 1437 (100%) |", "## Per-class recall",
                   "![accuracy vs label fraction](accuracy_vs_fraction.png)", "logistic regression on pixels"):
        assert needle in report, needle
    for name in ("accuracy_vs_fraction.png", "training_curves.png", "confusion_matrix.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name

    summary = read_results(str(out / "results.json"))
    assert summary["complete"] and summary["fractions"] == [0.1] and summary["steps"] == 3
    arms = {(r["arm"], r["fraction"]) for r in summary["records"]}
    assert arms == {("linear", 0.1), ("finetune", 0.1), ("supervised", 0.1), ("supervised", 1.0), ("pixels", 0.1),
                    ("knn", 0.1), ("random-linear", 0.1), ("random-knn", 0.1), ("random-bn-linear", 0.1),
                    ("random-bn-knn", 0.1)}
    for r in summary["records"]:
        if r["arm"] in ("knn", "random-knn", "random-bn-knn"):  # k chosen on validation, capped at the labels a split fits on
            ks = sorted(int(k) for k in r["selection"])
            assert ks[:2] == [3, 5] and len(ks) == 3 and ks[2] < r["label_count"] and r["chosen"]["k"] in ks
        if r["arm"].startswith("random-bn"):  # BatchNorm statistics recalibrated on the subset's images
            assert r["bn_recalibrated_on"] == r["label_count"] == 142
        elif r["arm"].startswith("random"):  # and as initialised
            assert "bn_recalibrated_on" not in r
    for row in summary["rows"]:  # compute counted with the tuning
        assert row["total_time_s"] == pytest.approx(row["final_time_s"] + row["tuning_time_s"])
        if row["arm"] in ("finetune", "supervised"):
            assert row["images_processed"] > row["tuning_images"] > 0
    assert "## Compute (this machine, tuning included)" in report and "## Grid edges" in report
    from simclr_dist.run.train.tracking import read_scalars
    tracked = read_scalars(str(tmp_path / "runs" / "simclr" / "tensorboard"))
    rows_now = {(r["arm"], r["fraction"]): r["mean"] for r in summary["rows"]}
    assert tracked["experiments/finetune/10pct/top1"][0][1] == pytest.approx(rows_now[("finetune", 0.1)])
    assert "tracking" in stdout
    # the file alone redraws the report (no training, no data), and fills a README's results block
    raw = read(out / "results.json")
    assert raw["format_version"] == 3 and raw["records"][0]["predictions"]["packed"] == "int32-zlib-base64"
    assert results_cmd.main([str(out / "results.json"), "--render", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == report
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_table.BEGIN}\nold\n{readme_table.END}\ntail\n")
    assert results_cmd.main([str(out / "results.json"), "--readme", str(readme), "--check"]) == 1
    assert results_cmd.main([str(out / "results.json"), "--readme", str(readme)]) == 0
    assert results_cmd.main([str(out / "results.json"), "--readme", str(readme), "--check"]) == 0
    block = readme.read_text()
    assert "| SimCLR fine-tuned | " in block and "(n=2)" in block and block.endswith(f"{readme_table.END}\ntail\n")
    assert (out / "accuracy_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in summary["records"]:
        assert 0 <= r["top1"] <= r["top5"] <= 1 and len(r["predictions"]) == 360
        assert 0 <= r["worst_class_acc"] <= r["top1"] + 1e-9 and len(r["per_class_recall"]) == 10
        if r["arm"] in ("finetune", "supervised"):
            # the given grid, extended beyond an edge it chose (at most twice, flagged)
            assert r["steps"] == 3 and set(r["selection"]) >= {"lr=0.1,wd=0", "lr=0.4,wd=0"}
            assert r["chosen"]["lr"] > 0 and r["curves"] and len(r["history"]) >= 1
            assert (len(r["selection"]) > 2) == bool(r["grid_extended"])
    rows = {(r["arm"], r["fraction"]): r for r in summary["rows"]}
    assert rows[("finetune", 0.1)]["n"] == 2 and rows[("finetune", 0.1)]["ci_low"] <= rows[("finetune", 0.1)]["mean"]
    # the declared family, tested over seeds: A (finetune vs scratch, probe vs pixels at 10%) and B (at 10% vs 100%)
    declared = {(p["experiment"], p["a"], p["b"]) for p in summary["paired"]}
    assert declared == {("A", "finetune", "supervised"), ("A", "linear", "pixels"), ("B", "finetune", "supervised"),
                        ("B", "linear", "supervised")}
    for paired in summary["paired"]:
        assert paired["replicates"] == 2 and paired["family_size"] == 4 and paired["verdict"]
        assert 0 <= paired["p"] <= paired["p_holm"] <= 1 and paired["min_p_sign_flip"] == 0.5  # 2 seeds: 2/4
        assert len(paired["mcnemar_per_seed"]) == 2  # description, one per seed
        bt = paired["diff_boot"]
        assert bt["ci_low"] <= bt["mean"] <= bt["ci_high"]
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("arm,fraction,label_count,n,mean,sd") and len(csv_rows) == 1 + len(rows)
    # per_seed.csv: the unit of the tests, one row per record with the point it used
    per_seed = list(csv.DictReader((out / "per_seed.csv").read_text().splitlines()))
    assert len(per_seed) == len(summary["records"])
    assert {(r["arm"], float(r["fraction"]), int(r["replicate"]), float(r["top1"])) for r in per_seed} == {
        (r["arm"], r["fraction"], r["replicate"], r["top1"]) for r in summary["records"]}
    fine = next(r for r in per_seed if r["arm"] == "finetune" and r["replicate"] == "0")
    fine_rec = next(r for r in summary["records"] if r["arm"] == "finetune" and r["replicate"] == 0)
    assert fine["chosen"] == f"lr={fine_rec['chosen']['lr']:g};wd={fine_rec['chosen']['wd']:g}"  # fixed steps: no epochs

    # fairness: one class-balanced subset per (fraction, replicate), the very images every arm trained on
    labels = load_eval_data(PretrainConfig(dataset="digits", **TINY).resolved()).train_labels
    for rep in summary["replicates"]:
        idx = summary["subsets"][f"0.1/{rep['subset_seed']}"]
        assert idx == balanced_subset(labels, 0.1, seed=rep["subset_seed"]).tolist()
        digests = {r["subset_sha256"] for r in summary["records"]
                   if r["fraction"] == 0.1 and r["subset_seed"] == rep["subset_seed"]}
        assert digests == {subset_digest(idx)}
    assert summary["subsets"]["0.1/0"] != summary["subsets"]["0.1/1"]
    finals = glob.glob(str(out / "runs" / "finetune-0.1-s0-i0-*-3st-b32"))
    assert len(finals) == 1 and read(f"{finals[0]}/results.json")["init_checkpoint"] == ckpt

    # the finished runs, packed into --runs-cache (results only), carry the study to a fresh --out (another machine)
    trained = sorted(os.listdir(out / "runs"))
    assert set(os.listdir(tmp_path / "cache")) == {f"{n}.json.gz" for n in trained} | {"invocations.json"}
    # the cache logs each invocation's wall time (a study spans sessions): one line, complete, every record counted
    [first] = read(tmp_path / "cache" / "invocations.json")
    assert first["complete"] and first["records"] == len(raw["records"]) and first["elapsed_s"] > 0
    assert f"over 1 invocation(s) recorded in the runs cache's `invocations.json` (first {first['started_at']}" in report
    fresh = tmp_path / "elsewhere"
    # a rerun there reuses every finished run, past a time limit too: the limit stops runs from starting, and a
    # finished run does not start
    assert exp.main([*args[:-3], str(fresh), *args[-2:], "--time-limit", "1e-4"]) == 0
    again = read(fresh / "results.json")["records"]
    assert all(r["reused"] for r in again)  # the trained cells and the replicates' probes and baselines
    assert [r["top1"] for r in again] == [r["top1"] for r in raw["records"]]
    assert [r["train_time_s"] for r in again] == [r["train_time_s"] for r in raw["records"]]  # what they cost once
    said = capsys.readouterr().out
    assert f"{len(trained)} finished run(s) taken" in said and said.count("results read back from") == 2
    assert "[exp] paused" not in said and "[exp] done in" in said
    assert sum(n.startswith("probes-r") for n in trained) == 2  # one entry per replicate
    log = read(tmp_path / "cache" / "invocations.json")
    assert len(log) == 2 and log[0] == first and log[1]["complete"]  # the rerun is a second line, not a rewrite
    # a probe input changed (the L2 grid): the probes run again, under another entry; the trained cells are reused
    l2 = args.index("--l2-grid") + 1
    assert exp.main([*args[:l2], "1e-4,1e-3,1e-2", *args[l2 + 1:-3], str(fresh), *args[-2:]]) == 0
    third = read(fresh / "results.json")["records"]
    assert not any(r["reused"] for r in third if r["arm"] in ("linear", "pixels", "knn"))
    assert all(r["reused"] for r in third if r["arm"] in ("finetune", "supervised"))
    assert sum(n.startswith("probes-r") for n in os.listdir(fresh / "runs")) == 4
    capsys.readouterr()

    other = write_simclr_checkpoint(tmp_path / "runs" / "simclr" / "checkpoint_000003")  # same --out, other model
    assert exp.main([*args[:1], other, *args[2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "was fine-tuned from" in err and "\n" not in err


def test_plan_orders_cells_and_names_runs(tmp_path):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    plan = make_plan(exp.parse_args(["--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--fractions",
                                     "0.1,0.5", "--seeds", "2"]))
    e = plan.ecfg
    assert (e.steps, e.batch_size, e.ray, e.small_fraction) == (None, 64, False, 0.1)  # digits: early stopping
    assert plan.fractions == (0.1, 0.5) and [r.subset_seed for r in plan.replicates] == [0, 1]
    cells = [(c.arm, c.fraction, c.rep.index) for c in plan.cells]
    assert cells[:5] == [("finetune", 0.1, 0), ("supervised", 0.1, 0), ("finetune", 0.5, 0), ("supervised", 0.5, 0),
                         ("supervised", 1.0, 0)]
    # replicate 0 tunes (3 LRs + final per cell), replicate 1 reuses its choices (--tune-once): finals only
    assert len(cells) == 10 and plan.trainings() == 5 * (3 + 1) + 5
    for small, big in zip(plan.fractions, plan.fractions[1:]):
        assert set(plan.subsets[(small, 0)]) <= set(plan.subsets[(big, 0)])
    ft = arm_config(plan, plan.cells[0], 0.4, 0.0, split=0)
    sc = arm_config(plan, plan.cells[1], 0.4, 0.0, split=None)
    assert ft.init_checkpoint == ckpt and sc.init_checkpoint is None and not sc.ray
    assert ft.name == "finetune-0.1-s0-i0-lr0.4-wd0-padcrop-es200p50-b64-v0" and sc.val_split is None
    assert sc.name == "supervised-0.1-s0-i0-lr0.4-wd0-padcrop-200ep-const-b64"  # the recipe is in the name


def test_linear_probe_with_one_label_per_class_uses_strongest_l2():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(10)
    x = torch.randn(10, 8, generator=gen) + 3 * torch.eye(10, 8)
    feats = Features(x, y, x + 0.01 * torch.randn(10, 8, generator=gen), y)
    out = linear_probe_features(feats, num_classes=10, l2_grid=(1e-4, 1e-2), log=lambda m: None)
    assert out["l2"] == 1e-2 and out["val_size"] == 0 and out["val_top1"] is None and out["top1"] > 0.5


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "{tmp}/nope"], "--checkpoint {tmp}/nope: no such checkpoint directory"),
    (["--checkpoint", "{ckpt}", "--run", "{tmp}/runs/x"], "at most one of --checkpoint"),
    (["--checkpoint", "{ckpt}", "--pretrain"], "--pretrain: pretrains a --run"),
    (["--checkpoint", "{ckpt}", "--fractions", "0.1,1.5"], "--fractions: each fraction must be in (0, 1], got 1.5"),
    (["--checkpoint", "{ckpt}", "--fractions", "ten"], "--fractions: 'ten' is not a number"),
    (["--checkpoint", "{ckpt}", "--arms", "linear,svm"], "--arms: unknown arm 'svm'"),
    (["--checkpoint", "{ckpt}", "--dataset", "cifar10"], "pretrained on digits"),
    (["--checkpoint", "{ckpt}", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--checkpoint", "{ckpt}", "--lr-grid", ""], "--lr-grid: is empty"),
    (["--checkpoint", "{ckpt}", "--wd-grid", " , "], "--wd-grid: is empty"),
    (["--checkpoint", "{ckpt}", "--lr-grid", "0.1,-1"], "--lr-grid: each value must be > 0, got -1"),
    (["--checkpoint", "{ckpt}", "--fractions", "0.01"],
     "--fractions 0.01 (subset seed 0): class 0 has 1 label in the subset: model selection needs at least 2 per "
     "class (one to fit, one to validate); raise the fraction"),
    (["--checkpoint", "{ckpt}", "--ray", "--fractions", "0.02", "--num-workers", "16"], "BatchNorm needs >= 2"),
    (["--checkpoint", "{ckpt}", "--out", "nosuchscheme://bucket/x"], "cannot open storage"),
    (["--checkpoint", "{ckpt}", "--preset", "fashion-mnist-cpu"], "--preset: names its own pretraining run"),
    (["--preset", "mnist"], "--preset: unknown preset 'mnist'"),
    (["--run", "{tmp}/runs/fresh", "--pretrain-args", "--name other"], "--name comes from --run"),
    (["--run", "{tmp}/runs/fresh", "--pretrain-args", "--epochs 0"], "--pretrain-args: --epochs: must be >= 1"),
    (["--run", "{tmp}/runs/fresh", "--pretrain-args", "--optimiser lars"], "unrecognized arguments: --optimiser"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--checkpoint", "{ckpt}", "--time-limit", "0"], "--time-limit: must be > 0, got 0"),
])
def test_experiments_bad_input_one_line_error_before_work(tmp_path, capsys, args, needle):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt) for a in args]
    assert exp.main([*args, "--out", str(tmp_path / "out")] if "--out" not in args else args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err, err
    assert not captured.out and not (tmp_path / "out").exists() and not (tmp_path / "runs" / "fresh").exists()


def test_experiments_unwritable_runs_cache_is_one_line_before_work(tmp_path, capsys):
    """Every finished run is packed into --runs-cache: one that cannot be written fails before the study (not at its
    first pack, after pretraining). A path under a regular file is unwritable even to root."""
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    (tmp_path / "afile").write_text("x")
    cache = str(tmp_path / "afile" / "cache")
    assert exp.main(["--checkpoint", ckpt, "--out", str(tmp_path / "out"), "--runs-cache", cache]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"error: --runs-cache {cache}: not writable (") and "\n" not in err, err
    assert "--storage-path" not in err and not captured.out and not (tmp_path / "out").exists()


def test_a_time_limit_stops_new_runs_from_starting_and_a_rerun_goes_on(tmp_path, capsys, monkeypatch):
    """--time-limit: past it no classifier run starts; what is done is written, the invocation logged, exit 0; the
    same command without the limit then trains what is missing and finishes."""
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--small-fraction", "0.1", "--arms", "linear,finetune",
            "--seeds", "1", "--steps", "2", "--batch-size", "32", "--lr-grid", "0.1", "--wd-grid", "0",
            "--grid-extensions", "0", "--baselines", "knn", "--knn-k", "3", "--l2-grid", "1e-2", "--no-ray",
            "--threads", "1", "--out", str(out), "--runs-cache", str(cache)]
    assert exp.main([*args, "--time-limit", "1e-4"]) == 0
    said = capsys.readouterr().out
    assert "[exp] paused: the time limit of 0.0001 min is reached; " in said and "rerun the same command" in said
    assert not (out / "runs").exists() or not any((out / "runs").glob("finetune-*/results.json"))  # none started
    summary = read(out / "results.json")  # the probes' part, written before the limit stopped the study
    assert not summary["complete"] and {r["arm"] for r in summary["records"]} == {"linear", "knn"}
    assert [x["complete"] for x in read(cache / "invocations.json")] == [False]
    # a limit reached inside a cell (its selection run trained, its final run not started): the runs the cell
    # finished are packed for the next session all the same (the limit is made to fall there, not timed)
    started: list[str] = []

    def limit_after_one_run(deadline, limit):
        def guard(run: str) -> None:
            started.append(run)
            if len(started) > 1:
                time.sleep(0.5)  # the stop comes measurably after the report's last update
                raise experiment_run.StudyPaused(f"the time limit of {limit:g} min is reached")
        return guard
    monkeypatch.setattr(experiment_run, "time_guard", limit_after_one_run)
    assert exp.main([*args, "--time-limit", "60"]) == 0
    assert "[exp] paused" in capsys.readouterr().out and len(started) == 2
    # the report is rewritten at the stop: its wall time is the invocation's whole time, as logged
    summary = read(out / "results.json")
    assert summary["invocations"] == read(cache / "invocations.json") and len(summary["invocations"]) == 2
    # the log keeps 0.1 s (round is monotone: the report, written after the log, rounds to at least the logged time)
    assert round(summary["elapsed_s"], 1) >= summary["invocations"][-1]["elapsed_s"] >= 0.5
    assert [p.name[:-len(".json.gz")] for p in cache.glob("finetune-*.json.gz")] == [started[0].rsplit("/", 1)[1]]
    monkeypatch.undo()
    assert exp.main(args) == 0
    summary = read(out / "results.json")
    assert summary["complete"] and {r["arm"] for r in summary["records"]} == {"linear", "knn", "finetune"}
    assert [x["complete"] for x in read(cache / "invocations.json")] == [False, False, True]


def test_a_resumed_study_writes_its_report_once_for_the_parts_it_replays(tmp_path, capsys, monkeypatch):
    """A study resumed on another machine replays every finished part before its new work; the report is written
    when something new trained (first the report of the replay, so a time limit that stops the new work leaves it)
    and at the end, not after each replayed part (that cost ~10 min per restart of the CPU preset)."""
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    cache = tmp_path / "cache"
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--small-fraction", "0.1", "--arms", "linear,finetune",
            "--seeds", "2", "--steps", "2", "--batch-size", "32", "--wd-grid", "0", "--grid-extensions", "0",
            "--baselines", "knn", "--knn-k", "3", "--l2-grid", "1e-2", "--no-ray", "--threads", "1",
            "--runs-cache", str(cache)]
    writes: list[tuple[bool, int]] = []  # (complete, records) of each write of the report

    def counted(out, summary):
        writes.append((summary["complete"], len(summary["records"])))
        write_outputs(out, summary)
    write_outputs = experiment_run.write_outputs
    monkeypatch.setattr(exp, "write_outputs", counted)
    assert exp.main([*args, "--lr-grid", "0.1", "--out", str(tmp_path / "first")]) == 0
    assert writes == [(False, 2), (False, 3), (False, 5), (False, 6), (True, 6)]  # each new part, then the end

    writes.clear()  # everything finished: replayed on a fresh --out from the cache, one write
    assert exp.main([*args, "--lr-grid", "0.1", "--out", str(tmp_path / "second")]) == 0
    assert writes == [(True, 6)]
    first, second = (read(tmp_path / d / "results.json")["records"] for d in ("first", "second"))
    assert [(r["arm"], r["top1"]) for r in second] == [(r["arm"], r["top1"]) for r in first]

    writes.clear()  # a grid point more: replicate 0's probes replay, its fine-tuning cell trains a new selection run
    monkeypatch.setattr(experiment_run, "time_guard", lambda deadline, limit: stop_at_once)
    assert exp.main([*args, "--lr-grid", "0.1,0.2", "--out", str(tmp_path / "third"), "--time-limit", "60"]) == 0
    assert "[exp] paused" in capsys.readouterr().out
    assert writes == [(False, 2), (False, 2)]  # the replayed probes, before the run the limit stopped, and at the stop
    summary = read(tmp_path / "third" / "results.json")
    assert not summary["complete"] and {r["arm"] for r in summary["records"]} == {"linear", "knn"}


def stop_at_once(run: str) -> None:
    raise experiment_run.StudyPaused("the time limit of 60 min is reached")


def test_experiments_says_an_empty_runs_cache_is_empty(tmp_path, capsys, monkeypatch):
    """A missing or empty --runs-cache has nothing to take because it is empty, not because the store has it all."""
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")

    def stop(plan, on_update=None):  # the study itself is not what this test is about
        raise KeyboardInterrupt
    monkeypatch.setattr(exp, "execute", stop)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--out", str(out), "--runs-cache", str(cache)]
    assert exp.main(args) == 130
    stdout = capsys.readouterr().out
    assert f"--runs-cache {cache}: empty (no finished run cached yet)" in stdout and "every cached run" not in stdout
    # created writable; the probe is gone; the interrupted invocation's wall time is logged (nothing finished)
    assert [p.name for p in cache.iterdir()] == ["invocations.json"]
    assert [(x["records"], x["complete"]) for x in read(cache / "invocations.json")] == [(0, False)]

    (out / "runs" / "a").mkdir(parents=True)
    (out / "runs" / "a" / "results.json").write_text("{}")
    (cache / "a.json.gz").write_bytes(gzip.compress(b"{}"))
    assert exp.main(args) == 130
    assert f"nothing to take (every cached run is in {out / 'runs'} already)" in capsys.readouterr().out


def test_probes_read_back_charge_the_shared_feature_pass_once(tmp_path, capsys):
    """The SimCLR encoder's feature pass serves every replicate and is charged to one record. A study resumed with a
    replicate more reads the first replicate's probes back (they carry the pass) and computes the new one's: the new
    records must not charge the pass again (the study's compute would grow by one pass per session)."""
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "exp"
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--arms", "linear", "--baselines", "", "--no-ray",
            "--threads", "1", "--l2-grid", "1e-4,1e-2", "--out", str(out)]
    assert exp.main([*args, "--seeds", "1"]) == 0
    first = read(out / "results.json")["records"]
    assert exp.main([*args, "--seeds", "2"]) == 0
    assert capsys.readouterr().out.count("results read back from") == 1  # replicate 0's, not recomputed
    records = read(out / "results.json")["records"]
    entries = {e.split("-")[1]: read(out / "runs" / e / "results.json")
               for e in os.listdir(out / "runs") if e.startswith("probes-r")}
    assert sorted(entries) == ["r0", "r1"]
    assert entries["r0"]["charged"] == ["ssl"] and entries["r1"]["charged"] == []
    r0 = [r for r in records if r["replicate"] == 0]
    assert all(r["reused"] for r in r0) and [r["train_time_s"] for r in r0] == [r["train_time_s"] for r in first]
    # replicate 1 computed in one process with replicate 0: the same records, the pass charged to replicate 0's
    assert exp.main([*args, "--seeds", "2", "--out", str(tmp_path / "together")]) == 0
    together = read(tmp_path / "together" / "results.json")["records"]
    assert [r["top1"] for r in together] == [r["top1"] for r in records]
    assert [read(tmp_path / "together" / "runs" / e / "results.json")["charged"]
            for e in sorted(os.listdir(tmp_path / "together" / "runs"))] == [["ssl"], []]
