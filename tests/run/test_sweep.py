"""Ray Tune sweeps: the shipped sweep files, every bad-input error, a real two-trial sweep on digits, resume, and the
augmentation switch at the transform level."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from simclr_dist.config import PretrainConfig
from simclr_dist.data.datasets import dataset_info
from simclr_dist.data.loader import LoaderSpec
from simclr_dist.data.torch_loader import TorchPretrainLoader
from simclr_dist.config.sweep import OBJECTIVES, SweepError, SweepSpec, load_spec, parse_sweep
from simclr_dist.report.sweep import (
    cells_csv,
    heatmap,
    make_plots,
    read_results,
    table_csv,
    table_markdown,
    write_results,
)
from simclr_dist.run.jobs.capacity import Capacity, Growth, capacity_of
from simclr_dist.run.studies.sweep_plan import check_spec, plan_concurrency, trial_resources
from simclr_dist.run.studies.sweep_run import check_identity, collect_rows, run_sweep
from simclr_dist.sweep import main

TUNE = Path(__file__).resolve().parents[2] / "tune"
SHIPPED = {"temperature": 12, "batch_size": 5, "epochs_x_batch": 20, "augmentations": 29,
           "augmentations_fmnist_cpu": 33, "temperature_fmnist_cpu": 18}
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
    if spec.base["dataset"] == "fashion-mnist" and not dataset_info("fashion-mnist").embedded:
        pytest.skip("the Debian package dataset-fashion-mnist is not installed (make setup installs it)")
    cfgs = check_spec(spec)  # every trial's config, resolved and validated (flags, data availability, objective)
    assert spec.study == name.replace("_fmnist_cpu", "-fmnist-cpu") and len(cfgs) == len(spec.trial_configs()) == trials
    assert spec.metric in OBJECTIVES and spec.mode == "max"
    assert all(c.knn_split == "val" and c.knn_every >= 0 for c in cfgs)  # never selects on the test split
    assert spec.metric == "val_linear_top1" and all(c.linear_probe for c in cfgs)  # the paper's linear protocol
    assert spec.resources["num_workers"] >= 1 and spec.concurrency >= 1
    if name.endswith("_cpu"):  # the CPU-sized studies: every trial 1 CPU, the same fixed 10k-image subset
        assert {(c.num_workers, c.cpus_per_worker, c.train_subset) for c in cfgs} == {(1, 1.0, 10000)}
        # 3 seeds per cell: every cell (its search values) once at each of seeds 0, 1, 2
        assert spec.seeds == [0, 1, 2]
        by_cell = {}
        for c in cfgs:
            by_cell.setdefault(tuple(getattr(c, k) for k in spec.search), []).append(c.seed)
        assert len(by_cell) == trials // 3 and all(sorted(s) == [0, 1, 2] for s in by_cell.values())
    else:
        assert spec.seeds is None and len({c.seed for c in cfgs}) == 1
    if name == "augmentations_fmnist_cpu":
        assert {c.augment2 for c in cfgs} == {"crop"} and {c.augment for c in cfgs} >= {"crop", "crop,color,cutout"}
    if name == "augmentations":
        assert spec.scheduler == {"type": "asha", "time_attr": "epoch", "max_t": 100, "grace_period": 25,
                                  "reduction_factor": 2}
        policies = {c.augment for c in cfgs}
        assert {c.augment2 for c in cfgs} == {"crop"}  # the other branch: crop and resize only
        assert all(p.startswith("crop") for p in policies) and len(policies) == 29
        assert {"crop", "crop,rotate", "crop,color", "crop,cutout,sobel", "crop,blur,rotate", "crop,gray"} <= policies
    elif name != "augmentations":
        assert spec.scheduler is None
    if name in ("batch_size", "epochs_x_batch"):
        assert {c.batch_size for c in cfgs} == {256, 512, 1024, 2048, 4096}
        assert {c.lr_scaling for c in cfgs} == {"sqrt"}  # one LR rule across batch sizes
    if name == "epochs_x_batch":
        assert {c.epochs for c in cfgs} == {100, 200, 400, 800}
    if name == "temperature_fmnist_cpu":
        assert {(c.temperature, c.proj_normalize) for c in cfgs} == {(t, n) for t in (0.1, 0.5, 10.0)
                                                                    for n in (False, True)}
    if name == "temperature":
        assert sorted({(c.temperature, c.proj_normalize) for c in cfgs}) == sorted(
            (t, n) for t in (0.05, 0.1, 0.5, 1.0, 10.0, 100.0) for n in (False, True))


def test_dry_run_prints_trials_and_resources(ray_cluster, tmp_path, capsys):
    rc = main([str(TUNE / "temperature.yaml"), "--dry-run", "--storage-path", str(tmp_path),
               "--set", "cpus_per_worker=1", "--set", "use_gpu=false", "--set", "temperature=[0.1,0.5,1.0]",
               "--set", "proj_normalize=true"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3 trial(s)" in out and "objective val_linear_top1 (max)" in out
    assert "at once: 2 trial(s)" in out and "the cluster fits 2 at once" in out  # 2 CPUs, 1 CPU per trial
    assert out.count("1 worker(s) x 1 CPU") == 3
    assert not (tmp_path / "temperature").exists()  # a dry run starts nothing and writes nothing


def test_seeds_replicate_every_cell_as_separate_trials(tmp_path):
    """``seeds: N`` runs every cell once per seed (seeds 0..N-1, or the listed ones), each its own trial and seed;
    the seed is a grid axis of Tune's space and part of what a resume must keep."""
    spec = parse_sweep(tiny(tmp_path), "s.yaml", ["seeds=[3,7]"])
    assert spec.trial_configs() == [{"temperature": t, "seed": s} for t in (0.1, 0.5) for s in (3, 7)]
    assert [c.seed for c in check_spec(spec)] == [3, 7, 3, 7]
    assert spec.param_space()["seed"] == {"grid_search": [3, 7]} and spec.identity()["seeds"] == [3, 7]
    assert parse_sweep({**tiny(tmp_path), "seeds": 2}, "s.yaml").seeds == [0, 1]
    unseeded = parse_sweep(tiny(tmp_path), "s.yaml")
    assert unseeded.seeds is None and "seed" not in unseeded.param_space() and len(unseeded.trial_configs()) == 2


