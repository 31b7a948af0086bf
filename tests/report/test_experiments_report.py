"""report.md of Experiments A/B, section by section on fixtures with known answers: per-class recall with its
interval over seeds; grid edges with the value chosen and, where the edge is a bound of the method, why."""

from __future__ import annotations

import numpy as np

from simclr_dist.report.experiments import aggregate, chosen_cell
from simclr_dist.report.experiments_md import edge_lines, loader_lines, per_class_lines

LABELS = np.repeat([0, 1, 2], 4)  # 3 classes x 4 test images


def record(arm: str, replicate: int, preds: list[int]) -> dict:
    p = np.asarray(preds)
    recall = [float((p[LABELS == c] == c).mean()) for c in range(3)]
    return {"arm": arm, "fraction": 0.1, "replicate": replicate, "label_count": 30, "predictions": preds,
            "top1": float((p == LABELS).mean()), "worst_class_acc": min(recall), "macro_f1": 0.0,
            "per_class_recall": recall}


def summary() -> dict:
    # class 0 right on 4, 2, 3 of its 4 images over the three seeds (recall 1, 0.5, 0.75); class 1 always right;
    # class 2 never (predicted as 1): the worst class of every seed
    fine = [record("finetune", i, [0] * k + [1] * (4 - k) + [1] * 4 + [1] * 4) for i, k in enumerate((4, 2, 3))]
    pixels = [record("pixels", i, [0] * 4 + [1] * 4 + [2] * 2 + [0] * 2) for i in range(3)]
    rows = aggregate(fine + pixels, LABELS, 3)
    return {"classes": ["zero", "one", "two"], "num_classes": 3, "rows": rows, "records": fine + pixels,
            "titles": {}}


def test_per_class_recall_has_each_class_interval_over_seeds_and_the_worst_class():
    text = "\n".join(per_class_lines(summary()))
    # class 0: mean 0.75, sd 0.25 over 3 seeds, t(0.975, 2) = 4.303 -> 0.75 +- 0.621 (t-intervals are not clipped)
    assert "| zero | 0.750 [0.129, 1.371] | 1.000 [1.000, 1.000] |" in text
    assert "| one | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in text  # no spread over seeds
    assert "| two | 0.000 [0.000, 0.000] | 0.500 [0.500, 0.500] |" in text
    # balanced accuracy per seed (1+1+0)/3, (0.5+1+0)/3, (0.75+1+0)/3 -> mean 0.5833
    assert "| *balanced accuracy* | 0.583 [" in text
    assert "| *worst class* | two: 0.000 [0.000, 0.000] | two: 0.500 [0.500, 0.500] |" in text
    assert "SimCLR fine-tuned (n=3)" in text and "### 10% of the labels" in text


def test_rows_without_intervals_fall_back_to_the_records_mean():
    s = summary()
    for r in s["rows"]:
        del r["recall_by_class"], r["worst_class_index"]
    text = "\n".join(per_class_lines(s))
    assert "| zero | 0.750 | 1.000 |" in text and "| *worst class* | 0.000 (per seed) |" in text


def test_grid_edges_name_each_replicate_value_and_say_which_edges_are_bounds_of_the_method():
    recs = [{"arm": "knn", "fraction": 0.001, "replicate": 0, "chosen": {"k": 1}, "grid_edge": "low"},
            {"arm": "knn", "fraction": 0.001, "replicate": 2, "chosen": {"k": 40}, "grid_edge": "high"},
            {"arm": "pixels", "fraction": 0.01, "replicate": 1, "chosen": {"l2": 1000.0}, "grid_edge": "high"},
            {"arm": "supervised", "fraction": 0.01, "replicate": 0, "chosen": {"lr": 0.8, "wd": 0.0, "epochs": 9},
             "grid_edge": "high", "edge_after_extension": "high"}]
    rows = [{"arm": "knn", "fraction": 0.001, "edge_replicates": [0, 2], "grid_extended": []},
            {"arm": "pixels", "fraction": 0.01, "edge_replicates": [1], "grid_extended": []},
            {"arm": "supervised", "fraction": 0.01, "edge_replicates": [0], "grid_extended": [0.8, 1.6]}]
    s = {"rows": rows, "records": recs, "titles": {}, "config": {"l2_grid": "1e-06,1,1000", "knn_k": "1,5,200"}}
    text = "\n".join(edge_lines(s))
    assert "still on an edge in replicate(s) 0 (k 1, low), 2 (k 40, high)" in text
    assert "1 (l2 1000, high)" in text  # the L2 grid's top: a grid too small, no excuse given
    assert "grid extended to 0.8, 1.6; still on an edge in replicate(s) 0 (lr 0.8, wd 0, epochs 9, high)" in text
    assert ("bounds of the method rather than a grid too small: k = 1 is the smallest k; k 40 is all the labels of "
            "the smallest fit split") in text
    assert "L2" not in text.split("grid too small")[1]  # the high L2 edge is not explained away


def test_the_protocol_says_when_the_study_changed_batch_makers_and_counts_each():
    one = [{"arm": "finetune", "classifier_loader": "torch", "selection_loaders": ["torch"]}] * 3
    assert loader_lines({"records": one + [{"arm": "linear"}]}) == []  # one way throughout: nothing to say
    mixed = one + [{"arm": "supervised", "classifier_loader": "resident", "selection_loaders": ["resident"]}] * 2
    [line] = loader_lines({"records": mixed})
    assert "(2 final run(s) resident, 3 final run(s) torch; selection runs: resident, torch)" in line


def test_the_chosen_cell_reads_the_same_for_a_fresh_record_and_one_read_back_from_the_cache():
    # a fresh run keeps the order it chose in (lr, wd, epochs); the runs cache stores keys sorted: one text for both
    fresh = {"lr": 0.2, "wd": 0.0, "epochs": 17}
    cached = dict(sorted(fresh.items()))
    assert list(fresh) != list(cached)
    assert chosen_cell({"chosen": [fresh]}) == chosen_cell({"chosen": [cached]}) == "epochs 17 lr 0.2 wd 0"
    assert chosen_cell({"chosen": [fresh, cached, None]}) == "epochs 17 lr 0.2 wd 0"
    assert chosen_cell({"chosen": [None]}) == "-"
