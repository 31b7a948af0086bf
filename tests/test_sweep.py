"""Ray Tune sweeps: the shipped sweep files, every bad-input error, a real two-trial sweep on digits, resume, and the
augmentation switch at the transform level."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from simclr_dist.config import PretrainConfig
from simclr_dist.data.datasets import dataset_info
from simclr_dist.data.loader import LoaderSpec
from simclr_dist.data.torch_loader import TorchPretrainLoader
from simclr_dist.sweep import (OBJECTIVES, SweepError, check_spec, collect_rows, load_spec, main, make_plots,
                               parse_spec, plan_concurrency, run_sweep, table_csv, table_markdown)

TUNE = Path(__file__).resolve().parents[1] / "tune"
SHIPPED = {"temperature": 5, "batch_size": 5, "epochs_x_batch": 20, "augmentations": 28}
PNG = b"\x89PNG\r\n\x1a\n"


def tiny(tmp_path, **search) -> dict:
    """A sweep of seconds-per-epoch digits trials: 16 px, ResNet-18 at 1/8 width, batch 64, one 1-CPU worker."""
    return {"study": "tiny", "storage_path": str(tmp_path / "sweeps"),
            "base": {"dataset": "digits", "image_size": 16, "width": 0.125, "batch_size": 64, "epochs": 1,
                     "log_every": 5},
            "search": search or {"temperature": [0.1, 0.5]},
            "objective": {"metric": "val_knn_top1", "mode": "max"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1}, "concurrency": 2}


# ------------------------------------------------------------------------------------------ the shipped files
@pytest.mark.parametrize("name, trials", SHIPPED.items())
def test_shipped_sweep_file_parses_and_validates(name, trials, tmp_path):
    spec = load_spec(str(TUNE / f"{name}.yaml"), [f"storage_path={tmp_path}"])
    cfgs = check_spec(spec)  # every trial's config, resolved and validated (flags, data availability, objective)
    assert spec.study == name and len(cfgs) == len(spec.trial_configs()) == trials
    assert spec.metric in OBJECTIVES and spec.mode == "max"
    assert all(c.knn_split == "val" and c.knn_every >= 0 for c in cfgs)  # never selects on the test split
    assert spec.resources["num_workers"] >= 1 and spec.concurrency >= 1
    if name == "augmentations":
        assert spec.scheduler == {"type": "asha", "time_attr": "epoch", "max_t": 100, "grace_period": 25,
                                  "reduction_factor": 2}
        policies = {c.augment for c in cfgs}
        assert {"crop", "rotate", "crop,color", "cutout,sobel", "blur,rotate"} <= policies and len(policies) == 28
    else:
        assert spec.scheduler is None
    if name in ("batch_size", "epochs_x_batch"):
        assert {c.batch_size for c in cfgs} == {256, 512, 1024, 2048, 4096}
        assert {c.lr_scaling for c in cfgs} == {"sqrt"}  # one LR rule across batch sizes
    if name == "epochs_x_batch":
        assert {c.epochs for c in cfgs} == {100, 200, 400, 800}
    if name == "temperature":
        assert [c.temperature for c in cfgs] == [0.05, 0.1, 0.2, 0.5, 1.0]


def test_dry_run_prints_trials_and_resources(ray_cluster, tmp_path, capsys):
    rc = main([str(TUNE / "temperature.yaml"), "--dry-run", "--storage-path", str(tmp_path),
               "--set", "cpus_per_worker=1", "--set", "use_gpu=false", "--set", "temperature=[0.1,0.5,1.0]"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3 trial(s)" in out and "objective val_knn_top1 (max)" in out
    assert "at once: 2 trial(s)" in out and "the cluster fits 2 at once" in out  # 2 CPUs, 1 CPU per trial
    assert out.count("1 worker(s) x 1 CPU") == 3
    assert not (tmp_path / "temperature").exists()  # a dry run starts nothing and writes nothing


def test_set_overrides():
    spec = load_spec(str(TUNE / "epochs_x_batch.yaml"),
                     ["epochs=5", "dataset=digits", "batch_size=[64,128]", "num_workers=2", "concurrency=3",
                      "objective.metric=val_knn_top5", "scheduler=asha", "scheduler.grace_period=2",
                      "knn_every=1"])
    assert "epochs" not in spec.search and spec.base["epochs"] == 5  # a scalar fixes a searched field
    assert spec.search["batch_size"].values == [64, 128]              # a list makes a grid
    assert spec.resources["num_workers"] == 2 and spec.concurrency == 3 and spec.metric == "val_knn_top5"
    assert spec.scheduler["type"] == "asha" and spec.scheduler["grace_period"] == 2
    assert len(check_spec(spec)) == 2


# ------------------------------------------------------------------------------------------ bad input
BAD = [
    ({"search": {"tempreature": [0.1, 0.5]}}, [], r"search.tempreature: unknown parameter 'tempreature'.*did you "
                                                 r"mean 'temperature'"),
    ({}, ["lerning_rate=0.1"], r"--set lerning_rate=0.1: unknown parameter 'lerning_rate'"),
    ({"search": {"augment": ["crop", "crop,colour"]}}, [], r"search.augment: unknown augmentation component "
                                                            r"'colour'"),
    ({"search": {"augment": {"pairs": ["crop", "jitter"]}}}, [], r"unknown augmentation component 'jitter'"),
    ({"search": {"temperature": ["cold"]}}, [], r"temperature must be a float, got 'cold'"),
    ({"base": {"knn_split": "test"}}, [], r"'knn_split' is set by the sweep"),
    ({"resources": {"gpus": 1}}, [], r"resources.gpus: unknown resource"),
    ({"scheduler": {"type": "asha", "grace": 2}}, [], r"scheduler.grace: unknown ASHA parameter"),
    ({"bogus": 1}, [], r"bogus: unknown section"),
]


@pytest.mark.parametrize("patch, overrides, match", BAD)
def test_bad_sweep_file_one_line_error_at_parse(patch, overrides, match, tmp_path):
    data = {**tiny(tmp_path), **patch}
    with pytest.raises(SweepError, match=match) as e:
        check_spec(parse_spec(data, "bad.yaml", overrides))
    assert "\n" not in str(e.value)


BAD_CHECK = [
    (["objective.metric=linear_top1"], r"objective.metric: the trainable does not report 'linear_top1'"),
    (["objective.metric=knn_top1"], r"does not report 'knn_top1'; did you mean 'val_knn_top1'"),  # the test split
    (["objective.metric=loss"], r"'loss' is not an accuracy on the held-out validation split"),
    (["knn_every=-1"], r"knn_every: -1 turns off the kNN monitor"),
    (["scheduler=asha"], r"knn_every 0 measures the objective only after the last epoch"),
    (["scheduler=asha", "knn_every=1", "scheduler.max_t=5"], r"max_t: 5 exceeds the trials' 1 epochs"),
    (["num_workers=3"], r"trial 1 \(temperature=0.1\): --batch-size: 64 is not divisible by --num-workers 3"),
]


@pytest.mark.parametrize("overrides, match", BAD_CHECK)
def test_bad_sweep_one_line_error_before_any_trial(overrides, match, tmp_path):
    with pytest.raises(SweepError, match=match) as e:
        check_spec(parse_spec(tiny(tmp_path), "bad.yaml", overrides))
    assert "\n" not in str(e.value)


def test_trial_bigger_than_the_cluster():
    spec = parse_spec(tiny(Path("/tmp")), "big.yaml", ["num_workers=4"])
    cfgs = check_spec(spec)
    with pytest.raises(SweepError, match=r"trial 1 needs 4 CPU \(4 Ray Train worker\(s\) x 1 CPU\); the Ray cluster "
                                         r"has 2 CPU"):
        plan_concurrency(spec, cfgs, {"CPU": 2.0}, None)
    spec = parse_spec(tiny(Path("/tmp")), "gpu.yaml", ["use_gpu=true"])
    with pytest.raises(SweepError, match=r"needs 1 GPU .* the Ray cluster has 0 GPU"):
        plan_concurrency(spec, check_spec(spec), {"CPU": 8.0}, None)
    assert plan_concurrency(spec, check_spec(spec), {"CPU": 8.0, "GPU": 1.0}, None)[0] == 1
    spec = parse_spec(tiny(Path("/tmp")), "ok.yaml")
    assert plan_concurrency(spec, check_spec(spec), {"CPU": 16.0}, None)[0] == 2  # the file's concurrency
    assert plan_concurrency(spec, check_spec(spec), {"CPU": 16.0}, 1)[0] == 1     # --max-concurrent


def test_too_big_for_the_real_cluster_fails_before_any_trial(ray_cluster, tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(json.dumps(tiny(tmp_path)))  # JSON is YAML
    rc = main([str(path), "--set", "cpus_per_worker=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "needs 3 CPU" in err and "has 2 CPU" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweeps" / "tiny").exists()  # nothing started, nothing written


# ------------------------------------------------------------------------------------------ results
class FakeResult:
    def __init__(self, config, metrics, error=None, history=None):
        self.config, self.metrics, self.error, self.path = config, metrics, error, f"/x/{metrics.get('trial_id', 'f')}"
        self.metrics_dataframe = pd.DataFrame(history) if history else None


def test_results_table_records_failed_trials_with_their_error(tmp_path):
    spec = parse_spec(tiny(tmp_path, augment={"pairs": ["crop", "color", "rotate"]}), "aug.yaml")
    ok = [FakeResult({"augment": a}, {"trial_id": f"t{i}", "epoch": 1, "time_total_s": 3.0},
                     history=[{"epoch": 1, "val_knn_top1": 0.5 + i / 20, "val_knn_top5": 0.9, "loss": 4.0}])
          for i, a in enumerate(["crop", "color", "rotate", "crop,color", "crop,rotate"])]
    err = RuntimeError("Traceback ...\n  File x\nsimclr_dist.pretrain.RunError: non-finite loss at step 0 (epoch 1); "
                       "stopped.")
    failed = FakeResult({"augment": "color,rotate"}, {"trial_id": "t9"}, error=err)
    rows = collect_rows(spec, ok + [failed])
    assert [r["trial"] for r in rows] == ["t4", "t3", "t2", "t1", "t0", "t9"]  # best first, failed last
    assert rows[-1]["status"] == "FAILED" and rows[-1]["error"].startswith("simclr_dist.pretrain.RunError: non-finite")
    assert rows[0]["status"] == "OK" and rows[0]["val_knn_top1"] == pytest.approx(0.7) and rows[0]["epochs_done"] == 1
    parsed = list(csv.DictReader(table_csv(rows).splitlines()))
    assert len(parsed) == 6 and parsed[-1]["status"] == "FAILED" and "non-finite" in parsed[-1]["error"]
    md = table_markdown(spec, rows)
    assert "| t9 | FAILED |" in md and "never the test split" in md
    plots = make_plots(spec, rows)
    assert set(plots) == {"augmentation_heatmap.png"} and plots["augmentation_heatmap.png"].startswith(PNG)
    spec = parse_spec(tiny(tmp_path, batch_size=[64, 128], epochs=[1, 2]), "eb.yaml")
    rows = [{"trial": f"t{b}{e}", "status": "OK", "batch_size": b, "epochs": e, "val_knn_top1": 0.5 + b / 1000 + e / 10,
             "note": ""} for b in (64, 128) for e in (1, 2)]
    assert set(make_plots(spec, rows)) == {"accuracy_vs_batch_size.png"}


# ------------------------------------------------------------------------------------------ real sweeps
@pytest.mark.ray
def test_real_sweep_on_digits_writes_table_and_plot(ray_cluster, tmp_path):
    """Two 1-epoch trials (1 worker x 1 CPU each, so both fit on the 2-CPU test cluster), each a Ray Train run
    inside a Tune trial with metrics forwarded by TuneReportCallback. (Resume: the slow test below.)"""
    spec = parse_spec(tiny(tmp_path), "tiny.yaml")
    out = run_sweep(spec)
    rows = out["rows"]
    assert out["concurrency"] == 2 and len(rows) == 2
    assert {r["status"] for r in rows} == {"OK"} and sorted(r["temperature"] for r in rows) == [0.1, 0.5]
    for r in rows:
        assert 0.0 < r["val_knn_top1"] <= r["val_knn_top5"] <= 1.0 and r["epochs_done"] == 1
        run_dir = tmp_path / "sweeps" / "tiny" / "train" / r["trial"]  # the trial's Train run, in shared storage
        assert list(run_dir.glob("checkpoint_*/manifest.json"))
    files = out["files"]
    assert set(files) == {"csv", "markdown", "accuracy_vs_temperature.png"}
    assert len(list(csv.DictReader(open(files["csv"])))) == 2
    assert "| trial | status | temperature | val_knn_top1 |" in Path(files["markdown"]).read_text()
    assert Path(files["accuracy_vs_temperature.png"]).read_bytes().startswith(PNG)

    with pytest.raises(SweepError, match="already exists: pass --resume"):
        run_sweep(parse_spec(tiny(tmp_path), "tiny.yaml"))
    with pytest.raises(SweepError, match="was started with a different base"):
        run_sweep(parse_spec(tiny(tmp_path), "tiny.yaml", ["epochs=2"]), resume=True)


def _trial_records(exp: Path) -> dict[str, tuple]:
    """Per trial: its Tune results (one line per reported epoch) and its Train run's checkpoint directories; a
    rerun trial would add lines (or rewrite them with new times) and new checkpoints."""
    return {d.name: ((d / "result.json").read_text(),
                     sorted(p.name for p in (exp / "train" / d.name).glob("checkpoint_*") if p.is_dir()))
            for d in exp.iterdir() if (d / "result.json").exists()}


def _interrupt_after_first_trial():
    """A Tune callback that sends the driver SIGUSR1 (which Tune handles like Ctrl+C) when the first trial ends."""
    from ray import tune

    class Interrupt(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            os.kill(os.getpid(), signal.SIGUSR1)
    return Interrupt()


@pytest.mark.slow
@pytest.mark.ray
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    """One trial at a time: the first finishes, the sweep is interrupted, --resume runs only the rest. The second
    trial fails (a non-finite loss drill) and is recorded as failed without stopping the sweep."""
    data = tiny(tmp_path, chaos_nan_step=[-1, 0])
    data["concurrency"] = 1
    first = run_sweep(parse_spec(data, "tiny.yaml"), callbacks=[_interrupt_after_first_trial()])
    done = [r for r in first["rows"] if r["status"] == "OK"]
    assert len(done) == 1 and done[0]["chaos_nan_step"] == -1
    assert any(r["status"] == "UNFINISHED" for r in first["rows"]) or len(first["rows"]) == 1
    exp = tmp_path / "sweeps" / "tiny"
    before = _trial_records(exp)[done[0]["trial"]]
    assert before[0].count("\n") == 1 and len(before[1]) == 1  # one epoch reported, one checkpoint

    second = run_sweep(parse_spec(data, "tiny.yaml"), resume=True)
    rows = {r["chaos_nan_step"]: r for r in second["rows"]}
    assert rows[-1]["trial"] == done[0]["trial"] and rows[-1]["status"] == "OK"
    assert rows[-1]["val_knn_top1"] == done[0]["val_knn_top1"]
    assert _trial_records(exp)[done[0]["trial"]] == before  # not rerun
    assert rows[0]["status"] == "FAILED" and "non-finite loss" in rows[0]["error"]
    assert "| FAILED |" in Path(second["files"]["markdown"]).read_text()

    before = _trial_records(exp)
    third = run_sweep(parse_spec(data, "tiny.yaml"), resume=True)  # all done: a resume reruns nothing
    assert [(r["trial"], r["status"]) for r in third["rows"]] == [(r["trial"], r["status"]) for r in second["rows"]]
    assert _trial_records(exp) == before


# ------------------------------------------------------------------------------------------ the augmentation switch
def _views(cfg: PretrainConfig, n: int = 8):
    """Views the trial's own loader makes from its config, with the input images they came from (float [0, 1])."""
    cfg = cfg.resolved()
    loader = TorchPretrainLoader(LoaderSpec(
        dataset=cfg.dataset, split=cfg.split, root=cfg.data_root, image_size=cfg.image_size, augment=cfg.augment,
        jitter_strength=cfg.jitter_strength, batch_size=8, rank=0, world_size=1, seed=0))
    info = dataset_info(cfg.dataset)
    mean, std = torch.tensor(info.mean)[:, None, None], torch.tensor(info.std)[:, None, None]
    torch.manual_seed(0)
    out = []
    for i in range(n):
        v1, v2, _ = loader.dataset[i]
        img = loader.dataset.base[i][0].float() / 255
        out.append((img, v1 * std + mean, v2 * std + mean))
    return loader, out