def test_resume_of_a_sweep_saved_before_seeds_existed_and_a_changed_field_named(tmp_path):
    """A sweep.json written before ``seeds`` joined the identity lacks the key: it is None, as in a spec without
    seeds, so the resume goes on; a field that did change is named (and only it)."""
    spec = parse_sweep(tiny(tmp_path), "s.yaml")
    old = {k: v for k, v in spec.identity().items() if k != "seeds"}
    check_identity(spec, old)  # resumes: no error
    with pytest.raises(SweepError, match=r"was started with a different num_samples: resume with the same file") as e:
        check_identity(parse_sweep(tiny(tmp_path), "s.yaml", ["num_samples=2"]), old)
    assert "\n" not in str(e.value)
    with pytest.raises(SweepError, match=r"was started with a different seeds: "):
        check_identity(parse_sweep(tiny(tmp_path), "s.yaml", ["seeds=2"]), old)  # the new field, when it is set
    with pytest.raises(SweepError, match=r"a different base, retired, seeds: "):  # a key only the saved one has
        check_identity(parse_sweep(tiny(tmp_path), "s.yaml", ["seeds=2", "epochs=2"]), {**old, "retired": 1})


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
    ({"seeds": 0}, [], r"^bad.yaml: seeds: must be a number of seeds >= 1 or a list of distinct seeds, got 0$"),
    ({"seeds": "three"}, [], r"seeds: must be a number of seeds >= 1 or a list of distinct integer seeds >= 0, got "
                             r"'three'"),
    ({"seeds": True}, [], r"seeds: must be a number of seeds .* got True"),
    ({"seeds": [0, 1.5]}, [], r"seeds: must be .* got \[0, 1.5\]"),
    ({"seeds": []}, [], r"seeds: must be .* got \[\]"),
    ({"seeds": [2, 2]}, [], r"seeds: duplicate seeds in \[2, 2\]"),
    ({}, ["seeds=-2"], r"seeds: must be a number of seeds >= 1 .* got -2"),
    ({"seeds": 2}, ["seed=3"], r"base.seed: conflicts with seeds \[0, 1\]"),
    ({"search": {"seed": [0, 1]}}, [], r"search.seed: repeat every cell over seeds with the top-level 'seeds: N'"),
    ({"seeds": 2, "num_samples": 2}, [], r"^bad.yaml: seeds: cannot be combined with num_samples 2: with seeds "
                                         r"every cell runs once per seed"),
    ({"seeds": 3}, ["num_samples=4"], r"^bad.yaml: seeds: cannot be combined with num_samples 4"),
    ({"seeds": 2, "search": {"temperature": {"uniform": [0.1, 0.5]}}}, [],
     r"^bad.yaml: seeds: cannot be combined with the random search.temperature \(uniform\)"),
    ({"seeds": 2, "search": {"batch_size": [64, 128], "temperature": {"choice": [0.1, 0.5]}}}, [],
     r"^bad.yaml: seeds: cannot be combined with the random search.temperature \(choice\)"),
]


