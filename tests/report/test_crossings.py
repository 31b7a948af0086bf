"""Where the curves meet: crossings of measured accuracy curves, and the plots from a real experiments results file
(tests/fixtures/experiments_digits.json: written by ``python -m simclr_dist.experiments`` on a real 8-epoch digits
pretraining, see its ``config``; the label subsets' index lists are dropped to keep it small)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simclr_dist.report import crossings
from simclr_dist.sweep import main

RESULTS = Path(__file__).resolve().parents[1] / "fixtures" / "experiments_digits.json"
PNG = b"\x89PNG\r\n\x1a\n"


def test_crossing_is_interpolated_in_log_x_and_absent_when_one_curve_leads():
    ssl = [(0.01, 0.5), (0.1, 0.7), (1.0, 0.8)]
    sup = [(0.01, 0.3), (0.1, 0.6), (1.0, 0.9)]
    (x, y), = crossings.crossings(ssl, sup)
    assert x == pytest.approx(math.sqrt(0.1)) and y == pytest.approx(0.75)  # halfway between 10% and 100% in log x
    assert crossings.crossings(ssl, [(f, a - 0.3) for f, a in ssl]) == []
    assert crossings.leader(ssl, [(f, a - 0.3) for f, a in ssl]) == "a"
    assert crossings.crossings([(1.0, 0.5), (2.0, 0.7)], [(1.0, 0.5), (2.0, 0.6)]) == [(1.0, 0.5)]  # a touch: once
    assert crossings.crossings([(5.0, 0.5)], [(1.0, 0.4), (2.0, 0.6)]) == []  # no common range
    # linear x (time), a level held from the moment the model exists
    level = crossings.extend_level([(10.0, 0.8)], 40.0)
    (t, acc), = crossings.crossings(level, [(5.0, 0.6), (20.0, 0.7), (40.0, 0.9)], log_x=False)
    assert t == pytest.approx(30.0) and acc == pytest.approx(0.8)


def test_curves_from_a_real_experiments_results_file(tmp_path, capsys):
    summary = json.loads(RESULTS.read_text())
    analysis = crossings.analyse(summary)
    assert analysis["fraction"] == 1.0 and analysis["fraction_text"] and analysis["time_text"]
    fc = crossings.fraction_curves(summary)
    assert set(fc) == {"linear", "finetune", "supervised"} and len(fc["supervised"]) == len(summary["fractions"])
    for c in analysis["by_fraction"]:  # every marked crossing lies between two measured fractions, on both curves
        assert summary["fractions"][0] <= c["fraction"] <= summary["fractions"][-1]
    tc = crossings.time_curves(summary, 1.0)
    pre = summary["pretraining"]["train_time_s"]
    assert tc["finetune"][0][0] > pre and tc["supervised"][0][0] < tc["finetune"][0][0]  # SimCLR pays pretraining

    rc = main(["--curves", str(RESULTS), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "Where the curves meet (digits)" in out
    for name in ("curves_vs_fraction.png", "curves_vs_time.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert saved["fraction_text"] == analysis["fraction_text"]
    assert all(s in (tmp_path / "curves.md").read_text() for s in analysis["fraction_text"] + analysis["time_text"])


def test_curves_bad_input_one_line(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert main(["--curves", str(tmp_path / "x.json")]) == 2
    assert "not an experiments results.json" in capsys.readouterr().err
    assert main(["--curves", str(tmp_path / "missing.json")]) == 2
    assert "cannot read an experiments results.json" in capsys.readouterr().err
    assert main(["--curves", str(RESULTS), "--curves-fraction", "0.3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--curves-fraction: 0.3 was not run" in err and len(err.strip().splitlines()) == 1
    assert main([]) == 2 and "name a sweep file" in capsys.readouterr().err


def test_curves_from_todays_records_format(tmp_path, capsys):
    """Today's experiments file holds one record per replicate (test read once): the curves use the mean over
    replicates, compare only where both arms ran, and the time plot is at the largest fraction both ran."""
    def rec(arm, fraction, top1, t, replicate):
        return {"arm": arm, "fraction": fraction, "top1": top1, "train_time_s": t, "replicate": replicate}

    records = [rec("supervised", 0.01, 0.70, 40.0, 0), rec("supervised", 0.01, 0.72, 44.0, 1),
               rec("supervised", 0.1, 0.76, 42.0, 0), rec("supervised", 0.1, 0.78, 42.0, 1),
               rec("supervised", 1.0, 0.90, 40.0, 0), rec("supervised", 1.0, 0.92, 40.0, 1),
               rec("finetune", 0.01, 0.80, 45.0, 0), rec("finetune", 0.01, 0.82, 45.0, 1),
               rec("finetune", 0.1, 0.84, 40.0, 0), rec("finetune", 0.1, 0.84, 40.0, 1),
               rec("pixels", 0.01, 0.77, 1.0, 0)]
    summary = {"dataset": "toy", "records": records, "pretraining": {"train_time_s": 1000.0}}
    rows = {(r["arm"], r["fraction"]): r for r in crossings.results(summary)}
    assert set(rows) == {("supervised", 0.01), ("supervised", 0.1), ("supervised", 1.0), ("finetune", 0.01),
                         ("finetune", 0.1)}  # baselines are not curves
    assert rows["supervised", 0.01]["top1"] == pytest.approx(0.71) and rows["supervised", 0.01]["replicates"] == 2
    analysis = crossings.analyse(summary)
    assert analysis["fraction"] == 0.1  # not 1.0: fine-tuning did not run there
    assert analysis["by_fraction"] == [] and "between 1% and 10% of the labels" in analysis["fraction_text"][0]
    assert crossings.time_curves(summary, 0.1)["finetune"] == [(1040.0, pytest.approx(0.84))]  # after pretraining
    path = tmp_path / "results.json"
    path.write_text(json.dumps(summary))
    assert main(["--curves", str(path)]) == 0
    assert (tmp_path / "curves_vs_time.png").read_bytes().startswith(PNG)
