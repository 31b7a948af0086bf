"""Experiments A/B as numbers a reviewer can check: per-arm statistics over replicates, the paired tests of SimCLR
against scratch, per-class results (built on :mod:`simclr_dist.report.stats` and :mod:`simclr_dist.report.classes`).

Why a summary: it is the study's one record (results.json holds every run's chosen hyper-parameters, steps and
test predictions), and the tables, report and plots are pure functions of it, so they can be redrawn from a
results file without retraining anything.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np

from simclr_dist.report.classes import class_report
from simclr_dist.report.stats import (Summary, class_metrics_over_seeds, declared_family, mcnemar, paired_t_test,
                                      sign_flip_test, summarize, two_level_bootstrap, two_level_bootstrap_diff)

RESULT_FORMAT = 3  # 3: predictions and subsets packed (report.results_file)
TITLES = {"linear": "SimCLR + linear probe", "finetune": "SimCLR fine-tuned", "supervised": "from scratch",
          "knn-20": "SimCLR kNN (k=20)", "knn-200": "SimCLR kNN (k=200)", "random-linear": "random init + linear probe",
          "random-knn-20": "random init kNN (k=20)", "random-knn-200": "random init kNN (k=200)",
          "pixels": "logistic regression on pixels", "knn": "SimCLR kNN (k chosen on validation)",
          "random-knn": "random init kNN (k chosen on validation)",
          "random-bn-linear": "random init, BN recalibrated + linear probe",
          "random-bn-knn": "random init, BN recalibrated, kNN"}
TRAINED = ("finetune", "supervised")
# The comparisons declared before the run (one family: Holm over all of them). Experiment A, at each fraction
# below 100%: SimCLR fine-tuned vs the same network from scratch, and the SimCLR linear probe vs logistic
# regression on pixels. Experiment B: SimCLR (fine-tuned, probe) on the small fraction vs from scratch on all
# labels, paired by replicate index (the same seeds, different subsets).
PAIRS_A = (("finetune", "supervised"), ("linear", "pixels"))
PAIRS_B = (("finetune", "supervised"), ("linear", "supervised"))
IMAGE_DRAWS = "shared"  # the runs share one test set: one image draw for all seeds (see two_level_bootstrap)


@dataclass
class Record:
    """One arm's result on one replicate's label subset at one fraction: the schema of ``results.json``'s
    ``records`` that every table, test and plot here reads. Probes and kNN fill the first block; a trained arm
    (its grid on the selection splits, then the final run) fills the rest."""

    arm: str
    fraction: float
    replicate: int | None          # None: a record written before replicates were numbered
    subset_seed: int
    seed: int
    label_count: int
    subset_sha256: str             # every arm of a replicate and fraction: the same digest
    top1: float                    # test top-1 of the final model (the only read of the test split)
    top5: float
    predictions: list[int]         # (test images,) predicted classes
    chosen: dict[str, float]       # the grid point chosen on validation: lr/wd, l2 or k
    train_time_s: float            # the final run's (probes: fit + feature extraction)
    selection: dict[str, float] | None = None   # validation top-1 of every grid point
    folds: int | None = None       # selection splits of the subset
    curves: list[Any] | None = None             # the chosen point's validation curves, one per selection split
    history: list[dict[str, Any]] | None = None # the final run's per-epoch history
    steps: int | None = None
    epochs: float | None = None
    global_batch: int | None = None
    peak_lr: float | None = None
    lr_rule: str | None = None
    augment: str | None = None
    selection_time_s: float | None = None       # the grid's training time (tuning compute)
    reused: bool = False           # read back from a finished run of the same name
    normalization: Any = None
    run: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-class metrics etc., added when summarised

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in d.items() if v is not None or k in ("replicate",)} | self.extra


def title(arm: str, summary: dict[str, Any] | None = None) -> str:
    names = (summary or {}).get("titles", {})
    return names.get(arm) or TITLES.get(arm) or arm


def summarise(plan, records: list[dict[str, Any]], pretraining: dict[str, Any], budget: dict[str, Any], *,
              elapsed: float, complete: bool, data=None) -> dict[str, Any]:
    """results.json: the plan, every record (with per-class metrics once the test labels are known), the
    per-(arm, fraction) statistics and the paired tests."""
    e = plan.ecfg
    summary = {
        "format_version": RESULT_FORMAT, "complete": complete, "elapsed_s": elapsed,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": e.to_dict(),
        "dataset": plan.model_cfg.dataset, "arch": plan.model_cfg.arch_signature(),
        "image_size": plan.model_cfg.image_size, "train_size": plan.train_size, "fractions": list(plan.fractions),
        "small_fraction": e.small_fraction, "arms": list(plan.arms), "baselines": list(plan.baselines),
        "replicates": [{"index": r.index, "subset_seed": r.subset_seed, "seed": r.seed} for r in plan.replicates],
        "grid": [list(p) for p in plan.grid()], "steps": e.steps, "batch_size": e.batch_size, "budget": budget,
        "pretraining": pretraining, "titles": titles_for(plan), "records": records,
        "encoder": ({"kind": "pretrained", **plan.pretrained.summary(), "spec": plan.pretrained_spec}
                    if plan.pretrained is not None else {"kind": "checkpoint", "source": plan.checkpoint}),
        "subsets": {f"{f:g}/{s}": idx.tolist() for (f, s), idx in plan.subsets.items()},
    }
    if data is not None:
        labels = data.test_labels()
        names = [str(c) for c in getattr(data.test, "classes", [])] or [str(i) for i in range(data.num_classes)]
        summary.update(test_size=len(labels), num_classes=data.num_classes, classes=names)
        for r in records:
            rep = class_report(labels, np.asarray(r["predictions"]), num_classes=data.num_classes,
                               class_names=names).to_dict()
            r.update(per_class_recall=rep["recall"], worst_class=rep["worst_class_name"],
                     worst_class_acc=rep["worst_recall"], macro_f1=rep["macro_f1"], confusion=rep["confusion"])
        summary["rows"] = aggregate(records, labels, data.num_classes)
        declared = declared_pairs(planned_results(plan), e.small_fraction)
        summary["declared"] = [{"a": a, "fraction": fa, "b": b, "fraction_b": fb} for a, fa, b, fb in declared]
        summary["paired"] = paired_tests(records, labels, summary["titles"], small=e.small_fraction,
                                         family_size=len(declared))
        summary["statistics"] = STATISTICS
    return summary


def stat_dict(s: Summary) -> dict[str, Any]:
    """A summary as JSON (sd and interval None for a single replicate)."""
    def num(v: float) -> float | None:
        return None if v != v else v

    return {"n": s.n, "mean": s.mean, "sd": num(s.sd), "ci_low": num(s.ci_low), "ci_high": num(s.ci_high)}


def titles_for(plan) -> dict[str, str]:
    pre = plan.pretrained
    if pre is None or pre.format == "simclr-dist":
        return dict(TITLES)
    return {**TITLES, "linear": f"{pre.format} + linear probe", "finetune": f"{pre.format} fine-tuned",
            "knn-20": f"{pre.format} kNN (k=20)", "knn-200": f"{pre.format} kNN (k=200)",
            "knn": f"{pre.format} kNN (k chosen on validation)"}


STATISTICS = (
    "The seed (one training run on its own label subset and initialisation) is the unit: per arm, the mean of "
    "test top-1 over seeds with its 95% Student-t interval, and a two-level bootstrap interval (seeds, then "
    "test images, one image draw shared by all seeds since they share the test set) that includes training "
    "variance. Comparisons declared before the run (Experiment A at each fraction: SimCLR fine-tuned vs from "
    "scratch, SimCLR linear probe vs pixel logistic regression; Experiment B: SimCLR on the small fraction vs from "
    "scratch on all labels) are tested over seeds with a paired t-test and an exact sign-flip test, Holm-adjusted "
    "over the whole declared family; McNemar's test per seed is description only.")


def correctness(rs: list[dict[str, Any]], labels: np.ndarray) -> np.ndarray:
    """(seeds, test images) bool: which test images each replicate's final model got right."""
    return np.stack([np.asarray(r["predictions"]) == labels for r in rs])