@pytest.mark.parametrize("patch, overrides, match", BAD)
def test_bad_sweep_file_one_line_error_at_parse(patch, overrides, match, tmp_path):
    data = {**tiny(tmp_path), **patch}
    with pytest.raises(SweepError, match=match) as e:
        check_spec(parse_sweep(data, "bad.yaml", overrides))
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
        check_spec(parse_sweep(tiny(tmp_path), "bad.yaml", overrides))
    assert "\n" not in str(e.value)


def fixed(**resources: float) -> Capacity:
    """A cluster that will not grow (no autoscaler, no stated maximum)."""
    return capacity_of(resources, Growth(), autoscaling=False)


def test_trial_bigger_than_the_cluster():
    spec = parse_sweep(tiny(Path("/tmp")), "big.yaml", ["num_workers=4"])
    cfgs = check_spec(spec)
    with pytest.raises(SweepError, match=r"trial 1 needs 4 CPU \(4 Ray Train worker\(s\) x 1 CPU\); the Ray cluster "
                                         r"has 2 CPU \(no autoscaler; .*--max-cluster-cpus"):
        plan_concurrency(spec, cfgs, fixed(CPU=2.0), None)
    spec = parse_sweep(tiny(Path("/tmp")), "gpu.yaml", ["use_gpu=true"])
    with pytest.raises(SweepError, match=r"needs 1 GPU .* the Ray cluster has 0 GPU"):
        plan_concurrency(spec, check_spec(spec), fixed(CPU=8.0), None)
    assert plan_concurrency(spec, check_spec(spec), fixed(CPU=8.0, GPU=1.0), None)[0] == 1
    spec = parse_sweep(tiny(Path("/tmp")), "ok.yaml")
    assert plan_concurrency(spec, check_spec(spec), fixed(CPU=16.0), None)[0] == 2  # the file's concurrency
    assert plan_concurrency(spec, check_spec(spec), fixed(CPU=16.0), 1)[0] == 1     # --max-concurrent


def test_autoscaling_cluster_plans_against_what_it_can_grow_to():
    spec = parse_sweep(tiny(Path("/tmp")), "grow.yaml", ["num_workers=4"])
    cfgs = check_spec(spec)
    # 2 CPUs today, stated to grow to 8: a 4-CPU trial waits for nodes instead of being refused; 2 fit at once
    grows = capacity_of({"CPU": 2.0}, Growth({"CPU": 8.0}, {"CPU": "--max-cluster-cpus"}), autoscaling=False)
    concurrency, notes = plan_concurrency(spec, cfgs, grows, None)
    assert concurrency == 2 and any("0 fit today" in n for n in notes), notes
    # beyond the stated maximum: refused before any trial, naming the maximum and where it was stated
    small = capacity_of({"CPU": 2.0}, Growth({"CPU": 3.0}, {"CPU": "SIMCLR_MAX_CLUSTER_CPUS"}), autoscaling=False)
    with pytest.raises(SweepError, match=r"needs 4 CPU .* has 2 CPU and can grow to 3 \(SIMCLR_MAX_CLUSTER_CPUS\)"):
        plan_concurrency(spec, cfgs, small, None)
    # an autoscaler with no stated maximum: nothing is refused, the file's concurrency stands
    assert plan_concurrency(spec, cfgs, capacity_of({"CPU": 0.0}, Growth(), autoscaling=True), None)[0] == 2
    # a stated GPU maximum on a cluster with no GPU node yet: trials get GPU workers (use_gpu unset)
    gpu = capacity_of({"CPU": 4.0}, Growth({"CPU": 64.0, "GPU": 8.0}, {"CPU": "x", "GPU": "y"}), autoscaling=False)
    spec = parse_sweep(tiny(Path("/tmp")), "gpu.yaml")
    assert plan_concurrency(spec, check_spec(spec), gpu, None)[0] == 2
    assert trial_resources(check_spec(spec)[0], gpu.gpus_possible()) == {"CPU": 1.0, "GPU": 1.0}


