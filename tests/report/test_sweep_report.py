"""The sweep report: what its objective measured, each cell over its seeds (mean, sd, t-interval, failures counted),
the Figure-5 means over distinct policies, and the reference rows in every output."""

from __future__ import annotations

import csv
import math

import pytest

from simclr_dist.config.sweep import SweepSpec, parse_sweep
from simclr_dist.report.sweep import (
    cells,
    cells_csv,
    heatmap,
    make_plots,
    objective_text,
    table_markdown,
    write_results,
)
from simclr_dist.run.studies.sweep_run import sort_rows

T975_2 = 4.302652729749464  # t(0.975, 2 degrees of freedom): the 95% interval of a mean of 3 seeds
PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_objective_text_names_the_online_probe_and_its_lag():
    assert "online linear probe" in objective_text(SweepSpec("s", "x.yaml", metric="online_probe_top1"))
    assert "kNN" in objective_text(SweepSpec("s", "x.yaml", metric="val_knn_top1"))
    assert "logistic-regression" in objective_text(SweepSpec("s", "x.yaml", metric="val_linear_top1"))


def spec_of(search: dict, seeds=3) -> SweepSpec:
    return parse_sweep({"study": "s", "base": {"dataset": "digits"}, "search": search, "seeds": seeds,
                        "objective": {"metric": "val_linear_top1", "mode": "max"}}, "s.yaml")


def trial(i: int, seed: int, value: float | None, **fields) -> dict:
    return {"trial": f"t{i}", "status": "OK" if value is not None else "FAILED", **fields, "seed": seed,
            "val_linear_top1": value, "note": "", "error": "" if value is not None else "RunError: non-finite loss"}


REFERENCES = [{"reference": "pixels", "of": "", "seed": None, "val_linear_top1": 0.65},
              *({"reference": "random-init", "of": "", "seed": s, "val_linear_top1": v}
                for s, v in ((0, 0.50), (1, 0.53), (2, 0.56)))]


def test_cells_aggregate_seeds_with_t_interval_and_count_failed_trials():
    spec = spec_of({"temperature": [0.1, 0.5]})
    # best first, as collect_rows orders the trials (so value order is not seed order)
    rows = [trial(2, 2, 0.74, temperature=0.5), trial(1, 1, 0.72, temperature=0.5), trial(0, 0, 0.70, temperature=0.5),
            trial(5, 2, 0.66, temperature=0.1), trial(3, 0, 0.60, temperature=0.1), trial(4, 1, None, temperature=0.1)]
    best, second = cells(spec, rows)
    assert best.fields == {"temperature": 0.5} and best.values == {0: 0.70, 1: 0.72, 2: 0.74}
    s = best.summary
    half = T975_2 * 0.02 / math.sqrt(3)  # sd of (0.70, 0.72, 0.74) is 0.02
    assert (s.mean, s.sd, s.n) == (pytest.approx(0.72), pytest.approx(0.02), 3)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.72 - half), pytest.approx(0.72 + half))
    # the failed seed is counted, not averaged: the mean is over the two measured seeds
    assert second.values == {0: 0.60, 2: 0.66} and second.failed == 1 and second.mean == pytest.approx(0.63)
    assert second.count() == "2 of 3 (1 failed)"

    table = list(csv.DictReader(cells_csv(spec, rows, REFERENCES).splitlines()))
    assert [(r["kind"], r["reference"], r["temperature"]) for r in table] == [
        ("cell", "", "0.5"), ("cell", "", "0.1"), ("reference", "pixels", ""), ("reference", "random-init", "")]
    first = table[0]
    assert float(first["mean"]) == pytest.approx(0.72) and float(first["sd"]) == pytest.approx(0.02)
    assert float(first["ci95_lo"]) == pytest.approx(0.72 - half) and float(first["ci95_hi"]) == pytest.approx(0.72 + half)
    assert [float(first[f"seed_{k}"]) for k in range(3)] == [0.70, 0.72, 0.74] and first["n"] == "3"
    assert (table[1]["n"], table[1]["trials"], table[1]["failed"], table[1]["seed_1"]) == ("2", "3", "1", "")
    # what pretraining added: each seed minus the random-init reference of that seed (0.50, 0.53, 0.56), paired
    assert float(first["gain_vs_init_mean"]) == pytest.approx(0.19)  # (0.20 + 0.19 + 0.18) / 3
    assert float(first["gain_vs_init_ci95_hi"]) - 0.19 == pytest.approx(half / 2)  # sd 0.01 instead of 0.02
    assert float(table[1]["gain_vs_init_mean"]) == pytest.approx(0.10)  # seeds 0 and 2 only: 0.60-0.50, 0.66-0.56
    assert table[2]["gain_vs_init_mean"] == ""  # a reference is not paired with itself

    md = table_markdown(spec, rows, REFERENCES)
    # per seed: every value labelled by its seed, in seed order; a failed seed is absent, not blank
    assert (f"| 0.5 | 0.720 ± {half:.3f} | [{0.72 - half:.3f}, {0.72 + half:.3f}] | 0.020 | 3 | "
            "s0 0.700, s1 0.720, s2 0.740 |") in md
    assert "| 2 of 3 (1 failed) | s0 0.600, s2 0.660 |" in md
    assert f"| s0 0.700, s1 0.720, s2 0.740 | +0.190 ± {half / 2:.3f} |" in md and "minus random init (paired by seed)" in md
    assert "| 2 of 3 (1 failed) |" in md and "| t4 | FAILED |" in md  # the failed trial stays in the trial table
    assert "95% t-interval over seeds" in md