def aggregate(records: list[dict[str, Any]], labels: np.ndarray | None = None,
              num_classes: int | None = None) -> list[dict[str, Any]]:
    """One row per (arm, fraction): top-1 over replicates (t-interval, and with ``labels`` the two-level bootstrap
    interval), per-class results over seeds (worst class, macro-F1, balanced accuracy), the budget and the
    hyper-parameters each replicate chose."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["arm"], r["fraction"])].append(r)
    rows = []
    for (arm, f), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rs = sorted(rs, key=lambda r: r.get("replicate") or 0)
        stats = stat_dict(summarize([r["top1"] for r in rs]))
        row = {"arm": arm, "fraction": f, "label_count": rs[0]["label_count"], **stats,
               "top1_by_seed": [r["top1"] for r in rs],
               "worst_class": float(np.mean([r["worst_class_acc"] for r in rs])),
               "macro_f1": float(np.mean([r["macro_f1"] for r in rs])),
               "steps": rs[0].get("steps"), "epochs": rs[0].get("epochs"),
               "chosen": [r.get("chosen") for r in rs],
               "train_time_s": float(np.mean([r.get("train_time_s", 0.0) for r in rs])),
               "selection_time_s": float(np.mean([r.get("selection_time_s") or 0.0 for r in rs])),
               **compute_of(rs)}
        if labels is not None:
            boot = two_level_bootstrap(correctness(rs, labels), image_draws=IMAGE_DRAWS)
            row.update(boot_low=boot.ci_low, boot_high=boot.ci_high, boot_note=boot.note)
            per_class = class_metrics_over_seeds(labels, [r["predictions"] for r in rs], num_classes)
            row.update(worst_class_index=per_class["worst_class"],
                       worst_class_recall=stat_dict(per_class["worst_recall"]),
                       balanced_accuracy=stat_dict(per_class["balanced_accuracy"]),
                       macro_f1_over_seeds=stat_dict(per_class["macro_f1"]),
                       recall_by_class=[None if s is None else stat_dict(s) for s in per_class["recall"]])
        rows.append(row)
    return rows


def compute_of(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """What one (arm, fraction) cost over all its replicates, tuning included: seconds of the final runs and of the
    grid (a reused choice costs its tuning once, on the replicate that made it), and the images they processed
    (probes: the feature pass is counted in seconds, not images). ``edges``: replicates whose choice sat on a grid
    edge (after any extension for a trained arm)."""
    final_s = float(sum(r.get("train_time_s") or 0.0 for r in rs))
    tuning_s = float(sum(r.get("selection_time_s") or 0.0 for r in rs))
    final_img = sum(int(r.get("images_seen") or 0) for r in rs)
    tuning_img = sum(int(r.get("selection_images_seen") or 0) for r in rs)
    edges = [r.get("replicate") for r in rs
             if (r.get("edge_after_extension") if r["arm"] in TRAINED else r.get("grid_edge"))]
    return {"total_time_s": final_s + tuning_s, "final_time_s": final_s, "tuning_time_s": tuning_s,
            "images_processed": final_img + tuning_img, "tuning_images": tuning_img,
            "grid_extended": sorted({v for r in rs for v in (r.get("grid_extended") or [])}),
            "edge_replicates": edges}


def declared_size(summary: dict[str, Any]) -> int:
    """How many comparisons the study declared: its own list where it has one, else from its fractions and arms
    (PAIRS_A at every fraction below 100%, PAIRS_B when from-scratch-on-all-labels is planned)."""
    if "declared" in summary:
        return len(summary["declared"])
    arms, base = set(summary.get("arms", [])), set(summary.get("baselines", []))
    n_a = sum((a in arms or a in base) and (b in arms or b in base) for a, b in PAIRS_A)
    n_b = sum(a in arms for a, _ in PAIRS_B) if "supervised" in arms else 0
    return n_a * len([f for f in summary["fractions"] if f < 1.0]) + n_b


def restat(summary: dict[str, Any], labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The summary's rows and declared tests recomputed from its records (same files, current statistics code):
    Holm over the whole declared family, whatever part of it is done."""
    out = dict(summary)
    out["rows"] = aggregate(summary["records"], labels, num_classes)
    out["paired"] = paired_tests(summary["records"], labels, summary["titles"], small=summary["small_fraction"],
                                 family_size=declared_size(summary))
    out["statistics"] = STATISTICS
    return out