def test_sync_bn_on_cpu_trials_is_refused_before_any_trial():
    spec = parse_sweep(tiny(Path("/tmp")), "sbn.yaml", ["sync_bn=true", "num_workers=2"])
    with pytest.raises(SweepError, match=r"--sync-bn needs GPU workers") as e:
        plan_concurrency(spec, check_spec(spec), fixed(CPU=8.0), None)
    assert "\n" not in str(e.value)


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
    spec = parse_sweep(tiny(tmp_path, augment={"pairs": ["crop", "color", "rotate"]}), "aug.yaml")
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
    spec = parse_sweep(tiny(tmp_path, batch_size=[64, 128], epochs=[1, 2]), "eb.yaml")
    rows = [{"trial": f"t{b}{e}", "status": "OK", "batch_size": b, "epochs": e, "val_knn_top1": 0.5 + b / 1000 + e / 10,
             "note": ""} for b in (64, 128) for e in (1, 2)]
    assert set(make_plots(spec, rows)) == {"accuracy_vs_batch_size.png"}


def test_a_failing_reference_is_skipped_with_one_line_and_the_results_are_still_written(tmp_path, monkeypatch):
    """The references run on the driver after the trials; when they fail there (e.g. no data on the driver), one line
    says they were skipped and why, and the trials' table is written without them."""
    import simclr_dist.run.studies.sweep_run as sweep_run

    spec = parse_sweep(tiny(tmp_path), "tiny.yaml")
    grid = [FakeResult({"temperature": t}, {"trial_id": f"t{i}", "epoch": 1, "time_total_s": 3.0},
                       history=[{"epoch": 1, "val_knn_top1": 0.5 + i / 10, "loss": 4.0}])
            for i, t in enumerate((0.1, 0.5))]

    def no_data(spec, cfgs, log):
        raise FileNotFoundError("digits: the train split is not under /data on this machine\n(more detail)")
    monkeypatch.setattr(sweep_run, "reference_rows", no_data)
    lines: list[str] = []
    out = sweep_run.finish(spec, check_spec(spec), grid, lines.append)
    assert lines == ["references skipped (FileNotFoundError: digits: the train split is not under /data on this "
                     "machine); the results are written without them"]
    assert out["references"] == [] and [r["trial"] for r in out["rows"]] == ["t1", "t0"]
    table = list(csv.DictReader(Path(out["files"]["csv"]).read_text().splitlines()))
    assert [(r["kind"], r["temperature"]) for r in table] == [("cell", "0.5"), ("cell", "0.1")]
    assert Path(out["files"]["markdown"]).exists() and Path(out["files"]["trials_csv"]).exists()


