"""The convergence protocol of Experiments A/B: every selection run stops on its own validation split and keeps its
best epoch's weights, an LR choice on the grid's edge extends the grid, the final run trains for the chosen epochs,
the classifiers' augmentation is the supervised pad-crop + flip (SimCLR's crop opt-in), and the digits default
stays a small plan. Tiny runs (digits, 16 px, width 1/8) or a stand-in for the classifier runs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from simclr_dist import experiments as exp
from simclr_dist.config import ConfigError, PretrainConfig
from simclr_dist.config.experiments import PRESETS, ExperimentsConfig
from simclr_dist.config.supervised import SupervisedConfig, classifier_components, resolve_augment
from simclr_dist.data.splits import label_split
from simclr_dist.run.jobs.classify_job import resolve
from simclr_dist.run.store.checkpoint import save_checkpoint
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.studies import experiment_run
from simclr_dist.run.studies.experiment_plan import arm_config, make_plan
from simclr_dist.run.studies.experiment_run import cell_budget, run_cell
from simclr_dist.run.train import classify_loop
from simclr_dist.run.train.classify_loop import LocalSession, classifier_transform, load_initial, train_classifier
from simclr_dist.run.train.evaluation import load_eval_data

TINY = dict(image_size=16, width=0.125)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> PretrainConfig:
    return PretrainConfig(dataset="digits", **TINY, **kw).resolved()


def write_checkpoint(directory) -> str:
    cfg = tiny_cfg(epochs=2)
    torch.manual_seed(0)
    save_checkpoint(str(directory), {
        "format_version": 1, "model": build_model(cfg).state_dict(), "optimizer": {}, "epoch": 2, "step": 20,
        "steps_per_epoch": 10, "config": cfg.to_dict(), "history": []})
    return str(directory)


@pytest.fixture(scope="module")
def data():
    return load_eval_data(tiny_cfg())


# ---------------------------------------------------------------------------- early stopping in the loop
def scripted_run(monkeypatch, data, scores, *, epochs: int, patience: int):
    """A real selection run (10% of digits, 3 steps per epoch) whose validation top-1 follows ``scores``; returns
    (the loop's result, the encoder it trained, the model's weights at each evaluation)."""
    mcfg = tiny_cfg()
    scfg = SupervisedConfig(dataset="digits", **TINY, fraction=0.1, val_split=0, epochs=epochs, patience=patience,
                            batch_size=32, lr=0.4, weight_decay=0.0, augment="padcrop", checkpoint_every=0,
                            ray=False).validate()
    split = label_split(data.train_labels, fraction=0.1, subset_seed=0, val_split=0)
    snapshots, left = [], list(scores)

    def validate(model, *a, **k):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return left.pop(0), 1.0

    monkeypatch.setattr(classify_loop, "validate", validate)
    encoder = load_initial(scfg, mcfg)[0]
    out = train_classifier(scfg, mcfg, LocalSession(None), split, data=data, encoder=encoder, log=lambda m: None)
    return out, encoder, snapshots


def same_weights(encoder, snapshot) -> bool:
    return all(torch.equal(v, snapshot[f"encoder.{k}"]) for k, v in encoder.state_dict().items())


def test_early_stopping_keeps_the_best_epochs_weights_and_stops_after_patience(monkeypatch, data):
    out, encoder, snaps = scripted_run(monkeypatch, data, [0.2, 0.4, 0.6, 0.5, 0.6, 0.3, 0.9], epochs=20, patience=3)
    # epoch 3 is best; 4, 5 (a tie is no improvement) and 6 are not: stopped after epoch 6, epoch 7 never trained
    assert (out["best_epoch"], out["stopped_epoch"], out["val_top1"]) == (3, 6, 0.6)
    assert out["converged"] and not out["hit_max_epochs"] and not out["diverged"]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4, 5, 6] and len(snaps) == 6
    assert same_weights(encoder, snaps[2])  # the best epoch's weights, restored
    assert not same_weights(encoder, snaps[5])  # not the last epoch's
    assert out["steps"] == 6 * out["steps_per_epoch"] and out["images_seen"] == 6 * 3 * 32
    assert out["schedule"] == "constant" and [h["lr"] for h in out["history"]] == pytest.approx([0.4 * 32 / 256] * 6)
    assert [p["val_top1"] for p in out["curve"]] == [0.2, 0.4, 0.6, 0.5, 0.6, 0.3]  # one point per epoch


def test_max_epochs_caps_a_run_still_improving_and_flags_it(monkeypatch, data):
    out, encoder, snaps = scripted_run(monkeypatch, data, [0.1, 0.2, 0.3, 0.4], epochs=4, patience=3)
    assert (out["best_epoch"], out["stopped_epoch"], out["max_epochs"]) == (4, 4, 4)
    assert out["hit_max_epochs"] and not out["converged"]
    assert same_weights(encoder, snaps[3])


def test_a_diverging_selection_run_stops_with_its_best_score_instead_of_failing_the_study(monkeypatch, data):
    real, calls = classify_loop.classify_step, []

    def step(*a, **k):  # the loss turns non-finite in epoch 3 (3 steps per epoch)
        out = real(*a, **k)
        calls.append(1)
        return out if len(calls) < 7 else torch.tensor([float("nan"), 0.0, float(out[2])], dtype=out.dtype)

    monkeypatch.setattr(classify_loop, "classify_step", step)
    out, encoder, snaps = scripted_run(monkeypatch, data, [0.3, 0.5, 0.9], epochs=10, patience=3)
    assert out["diverged"] and (out["stopped_epoch"], out["best_epoch"], out["val_top1"]) == (3, 2, 0.5)
    assert len(snaps) == 2 and same_weights(encoder, snaps[1]) and out["history"][-1]["train_loss"] is None
    assert not out["converged"] and not out["hit_max_epochs"]


def test_early_stopping_needs_a_validation_split_and_no_fixed_steps():
    with pytest.raises(ConfigError, match="--patience: early stopping needs a validation split"):
        SupervisedConfig(patience=3).validate()
    with pytest.raises(ConfigError, match="--patience: stops on validation, --steps fixes the budget"):
        SupervisedConfig(patience=3, val_split=0, steps=10).validate()
    assert SupervisedConfig(patience=3, val_split=0).schedule_name() == "constant"
    assert SupervisedConfig(epochs=3).schedule_name() == "cosine"


# ---------------------------------------------------------------------------- LR grid, extension, final epochs
class FakeRuns:
    """Stands in for run_classifier: validation top-1 from ``score(lr)``, best epoch ``best(lr, split)``; records
    every config it was handed."""

    def __init__(self, score, best=lambda lr, k: 4):
        self.score, self.best, self.configs = score, best, []

    def __call__(self, scfg, *, data=None, split=None, log=None, before_training=None, equivalent=None):
        self.configs.append(scfg)
        if scfg.val_split is not None:
            best = self.best(scfg.lr, scfg.val_split)
            return {"score": self.score(scfg.lr), "curve": [{"step": 1, "val_top1": self.score(scfg.lr)}],
                    "best_epoch": best, "stopped_epoch": best + scfg.patience, "hit_max_epochs": False,
                    "diverged": False, "train_time_s": 1.0, "images_seen": 100}
        return {"top1": 0.5, "top5": 0.9, "predictions": [0] * 360, "label_count": len(split.subset),
                "subset_sha256": split.digest(), "history": [], "train_time_s": 2.0, "images_seen": 50,
                "run": scfg.name, "cached": False, "normalization": None,
                "params": {"steps": 10, "steps_per_epoch": 2, "global_batch": 32, "peak_lr": scfg.lr / 8,
                           "lr_rule": "rule", "augment": scfg.augment, "schedule": "constant"}}

    def selection_lrs(self, rep: int = 0):
        return [c.lr for c in self.configs if c.val_split is not None and c.seed == rep]

    def finals(self):
        return [c for c in self.configs if c.val_split is None]


def fake_plan(tmp_path, *extra):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    return make_plan(exp.parse_args(["--checkpoint", ckpt, "--fractions", "0.05", "--seeds", "2", "--wd-grid", "0",
                                     "--lr-grid-supervised", "0.1,0.2,0.4", "--lr-grid-finetune", "0.05,0.1,0.2",
                                     "--no-ray", "--out", str(tmp_path / "o"), *extra]))


@pytest.mark.parametrize("score, edge, extended, after, chosen", [
    (lambda lr: lr, "high", [0.8, 1.6], "high", 1.6),  # always the top: extended twice, still on the edge
    (lambda lr: -abs(math.log(lr / 0.4)) - (lr > 0.4), "high", [0.8], None, 0.4),  # 0.8 is worse: back inside
    (lambda lr: -lr, "low", [0.05, 0.025], "low", 0.025),
    (lambda lr: -abs(math.log(lr / 0.2)), None, [], None, 0.2),  # inside the grid: nothing to extend
])
def test_a_choice_on_the_grids_edge_extends_the_grid_and_is_flagged(tmp_path, monkeypatch, score, edge, extended,
                                                                     after, chosen):
    plan = fake_plan(tmp_path)
    cell = next(c for c in plan.cells if c.arm == "supervised" and c.fraction == 0.05 and c.rep.index == 0)
    assert cell.folds == 5  # 7 labels per class: 5-fold selection
    fake = FakeRuns(score)
    monkeypatch.setattr(experiment_run, "run_classifier", fake)
    rec = run_cell(plan, cell, None, lambda m: None)
    assert fake.selection_lrs() == [lr for lr in [0.1, 0.2, 0.4, *extended] for _ in range(5)]
    assert (rec["grid_edge"], rec["grid_extended"], rec["edge_after_extension"]) == (edge, extended, after)
    assert rec["chosen"]["lr"] == chosen and rec["lr_grid"] == sorted([0.1, 0.2, 0.4, *extended])
    assert set(rec["selection"]) == {f"lr={lr:g},wd=0" for lr in [0.1, 0.2, 0.4, *extended]}
    runs = 5 * (3 + len(extended))  # 5 splits x every LR tried
    assert rec["selection_runs"] == runs and rec["selection_images_seen"] == 100 * runs
    assert rec["selection_time_s"] == runs and rec["images_seen"] == 50


def test_the_final_run_trains_for_the_chosen_epochs_and_later_replicates_reuse_the_choice(tmp_path, monkeypatch):
    plan = fake_plan(tmp_path)
    assert plan.ecfg.tune_once and plan.ecfg.early_stopping()
    fake = FakeRuns(lambda lr: -abs(math.log(lr / 0.2)), best=lambda lr, k: [3, 4, 4, 5, 5][k])  # mean 4.2
    monkeypatch.setattr(experiment_run, "run_classifier", fake)
    tuned = {}
    cells = [c for c in plan.cells if c.arm == "supervised" and c.fraction == 0.05]
    first, second = (run_cell(plan, c, None, lambda m: None, tuned) for c in cells)
    [f0, f1] = fake.finals()
    for final in (f0, f1):
        assert (final.lr, final.epochs, final.patience, final.schedule, final.steps) == (0.2, 5, None, "constant",
                                                                                       None)
    selecting = [c for c in fake.configs if c.val_split is not None]
    assert {(c.epochs, c.patience, c.schedule) for c in selecting} == {(plan.ecfg.max_epochs_for(0.05),
                                                                        plan.ecfg.patience_for(0.05), "constant")}
    assert first["epochs_chosen"] == second["epochs_chosen"] == 5 and first["best_epochs"] == [3, 4, 4, 5, 5]
    assert first["chosen"] == second["chosen"] == {"lr": 0.2, "wd": 0.0, "epochs": 5}
    assert fake.selection_lrs(rep=1) == []  # the second replicate ran its final run only
    assert (first["tuned_on_replicate"], second["tuned_on_replicate"]) == (0, 0) and second["tune_once"]
    assert second["selection_time_s"] == 0 and second["selection_images_seen"] == 0 and first["selection_runs"] == 15
    assert "-5ep-const-" in f0.name and "-es" in selecting[0].name and f0.name != f1.name

    fake2 = FakeRuns(lambda lr: -abs(math.log(lr / 0.2)))
    monkeypatch.setattr(experiment_run, "run_classifier", fake2)
    plan2 = fake_plan(tmp_path / "b", "--no-tune-once")
    for c in (c for c in plan2.cells if c.arm == "supervised" and c.fraction == 0.05):
        run_cell(plan2, c, None, lambda m: None, {})
    assert len(fake2.selection_lrs(rep=0)) == len(fake2.selection_lrs(rep=1)) == 15  # every replicate tunes


def test_an_early_stopping_study_never_reads_the_test_split_before_the_final_run(tmp_path, monkeypatch, data):
    class Guarded(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base, self.armed, self.targets = base, False, base.targets

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            if self.armed:
                raise AssertionError("the test split was read during model selection")
            return self.base[i]

    guarded = Guarded(data.test)
    monkeypatch.setattr(experiment_run, "load_eval_data",
                        lambda *a, **k: dataclasses.replace(load_eval_data(*a, **k), test=guarded))
    real, finals = experiment_run.run_classifier, []

    def spy(scfg, **kw):
        guarded.armed = scfg.val_split is not None
        out = real(scfg, **kw)
        guarded.armed = False
        if scfg.val_split is None:
            finals.append(scfg)
        return out

    monkeypatch.setattr(experiment_run, "run_classifier", spy)
    ckpt = write_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "o"
    args = ["--checkpoint", ckpt, "--fractions", "0.1", "--seeds", "1", "--max-epochs", "0.1:3,1:1", "--patience",
            "1", "--batch-size", "32", "--lr-grid", "0.4", "--wd-grid", "0", "--baselines", "", "--arms",
            "finetune,supervised", "--no-ray", "--out", str(out)]
    assert exp.main(args) == 0
    assert len(finals) == 3 and all(f.epochs >= 1 and f.patience is None for f in finals)
    summary = __import__("json").loads((out / "results.json").read_text())
    for r in summary["records"]:
        assert r["early_stopping"] and r["epochs_chosen"] == r["chosen"]["epochs"] >= 1
        assert r["images_seen"] > 0 and r["selection_images_seen"] > 0 and r["selection_time_s"] > 0
        assert r["augment"] == "padcrop" and r["schedule"] == "constant" and r["grid_edge"] is None
        assert all(s <= r["max_epochs"] for s in r["selection_detail"]["lr=0.4,wd=0"]["stopped_epochs"])


# ---------------------------------------------------------------------------- augmentation
def ops(transform) -> list[type]:
    return [type(t) for t in transform.transforms]


def test_classifiers_train_with_pad_crop_and_flip_and_simclrs_crop_is_opt_in(tmp_path, data):
    assert resolve_augment(None, "fashion-mnist") == "padcrop,flip" and resolve_augment(None, "digits") == "padcrop"
    assert resolve_augment("simclr", "fashion-mnist") == "crop,flip" and resolve_augment("simclr", "digits") == "crop"
    assert resolve(SupervisedConfig(**TINY))[0].augment == "padcrop"
    default = classifier_transform("padcrop,flip", data)
    assert v2.RandomCrop in ops(default) and v2.RandomHorizontalFlip in ops(default)
    assert v2.RandomResizedCrop not in ops(default)
    [crop] = [t for t in default.transforms if isinstance(t, v2.RandomCrop)]
    assert crop.padding == [2, 2, 2, 2] and crop.size == (16, 16)  # 16 px: padding 16 // 8
    assert default(data.train[0][0]).shape == (3, 16, 16)
    assert v2.RandomResizedCrop in ops(classifier_transform("crop", data))
    with pytest.raises(ValueError, match="padcrop combines with flip only"):
        classifier_components("padcrop,color")
    with pytest.raises(ConfigError, match="--augment: unknown augmentation component 'warp'"):
        SupervisedConfig(augment="crop,warp").validate()

    plan = fake_plan(tmp_path)
    for cell in plan.cells:
        cfg = arm_config(plan, cell, 0.1, 0.0, split=0)
        assert cfg.augment == "padcrop" and "-padcrop-" in cfg.name  # every arm alike, and in the run's name
    simclr = fake_plan(tmp_path / "s", "--augment", "simclr")
    cfg = arm_config(simclr, simclr.cells[0], 0.1, 0.0, split=0)
    assert cfg.augment == "crop" and "-crop-" in cfg.name


# ---------------------------------------------------------------------------- the defaults
def test_the_digits_default_plan_validates_and_stays_small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretraining run here: the plan pretrains first, as `make demo` would
    plan = make_plan(exp.parse_args([]))
    e = plan.ecfg
    assert plan.pretrain_cfg is not None and plan.fractions == (0.1,) and len(plan.replicates) == 2
    assert e.steps is None and e.early_stopping() and e.tune_once and e.grid_extensions == 2
    assert (e.max_epochs_for(0.1), e.patience_for(0.1), e.max_epochs_for(1.0), e.patience_for(1.0)) == (200, 50, 15, 4)
    for arm in ("finetune", "supervised"):
        lrs = e.lrs(arm)
        assert len(lrs) >= 3 and len({round(b / a, 9) for a, b in zip(lrs, lrs[1:])}) == 1  # log-spaced
    cells = [(c.arm, c.fraction, c.rep.index) for c in plan.cells]
    assert cells == [("finetune", 0.1, 0), ("supervised", 0.1, 0), ("supervised", 1.0, 0),
                     ("finetune", 0.1, 1), ("supervised", 0.1, 1), ("supervised", 1.0, 1)]
    # replicate 0: 3 LRs x 1 weight decay x 1 hold-out split + a final run per cell; replicate 1: final runs only
    assert plan.trainings() == 3 * (3 * 1 * 1 + 1) + 3
    steps = [cell_budget(plan, c) for c in plan.cells]
    # 10%: 1 step per selection epoch, 2 per final epoch; 100%: 17 and 22 (batch 64)
    assert sum(b["selection"] + b["final"] for b in steps) == 4225  # measured 8.3 min with pretraining on 2 cores
    assert sum(b["extension"] for b in steps) * e.grid_extensions == 1310
    sel = arm_config(plan, plan.cells[2], 0.2, 5e-4, split=0)
    assert (sel.epochs, sel.patience, sel.schedule, sel.augment) == (15, 4, "constant", "padcrop")


def test_the_fashion_mnist_cpu_preset_covers_the_fractions_and_replicates():
    cpu = ExperimentsConfig(preset="fashion-mnist-cpu").resolved("fashion-mnist")
    assert cpu.fraction_list() == (0.001, 0.01, 0.1) and cpu.early_stopping() and cpu.tune_once
    assert [cpu.seeds_for(f) for f in (0.001, 0.01, 0.1, 1.0)] == [10, 10, 6, 3]
    assert all(cpu.max_epochs_for(f) >= 1 and cpu.patience_for(f) < cpu.max_epochs_for(f) for f in (0.001, 1.0))
    assert len(cpu.lrs("finetune")) >= 3 and len(cpu.lrs("supervised")) >= 3
    assert round(60000 * 0.001) == 60  # 0.1% of Fashion-MNIST: 60 labels
    fixed = ExperimentsConfig(preset="fashion-mnist-cpu", steps=300, seeds=2).resolved("fashion-mnist")
    assert (fixed.steps, fixed.max_epochs, fixed.patience, fixed.seeds_for(0.001)) == (300, None, None, 2)
    with pytest.raises(ConfigError, match="--max-epochs: --steps fixes the budget"):
        ExperimentsConfig(steps=10, max_epochs="30").validate()
    with pytest.raises(ConfigError, match="--patience: 'x:3' is not N or FRACTION:N"):
        ExperimentsConfig(patience="x:3").validate()
    assert PRESETS["fashion-mnist-gpu"]["seeds_by_fraction"] == PRESETS["fashion-mnist-cpu"]["seeds_by_fraction"]
    assert np.isclose(ExperimentsConfig(max_epochs="0.01:100,0.1:40").resolved("digits").max_epochs_for(0.05), 100)


def test_a_selection_run_that_converged_under_a_smaller_maximum_is_the_same_run(tmp_path):
    """Raising a fraction's maximum epochs reuses the selection runs that stopped on patience before the old maximum
    (constant LR: the maximum changes nothing before it is reached), never one that reached it, never another
    patience or another experiment."""
    from simclr_dist.config.supervised import SupervisedConfig
    from simclr_dist.run.studies.experiment_run import converged_under_a_smaller_maximum

    base = "supervised-0.1-s0-i0-lr0.1-wd0-padcrop-{tag}-b64-v0"
    new = SupervisedConfig(dataset="digits", fraction=0.1, val_split=0, epochs=100, patience=8, schedule="constant",
                           lr=0.1, storage_path=str(tmp_path), name=base.format(tag="es100p8"))

    def finished(tag: str, epochs: int, stopped: int, converged: bool, **change) -> None:
        cfg = dataclasses.replace(new, name=base.format(tag=tag), epochs=epochs, **change)
        (tmp_path / cfg.name).mkdir()
        (tmp_path / cfg.name / "results.json").write_text(json.dumps(
            {"config": cfg.to_dict(), "converged": converged, "stopped_epoch": stopped, "score": 0.9}))

    said: list[str] = []
    finished("es40p8", 40, 40, False)  # reached its maximum: it would have gone on
    finished("es30p5", 30, 12, True, patience=5)  # another patience
    assert converged_under_a_smaller_maximum(new, said.append) is None
    finished("es20p8", 20, 14, True, lr=0.2)  # another experiment under this name pattern is refused by its key
    assert converged_under_a_smaller_maximum(new, said.append) is None and not said
    finished("es60p8", 60, 23, True)
    same = converged_under_a_smaller_maximum(new, said.append)
    assert same["same_as_max_epochs"] == 60 and same["stopped_epoch"] == 23 and same["score"] == 0.9
    assert said == [f"[supervised] {base.format(tag='es60p8')}: stopped on patience at epoch 23 of at most 60: the "
                    "same run as at most 100 epochs (constant LR); reusing it (validation top-1 0.9000)"]
    assert converged_under_a_smaller_maximum(dataclasses.replace(new, epochs=50), said.append) is None  # 60 is not smaller
