"""The one-GPU preset (``--preset fashion-mnist-h200``): what it resolves to, and its whole code path smoke-run on
the CPU (``--smoke``) in a child process where ``import ray`` fails, as on the GPU machine, which has no Ray.

The smoke run is the preset's own path: its pretraining flags (``--no-ray --loader resident --knn-split val``)
with the smoke's appended, then every arm in this process with the resident classifier batches (the preset asks
for them, so they run on the CPU too), on a 600-image Fashion-MNIST written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fashion_slices import write_idx
from simclr_dist.config import ConfigError
from simclr_dist.config.experiments import PRESET_PRETRAIN, PRESETS, PROBE_GRIDS, SMOKE_PRETRAIN, ExperimentsConfig
from simclr_dist.data.datasets import IDX_FILES, dataset_info, load_dataset
from simclr_dist.report.results_file import read_results
from simclr_dist.run.store.checkpoint import MANIFEST_FILE, list_complete_checkpoints
from simclr_dist.run.studies.experiment_plan import pretrain_config

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = {"train": 50, "test": 10}  # 500 + 100 images: 10% is 50 labels (5 a class), 100% 500


def write_slice(directory: Path) -> Path:
    """A small class-balanced Fashion-MNIST as IDX files: the real images when the Debian package is installed
    (the first of each class), else random pixels."""
    rng = np.random.default_rng(0)
    real = dataset_info("fashion-mnist").embedded
    for split, per in PER_CLASS.items():
        if real:
            data = load_dataset("fashion-mnist", split, image_size=28)
            labels = data.targets.numpy()
            keep = np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(10)])
            images, labels = data.images[keep, 0].numpy(), labels[keep].astype(np.uint8)
        else:
            labels = (np.arange(10 * per) % 10).astype(np.uint8)
            images = rng.integers(0, 256, (10 * per, 28, 28), dtype=np.uint8)
        image_stem, label_stem = IDX_FILES[split]
        write_idx(directory / image_stem, images)
        write_idx(directory / label_stem, labels)
    return directory


def test_the_h200_preset_is_one_gpu_without_ray_on_validation_until_the_end(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    h = ExperimentsConfig(preset="fashion-mnist-h200").resolved("fashion-mnist")
    assert (h.ray, h.num_workers, h.classifier_loader, h.threads) == (False, 1, "resident", 0)
    assert h.fraction_list() == (0.001, 0.01, 0.1) and h.early_stopping() and h.tune_once
    assert [h.seeds_for(f) for f in (0.001, 0.01, 0.1, 1.0)] == [3, 3, 3, 3]  # tests over seeds need >= 3
    assert [h.max_epochs_for(f) for f in (0.001, 0.01, 0.1, 1.0)] == [100, 60, 20, 5]
    assert all(h.patience_for(f) < h.max_epochs_for(f) for f in (0.001, 0.01, 0.1, 1.0))
    assert len(h.lrs("finetune")) == len(h.lrs("supervised")) == 3 and h.grid("finetune")[0][1] == 5e-4
    assert h.run == "./runs/simclr-fashion-mnist-h200" and h.pretrain_args == PRESET_PRETRAIN["fashion-mnist-h200"][1]
    pre = pretrain_config(h, h.run)
    assert (pre.ray, pre.loader, pre.knn_split, pre.width, pre.batch_size, pre.epochs) == (
        False, "resident", "val", 1.0, 512, 25)
    # --smoke: the preset's pretraining flags with the smoke's appended (the last wins), its own run and output
    data = str(write_slice(tmp_path / "fm"))
    s = ExperimentsConfig(preset="fashion-mnist-h200", smoke=True, data_root=data).resolved("fashion-mnist")
    assert s.pretrain_args == PRESET_PRETRAIN["fashion-mnist-h200"][1] + " " + SMOKE_PRETRAIN
    assert s.run == "./runs/simclr-fashion-mnist-h200-smoke" and s.classifier_loader == "resident"
    small = pretrain_config(s, s.run)
    assert (small.ray, small.loader, small.knn_split, small.width, small.epochs, small.data_root) == (
        False, "resident", "val", 0.125, 1, data)  # the study's --data-root reaches its pretraining
    assert [s.seeds_for(f) for f in s.fraction_list() + (1.0,)] == [3, 3] and s.max_epochs_for(1.0) == 2
    assert ExperimentsConfig(preset="fashion-mnist-h200", smoke=True, seeds=4).resolved("fashion-mnist").seeds == 4
    # the probes' grids: the smoke's small ones when not given; a grid given wins, even one equal to the default
    assert (s.l2_values(), s.knn_ks()) == ((0.01, 1.0), (1, 5))
    wide = ExperimentsConfig(preset="fashion-mnist-h200").resolved("fashion-mnist")
    assert len(wide.l2_values()) == 10 and wide.knn_ks() == (1, 3, 5, 10, 20, 50, 100, 200)
    given = ExperimentsConfig(preset="fashion-mnist-h200", smoke=True, l2_grid=PROBE_GRIDS["l2_grid"],
                              knn_k="1,3").resolved("fashion-mnist")
    assert given.l2_values() == wide.l2_values() and given.knn_ks() == (1, 3)
    with pytest.raises(ConfigError, match="^--smoke: runs a preset's code path: give --preset NAME"):
        ExperimentsConfig(smoke=True).validate()
    # the CPU study makes its batches resident too (1.2x a step on 2 cores); the GPU one keeps auto (resident on CUDA)
    assert ExperimentsConfig(preset="fashion-mnist-cpu").resolved("fashion-mnist").classifier_loader == "resident"
    assert "classifier_loader" not in PRESETS["fashion-mnist-gpu"]
    assert ExperimentsConfig(preset="fashion-mnist-gpu").resolved("fashion-mnist").classifier_loader == "auto"


# Makes every `import ray...` fail, as on a machine without Ray, and notes each attempt in $NO_RAY_LOG.
NO_RAY = textwrap.dedent("""
    import os, sys

    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                with open(os.environ["NO_RAY_LOG"], "a") as f:
                    f.write(name + "\\n")
                raise ImportError(f"No module named {name!r} (this test's machine has no Ray)")
            return None

    sys.meta_path.insert(0, NoRay())