# ------------------------------------------------------------------------------------------ render again
def swept(tmp_path, search: dict) -> tuple[Path, SweepSpec, list[dict], list[dict]]:
    """A 3-seed sweep file on disk, and the trial rows and references its sweep would have written: rows made by
    collect_rows from Tune-like results (seed 1 of the first cell failed; values with every digit of a float), the
    pixels, the random init of every seed, and a reference that failed (NaN), as reference_rows makes them."""
    data = {**tiny(tmp_path, **search), "seeds": 3, "objective": {"metric": "val_linear_top1", "mode": "max"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(str(path))
    grid = []
    for i, point in enumerate(spec.trial_configs()):
        metrics = {"trial_id": f"t{i:02d}", "epoch": 1, "time_total_s": 3.0 + i / 7}
        history = [{"epoch": 1, "val_linear_top1": 0.5 + math.sin(i) / 10, "val_linear_top1_init": 0.4 + i / 300,
                    "val_knn_top1": 0.3 + math.cos(i) / 10, "loss": 4.0 + 1 / (i + 1)}]
        grid.append(FakeResult(point, metrics, RuntimeError("x\nRunError: non-finite loss") if i == 1 else None,
                               None if i == 1 else history))
    refs = [{"reference": "pixels", "of": "", "seed": None, "val_linear_top1": 2 / 3, "val_knn_top1": 0.5},
            *({"reference": "random-init", "of": "", "seed": s, "val_linear_top1": 0.4 + s / 70, "val_knn_top1": 0.3}
              for s in spec.seeds),
            {"reference": "pixels", "of": "image_size=32", "seed": None, "val_linear_top1": math.nan}]
    return path, spec, collect_rows(spec, grid), refs


@pytest.mark.parametrize("search", [{"temperature": [0.1, 10.0], "proj_normalize": [True, False]},
                                    {"augment": {"pairs": ["crop", "color", "rotate"], "with": "crop"}}])
def test_render_from_written_results_rewrites_them_byte_for_byte(search, tmp_path, monkeypatch):
    """``--render-from``: the rows read back from trials.csv are the rows the sweep collected (10.0 a float, True a
    bool, seeds ints, a failed trial's blanks None), the references come back from results.csv, and the files
    written again equal the sweep's byte for byte, without running a sweep."""
    import simclr_dist.sweep as sweep_cli

    path, spec, rows, refs = swept(tmp_path, search)
    files = write_results(spec, rows, refs)
    exp = Path(files["csv"]).parent
    assert read_results(spec, str(exp))[0] == rows
    monkeypatch.setattr(sweep_cli, "run_sweep", lambda *a, **k: pytest.fail("--render-from ran the sweep"))
    again = tmp_path / "again"
    assert main([str(path), "--render-from", str(exp), "--out", str(again)]) == 0
    for name in ("results.csv", "trials.csv", "results.md"):
        assert (again / name).read_bytes() == (exp / name).read_bytes(), name
    md = (again / "results.md").read_text()
    assert "*reference: raw pixels (no network) (image_size=32)*" in md and "| 0 of 1 (1 failed) |" in md
    plots = sorted(p.name for p in (exp / "plots").iterdir())
    assert plots and sorted(p.name for p in (again / "plots").iterdir()) == plots


BAD_RENDER = [
    ("none", [], r"none/trials.csv: no such file \(--render-from names the directory a sweep wrote its results to\)$"),
    ("exp", ["--set", "temperature=[0.1,0.5]"], r"exp/trials.csv line \d+: temperature '10.0' is not a value \S*s.yaml "
                                                r"searches \(0.1, 0.5\): the trials of another sweep file\?$"),
    ("exp", ["--set", "augment=[crop,color]"], r"exp/trials.csv: no column augment: not the trials.csv of a sweep of "
                                               r"\S*s.yaml$"),
    ("exp", ["--set", "proj_normalize=true"], r"exp/trials.csv: column 'proj_normalize' is a pretraining field "
                                              r"\S*s.yaml does not search"),
    ("exp", ["--set", "seeds=2"], r"exp/trials.csv line \d+: seed 2 is not one of the seeds \[0, 1\] of \S*s.yaml"),
    ("exp", ["--set", "objective.metric=val_knn_top1"], r"exp/results.csv line 2: metric 'val_linear_top1', but "
                                                        r"\S*s.yaml selects on 'val_knn_top1'"),
    ("exp", ["--resume"], r"--render-from: renders a finished sweep and runs nothing; drop --resume$"),
]


@pytest.mark.parametrize("where, extra, match", BAD_RENDER)
def test_render_from_bad_input_one_line_error(where, extra, match, tmp_path, capsys):
    path, spec, rows, refs = swept(tmp_path, {"temperature": [0.1, 10.0], "proj_normalize": [True, False]})
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "trials.csv").write_text(table_csv(rows))
    (tmp_path / "exp" / "results.csv").write_text(cells_csv(spec, rows, refs))
    assert main([str(path), "--render-from", str(tmp_path / where), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err.strip()), err


def test_figure5_pairs_on_one_branch_and_heatmap_with_means(tmp_path):
    """``pairs`` with ``with: crop``: one trial per distinct policy (the crop row repeats the diagonal), the other
    branch set by ``augment2``; the heatmap maps every cell to its trial, with row and column means."""
    data = tiny(tmp_path, augment={"pairs": ["crop", "color", "noise", "rotate"], "with": "crop"})
    data["base"]["augment2"] = "crop"
    spec = parse_sweep(data, "fig5.yaml")
    policies = ["crop", "crop,color", "crop,noise", "crop,rotate", "crop,color,noise", "crop,color,rotate",
                "crop,noise,rotate"]
    assert spec.search["augment"].values == policies
    cfgs = check_spec(spec)
    assert [c.augment for c in cfgs] == policies and {c.augment2 for c in cfgs} == {"crop"}
    rows = [{"trial": f"t{i}", "status": "OK", "augment": p, "val_knn_top1": i / 10,
             "note": "stopped early by asha" if p == "crop,noise,rotate" else ""} for i, p in enumerate(policies)]
    rows.append({"trial": "t9", "status": "FAILED", "augment": "crop,color,rotate", "val_knn_top1": None, "note": ""})
    heat = heatmap(spec, rows)
    assert heat["components"] == ["crop", "color", "noise", "rotate"] and heat["with"] == ["crop"]
    v = heat["values"]
    assert v[0][0] == 0.0 and v[0][1] == v[1][0] == v[1][1] == 0.1  # crop then color = color on the cropped branch
    assert v[1][2] == v[2][1] == 0.4 and v[2][3] == 0.6
    assert v[1][3] == 0.5 and heat["early"] == {(2, 3), (3, 2)}
    # the color row's cells (color, crop) and (color, color) are one policy, crop,color: counted once
    assert heat["row_means"][1] == pytest.approx((0.1 + 0.4 + 0.5) / 3) and heat["col_means"] == heat["row_means"]
    md = table_markdown(spec, rows)
    assert "## Augmentation pairs" in md and "| **color** | 0.100 | 0.100 | 0.400 | 0.500 (1 failed) | 0.333 |" in md
    assert "| **noise** | 0.200 | 0.400 | 0.200 | 0.600* | 0.400 |" in md and "| **mean** |" in md
    assert "| crop,color,rotate | 0.500 |  |  | 1 of 2 (1 failed) |  |" in md  # the failed trial counted in its cell
    assert make_plots(spec, rows)["augmentation_heatmap.png"].startswith(PNG)


BAD_PAIRS = [
    ({"pairs": ["crop", "color"], "with": "crpo"}, r"search.augment.with: unknown augmentation component 'crpo'"),
    ({"pairs": ["crop", "crop"]}, r"duplicate components"),
    ({"pairs": ["crop,color"]}, r"'crop,color' is not one augmentation component"),
    ({"pairs": []}, r"pairs needs a non-empty list"),
]


@pytest.mark.parametrize("dim, match", BAD_PAIRS)
def test_bad_pairs_one_line_error(dim, match, tmp_path):
    with pytest.raises(SweepError, match=match) as e:
        parse_sweep(tiny(tmp_path, augment=dim), "bad.yaml")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ real sweeps
@pytest.mark.ray
@pytest.mark.drill  # CI's second stage (make test-cluster): four Tune trials of Ray Train runs, ~1.5-2 min
def test_real_asha_sweep_stops_trials_early_and_keeps_their_rows(ray_cluster, tmp_path):
    """Four 2-epoch trials under ASHA (rungs at epochs 1 and 2), two at a time on the 2-CPU test cluster, each a Ray
    Train run inside a Tune trial with its per-epoch metrics forwarded by TuneReportCallback, selected on the
    validation linear probe. The first two trials train at the default LR; the last two at a near-zero LR, which
    leaves the encoder near its random init with BatchNorm statistics of the data - a far weaker probe (measured:
    0.95 vs 0.59). A later trial starts only when an earlier one has ended, so both earlier trials are recorded at the
    first rung when a later one reaches it, and ASHA stops it there (an earlier trial may be stopped too, by the
    other). Stopping must end that trial's Train run and free its CPU for the next trial, and the row must stay in
    the table with the objective of its last rung."""
    data = tiny(tmp_path, base_lr=[0.6, 1.2, 0.0001, 0.0002])
    data["base"].update(epochs=2, knn_every=1)
    data["objective"]["metric"] = "val_linear_top1"
    data["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    out = run_sweep(parse_sweep(data, "tiny.yaml"))
    rows = out["rows"]
    assert out["concurrency"] == 2 and len(rows) == 4
    assert {r["status"] for r in rows} == {"OK"} and sorted(r["base_lr"] for r in rows) == [0.0001, 0.0002, 0.6, 1.2]
    stopped = [r for r in rows if r["note"] == "stopped early by asha"]
    assert {r["base_lr"] for r in stopped} >= {0.0001, 0.0002} and all(r["epochs_done"] == 1 for r in stopped), rows
    assert all(r["epochs_done"] == 2 for r in rows if r not in stopped)
    for r in rows:
        assert 0.0 < r["val_linear_top1"] <= r["val_linear_top5"] <= 1.0 and 0.0 < r["val_knn_top1"] <= 1.0
        run_dir = tmp_path / "sweeps" / "tiny" / "train" / r["trial"]  # the trial's Train run, in shared storage
        assert len(list(run_dir.glob("checkpoint_*/manifest.json"))) == r["epochs_done"]  # none after the stop
    files = out["files"]
    assert set(files) == {"csv", "trials_csv", "markdown"}
    table = list(csv.DictReader(open(files["trials_csv"])))
    assert {t["trial"] for t in table} == {r["trial"] for r in rows}
    assert sum(t["note"] == "stopped early by asha" for t in table) == len(stopped)
    cells_table = list(csv.DictReader(open(files["csv"])))
    assert sorted(float(c["base_lr"]) for c in cells_table if c["kind"] == "cell") == [0.0001, 0.0002, 0.6, 1.2]
    assert [c["reference"] for c in cells_table if c["kind"] == "reference"] == ["pixels", "random-init"]
    md = Path(files["markdown"]).read_text()
    assert "| trial | status | base_lr | val_linear_top1 | val_linear_top1_init |" in md and "linear-probe" not in md
    assert "logistic-regression probe" in md and md.count("stopped early by asha") == len(stopped)

    with pytest.raises(SweepError, match="already exists: pass --resume"):
        run_sweep(parse_sweep(data, "tiny.yaml"))
    with pytest.raises(SweepError, match="was started with a different base"):
        run_sweep(parse_sweep(data, "tiny.yaml", ["epochs=3"]), resume=True)


@pytest.mark.ray
def test_real_sweep_with_seeds_writes_cells_and_reference_rows_on_the_same_split(ray_cluster, tmp_path):
    """One cell at two seeds on digits (two trials), then the references. The pixels row is the probe on the raw
    pixels computed here directly on the trials' validation split; each seed's random-init row is what that seed's
    trial measured on its own encoder before training (same network, split and probe: the objective at init)."""
    import torch.nn.functional as F

    from simclr_dist.core.probe import probe_accuracy
    from simclr_dist.data.augment import build_eval_transform
    from simclr_dist.data.datasets import load_dataset
    from simclr_dist.data.splits import validation_split

    data = tiny(tmp_path, temperature=[0.5])
    data["seeds"] = 2
    data["base"]["knn_every"] = 0
    data["objective"]["metric"] = "val_linear_top1"
    out = run_sweep(parse_sweep(data, "seeds.yaml"))
    rows = out["rows"]
    assert sorted(r["seed"] for r in rows) == [0, 1] and {r["status"] for r in rows} == {"OK"}, rows
    refs = {(r["reference"], r["seed"]): r for r in out["references"]}
    assert set(refs) == {("pixels", None), ("random-init", 0), ("random-init", 1)}

    info = dataset_info("digits")
    transform = build_eval_transform(16, info.mean, info.std)
    bank, query = validation_split(load_dataset("digits", "train", image_size=16))

    def pixels(split) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 3*16*16) rows, l2-normalised as the probe sees them
        x = torch.stack([transform(split[i][0]) for i in range(len(split))]).flatten(1)
        return F.normalize(x, dim=1), torch.tensor([int(split[i][1]) for i in range(len(split))])
    direct = probe_accuracy(*pixels(bank), *pixels(query), num_classes=10)
    assert refs[("pixels", None)]["val_linear_top1"] == pytest.approx(direct["linear_top1"], abs=1e-6)
    for r in rows:  # the driver's random init of seed s is the trial's own init of seed s
        assert refs[("random-init", r["seed"])]["val_linear_top1"] == pytest.approx(r["val_linear_top1_init"],
                                                                                    abs=1e-6)

    table = list(csv.DictReader(open(out["files"]["csv"])))
    cell, *references = table
    assert (cell["kind"], cell["n"], cell["failed"]) == ("cell", "2", "0")
    per_seed = sorted(float(cell[f"seed_{r['seed']}"]) for r in rows)
    assert per_seed == pytest.approx(sorted(r["val_linear_top1"] for r in rows))
    assert float(cell["mean"]) == pytest.approx(sum(per_seed) / 2) and float(cell["ci95_lo"]) <= float(cell["mean"])
    assert [(r["kind"], r["reference"]) for r in references] == [("reference", "pixels"), ("reference", "random-init")]
    md = Path(out["files"]["markdown"]).read_text()
    assert "*reference: raw pixels (no network)*" in md and "*reference: random-init encoder (no pretraining)*" in md


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
    first = run_sweep(parse_sweep(data, "tiny.yaml"), callbacks=[_interrupt_after_first_trial()])
    done = [r for r in first["rows"] if r["status"] == "OK"]
    assert len(done) == 1 and done[0]["chaos_nan_step"] == -1
    assert any(r["status"] == "UNFINISHED" for r in first["rows"]) or len(first["rows"]) == 1
    exp = tmp_path / "sweeps" / "tiny"
    before = _trial_records(exp)[done[0]["trial"]]
    assert before[0].count("\n") == 1 and len(before[1]) == 1  # one epoch reported, one checkpoint

    second = run_sweep(parse_sweep(data, "tiny.yaml"), resume=True)
    rows = {r["chaos_nan_step"]: r for r in second["rows"]}
    assert rows[-1]["trial"] == done[0]["trial"] and rows[-1]["status"] == "OK"
    assert rows[-1]["val_knn_top1"] == done[0]["val_knn_top1"]
    assert _trial_records(exp)[done[0]["trial"]] == before  # not rerun
    assert rows[0]["status"] == "FAILED" and "non-finite loss" in rows[0]["error"]
    assert "| FAILED |" in Path(second["files"]["markdown"]).read_text()

    before = _trial_records(exp)
    third = run_sweep(parse_sweep(data, "tiny.yaml"), resume=True)  # all done: a resume reruns nothing
    assert [(r["trial"], r["status"]) for r in third["rows"]] == [(r["trial"], r["status"]) for r in second["rows"]]
    assert _trial_records(exp) == before


# ------------------------------------------------------------------------------------------ the augmentation switch
def test_augmentation_trials_transform_one_branch(tmp_path):
    """The shipped Figure 5 study on one branch: the 'crop,color' trial's loader jitters the colours of its first
    view only; its second view is the crop-only view (same random draws as the 'crop' trial's), and 'crop,rotate'
    differs from 'crop' only by quarter turns of the first view."""
    spec = load_spec(str(TUNE / "augmentations.yaml"), ["dataset=digits", "image_size=16", "batch_size=64",
                                                        "cpus_per_worker=1", f"storage_path={tmp_path}"])
    cfgs = {c.augment: c.resolved() for c in check_spec(spec)}
    assert {c.augment2 for c in cfgs.values()} == {"crop"}
    transforms = {}
    for name in ("crop", "crop,color", "crop,rotate"):
        cfg = cfgs[name]
        loader = TorchPretrainLoader(LoaderSpec(
            dataset=cfg.dataset, split=cfg.split, root=cfg.data_root, image_size=cfg.image_size,
            augment=cfg.augment, augment2=cfg.augment2, jitter_strength=cfg.jitter_strength, batch_size=8,
            rank=0, world_size=1, seed=0))
        assert loader.augment.components == tuple(name.split(",")) and loader.augment2.components == ("crop",)
        transforms[name] = loader.dataset.transform
    images = [loader.dataset.base[i][0] for i in range(16)]

    def draw(t, which, img, seed):
        torch.manual_seed(seed)
        return (t.view_transform if which == 1 else t.second)(img)

    jittered = 0
    for i, img in enumerate(images):
        crop1 = draw(transforms["crop"], 1, img, i)
        assert torch.equal(draw(transforms["crop,color"], 2, img, i), crop1)   # the other branch: crop only
        assert torch.equal(draw(transforms["crop,rotate"], 2, img, i), crop1)
        jittered += not torch.equal(draw(transforms["crop,color"], 1, img, i), crop1)
        rotated = draw(transforms["crop,rotate"], 1, img, i)
        assert any(torch.equal(rotated, torch.rot90(crop1, k, (1, 2))) for k in range(4))
    assert jittered >= len(images) // 2  # colour jitter is applied with p=0.8


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
