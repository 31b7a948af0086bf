"""The benchmark scripts: each --quick mode writes a well-formed report, and the loss benchmark's
stand-ins (naive reference, candidate rewrite, emulated ranks) compute what they claim to."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench import common, gpu, loss as bench_loss, step
from simclr_dist.core.loss import nt_xent, ntxent_logits

MACHINE_KEYS = {"date", "cpu_model", "cpu_cores", "torch", "ray", "cuda_device"}


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert MACHINE_KEYS <= set(report["machine"])
    return report


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------- --quick reports


def test_loss_quick_report(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "loss.json"
    assert bench_loss.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    rows = _report(out)["rows"]
    assert {(r["global_batch"], r["world"]) for r in rows} == {(g, w) for g in (256, 512) for w in (1, 2, 8)}
    for r in rows:
        for key in ("prod_ms", "naive_ms", "lean_ms", "prod_over_naive", "lean_over_prod", "prod_peak_mib",
                    "naive_peak_mib", "lean_peak_mib", "logit_mib"):
            assert _positive(r[key]), (key, r)
        assert r["logits"] == f"{2 * r['global_batch'] // r['world']}x{2 * r['global_batch']}"
        assert r["prod_over_naive"] == pytest.approx(r["prod_ms"] / r["naive_ms"])


def test_step_quick_report(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "step.json"
    assert step.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    report = _report(out)
    rows = report["steps"]
    assert rows and "scaling" not in report  # no Ray in --quick
    assert {r["data"] for r in rows} == {"synthetic", "digits"}
    for r in rows:
        for key in ("forward_ms", "loss_ms", "backward_ms", "optimizer_ms", "total_ms", "samples_per_s",
                    "gflop_per_sample", "achieved_gflops", "matmul_gflops", "limit_samples_per_s", "of_limit"):
            assert _positive(r[key]), (key, r)
        assert r["data_ms"] > 0 if r["data"] == "digits" else r["data_ms"] >= 0
        parts = sum(r[f"{p}_ms"] for p in step.PHASES)
        assert parts <= r["total_ms"] * 1.001  # phases are disjoint slices of the step
    # the data phase is really timed: handing back pre-made views costs less than loading and augmenting real
    # digits for the same network and batch (a phase timer that missed the loader would make them equal)
    by_kind = {(r["config"], r["batch"], r["data"]): r["data_ms"] for r in rows}
    pairs = [(v, by_kind[(c, b, "digits")]) for (c, b, d), v in by_kind.items()
             if d == "synthetic" and (c, b, "digits") in by_kind]
    assert pairs and all(synthetic < digits for synthetic, digits in pairs), pairs


def test_gpu_allow_cpu_smoke_report(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--quick", "--threads", "1", "--out", str(out)] + ([] if torch.cuda.is_available() else ["--allow-cpu"])
    assert gpu.main(argv) == 0
    report = _report(out)
    [row] = report["rows"] if not torch.cuda.is_available() else report["rows"][:1]
    assert row["status"] == "ok"
    for key in ("step_ms", "samples_per_s", "tflops", "of_matmul", "gflop_per_sample"):
        assert _positive(row[key]), (key, row)
    assert report["loader"] == "synthetic" and _positive(report["matmul_bf16_tflops"])
    assert row["loader"] == "synthetic" and "beton" not in report


def test_gpu_ffcv_loader_against_synthetic(tmp_path: Path, keep_threads: None) -> None:
    """--loaders synthetic,ffcv: per batch size a synthetic row and an FFCV row (a generated .beton, FFCV's first
    batch in the warm-up) with its data wait and its samples/s relative to the synthetic row of the same run."""
    out = tmp_path / "gpu.json"
    argv = ["--quick", "--threads", "1", "--loaders", "ffcv,synthetic", "--out", str(out)]
    assert gpu.main(argv + ([] if torch.cuda.is_available() else ["--allow-cpu"])) == 0
    report = _report(out)
    assert report["loaders"] == ["synthetic", "ffcv"] and report["loader"] == "synthetic,ffcv"
    rows = {(r["batch"], r["loader"]): r for r in report["rows"]}
    batch = report["rows"][0]["batch"]
    synth, ffcv = rows[(batch, "synthetic")], rows[(batch, "ffcv")]
    for r in (synth, ffcv):
        assert r["status"] == "ok", r
        for key in ("step_ms", "samples_per_s", "tflops", "vs_synthetic", "warmup_s"):
            assert _positive(r[key]), (key, r)
    assert synth["vs_synthetic"] == 1.0 and "data_wait_ms" not in synth
    assert ffcv["vs_synthetic"] == pytest.approx(ffcv["samples_per_s"] / synth["samples_per_s"])
    # decoding JPEGs on the CPU takes time the step waits for; ms/step and share are two views of one measurement
    assert ffcv["data_wait_ms"] > 0 and 0 < ffcv["data_wait_share"] < 1
    assert ffcv["data_wait_ms"] == pytest.approx(ffcv["data_wait_share"] * ffcv["step_ms"], rel=1e-6)
    assert ffcv["steps"] == synth["steps"] and ffcv["warmup_s"] >= ffcv["first_batch_s"] > 0  # compile untimed
    assert ffcv["epochs_started"] == 0  # the default .beton holds warm-up + timed steps in one epoch
    beton = report["beton"]
    assert beton["built"] and beton["temporary"] and beton["images"] >= batch * (ffcv["steps"] + 1)
    assert _positive(beton["bytes_per_image"]) and not Path(beton["path"]).exists()  # the temp dir is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_gpu_without_cuda_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out)]) == 0
    assert "no CUDA device: skipped" in capsys.readouterr().out
    report = _report(out)
    assert report["skipped"] == "no CUDA device" and report["rows"] == []


def test_peak_table() -> None:
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA GeForce GTX 1080") is None and gpu.peak_tflops(None) is None


# ---------------------------------------------------------------- what the loss benchmark compares


def test_naive_and_lean_equal_production_loss_and_grads() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    want = nt_xent(z1, z2, 0.2)
    want_grads = torch.autograd.grad(want, (z1, z2))
    for impl in (bench_loss.naive_nt_xent, bench_loss.lean_nt_xent):
        got = impl(z1, z2, 0.2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (z1, z2)), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world", [2, 8])
def test_emulated_rank_logits_are_local_rows_by_global_columns(world: int) -> None:
    b, d = 3, 4
    z1, z2 = torch.randn(b, d), torch.randn(b, d)
    foreign = bench_loss.foreign_rows(world, b, d)
    for rank in (0, world - 1):
        with bench_loss.emulated_ranks(world, rank, foreign):
            logits, targets = ntxent_logits(z1, z2, 0.5)
            lean = bench_loss.lean_nt_xent(z1, z2, 0.5)
        assert logits.shape == (2 * b, 2 * b * world)  # (2B_local, 2B_global), never (2B_global)^2
        assert targets.tolist() == [world * b + rank * b + i for i in range(b)] + [rank * b + i for i in range(b)]
        torch.testing.assert_close(lean, F.cross_entropy(logits, targets))


def test_live_tensor_bytes_tracks_allocations_and_frees() -> None:
    with common.LiveTensorBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2             # another 4000
        del a
        c = b + 1             # 4000 more; peak is 8000 (a was freed first)
        del b, c
    assert tracker.peak == 8000 and tracker.current == 0
    assert common.peak_bytes(lambda: torch.zeros(256, 256)) == 256 * 256 * 4


def test_format_table_aligns_columns() -> None:
    text = common.format_table([{"a": 1, "b": 2.5}, {"a": 100, "b": None}], [("a", "A", "d"), ("b", "bee", ".2f")])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[-1].split() == ["100", "-"]


# ---------------------------------------------------------------- real 2-process gloo group


def test_gloo_per_rank_logits_match_emulation(tmp_path: Path) -> None:
    """Each of W=2 real ranks gets (2B_local, 2B_global) logits, equal to what the benchmark's emulation builds."""
    world, b = 2, 3
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(world * b, 4, generator=g), torch.randn(world * b, 4, generator=g)
    mp.spawn(bench_loss.gloo_rank_logits, args=(world, str(tmp_path / "store"), str(tmp_path), z1, z2), nprocs=world)
    for rank in range(world):
        real = torch.load(tmp_path / f"rank{rank}.pt")
        assert real["logits"].shape == (2 * b, 2 * b * world)
        others = [r for r in range(world) if r != rank]
        foreign = [F.normalize(torch.cat([z[r * b:(r + 1) * b] for r in others]), dim=1) for z in (z1, z2)]
        sl = slice(rank * b, (rank + 1) * b)
        with bench_loss.emulated_ranks(world, rank, foreign):
            logits, targets = ntxent_logits(z1[sl], z2[sl], bench_loss.TAU)
        torch.testing.assert_close(logits, real["logits"])
        assert targets.tolist() == real["targets"].tolist()