def planned_results(plan) -> list[dict[str, Any]]:
    """(arm, fraction) stubs of every result the plan will produce (trained cells, probes at every fraction), so
    the declared family is fixed by the plan, not by what an unfinished study has done."""
    have = {(c.arm, c.fraction) for c in plan.cells}
    have |= {("linear", f) for f in plan.fractions if "linear" in plan.arms}
    have |= {("pixels", f) for f in plan.fractions if "pixels" in plan.baselines}
    return [{"arm": a, "fraction": f} for a, f in sorted(have)]


def declared_pairs(records: list[dict[str, Any]], small: float) -> list[tuple[str, float, str, float]]:
    """(arm a, fraction a, arm b, fraction b) of every declared comparison the records allow."""
    have = {(r["arm"], r["fraction"]) for r in records}
    pairs = [(a, f, b, f) for f in sorted({r["fraction"] for r in records}) if f < 1.0 for a, b in PAIRS_A]
    pairs += [(a, small, b, 1.0) for a, b in PAIRS_B]
    return [p for p in pairs if (p[0], p[1]) in have and (p[2], p[3]) in have]


def paired_tests(records: list[dict[str, Any]], labels: np.ndarray, titles: dict[str, str], *,
                 small: float | None = None, family_size: int | None = None) -> list[dict[str, Any]]:
    """Every declared comparison, tested over seeds (replicates paired by index: the same subsets within a
    fraction, the same test images): paired t-test (the primary p) and exact sign-flip test, each Holm-adjusted
    over the whole family; the two-level bootstrap interval of the difference; McNemar per seed as description."""
    by = {(r["arm"], r["fraction"], r.get("replicate")): r for r in records}
    fractions = sorted({r["fraction"] for r in records if r["fraction"] < 1.0})
    small = small if small is not None else (fractions[-1] if fractions else 1.0)
    rows, t_tests, flips = [], [], []
    for a, fa, b, fb in declared_pairs(records, small):
        reps = sorted(k[2] for k in by if k[0] == a and k[1] == fa and (b, fb, k[2]) in by)
        if len(reps) < 2:
            continue  # one seed: no test over seeds (the report says so through the rows' n)
        names = (f"{titles.get(a, a)} ({100 * fa:g}%)", f"{titles.get(b, b)} ({100 * fb:g}%)")
        ra, rb = [by[(a, fa, i)] for i in reps], [by[(b, fb, i)] for i in reps]
        acc_a, acc_b = [r["top1"] for r in ra], [r["top1"] for r in rb]
        t_tests.append(paired_t_test(acc_a, acc_b, names=names))
        flips.append(sign_flip_test(acc_a, acc_b, names=names))
        ca, cb = correctness(ra, labels), correctness(rb, labels)
        boot = two_level_bootstrap_diff(ca, cb, image_draws=IMAGE_DRAWS)
        per_seed = [mcnemar(x, y, names=names) for x, y in zip(ca, cb)]
        rows.append({"a": a, "b": b, "fraction": fa, "fraction_b": fb, "experiment": "B" if fb != fa else "A",
                     "replicates": len(reps), "diff": stat_dict(summarize(np.subtract(acc_a, acc_b))),
                     "diff_boot": {"mean": boot.mean, "ci_low": boot.ci_low, "ci_high": boot.ci_high},
                     "mcnemar_per_seed": [{"only_a": m.details["only_a_right"], "only_b": m.details["only_b_right"],
                                           "p": m.p_value} for m in per_seed]})
    if rows:
        size = max(family_size or 0, len(rows))
        for row, t, s in zip(rows, declared_family(t_tests, size), declared_family(flips, size)):
            row.update(p=t.p_value, p_holm=t.p_holm, verdict=t.verdict, seeds_p=s.p_value, seeds_p_holm=s.p_holm,
                       seeds_verdict=s.verdict, min_p_sign_flip=s.min_p, family_size=t.family_size)
    return rows


