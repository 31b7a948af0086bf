"""Bad input: each is rejected early (before Ray) with one line naming the culprit, and nothing saved is lost."""

from __future__ import annotations

import json

import pytest

from simclr_dist import pretrain
from simclr_dist.config import ConfigError, PretrainConfig, parse_config


def run_cli(capsys, args):
    rc = pretrain.main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "mnist"], "--dataset: unknown dataset 'mnist'"),
    (["--arch", "resnet99"], "--arch: unknown architecture 'resnet99'"),
    (["--batch-size", "7", "--num-workers", "2"], "--batch-size: 7 is not divisible by --num-workers 2"),
    (["--batch-size", "2", "--num-workers", "2"], "NT-Xent needs at least 2 per worker"),
    (["--temperature", "0"], "--temperature: must be > 0, got 0.0"),
    (["--temperature", "-0.5"], "--temperature: must be > 0, got -0.5"),
    (["--augment", "crop,sparkle"], "--augment:"),
    (["--optimizer", "adam"], "--optimizer: unknown optimizer 'adam'"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "--download"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--no-use-gpu", "--sync-bn"], "--sync-bn: needs GPU workers"),   # gloo has no SyncBatchNorm
    (["--max-cluster-gpus", "-1"], "--max-cluster-gpus: must be >= 0"),
])
def test_bad_input_one_line_error(capsys, tmp_path, args, needle):
    rc, err = run_cli(capsys, [*args, "--storage-path", str(tmp_path / "runs")])
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err
    assert needle in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_storage_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, err = run_cli(capsys, ["--storage-path", str(blocker / "runs")])
    assert rc == 2 and "--storage-path" in err and "not writable" in err and "\n" not in err


def test_incompatible_resume_rejected_and_saved_config_kept(capsys, tmp_path):
    store = str(tmp_path / "runs")
    first = pretrain.preflight(parse_config(["--storage-path", store, "--name", "r"]))
    saved = (tmp_path / "runs" / "r" / pretrain.RUN_CONFIG_FILE).read_text()
    assert json.loads(saved)["arch"] == first.arch == "resnet18"
    rc, err = run_cli(capsys, ["--storage-path", store, "--name", "r", "--arch", "resnet34"])
    assert rc == 2 and "arch='resnet18' (now 'resnet34')" in err
    assert (tmp_path / "runs" / "r" / pretrain.RUN_CONFIG_FILE).read_text() == saved
    # a compatible rerun passes preflight (it will resume)
    assert pretrain.preflight(parse_config(["--storage-path", store, "--name", "r"])).arch == "resnet18"


def test_defaults_resolve_to_the_fast_digits_run():
    cfg = PretrainConfig().validate().resolved()
    assert (cfg.dataset, cfg.split, cfg.image_size, cfg.width, cfg.cifar_stem) == ("digits", "train", 24, 0.25, True)
    assert cfg.warmup_epochs == pytest.approx(0.1 * cfg.epochs)
    assert (cfg.batch_size, cfg.lr_scaling, cfg.base_lr) == (128, "sqrt", 0.075)  # paper: sqrt rule for small batches
    assert PretrainConfig(batch_size=4096).resolved().lr_scaling == "linear"
    big = PretrainConfig(dataset="imagenet", data_root="/x").resolved()
    assert (big.image_size, big.width, big.cifar_stem, big.epochs, big.warmup_epochs) == (224, 1.0, False, 100, 10.0)
    assert big.resolved() == big  # idempotent


def test_every_field_is_a_flag_with_help():
    import dataclasses
    from simclr_dist.config import build_parser
    parser = build_parser(PretrainConfig, "x", "y")
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(PretrainConfig):
        assert f.name in flags and flags[f.name].help, f.name
    assert parse_config(["--no-sync-bn", "--cifar-stem", "--width", "0.5"]).cifar_stem is True


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError, match="--num-workers: must be >= 1"):
        PretrainConfig(num_workers=0).validate()


# ---------------------------------------------------------------------------- the three that used to print pages
@pytest.mark.parametrize("command, args, needles", [
    ("pretrain", ["--epohcs", "3"], ("unrecognized arguments: --epohcs 3", "(did you mean --epochs?)",
                                    "see python -m simclr_dist.pretrain --help")),
    ("evaluate", ["--chekpoint", "x"], ("--chekpoint", "(did you mean --checkpoint?)", "--help")),
    ("data.convert", ["--dataset", "digits", "--out", "x.beton", "--shadrs", "2"], ("(did you mean --shards?)",)),
    ("sweep", ["--zzz"], ("unrecognized arguments: --zzz", "--help")),
])
def test_an_unknown_flag_is_one_line_with_a_close_match(capsys, command, args, needles):
    import importlib

    module = importlib.import_module(f"simclr_dist.{command}")
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "usage:" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_convert_to_an_unwritable_place_is_one_line(capsys, tmp_path):
    from simclr_dist.data import convert

    rc = convert.main(["--dataset", "digits", "--split", "train", "--out", "/proc/x.beton", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: --out /proc/x.beton: cannot write there"), err


def test_evaluate_refuses_a_malicious_checkpoint_in_one_line(capsys, tmp_path):
    """A complete checkpoint whose checkpoint.pt holds a pickle that would run code (its manifest hash updated to
    match): refused without running it, as one line and exit 2, not a traceback."""
    import hashlib
    import io
    import os
    import pickle

    import torch

    from simclr_dist import evaluate
    from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE, MANIFEST_FILE, save_checkpoint
    from simclr_dist.run.store.weights import build_model

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    cfg = PretrainConfig(dataset="digits", image_size=16, width=0.125, epochs=1).resolved()
    ckpt = tmp_path / "checkpoint_000001"
    save_checkpoint(str(ckpt), {"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "epoch": 1,
                                "step": 1, "optimizer": {}, "scaler": {}, "history": []})
    buf = io.BytesIO()
    torch.save({"model": Boom()}, buf, pickle_module=pickle)
    (ckpt / CHECKPOINT_FILE).write_bytes(buf.getvalue())
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest.update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    rc = evaluate.main(["--checkpoint", str(ckpt), "--protocols", "knn"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "refused to load" in err, err
    assert not (tmp_path / "pwned").exists()  # no code ran


def test_a_bad_value_of_a_known_flag_suggests_no_other_flag(capsys):
    """Only an unknown flag gets "did you mean": a bad value names the flag itself (it once read "invalid int value:
    'abc' (did you mean --epochs?)" for --epochs abc)."""
    from simclr_dist import pretrain

    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--epochs", "abc"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "invalid int value: 'abc'" in err, err
    assert "did you mean" not in err and err.endswith("--help"), err