def test_gpu_check_cpu_smoke_runs_every_check(tmp_path: Path, keep_threads: None) -> None:
    """The prepared GPU check runs end to end here (CUDA-only checks say so), so a lent GPU gets a working script."""
    from bench import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--allow-cpu", "--skip", "compile", "--out", str(out)]) == 0
    rows = {r["check"]: r for r in json.loads(out.read_text())["checks"]}
    assert set(rows) == {"eager", "compile", "syncbn", "augment", "metrics", "torch-loader"}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["samples_per_s"] > 0
    assert math.isfinite(rows["eager"]["loss"])
    assert rows["torch-loader"]["status"] == "ok" and 0 <= rows["torch-loader"]["data_wait_share"] <= 1
    assert rows["compile"]["status"] == "skipped: --skip"
    assert all(rows[c]["status"].startswith("skipped: no CUDA") for c in ("syncbn", "augment", "metrics"))


def test_h200_smoke_runs_every_leg_on_cpu(tmp_path: Path, keep_threads: None) -> None:
    """The prepared one-GPU check runs end to end on the CPU (compile left out): both loaders on both data sets feed
    the production step, each row has its throughput, data wait and epoch time, and the report says which data."""
    from bench import h200

    out = tmp_path / "h200.json"
    assert h200.main(["--smoke", "--out", str(out)]) == 0
    report = _report(out)
    assert report["smoke"] and report["data_source"] == {"cifar10": "synthetic colour 32 px",
                                                         "fashion-mnist": "synthetic grey 28 px"}
    legs = {(r["data"], r["mode"], r.get("loader")): r for r in report["rows"]}
    for data in ("cifar10", "fashion-mnist"):
        assert legs[(data, "compile", None)]["status"] == "skipped"
        for loader in ("resident", "torch"):
            r = legs[(data, "eager", loader)]
            assert r["status"] == "ok" and r["steps"] == 2, r
            for key in ("pairs_per_s", "step_ms", "s_per_epoch", "warmup_s"):
                assert _positive(r[key]), (key, r)
            assert 0 < r["data_wait_share"] < 1 and math.isfinite(r["loss"])
            assert r["s_per_epoch"] == pytest.approx(h200.TRAIN_IMAGES[data] / r["pairs_per_s"])
    epoch = legs[("cifar10", "epoch", "resident")]
    assert epoch["steps"] == 64 // 16 and _positive(epoch["s_per_epoch"]) and epoch["vs_anchor"] is None


