"""Experiments A/B and the supervised trainer on an imported encoder (``--pretrained`` / ``--init-pretrained``).

The import is a tiny randomly initialised ResNet-18 in torchvision's layout (an ImageNet 7x7 stem and an ``fc``
head, which the importer drops), written here: no download. The experiments run on digits in-process (``--no-ray``)
with one epoch per trained arm.
"""

from __future__ import annotations

import glob
import json

import pytest
import torch

from simclr_dist import experiments as exp
from simclr_dist import supervised as sup
from simclr_dist.config import PretrainConfig
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.run.jobs.classify_job import RUN_CONFIG_FILE, initial_encoder, resolve
from simclr_dist.run.studies.experiment_plan import arm_config, make_plan
from simclr_dist.data.datasets import dataset_info
from simclr_dist.core.models import build_backbone
from simclr_dist.run.store.pretrained import IMAGENET_MEAN_STD
from simclr_dist.run.store.checkpoint import save_checkpoint
from simclr_dist.run.store.weights import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_torchvision_file(path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A tiny ResNet-18 (width 1/8, ImageNet stem) saved as a torchvision state dict with a 1000-class ``fc``;
    returns the encoder's tensors (what an import must reproduce)."""
    torch.manual_seed(seed)
    encoder, feat_dim = build_backbone("resnet18", cifar_stem=False, width=0.125)
    with torch.no_grad():  # non-trivial BN statistics: a BN mix-up would show
        for name, t in encoder.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                t.uniform_(-0.1, 0.1)
            elif name.endswith(("running_var", "bn1.weight", "bn2.weight")):
                t.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.save({**state, "fc.weight": torch.randn(1000, feat_dim), "fc.bias": torch.zeros(1000)}, path)
    return state


def write_simclr_checkpoint(directory) -> str:
    cfg = PretrainConfig(dataset="digits", epochs=1, image_size=16, width=0.125).resolved()
    save_checkpoint(str(directory), {
        "format_version": 1, "model": build_model(cfg).state_dict(), "optimizer": {}, "schedule": {}, "scaler": {},
        "epoch": 1, "step": 10, "steps_per_epoch": 10, "config": cfg.to_dict(),
        "history": [{"epoch": 1, "loss": 5.0, "epoch_time_s": 3.0}]})
    return str(directory)


def read(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("tv") / "r18-tiny.pth"
    return str(path), write_torchvision_file(path)


# ---------------------------------------------------------------------------- flags: one line, before any work
@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "{ckpt}", "--pretrained", "torchvision:{tv}", "--dataset", "digits"],
     "--checkpoint: give at most one of --checkpoint DIR, --run STORAGE/NAME and --pretrained FORMAT:PATH"),
    (["--run", "{tmp}/runs/x", "--pretrained", "torchvision:{tv}", "--dataset", "digits"], "at most one of"),
    (["--pretrained", "moco:/x.pth", "--dataset", "digits"], "unknown format 'moco'; choose from simclr-v1"),
    (["--pretrained", "spijkervet"], "expected FORMAT:PATH_OR_URI"),
    (["--pretrained", "torchvision:{tv}"], "--dataset: required with --pretrained torchvision:..."),
    (["--pretrained", "spijkervet:/x.tar"], "--dataset: required with --pretrained spijkervet:..."),
    (["--pretrained", "torchvision:{tmp}/nope.pth", "--dataset", "digits"], "nope.pth: no such file"),
    (["--pretrained", "torchvision:{bad}", "--dataset", "digits"], "--no-strict loads the"),
    (["--pretrained", "torchvision:{tv}", "--dataset", "digits", "--pretrain"],
     "--pretrain: pretrains a --run STORAGE/NAME, not a --pretrained"),
    (["--pretrained", "torchvision:{tv}", "--dataset", "digits", "--image-size", "4"], "--image-size: must be >= 8"),
    (["--checkpoint", "{ckpt}", "--image-size", "16"], "--image-size: only applies with --pretrained"),
])
def test_experiments_pretrained_bad_flags_one_line_error(tv_file, tmp_path, capsys, args, needle):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    bad = {k: v for k, v in torch.load(tv_file[0]).items() if k != "layer1.0.bn1.weight"}  # a partial file
    torch.save(bad, tmp_path / "bad.pth")
    subst = {"{tmp}": str(tmp_path), "{ckpt}": ckpt, "{tv}": tv_file[0], "{bad}": str(tmp_path / "bad.pth")}
    for k, v in subst.items():
        args = [a.replace(k, v) for a in args]
    assert exp.main([*args, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err, err
    assert not captured.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--init-checkpoint", "{ckpt}", "--init-pretrained", "torchvision:{tv}", "--dataset", "digits"],
     "--init-pretrained: give at most one of --init-checkpoint DIR and --init-pretrained FORMAT:PATH"),
    (["--init-pretrained", "moco:/x.pth", "--dataset", "digits"], "--init-pretrained 'moco:/x.pth': unknown format"),
    (["--init-pretrained", "torchvision:{tv}"], "--dataset: required with --init-pretrained torchvision:..."),
    (["--init-pretrained", "torchvision:{tmp}/nope.pth", "--dataset", "digits"],
     "--init-pretrained torchvision:{tmp}/nope.pth: no such file"),
    (["--init-pretrained", "torchvision:{tv}", "--dataset", "digits", "--width", "0.5"],
     "--width 0.5: --init-pretrained torchvision:"),
])
def test_supervised_init_pretrained_bad_flags_one_line_error(tv_file, tmp_path, capsys, args, needle):
    ckpt = write_simclr_checkpoint(tmp_path / "ckpt")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt).replace("{tv}", tv_file[0]) for a in args]
    assert sup.main([*args, "--no-ray", "--storage-path", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.replace("{tmp}", str(tmp_path)) in err, err
    assert not captured.out and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- end to end
def test_experiments_on_imported_torchvision_encoder(tv_file, tmp_path, capsys):
    path, src = tv_file
    out = tmp_path / "exp"
    common = ["--dataset", "digits", "--image-size", "16", "--fractions", "0.1", "--seeds", "1", "--steps", "2",
              "--batch-size", "32", "--lr-grid", "0.4", "--wd-grid", "0", "--baselines", "", "--no-ray",
              "--threads", "1", "--l2-grid", "1e-2", "--out", str(out)]
    assert exp.main(["--pretrained", f"torchvision:{path}", *common]) == 0
    stdout = capsys.readouterr().out
    assert "[pretrained] torchvision:" in stdout and "input normalisation: mean (0.485, 0.456, 0.406)" in stdout

    summary = read(out / "results.json")
    spec = f"torchvision:{path}"
    assert summary["complete"] and summary["dataset"] == "digits" and summary["image_size"] == 16
    enc = summary["encoder"]
    assert enc["kind"] == "pretrained" and enc["source"] == spec and enc["format"] == "torchvision"
    assert enc["uri"] == path and enc["spec"] == spec and enc["complete"] and enc["dropped"] == ["fc.weight", "fc.bias"]
    # the network is the import's (7x7 stem, 1/8 width), not digits' default (3x3 stem, 1/4 width)
    assert (summary["arch"]["arch"], summary["arch"]["width"], summary["arch"]["cifar_stem"]) == ("resnet18", 0.125,
                                                                                                  False)
    assert summary["pretraining"]["source"] == spec and summary["pretraining"]["train_time_s"] is None
    assert {(r["arm"], r["fraction"]) for r in summary["records"]} == {("linear", 0.1), ("finetune", 0.1),
                                                                      ("supervised", 0.1), ("supervised", 1.0)}
    imagenet = {"mean": list(IMAGENET_MEAN_STD[0]), "std": list(IMAGENET_MEAN_STD[1])}
    digits = {"mean": list(dataset_info("digits").mean), "std": list(dataset_info("digits").std)}
    for r in summary["records"]:
        assert 0 <= r["top1"] <= r["top5"] <= 1
        if r["arm"] == "supervised":  # unchanged: the same network from scratch, on the dataset's normalisation
            assert r["normalization"] == digits
        if r["arm"] == "finetune":  # the import's normalisation in the fine-tuned arm's transforms
            assert r["normalization"] == imagenet
    assert summary["titles"]["finetune"] == "torchvision fine-tuned"
    report = (out / "report.md").read_text()
    assert f"- Encoder: imported `{spec}` (format torchvision" in report and "SimCLR checkpoint" not in report
    assert "| torchvision fine-tuned | 142 |" in report and "pretraining time unknown" in report

    # the fine-tuned arm started from the imported weights, the supervised arm did not
    [ft_dir] = glob.glob(str(out / "runs" / "finetune-0.1-s0-i0-lr0.4-wd0-padcrop-2st-b32-pt*"))
    ft = read(f"{ft_dir}/results.json")
    assert ft["init_pretrained"] == spec and ft["init_checkpoint"] is None and ft["params"]["weight_decay"] == 0
    scfg, mcfg = resolve(SupervisedConfig.from_dict(read(f"{ft_dir}/{RUN_CONFIG_FILE}")))
    assert (mcfg.arch, mcfg.width, mcfg.cifar_stem, mcfg.image_size) == ("resnet18", 0.125, False, 16)
    got = initial_encoder(scfg, mcfg).state_dict()
    for k, v in src.items():
        assert torch.equal(got[k], v), k
    scratch = read(out / "runs" / "supervised-0.1-s0-i0-lr0.4-wd0-padcrop-2st-b32" / RUN_CONFIG_FILE)
    assert scratch["init_pretrained"] is None and scratch["init_checkpoint"] is None
    s_cfg, s_mcfg = resolve(SupervisedConfig.from_dict(scratch))
    assert not torch.equal(initial_encoder(s_cfg, s_mcfg).state_dict()["conv1.weight"], src["conv1.weight"])

    # another import into the same --out: its own fine-tuned runs; the from-scratch runs are reused
    other = tmp_path / "other.pth"
    write_torchvision_file(other, seed=2)
    assert exp.main(["--pretrained", f"torchvision:{other}", *common]) == 0
    capsys.readouterr()
    again = read(out / "results.json")
    assert again["encoder"]["source"] == f"torchvision:{other}"
    reused = {(r["arm"], r["fraction"]): r["reused"] for r in again["records"] if r["arm"] in ("finetune", "supervised")}
    assert reused == {("finetune", 0.1): False, ("supervised", 0.1): True, ("supervised", 1.0): True}
    assert len(glob.glob(str(out / "runs" / "finetune-0.1-s0-i0-lr0.4-wd0-padcrop-2st-b32-pt*"))) == 2

    # the first import's very weights read from another path (a clone elsewhere): known by their digest, so every
    # finished run is read back, none retrained
    moved = tmp_path / "elsewhere" / "same.pth"
    moved.parent.mkdir()
    moved.write_bytes(open(path, "rb").read())
    assert exp.main(["--pretrained", f"torchvision:{moved}", *common]) == 0
    capsys.readouterr()
    third = read(out / "results.json")
    assert all(r["reused"] for r in third["records"] if r["arm"] in ("finetune", "supervised"))
    assert len(glob.glob(str(out / "runs" / "finetune-0.1-s0-i0-lr0.4-wd0-padcrop-2st-b32-pt*"))) == 2


def test_plan_on_simclr_dist_run_dir_pins_its_checkpoint_and_takes_its_data(tmp_path):
    ckpt = write_simclr_checkpoint(tmp_path / "runs" / "simclr" / "checkpoint_000001")
    plan = make_plan(exp.parse_args(["--pretrained", f"simclr-dist:{tmp_path / 'runs' / 'simclr'}", "--no-ray",
                                     "--out", str(tmp_path / "o")]))
    assert plan.pretrained_spec == f"simclr-dist:{ckpt}" and plan.checkpoint is None  # the run's latest checkpoint
    m = plan.model_cfg  # no --dataset/--image-size: the checkpoint's own
    assert (m.dataset, m.image_size, m.arch, m.width, m.cifar_stem) == ("digits", 16, "resnet18", 0.125, True)
    ft = arm_config(plan, next(c for c in plan.cells if c.arm == "finetune"), 0.4, 0.0, split=None)
    scratch = arm_config(plan, next(c for c in plan.cells if c.arm == "supervised"), 0.4, 0.0, split=None)
    assert ft.init_pretrained == plan.pretrained_spec and ft.init_checkpoint is None and "-pt" in ft.name
    assert scratch.init_pretrained is None and scratch.init_checkpoint is None and "-pt" not in scratch.name