""")


def test_the_h200_preset_smoke_runs_its_whole_path_on_a_cpu_without_ray(tmp_path):
    data = write_slice(tmp_path / "fashion-mnist")
    hook = tmp_path / "no_ray"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_RAY)
    log = tmp_path / "ray-imports.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "NO_RAY_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "study"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simclr_dist.experiments", "--preset", "fashion-mnist-h200",
                           "--smoke", "--data-root", str(data), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert not log.exists(), log.read_text()  # nothing on the path even tried to import Ray
    print(f"smoke run: {wall:.0f} s")

    # pretraining: the preset's flags (no Ray, resident loader, validation monitor) with the smoke's
    run = tmp_path / "runs" / "simclr-fashion-mnist-h200-smoke"
    pre = json.loads((run / "simclr_config.json").read_text())
    assert (pre["ray"], pre["loader"], pre["knn_split"], pre["epochs"], pre["width"]) == (
        False, "resident", "val", 1, 0.125)
    assert pre["data_root"] == str(data)
    newest = list_complete_checkpoints(str(run))[-1].uri
    history = json.loads((Path(newest) / MANIFEST_FILE).read_text())["history"]
    assert history and "val_knn_top1" in history[-1] and "knn_top1" not in history[-1]  # no test read there
    summary = read_results(str(out / "results.json"))

    # every arm, probe and baseline at 10% and the supervised arm at 100%, 3 replicates each
    assert summary["complete"] and summary["fractions"] == [0.1]
    arms = {(r["arm"], r["fraction"]) for r in summary["records"]}
    assert {("linear", 0.1), ("finetune", 0.1), ("supervised", 0.1), ("supervised", 1.0), ("pixels", 0.1),
            ("knn", 0.1)} <= arms
    for arm, fraction in (("finetune", 0.1), ("supervised", 0.1), ("supervised", 1.0)):
        assert sorted(r["replicate"] for r in summary["records"] if (r["arm"], r["fraction"]) == (arm, fraction)) \
            == [0, 1, 2]
    # the trained arms' batches: resident, forced by the preset on this CPU; selection runs never read test
    results = [json.loads(p.read_text()) for p in (out / "runs").glob("*/results.json")
               if not p.parent.name.startswith("probes-")]  # the replicates' probes, kept beside the runs
    assert results and {r["classifier_loader"] for r in results} == {"resident"}
    assert all(r["predictions"] is None for r in results if r["params"]["val_split"] is not None)
    assert "(resident batches)" in done.stdout and "## Experiment A" in (out / "report.md").read_text()