def test_preset_e2e_quick_runs_both_configurations(tmp_path: Path, keep_threads: None) -> None:
    """The before/after end-to-end bench: both configurations through the production pretraining command, the
    'before' one contiguous on its own loader, the 'after' one channels_last on the resident loader."""
    from bench import preset_e2e

    out = tmp_path / "e2e.json"
    assert preset_e2e.main(["--quick", "--threads", "1", "--before-loader", "torch", "--out", str(out)]) == 0
    report = _report(out)
    rows = {r["config"]: r for r in report["rows"]}
    assert (rows["before"]["memory_format"], rows["before"]["loader"]) == ("contiguous", "torch")
    assert (rows["after"]["memory_format"], rows["after"]["loader"]) == ("channels_last", "resident")
    for r in rows.values():
        for key in ("wall_s", "first_epoch_s", "later_samples_per_s", "of_limit"):
            assert _positive(r[key]), (key, r)
        assert r["of_limit"] < 1  # a rate above the FLOP-count limit would mean a miscount
    summary = {s["config"]: s for s in report["summary"]}
    assert summary["before"]["speedup"] == 1.0
    assert summary["after"]["speedup"] == pytest.approx(rows["after"]["later_samples_per_s"]
                                                         / rows["before"]["later_samples_per_s"])
    assert report["preset_args"][:2] == ["--dataset", "fashion-mnist"]


