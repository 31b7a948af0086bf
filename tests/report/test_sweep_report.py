"""The sweep report says what its objective measured."""

from __future__ import annotations

from simclr_dist.config.sweep import SweepSpec
from simclr_dist.report.sweep import objective_text


def test_sweep_objective_text_names_the_online_probe_and_its_lag():
    assert "online linear probe" in objective_text(SweepSpec("s", "x.yaml", metric="online_probe_top1"))
    assert "kNN" in objective_text(SweepSpec("s", "x.yaml", metric="val_knn_top1"))
    assert "logistic-regression" in objective_text(SweepSpec("s", "x.yaml", metric="val_linear_top1"))
