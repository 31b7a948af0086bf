"""Shared fixtures: one real local Ray instance for the whole session (a worker group starts in ~20-40 s)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one torch thread is several times faster than two contending ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    from simclr_dist.run.jobs.launch import bind_to_loopback

    os.environ.pop("RAY_ADDRESS", None)  # never join a cluster that happens to be running on the test machine
    bind_to_loopback()  # as a local run of the project does: every Ray socket on 127.0.0.1 (test_loopback checks)
    import ray

    # The dashboard is what writes Prometheus' service-discovery file (test_monitoring scrapes through it), and a
    # 1 s metrics export (Ray's default: 10 s) gives a short run enough recorded points.
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=True, logging_level="WARNING",
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_args(tmp_path):
    """CLI flags of a seconds-per-epoch digits run: 16 px, ResNet-18 at 1/8 width, batch 64 over 2 workers."""
    def make(name: str, *extra: str) -> list[str]:
        return ["--dataset", "digits", "--image-size", "16", "--width", "0.125", "--batch-size", "64",
                "--num-workers", "2", "--storage-path", str(tmp_path / "runs"), "--name", name,
                "--knn-every", "-1", "--log-every", "5", *extra]
    return make
