"""The evaluator on tiny digits checkpoints written in the test (no Ray): checkpoint discovery, label subsets, the
three protocols' hygiene (frozen probe, L2 chosen without test data, fine-tuning through the one classifier loop
really trains and reads the test split once), and the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from simclr_dist import evaluate as ev
from simclr_dist.config.evaluate import EvalConfig
from simclr_dist.core.probe import fit_logistic
from simclr_dist.data.splits import balanced_subset, stratified_split
from simclr_dist.run.train import evaluation as evl
from simclr_dist.run.eval.jobs import finetune, watch_run
from simclr_dist.run.store.checkpoint import latest_checkpoint, list_complete_checkpoints
from simclr_dist.config import PretrainConfig
from simclr_dist.run.store.checkpoint import CHECKPOINT_FILE, MANIFEST_FILE, save_checkpoint
from simclr_dist.run.store.weights import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg() -> PretrainConfig:
    return PretrainConfig(dataset="digits", image_size=16, width=0.125, epochs=3).resolved()


def write_checkpoint(directory, epoch: int, seed: int = 0) -> str:
    cfg = tiny_cfg()
    torch.manual_seed(seed)
    model = build_model(cfg)
    save_checkpoint(str(directory), {
        "format_version": 1, "model": model.state_dict(), "optimizer": {}, "schedule": {}, "scaler": {},
        "epoch": epoch, "step": 10 * epoch, "steps_per_epoch": 10, "config": cfg.to_dict(), "history": []})
    return str(directory)


@pytest.fixture(scope="module")
def data() -> evl.EvalData:
    return evl.load_eval_data(tiny_cfg())


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_cfg()).encoder


@pytest.fixture(scope="module")
def features(encoder, data) -> evl.Features:
    return evl.compute_features(encoder, data, log=lambda m: None)


# ---------------------------------------------------------------------------- checkpoint discovery
def test_latest_checkpoint_is_highest_complete_epoch(tmp_path):
    run = tmp_path / "runs" / "r"
    assert latest_checkpoint(str(run)) is None and list_complete_checkpoints(str(run)) == []  # run not started
    write_checkpoint(run / "checkpoint_b", epoch=2)
    write_checkpoint(run / "checkpoint_c", epoch=1)  # names do not decide: the manifest's epoch does
    write_checkpoint(run / "checkpoint_d", epoch=3)
    os.remove(run / "checkpoint_d" / MANIFEST_FILE)  # being written: must never be read
    write_checkpoint(run / "checkpoint_e", epoch=4)
    with open(run / "checkpoint_e" / CHECKPOINT_FILE, "r+b") as f:  # manifest copied before the weights
        f.truncate(100)
    (run / "simclr_config.json").write_text("{}")
    (run / "notes").mkdir()

    refs = list_complete_checkpoints(str(run))
    assert [(r.name, r.epoch) for r in refs] == [("checkpoint_c", 1), ("checkpoint_b", 2)]
    assert latest_checkpoint(str(run)) == str(run / "checkpoint_b")


# ---------------------------------------------------------------------------- label subsets
def test_balanced_subset_stratified_deterministic_nested(data):
    labels = data.train_labels
    counts = np.bincount(labels)
    subsets = {f: balanced_subset(labels, f, seed=0) for f in (0.01, 0.1, 1.0)}
    for f, idx in subsets.items():
        assert len(np.unique(idx)) == len(idx)
        per_class = np.bincount(labels[idx], minlength=10)
        np.testing.assert_array_equal(per_class, np.maximum(1, np.round(f * counts)))
        if f < 1:  # balanced: digits classes hold 139-146 images
            assert per_class.max() - per_class.min() <= 1
    assert np.array_equal(subsets[1.0], np.arange(len(labels)))
    assert set(subsets[0.01]) <= set(subsets[0.1])  # nested: a label-fraction curve only adds labels
    np.testing.assert_array_equal(subsets[0.1], balanced_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subsets[0.1], balanced_subset(labels, 0.1, seed=1))
    assert -1 not in np.array([0, -1, 1, -1])[balanced_subset(np.array([0, -1, 1, -1]), 1.0)]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            balanced_subset(labels, bad)


def test_stratified_split_partitions_train(data):
    fit, val = stratified_split(data.train_labels, 0.2, seed=0)
    assert not set(fit) & set(val) and len(fit) + len(val) == len(data.train_labels)
    assert set(data.train_labels[val]) == set(range(10)) == set(data.train_labels[fit])
    assert abs(len(val) - 0.2 * len(data.train_labels)) <= 10


# ---------------------------------------------------------------------------- linear probe
def test_fit_logistic_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=gen)
    x = torch.randn(400, 8, generator=gen) * 3 + torch.randn(4, 8, generator=gen)[y] * 2
    l2 = 1e-2
    ours = fit_logistic(x, y, num_classes=4, l2=l2)
    z = ((x - x.mean(0)) / x.std(0)).numpy()
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-8, max_iter=2000).fit(z, y.numpy())
    np.testing.assert_allclose(ours.weight.numpy(), ref.coef_, atol=2e-3)
    assert (ours.logits(x).argmax(1).numpy() == ref.predict(z)).mean() == 1.0


def test_linear_probe_freezes_encoder_and_picks_l2_on_validation(encoder, data):
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}  # weights and BN running statistics
    grads_wanted = {n: p.requires_grad for n, p in encoder.named_parameters()}
    grid = (1e-5, 1e-3, 1e-1)
    out = evl.linear_probe(encoder, data, l2_grid=grid, log=lambda m: None)

    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in encoder.parameters())
    assert {n: p.requires_grad for n, p in encoder.named_parameters()} == grads_wanted
    assert encoder.training  # mode restored
    assert set(out["val_top1_by_l2"]) == {f"{v:g}" for v in grid}
    assert out["l2"] in grid and out["val_top1"] == max(out["val_top1_by_l2"].values())
    assert out["fit_size"] + out["val_size"] == out["label_count"] == len(data.train)
    assert 0.5 < out["top1"] <= out["top5"] <= 1  # random conv features already separate digits linearly


def test_l2_selection_never_sees_test_data(features, monkeypatch):
    seen = []
    real_select = evl.select_l2

    def spy(fit_x, fit_y, val_x, val_y, **kw):
        seen.append(len(fit_x) + len(val_x))
        return real_select(fit_x, fit_y, val_x, val_y, **kw)

    monkeypatch.setattr(evl, "select_l2", spy)
    kw = dict(num_classes=10, l2_grid=(1e-4, 1e-2), log=lambda m: None)
    honest = evl.linear_probe_features(features, **kw)
    garbage = evl.Features(features.train_x, features.train_y, torch.randn_like(features.test_x),
                          torch.zeros_like(features.test_y))
    poisoned = evl.linear_probe_features(garbage, **kw)
    assert seen == [len(features.train_y)] * 2
    assert (poisoned["l2"], poisoned["val_top1_by_l2"]) == (honest["l2"], honest["val_top1_by_l2"])
    assert poisoned["top1"] != honest["top1"]  # the test split only enters the final report


# ---------------------------------------------------------------------------- kNN and fine-tuning
def test_knn_above_chance(features):
    out = evl.knn_eval(features, num_classes=10, k=200, temperature=0.1)
    assert 0.3 < out["top1"] <= out["top5"] <= 1.0  # chance is 0.1
    assert out["params"] == {"k": 200, "temperature": 0.1}


def test_finetune_trains_encoder_through_the_one_loop_and_tests_once(data, monkeypatch):
    torch.manual_seed(1)
    enc = build_model(tiny_cfg()).encoder
    before = [p.detach().clone() for p in enc.parameters()]
    reads = []
    real_predict = evl.predict

    def spy(model, dataset, *args, **kw):
        reads.append(dataset is data.test)
        return real_predict(model, dataset, *args, **kw)

    monkeypatch.setattr("simclr_dist.run.train.classify_loop.predict", spy)
    ecfg = EvalConfig(checkpoint="x", finetune_epochs=2, finetune_batch_size=32, finetune_lr=0.4)
    out = finetune(enc, data, tiny_cfg(), ecfg, 0.1, device=torch.device("cpu"), log=lambda m: None)

    assert any(not torch.equal(p, b) for p, b in zip(enc.parameters(), before))  # the whole network trains
    assert out["subset_indices"] == balanced_subset(data.train_labels, 0.1, seed=0).tolist()
    assert out["label_count"] == len(out["subset_indices"]) == 142
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    for h in out["history"]:
        assert h["train_loss"] > 0 and 0 <= h["train_acc"] <= 1 and "test_top1" not in h
    assert out["history"][-1]["train_loss"] < out["history"][0]["train_loss"]
    assert reads == [True]  # the test split is read once, after the last step
    assert 0 <= out["top1"] <= out["top5"] <= 1 and len(out["predictions"]) == len(data.test)
    assert out["params"]["augment"] == "crop" and out["params"]["peak_lr"] == pytest.approx(0.4 * 32 / 256)
    assert out["params"]["steps"] == 2 * (142 // 32)


# ---------------------------------------------------------------------------- CLI
def read(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_cli_writes_results_next_to_checkpoint_then_skips(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "runs" / "r" / "checkpoint_000001", epoch=1)
    args = ["--checkpoint", ckpt, "--protocols", "finetune,knn,linear", "--label-fractions", "0.05",
            "--finetune-epochs", "1", "--l2-grid", "1e-4,1e-2"]
    assert ev.main(args) == 0
    out = capsys.readouterr().out
    files = {n: str(tmp_path / "runs" / "r" / "eval" / "checkpoint_000001" / f"{n}.json")
             for n in ("linear", "knn", "finetune-0.05")}
    results = {n: read(p) for n, p in files.items()}
    for name, r in results.items():
        assert r["checkpoint"] == ckpt and r["checkpoint_epoch"] == 1 and 0 <= r["top1"] <= r["top5"] <= 1
        assert r["wall_time_s"] > 0 and r["params"] and name in out
    assert results["linear"]["l2"] in (1e-4, 1e-2) and results["knn"]["label_count"] == 1437
    assert results["finetune-0.05"]["label_count"] == len(results["finetune-0.05"]["subset_indices"]) == 70
    assert len(results["finetune-0.05"]["history"]) == 1

    stamps = {p: os.stat(p).st_mtime_ns for p in files.values()}
    assert ev.main(args) == 0  # idempotent: nothing is recomputed or rewritten
    assert "already evaluated" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in files.values()} == stamps


def test_linear_at_label_fractions_on_validation_queries_never_reads_the_test_split(tmp_path, capsys, monkeypatch):
    """The pretraining curve's evaluation: probes on 5% and 20% of the labels and kNN, scored on a held-out part of
    the labelled train split; the test split is never loaded into features, and the bank excludes the queries."""
    ckpt = write_checkpoint(tmp_path / "runs" / "r" / "checkpoint_000001", epoch=1)
    seen = []
    real = evl.extract_features

    def spy(encoder, dataset, *a, **k):
        seen.append(len(dataset))
        return real(encoder, dataset, *a, **k)

    monkeypatch.setattr(evl, "extract_features", spy)
    args = ["--checkpoint", ckpt, "--protocols", "linear,knn", "--linear-fractions", "0.05,0.2", "--queries", "val",
            "--l2-grid", "1e-4,1e-2"]
    assert ev.main(args) == 0
    out_dir = tmp_path / "runs" / "r" / "eval" / "checkpoint_000001"
    assert sorted(p.name for p in out_dir.glob("*.json")) == ["knn-val.json", "linear-0.05-val.json",
                                                             "linear-0.2-val.json"]
    assert seen == [1437]  # the train split only: no test features
    low, high, knn = (read(out_dir / f"{n}.json") for n in ("linear-0.05-val", "linear-0.2-val", "knn-val"))
    queries = knn["test_size"]
    assert queries == round(0.2 * 1437) or abs(queries - 0.2 * 1437) <= 10  # the fixed 20% per class
    assert knn["label_count"] == 1437 - queries and knn["queries"] == "val"
    assert low["label_fraction"] == 0.05 and low["label_count"] < high["label_count"] < 1437 - queries
    assert "linear-0.05-val" in capsys.readouterr().out


def test_pretraining_curve_from_the_eval_index(tmp_path, capsys):
    """Two checkpoints scored by the evaluation job, then --curve draws accuracy vs epochs and wall time from the
    run's index: one CSV row per (protocol, epoch), the PNG a real image."""
    run = tmp_path / "runs" / "r"
    for epoch in (1, 2):
        write_checkpoint(run / f"checkpoint_00000{epoch}", epoch=epoch, seed=epoch)
        assert ev.main(["--checkpoint", str(run / f"checkpoint_00000{epoch}"), "--protocols", "knn",
                        "--queries", "val"]) == 0
    png = tmp_path / "curve.png"
    assert ev.main(["--run", str(run), "--protocols", "knn", "--queries", "val", "--curve", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0] == "protocol,epoch,step,train_s,label_count,top1"
    assert [r.split(",")[:2] for r in rows[1:]] == [["knn-val", "1"], ["knn-val", "2"]]
    assert "pretraining curve" in capsys.readouterr().out


def test_run_and_watch_evaluate_each_complete_checkpoint_once(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    first = write_checkpoint(run / "checkpoint_000001", epoch=1)
    staging = write_checkpoint(tmp_path / "staging", epoch=2, seed=1)
    second = run / "checkpoint_000002"
    second.mkdir()
    shutil.copy(os.path.join(staging, CHECKPOINT_FILE), second)  # weights arrived, manifest not yet

    assert ev.main(["--run", str(run), "--protocols", "knn", "--threads", "1"]) == 0  # the latest complete one
    assert os.path.exists(run / "eval" / "checkpoint_000001" / "knn.json")
    assert not (run / "eval" / "checkpoint_000002").exists()

    polls = []

    def sleep(seconds: float) -> None:  # training finishes writing checkpoint 2 while the watcher waits
        polls.append(seconds)
        shutil.copy(os.path.join(staging, MANIFEST_FILE), second)

    cfg = ev.parse_args(["--run", str(run), "--watch", "--watch-until-epoch", "2", "--interval", "5",
                         "--protocols", "knn"]).validate()
    results = watch_run(str(run), cfg, log=lambda m: None, sleep=sleep)
    assert polls == [5.0]
    assert [(r["checkpoint_epoch"], r["cached"]) for r in results] == [(1, True), (2, False)]
    assert read(run / "eval" / "checkpoint_000002" / "knn.json")["checkpoint_epoch"] == 2

    stamp = os.stat(run / "eval" / "checkpoint_000002" / "knn.json").st_mtime_ns
    capsys.readouterr()
    assert ev.main(["--run", str(run), "--watch", "--watch-until-epoch", "2", "--interval", "0.01",
                    "--protocols", "knn"]) == 0
    assert capsys.readouterr().out.count("already evaluated") == 2
    assert os.stat(run / "eval" / "checkpoint_000002" / "knn.json").st_mtime_ns == stamp


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "{tmp}/nope"], "no such checkpoint directory"),
    (["--checkpoint", "{tmp}/runs/r/checkpoint_2"], "incomplete checkpoint (no manifest.json)"),
    (["--run", "{tmp}/runs/empty"], "no complete checkpoint"),
    (["--run", "{tmp}/runs/r", "--checkpoint", "{tmp}/runs/r/checkpoint_1"], "exactly one of"),
    ([], "exactly one of"),
    (["--checkpoint", "{tmp}/runs/r/checkpoint_1", "--protocols", "linear,svm"], "unknown protocol 'svm'"),
    (["--checkpoint", "{tmp}/runs/r/checkpoint_1", "--label-fractions", "0.1,0"], "must be in (0, 1], got 0"),
    (["--checkpoint", "{tmp}/runs/r/checkpoint_1", "--label-fractions", "1.5"], "must be in (0, 1], got 1.5"),
    (["--checkpoint", "{tmp}/runs/r/checkpoint_1", "--label-fractions", "ten"], "'ten' is not a number"),
    (["--checkpoint", "{tmp}/runs/r/checkpoint_1", "--watch"], "--watch: needs --run"),
])
def test_bad_input_one_line_error(tmp_path, capsys, args, needle):
    (tmp_path / "runs" / "r" / "checkpoint_1").mkdir(parents=True)  # validation comes before any reading
    (tmp_path / "runs" / "r" / "checkpoint_2").mkdir()
    (tmp_path / "runs" / "r" / "checkpoint_2" / CHECKPOINT_FILE).write_bytes(b"partial")
    (tmp_path / "runs" / "empty" / "checkpoint_1").mkdir(parents=True)
    assert ev.main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err
    assert not captured.out