def test_preset_e2e_counts_the_flops_of_the_network_the_run_trains() -> None:
    """The limit is computed for the preset's real network: ResNet-18 x1/4 with the CIFAR stem the run resolves at
    28 px (0.346 GFLOP per pair), not the ImageNet stem an unresolved config builds (0.030: a limit 11x too high)."""
    from bench import preset_e2e

    assert preset_e2e.flop_per_pair(preset_e2e.preset_args()) / 1e9 == pytest.approx(0.346, abs=0.001)


def test_online_probe_quick_times_the_step_with_and_without_the_probe(tmp_path: Path, keep_threads: None) -> None:
    """The probe's cost bench: the production step alone and followed by the probe's step, both timed on real digits
    batches, their ratio the one docs/performance.md section 6c quotes, and the per-epoch evaluation timed."""
    from bench import online_probe

    out = tmp_path / "online_probe.json"
    online_probe.main(["--quick", "--threads", "1", "--out", str(out)])
    report = _report(out)
    assert report["benchmark"] == "online_probe" and report["machine"]["torch_threads"] == 1
    rows = report["online probe cost"]
    assert [r["config"] for r in rows] == [next(iter(online_probe.CONFIGS))]  # --quick: the tiny config only
    for r in rows:
        for key in ("step_ms", "step_probe_ms", "ratio", "probe_eval_s"):
            assert _positive(r[key]), (key, r)
        assert r["ratio"] == pytest.approx(r["step_probe_ms"] / r["step_ms"])
        assert r["repeats"] == 3 and isinstance(r["steps_per_epoch"], int) and r["steps_per_epoch"] > 0


def test_classifier_loader_quick_times_both_batch_makers_through_the_production_step(tmp_path: Path,
                                                                                    keep_threads: None) -> None:
    """The classifier-loader bench: one step of each batch maker (production training_batches + classify_step on the
    study's network) round-robin; the ratio docs/performance.md section 6d quotes is torch's step over each."""
    from bench import classifier_loader

    out = tmp_path / "classifier_loader.json"
    classifier_loader.main(["--quick", "--threads", "1", "--out", str(out)])
    report = _report(out)
    assert report["benchmark"] == "classifier_loader" and report["machine"]["torch_threads"] == 1
    rows = {r["loader"]: r for r in report["classifier step by batch maker"]}
    assert set(rows) == {"torch", "resident"} and rows["torch"]["ratio"] == 1.0
    for r in rows.values():
        assert _positive(r["step_ms"]) and _positive(r["batch_ms"]) and r["repeats"] == 5
        assert r["step_ms"] > r["batch_ms"]  # the step includes its batch
    assert rows["resident"]["ratio"] == pytest.approx(rows["torch"]["step_ms"] / rows["resident"]["step_ms"])
