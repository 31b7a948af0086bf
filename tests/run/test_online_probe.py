"""The online probe and RankMe: real arithmetic, a real in-process run (``--no-ray``), a real sweep plan and a real
ASHA sweep selecting on ``online_probe_top1``."""

from __future__ import annotations

import csv
import time
import urllib.request

import pytest
import torch

from simclr_dist import pretrain
from simclr_dist.config import parse_config
from simclr_dist.config.sweep import SweepError, parse_sweep
from simclr_dist.core.online_probe import OnlineProbe, probe_optimizer, probe_top1, probe_update, rankme
from simclr_dist.run.store.checkpoint import load_checkpoint
from simclr_dist.run.studies.sweep_plan import check_spec
from simclr_dist.run.train import online_probe as online_probe_module


def args(tmp_path, name: str, *extra: str) -> list[str]:
    return ["--no-ray", "--threads", "1", "--dataset", "digits", "--image-size", "16", "--width", "0.125",
            "--batch-size", "64", "--storage-path", str(tmp_path / "runs"), "--name", name, "--knn-every", "-1",
            "--log-every", "5", "--epochs", "1", "--tracking", "none", *extra]


def test_rankme_is_the_effective_rank():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    for r in (1, 5, 32):
        equal = q[:, :r] @ torch.eye(r, 64)                         # (64, 64), r equal singular values
        assert rankme(equal) == pytest.approx(r, rel=1e-3)             # (eps keeps log finite at 0)
    collapsed = torch.randn(1, 32).repeat(100, 1) + 1e-4 * torch.randn(100, 32)  # every row near one point
    assert rankme(collapsed) < 1.1
    assert rankme(torch.randn(500, 32)) > 25                        # isotropic: close to min(N, D) = 32


def test_probe_learns_separable_features_and_never_touches_its_input():
    torch.manual_seed(0)
    centres = 3 * torch.randn(4, 16)
    y = torch.randint(4, (512,))
    x = (centres[y] + torch.randn(512, 16)).requires_grad_()
    probe = OnlineProbe(16, 4)
    opt = probe_optimizer(probe)
    before = probe_top1(probe, x.detach(), y)
    for _ in range(50):
        probe_update(probe, opt, x, y)
    assert x.grad is None                                          # detached: nothing flows back to the features
    assert probe_top1(probe, x.detach(), y) > max(0.9, before)