# ---------------------------------------------------------------------------- format compatibility
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def test_checkpoint_written_by_commit_1af4297_still_loads_and_evaluates(tmp_path, capsys):
    """tests/fixtures/checkpoint_1af4297 was written by the save path of commit 1af4297 (FORMAT_VERSION 1, see
    fixtures/make_checkpoint_1af4297.py): the current code verifies it, rebuilds the same network from its config,
    reproduces the recorded features exactly, and evaluates it."""
    from simclr_dist.run.store.checkpoint import FORMAT_VERSION, load_checkpoint

    assert FORMAT_VERSION >= 1  # today's format may be newer; format 1 must stay readable
    ckpt = str(tmp_path / "checkpoint_000001")
    shutil.copytree(os.path.join(FIXTURES, "checkpoint_1af4297"), ckpt)
    state = load_checkpoint(ckpt)
    assert state["format_version"] == 1 and read(os.path.join(ckpt, MANIFEST_FILE))["epoch"] == 1
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])  # strict: every tensor of the old layout has its place
    model.eval()
    expected = read(os.path.join(FIXTURES, "checkpoint_1af4297.features.json"))["features"]
    with torch.no_grad():
        got = model.encoder(torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
    assert latest_checkpoint(str(tmp_path)) == ckpt
    assert ev.main(["--checkpoint", ckpt, "--protocols", "knn", "--threads", "1"]) == 0
    from simclr_dist.run.eval.store import results_dir

    assert read(os.path.join(results_dir(ckpt), "knn.json"))["checkpoint_epoch"] == 1
    assert "knn" in capsys.readouterr().out