def _colour_stats(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.mean((1, 2)), x.std((1, 2))])  # per-channel mean and std


def test_augmentation_switch_changes_the_pipeline(tmp_path):
    """The 'rotate' and 'color' trials of the augmentation sweep build different pipelines: with colour off the
    views keep the input's colour statistics exactly (rotation only moves pixels); with colour on they do not."""
    spec = load_spec(str(TUNE / "augmentations.yaml"), ["dataset=digits", "image_size=16", "batch_size=64",
                                                        "cpus_per_worker=1", f"storage_path={tmp_path}"])
    cfgs = {c.augment: c for c in check_spec(spec)}
    loader, views = _views(cfgs["rotate"])
    assert loader.augment.components == ("rotate",)
    for img, v1, v2 in views:
        for v in (v1, v2):
            torch.testing.assert_close(_colour_stats(v), _colour_stats(img), atol=1e-5, rtol=0)
    loader, views = _views(cfgs["color"])
    assert loader.augment.components == ("color",)
    changed = [not torch.allclose(_colour_stats(v), _colour_stats(img), atol=1e-3)
               for img, v1, v2 in views for v in (v1, v2)]
    assert sum(changed) >= len(changed) // 2  # colour jitter is applied with p=0.8


# ------------------------------------------------------------------------------------------ the validation split
def test_knn_validation_split_is_fixed_stratified_and_disjoint_from_test():
    from simclr_dist.config import build_parser
    from simclr_dist.data.datasets import load_dataset
    from simclr_dist.data.splits import validation_split

    train = load_dataset("digits", "train", image_size=8)
    bank, val = validation_split(train)
    bank_idx, val_idx = set(bank.indices), set(val.indices)
    assert not bank_idx & val_idx and len(bank_idx | val_idx) == len(train)  # the labelled train split, partitioned
    assert len(val_idx) == pytest.approx(0.2 * len(train), abs=10)
    counts = torch.bincount(train.targets[sorted(val_idx)], minlength=10)
    assert counts.min() >= 0.18 * torch.bincount(train.targets).min()      # every class held out ~20%
    assert validation_split(train)[1].indices == val.indices                # fixed: every trial shares it
    help_text = build_parser(PretrainConfig, "p", "d").format_help()       # the flag renders in --help
    assert "--knn-split" in help_text and "20% of the labelled train split" in " ".join(help_text.split())