def figure5_rows(spec: SweepSpec) -> list[dict]:
    """Every policy at three seeds: its mean plus -0.01, 0, +0.01 (so every per-seed row mean moves alike)."""
    means = {"crop": 0.60, "crop,color": 0.80, "crop,rotate": 0.50, "crop,color,rotate": 0.70}
    assert list(means) == spec.search["augment"].values
    return [trial(3 * i + s, s, m + (s - 1) / 100, augment=p) for i, (p, m) in enumerate(means.items())
            for s in range(3)]


def test_figure5_row_and_column_means_count_each_policy_once():
    """(color, crop) and (color, color) are both the policy crop,color: the color row has three cells but two
    policies. Counting cells would give (0.8 + 0.8 + 0.7) / 3 = 0.767; each policy once gives 0.75."""
    spec = spec_of({"augment": {"pairs": ["crop", "color", "rotate"], "with": "crop"}})
    heat = heatmap(spec, figure5_rows(spec), REFERENCES)
    assert heat["components"] == ["crop", "color", "rotate"]
    assert heat["values"][1] == [pytest.approx(0.80), pytest.approx(0.80), pytest.approx(0.70)]
    assert heat["row_means"] == [pytest.approx((0.6 + 0.8 + 0.5) / 3), pytest.approx((0.8 + 0.7) / 2),
                                 pytest.approx((0.5 + 0.7) / 2)]
    assert heat["row_means"][1] != pytest.approx((0.8 + 0.8 + 0.7) / 3)  # what counting cells would say
    assert heat["col_means"] == heat["row_means"]
    # the interval of a row mean: over seeds, of the per-seed means of its policies (here they move by -0.01, 0, +0.01)
    assert heat["row_half"][1] == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    assert heat["half"][0][0] == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    md = table_markdown(spec, figure5_rows(spec), REFERENCES)
    assert "| **color** | 0.800 ± 0.025 | 0.800 ± 0.025 | 0.700 ± 0.025 | 0.750 ± 0.025 |" in md
    assert "averages the DISTINCT policies of that row" in md and "not counted twice" in md  # the rule, stated
    assert "References (same split and probe): pixels 0.650; random-init 0.530 ± 0.075 (n=3)" in md


def test_reference_rows_in_the_table_csv_and_plots():
    spec = spec_of({"temperature": [0.1, 0.5], "proj_normalize": [True, False]})
    rows = [trial(4 * s + i, s, 0.6 + i / 50 + s / 100, temperature=t, proj_normalize=n)
            for s in range(3) for i, (t, n) in enumerate((t, n) for t in (0.1, 0.5) for n in (True, False))]
    md = table_markdown(spec, rows, REFERENCES)
    ref_half = T975_2 * 0.03 / math.sqrt(3)
    assert "| *reference: raw pixels (no network)* |  | 0.650 |  |  | 1 |  |" in md
    assert (f"| *reference: random-init encoder (no pretraining)* |  | 0.530 ± {ref_half:.3f} | "
            f"[{0.53 - ref_half:.3f}, {0.53 + ref_half:.3f}] | 0.030 | 3 | s0 0.500, s1 0.530, s2 0.560 |") in md
    refs = [r for r in csv.DictReader(cells_csv(spec, rows, REFERENCES).splitlines()) if r["kind"] == "reference"]
    assert [r["reference"] for r in refs] == ["pixels", "random-init"]
    assert refs[0]["mean"] == "0.65" and refs[0]["seed_0"] == "" and refs[1]["seed_2"] == "0.56"
    plots = make_plots(spec, rows, REFERENCES)
    assert set(plots) == {"accuracy_vs_temperature.png"} and plots["accuracy_vs_temperature.png"].startswith(PNG)
    fig5 = spec_of({"augment": {"pairs": ["crop", "color", "rotate"], "with": "crop"}})
    assert make_plots(fig5, figure5_rows(fig5), REFERENCES)["augmentation_heatmap.png"].startswith(PNG)


def test_a_nan_objective_counts_as_failed_and_the_results_are_written(tmp_path):
    """A trial that never reported a number has NaN for its objective (the column is all NaN): it is counted in its
    cell as failed, never averaged (a NaN in summarize raised, so no table was written)."""
    spec = parse_sweep({"study": "s", "base": {"dataset": "digits"}, "search": {"temperature": [0.1, 0.5]},
                        "seeds": 2, "objective": {"metric": "val_linear_top1", "mode": "max"},
                        "storage_path": str(tmp_path)}, "s.yaml")
    rows = [trial(0, 0, 0.70, temperature=0.5), trial(1, 1, math.nan, temperature=0.5),
            trial(2, 0, 0.60, temperature=0.1), trial(3, 1, 0.62, temperature=0.1)]
    best, second = cells(spec, rows)
    assert best.fields == {"temperature": 0.5} and best.values == {0: 0.70} and best.count() == "1 of 2 (1 failed)"
    assert second.values == {0: 0.60, 1: 0.62}
    refs = [*REFERENCES, {"reference": "pixels", "of": "other", "seed": None, "val_linear_top1": math.nan}]
    files = write_results(spec, rows, refs)
    md = (tmp_path / "s" / "results.md").read_text()
    assert files["markdown"].endswith("results.md") and "| 0.5 | 0.700 |  |  | 1 of 2 (1 failed) |" in md
    assert "*reference: raw pixels (no network) (other)* | - |  |  | 0 of 1 (1 failed) |" in md  # a NaN reference
    assert sort_rows(spec, [trial(1, 1, math.nan), trial(0, 0, 0.5), trial(2, 0, 0.7)])[-1]["trial"] == "t1"