def test_encoder_trains_identically_with_and_without_the_probe_and_test_split_is_never_read(tmp_path, monkeypatch):
    read = []
    real = online_probe_module.load_dataset
    monkeypatch.setattr(online_probe_module, "load_dataset", lambda name, split, **kw: read.append(split) or
                        real(name, split, **kw))
    plain = pretrain.run(parse_config(args(tmp_path, "plain")))
    probed = pretrain.run(parse_config(args(tmp_path, "probed", "--online-probe")))
    assert read == ["train"]                                        # the probe's data: the labelled train split only
    a, b = load_checkpoint(plain["checkpoint"]), load_checkpoint(probed["checkpoint"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k                     # the encoder's gradients are unchanged
    assert [h["loss"] for h in plain["history"]] == [h["loss"] for h in probed["history"]]
    h = probed["history"][-1]
    assert 0.2 < h["online_probe_top1"] <= 1.0                      # 10 classes: chance is 0.1
    assert 1.0 < h["rankme"] <= 64 and h["online_probe_loss"] > 0  # features of a 1/8-width ResNet-18: 64 dims
    assert set(b["online_probe"]) == {"head", "optimizer"} and not a["online_probe"]


@pytest.mark.ray
def test_prometheus_gauges_hold_the_last_epochs_probe_and_rankme(ray_cluster, tiny_args):
    """On Ray, each epoch end sets ``ray_simclr_online_probe_top1`` and ``ray_simclr_rankme``: after a 2-epoch run the
    series the node's metrics agent exports (what Prometheus scrapes, parsed as Prometheus parses it) hold the last
    epoch's values, labelled with the run and rank 0."""
    from prometheus_client.parser import text_string_to_metric_families

    run = "probe-gauges"
    summary = pretrain.run(parse_config(tiny_args(run, "--num-workers", "1", "--epochs", "2", "--online-probe",
                                                  "--tracking", "none")))
    first, last = summary["history"]
    assert first["rankme"] != last["rankme"]                        # so the gauge's value tells the epochs apart
    port = next(n["MetricsExportPort"] for n in ray_cluster.nodes() if n["Alive"])
    want = {"ray_simclr_online_probe_top1": last["online_probe_top1"], "ray_simclr_rankme": last["rankme"]}
    deadline, got = time.monotonic() + 30, {}
    while time.monotonic() < deadline:                              # Ray exports every 1 s in the test session
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        got = {(s.name, s.labels["rank"]): s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name in want and s.labels.get("run") == run}
        if got == {(k, "0"): v for k, v in want.items()}:
            break
        time.sleep(1)
    assert got == {(k, "0"): pytest.approx(v, rel=1e-6) for k, v in want.items()}, (got, summary["history"])


def tiny_sweep(tmp_path, **search) -> dict:
    return {"study": "probe", "base": {"dataset": "digits", "image_size": 16, "width": 0.125, "batch_size": 64,
                                       "epochs": 2, "knn_every": -1, "log_every": 10},
            "search": search, "objective": {"metric": "online_probe_top1"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1}, "concurrency": 2,
            "storage_path": str(tmp_path / "sweeps")}


def test_online_probe_objective_plans_without_the_knn_monitor(tmp_path):
    data = tiny_sweep(tmp_path, base_lr=[0.6, 0.0001])
    data["scheduler"] = {"type": "asha", "grace_period": 1}
    spec = parse_sweep(data, "probe.yaml")
    cfgs = check_spec(spec)                                          # knn_every -1 is fine: the probe measures it
    assert all(c.online_probe and c.knn_every == -1 for c in cfgs)
    with pytest.raises(SweepError, match="'ray' is set by the sweep"):
        parse_sweep({**data, "base": {**data["base"], "ray": False}}, "probe.yaml")


@pytest.mark.ray
@pytest.mark.drill  # CI's second stage (make test-cluster): four Tune trials of Ray Train runs with the probe
def test_asha_stops_a_trial_on_the_online_probe(ray_cluster, tmp_path):
    """Four 2-epoch trials, rungs at epochs 1 and 2, two at a time on the 2-CPU test cluster, selected on
    ``online_probe_top1``: ASHA must stop trials at the first rung on that value, end their Train runs and keep rows.

    After one epoch the online probe favours the near-static encoders of tiny LRs (measured at rung 1: 0.40 at LR 1e-4,
    0.13 at LR 1.2; after 2 epochs 0.52 at LR 1e-4 against 0.32 at LR 0.6), because a head trained online lags an
    encoder that moves fast: a short-rung sweep on this objective selects slow learners. So the tiny LRs run first;
    a later trial starts only when an earlier one has ended, both earlier ones are recorded at rung 1 when a later
    one reaches it, and ASHA stops it there (with the trials in the other order, which ones it stops depends on
    which report first)."""
    from simclr_dist.run.studies.sweep_run import run_sweep

    data = tiny_sweep(tmp_path, base_lr=[0.0001, 0.0002, 0.6, 1.2])
    data["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    out = run_sweep(parse_sweep(data, "probe.yaml"))
    rows = out["rows"]
    assert {r["status"] for r in rows} == {"OK"} and len(rows) == 4
    stopped = [r for r in rows if r["note"] == "stopped early by asha"]
    assert {r["base_lr"] for r in stopped} >= {0.6, 1.2} and all(r["epochs_done"] == 1 for r in stopped), rows
    kept = [r for r in rows if r not in stopped]
    assert kept and all(r["epochs_done"] == 2 for r in kept)
    assert min(r["online_probe_top1"] for r in stopped) < max(r["online_probe_top1"] for r in kept)  # stopped on it
    assert all(0.0 < r["online_probe_top1"] <= 1.0 and r["rankme"] > 1.0 for r in rows)
    for r in rows:  # no checkpoint after the stop: the trial's Train run ended at its rung
        run_dir = tmp_path / "sweeps" / "probe" / "train" / r["trial"]
        assert len(list(run_dir.glob("checkpoint_*/manifest.json"))) == r["epochs_done"]
    table = list(csv.DictReader(open(out["files"]["trials_csv"])))  # one row per trial (results.csv: the cells)
    assert {t["trial"] for t in table} == {r["trial"] for r in rows}
    assert {"online_probe_top1", "rankme"} <= set(table[0])
