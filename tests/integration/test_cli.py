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