def find_row(summary: dict[str, Any], arm: str, fraction: float) -> dict[str, Any] | None:
    return next((r for r in summary.get("rows", []) if r["arm"] == arm and r["fraction"] == fraction), None)


def pct(f: float) -> str:
    return f"{100 * f:g}%"


def acc(row: dict[str, Any]) -> str:
    """``0.8123 +- 0.0040 [0.802, 0.822]`` (mean +- sd [95% interval]) over the replicates."""
    if row["n"] == 1:
        return f"{row['mean']:.4f} (1 run)"
    return f"{row['mean']:.4f} ± {row['sd']:.4f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def budget_cell(row: dict[str, Any]) -> str:
    if row.get("steps"):
        return f"{row['steps']} ({row['epochs']:.3g} ep)" if row.get("epochs") else f"{row['steps']}"
    return "L-BFGS" if "linear" in row["arm"] or row["arm"] == "pixels" else "-"


def chosen_cell(row: dict[str, Any]) -> str:
    parts = []
    for c in row["chosen"]:
        if c is None:
            continue
        # sorted: a record read back from the runs cache (keys sorted there) and a fresh one read the same
        parts.append(" ".join(f"{k} {v:g}" for k, v in sorted(c.items())))
    return "; ".join(dict.fromkeys(parts)) or "-"


def format_table(summary: dict[str, Any]) -> str:
    """The study on stdout: one line per (fraction, arm)."""
    rows = summary.get("rows", [])
    head = f"{'labels':>14}  {'arm':<32} {'top-1 (mean ± sd [95% CI])':<38} {'worst class':>11} {'steps':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label_count']:>6} ({pct(r['fraction']):>5})  {title(r['arm'], summary):<32} "
                     f"{acc(r):<38} {r['worst_class']:>11.3f} {budget_cell(r):>12}")
    for p in summary.get("paired", []):
        lines.append(f"{p.get('experiment', 'A')} {pct(p['fraction'])}: {p['verdict']}")
    return "\n".join(lines)


def secs(s: float | None) -> str:
    return "-" if s is None else f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
