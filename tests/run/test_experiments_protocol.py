"""The fairness rules of Experiments A/B, checked on real (tiny) runs: the same number of steps at every label
fraction, model selection that never reads the test split, label-subset and init seeds that move independently,
selection splits that fit the labels available, and a preset whose pretraining run is reused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_dist import experiments as exp
from simclr_dist.config import ConfigError, PretrainConfig
from simclr_dist.config.experiments import PRESET_ENCODER, PRESET_PRETRAIN, PRESETS, ExperimentsConfig
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.data import splits as splits_module
from simclr_dist.data.splits import SelectionError, balanced_subset, label_split, selection_splits
from simclr_dist.run.studies import experiment_run
from simclr_dist.run.store.checkpoint import save_checkpoint
from simclr_dist.run.train.classify_loop import load_initial
from simclr_dist.run.jobs.classify_job import run_classifier
from simclr_dist.run.train.evaluation import load_eval_data
from simclr_dist.run.studies.experiment_plan import arm_config, finished_checkpoint, make_plan, pretrain_config
from simclr_dist.run.store.weights import build_model

TINY = dict(image_size=16, width=0.125)
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> PretrainConfig:
    return PretrainConfig(dataset="digits", **TINY, **kw).resolved()


def write_checkpoint(directory, epoch: int = 2) -> str:
    cfg = tiny_cfg(epochs=epoch)
    torch.manual_seed(0)
    save_checkpoint(str(directory), {
        "format_version": 1, "model": build_model(cfg).state_dict(), "optimizer": {}, "epoch": epoch,
        "step": 10 * epoch, "steps_per_epoch": 10, "config": cfg.to_dict(), "history": []})
    return str(directory)


@pytest.fixture(scope="module")
def data():
    return load_eval_data(tiny_cfg())


def classifier(tmp_path, name: str, **kw) -> SupervisedConfig:
    base = dict(dataset="digits", batch_size=32, lr=0.4, weight_decay=0.0, ray=False, storage_path=str(tmp_path),
                name=name, **TINY)
    return SupervisedConfig(**{**base, **kw})


# ---------------------------------------------------------------------------- the same budget at every fraction
def test_equal_steps_at_every_fraction_epochs_grow_as_the_subset_shrinks(tmp_path, data):
    runs = {f: run_classifier(classifier(tmp_path, f"r{f:g}", fraction=f, steps=9), data=data, log=lambda m: None)
            for f in (0.05, 0.25)}
    for f, r in runs.items():
        assert r["params"]["steps"] == 9 and r["history"][-1]["step"] == 9, f
    small, big = runs[0.05]["params"], runs[0.25]["params"]
    assert small["steps_per_epoch"] < big["steps_per_epoch"] and small["epochs"] > big["epochs"]
    assert small["peak_lr"] == big["peak_lr"] == pytest.approx(0.4 * 32 / 256)

    ckpt = write_checkpoint(tmp_path / "ckpt")
    plan = make_plan(exp.parse_args(["--checkpoint", ckpt, "--fractions", "0.1,0.5", "--steps", "17",
                                     "--out", str(tmp_path / "o")]))
    budgets = {(c.arm, c.fraction, lr, wd, split): arm_config(plan, c, lr, wd, split=split).steps
               for c in plan.cells for lr, wd in plan.grid() for split in (None, 0)}
    assert set(budgets.values()) == {17} and {f for _, f, *_ in budgets} == {0.1, 0.5, 1.0}


# ---------------------------------------------------------------------------- selection never reads test data
class GuardedTest(torch.utils.data.Dataset):
    """The test split, refusing every image while ``armed`` (its labels stay readable: they are not data)."""

    def __init__(self, base):
        self.base, self.armed, self.reads = base, False, 0
        self.targets, self.classes = base.targets, getattr(base, "classes", None)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.armed:
            raise AssertionError("the test split was read during model selection")
        self.reads += 1
        return self.base[i]


def test_model_selection_never_reads_the_test_split(tmp_path, monkeypatch, data):
    guarded = GuardedTest(data.test)
    monkeypatch.setattr(experiment_run, "load_eval_data",
                        lambda *a, **k: dataclasses.replace(load_eval_data(*a, **k), test=guarded))
    real = experiment_run.run_classifier
    finals = []

    def spy(scfg, **kw):
        guarded.armed = scfg.val_split is not None  # every selection run trains with the test split refusing reads
        before = guarded.reads
        out = real(scfg, **kw)
        guarded.armed = False
        if scfg.val_split is None:
            finals.append(guarded.reads - before)
        return out

    monkeypatch.setattr(experiment_run, "run_classifier", spy)
    ckpt = write_checkpoint(tmp_path / "ckpt")
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--seeds", "1", "--steps", "3", "--batch-size", "32",
            "--lr-grid", "0.1,0.4", "--wd-grid", "0,1e-4", "--baselines", "", "--arms", "finetune,supervised",
            "--no-ray", "--out", str(tmp_path / "o")]
    assert exp.main(args) == 0
    assert finals == [len(data.test)] * 3  # each final model reads the test split exactly once; selection never


def test_selection_run_trains_without_its_validation_images(data):
    cfg = SupervisedConfig(fraction=0.1, subset_seed=3, val_split=0)
    split = label_split(data.train_labels, fraction=cfg.fraction, subset_seed=cfg.subset_seed, val_split=0)
    assert not set(split.fit) & set(split.val) and set(split.fit) | set(split.val) == set(split.subset)
    assert np.bincount(data.train_labels[split.val], minlength=10).min() >= 2  # every class is validated


# ---------------------------------------------------------------------------- seeds
def test_subset_seed_and_init_seed_are_separate(data, tmp_path):
    mcfg = tiny_cfg()

    def draw(subset_seed: int, seed: int):
        cfg = SupervisedConfig(fraction=0.1, subset_seed=subset_seed, seed=seed)
        return (label_split(data.train_labels, fraction=0.1, subset_seed=subset_seed, val_split=None).subset,
                load_initial(cfg, mcfg)[0].state_dict()["conv1.weight"])

    sub00, w00 = draw(0, 0)
    sub10, w10 = draw(1, 0)
    sub01, w01 = draw(0, 1)
    assert not np.array_equal(sub00, sub10) and torch.equal(w00, w10)  # the subset moves, the init does not
    assert np.array_equal(sub00, sub01) and not torch.equal(w00, w01)  # the init moves, the subset does not

    ckpt = write_checkpoint(tmp_path / "ckpt")
    plan = make_plan(exp.parse_args(["--checkpoint", ckpt, "--seeds", "3", "--subset-seed", "10", "--seed", "20",
                                     "--out", str(tmp_path / "o")]))
    assert [(r.subset_seed, r.seed) for r in plan.replicates] == [(10, 20), (11, 21), (12, 22)]
    cfgs = [arm_config(plan, c, 0.4, 0.0, split=None) for c in plan.cells if c.arm == "supervised" and c.fraction < 1]
    assert [(c.subset_seed, c.seed) for c in cfgs] == [(10, 20), (11, 21), (12, 22)]
    assert len({tuple(plan.subsets[(0.1, s)]) for s in (10, 11, 12)}) == 3


# ---------------------------------------------------------------------------- selection splits
def test_selection_splits_hold_out_or_k_fold_by_labels_per_class():
    labels = np.repeat(np.arange(3), [40, 12, 30])
    [(fit, val)] = selection_splits(labels, val_fraction=0.2, seed=0)  # >= 10 per class: one hold-out
    assert np.bincount(labels[val]).tolist() == [8, 2, 6] and len(fit) + len(val) == len(labels)
    few = np.repeat(np.arange(3), [4, 3, 6])
    folds = selection_splits(few, val_fraction=0.2, seed=0)  # fewer: k-fold, k = smallest class
    assert len(folds) == 3
    validated = np.concatenate([v for _, v in folds])
    assert sorted(validated) == list(range(len(few)))  # every label validated exactly once
    for fit, val in folds:
        assert set(few[fit]) == {0, 1, 2} and not set(fit) & set(val)
    with pytest.raises(SelectionError, match="class 2 has 1 label in the subset"):
        selection_splits(np.array([0, 0, 1, 1, 2]), seed=0)
    big = np.repeat(np.arange(2), 5000)
    [(_, val)] = selection_splits(big, val_fraction=0.2, seed=0)
    assert len(val) == 400  # at most 200 per class


# ---------------------------------------------------------------------------- presets
def test_presets_resolve_to_the_published_encoder_from_the_repository_root(monkeypatch):
    """From the repository root the CPU preset studies the published encoder (no pretraining); elsewhere, or with
    --pretrain, it pretrains its named run (next test)."""
    monkeypatch.chdir(ROOT)
    cpu = ExperimentsConfig(preset="fashion-mnist-cpu").resolved("fashion-mnist")
    assert cpu.pretrained == f"simclr-dist:{PRESET_ENCODER['fashion-mnist-cpu']}" and cpu.run is None
    assert (ROOT / PRESET_ENCODER["fashion-mnist-cpu"] / "MODEL_CARD.md").is_file()
    again = ExperimentsConfig(preset="fashion-mnist-cpu", pretrain=True).resolved("fashion-mnist")
    assert again.pretrained is None and again.run == "./runs/simclr-fashion-mnist-cpu"


def test_presets_resolve_and_name_their_pretraining_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no published encoder here: the preset pretrains its run
    cpu = ExperimentsConfig(preset="fashion-mnist-cpu").resolved("fashion-mnist")
    assert (cpu.dataset, cpu.steps, cpu.ray) == ("fashion-mnist", None, False)  # early stopping, not fixed steps
    assert [cpu.seeds_for(f) for f in (0.001, 0.01, 0.1, 1.0)] == [10, 10, 6, 3]  # the seed is the unit
    pre = pretrain_config(cpu, cpu.run)  # the named run the coordinator starts early: stable, explicit flags
    assert (pre.name, pre.dataset, pre.width, pre.image_size, pre.batch_size) == ("simclr-fashion-mnist-cpu",
                                                                                 "fashion-mnist", 0.25, 28, 256)
    assert cpu.run == "./runs/simclr-fashion-mnist-cpu" and cpu.pretrain_args == PRESET_PRETRAIN["fashion-mnist-cpu"][1]
    assert cpu.fraction_list() == (0.001, 0.01, 0.1) and len(cpu.grid("supervised")) == 6
    override = ExperimentsConfig(preset="fashion-mnist-cpu", seeds=1, steps=7).resolved("fashion-mnist")
    assert (override.seeds, override.steps) == (1, 7)  # a flag given wins over the preset
    gpu = ExperimentsConfig(preset="fashion-mnist-gpu").resolved("fashion-mnist")
    assert "--width 1.0" in gpu.pretrain_args and gpu.ray and gpu.use_gpu
    # one pretraining worker per GPU present (this box: none, so 1; 8 GPUs: 8), the monitor on validation queries
    assert "--num-workers 1 " in gpu.pretrain_args and "--knn-split val" in gpu.pretrain_args
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    gpu8 = ExperimentsConfig(preset="fashion-mnist-gpu").resolved("fashion-mnist")
    assert "--num-workers 8 " in gpu8.pretrain_args and "{gpus}" not in gpu8.pretrain_args
    assert pretrain_config(gpu8, gpu8.run).knn_split == "val"
    assert [gpu.seeds_for(f) for f in (0.001, 0.01, 0.1, 1.0)] == [10, 10, 6, 3]
    with pytest.raises(ConfigError, match="--dataset: the preset fashion-mnist-cpu is a fashion-mnist study"):
        ExperimentsConfig(preset="fashion-mnist-cpu", dataset="digits").validate()


def test_a_finished_pretraining_run_is_reused_an_unfinished_one_resumed(tmp_path):
    run = tmp_path / "runs" / "simclr-x"
    ecfg = ExperimentsConfig(run=str(run), pretrain_args="--epochs 2 --image-size 16 --width 0.125")
    wanted = pretrain_config(ecfg.resolved("digits"), str(run))
    assert (wanted.name, wanted.epochs) == ("simclr-x", 2) and finished_checkpoint(str(run), wanted) is None
    write_checkpoint(run / "checkpoint_000001", epoch=1)
    assert finished_checkpoint(str(run), wanted) is None  # epoch 1 of 2: pretraining resumes first
    plan = make_plan(ExperimentsConfig(run=str(run), pretrain_args="--epochs 2 --image-size 16 --width 0.125",
                                       out=str(tmp_path / "o")))
    assert plan.pretrain_cfg is not None and plan.pretrain_cfg.epochs == 2 and plan.checkpoint is None
    done = write_checkpoint(run / "checkpoint_000002", epoch=2)
    plan = make_plan(ExperimentsConfig(run=str(run), pretrain_args="--epochs 2 --image-size 16 --width 0.125",
                                       out=str(tmp_path / "o")))
    assert plan.pretrain_cfg is None and plan.checkpoint == done  # finished: reused, nothing pretrains


def test_the_plan_draws_every_label_split_once_and_the_runs_train_on_it(tmp_path, monkeypatch, data):
    """The plan's splits are the very objects every classifier run receives, and nothing after the plan draws a
    subset again: with the drawing functions made to fail once the plan exists, the whole study still runs."""
    ckpt = write_checkpoint(tmp_path / "ckpt")
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--seeds", "1", "--steps", "2", "--batch-size", "32",
            "--lr-grid", "0.1", "--wd-grid", "0", "--baselines", "pixels", "--arms", "finetune,supervised",
            "--no-ray", "--out", str(tmp_path / "o")]
    plan = make_plan(exp.parse_args(args))
    monkeypatch.setattr(exp, "make_plan", lambda ecfg: plan)
    real, handed = experiment_run.run_classifier, []

    def spy(scfg, *, split=None, **kw):
        handed.append((scfg.val_split, split))
        return real(scfg, split=split, **kw)

    def redraw(*a, **k):
        raise AssertionError("a label subset was drawn again after the plan")

    monkeypatch.setattr(experiment_run, "run_classifier", spy)
    for name in ("balanced_subset", "selection_splits", "label_split", "label_splits"):
        monkeypatch.setattr(splits_module, name, redraw)
    assert exp.main(args) == 0
    assert len(handed) == plan.trainings() == 6  # 10%: two arms x (1 selection + final); Experiment B: 100%
    for val_split, split in handed:
        final, selecting = plan.splits[(split.fraction, 0)]
        assert split is (final if val_split is None else selecting[val_split])


def test_labels_of_every_fraction_are_drawn_once_per_replicate(tmp_path, data):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    plan = make_plan(exp.parse_args(["--checkpoint", ckpt, "--fractions", "0.1", "--seeds", "2",
                                     "--out", str(tmp_path / "o")]))
    for (f, s), idx in plan.subsets.items():
        assert np.array_equal(idx, balanced_subset(data.train_labels, f, s))


# ---------------------------------------------------------------------------- Fashion-MNIST, on a small slice
def test_experiments_on_a_fashion_mnist_slice(tmp_path, capsys):
    """The Fashion-MNIST path end to end on IDX files written here (4 images per class): a tiny checkpoint
    'pretrained' on it, every arm and baseline under the protocol (k-fold selection: few labels per class), and a
    report with the clothing class names, per-class recall and the confusion matrices."""
    from fashion_slices import make_slice  # the IDX writer the dataset's own tests use

    make_slice(tmp_path / "fm")
    cfg = PretrainConfig(dataset="fashion-mnist", data_root=str(tmp_path / "fm"), image_size=16, width=0.125,
                         epochs=1).resolved()
    torch.manual_seed(0)
    ckpt = str(tmp_path / "runs" / "simclr-fm" / "checkpoint_000001")
    save_checkpoint(ckpt, {"format_version": 1, "model": build_model(cfg).state_dict(), "optimizer": {},
                           "epoch": 1, "step": 1, "steps_per_epoch": 1, "config": cfg.to_dict(), "history": []})
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--fractions", "1", "--small-fraction", "1", "--seeds", "2", "--steps", "2",
            "--batch-size", "16", "--lr-grid", "0.4", "--wd-grid", "0", "--knn-k", "3", "--l2-grid", "1e-2",
            "--no-ray", "--out", str(out)]
    assert exp.main(args) == 0
    stdout = capsys.readouterr().out
    assert "fit 30 + validation 10 (split 3 of 4)" in stdout  # 4 labels per class: 4-fold selection
    summary = __import__("json").loads((out / "results.json").read_text())
    assert summary["dataset"] == "fashion-mnist" and summary["test_size"] == 20
    assert summary["classes"][0] == "T-shirt/top" and summary["classes"][-1] == "Ankle boot"
    trained = [r for r in summary["records"] if r["arm"] in ("finetune", "supervised")]
    assert len(trained) == 4 and all(r["folds"] == 4 and r["steps"] == 2 for r in trained)
    report = (out / "report.md").read_text()
    assert "| Ankle boot |" in report and "## Per-class recall" in report
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
