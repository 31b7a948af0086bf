"""report.md of Experiments A and B: the tables, the paired tests, per-class results, the plots, and how every
number was made (so a reader can judge the protocol without reading code).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from simclr_dist.report.experiments import acc, budget_cell, chosen_cell, find_row, pct, secs, title
from simclr_dist.report.experiments_plots import confusion_panels


def report(summary: dict[str, Any]) -> str:
    ds, small, cfg = summary["dataset"], summary["small_fraction"], summary["config"]
    pre, arch = summary["pretraining"], summary["arch"]
    reps = summary["replicates"]
    name = "SimCLR" if pre.get("format") in (None, "simclr-dist") else f"The imported {pre['format']} encoder"
    lines = [f"# {name} vs supervised on {ds}: Experiments A and B", "", *status_lines(summary),
             *source_lines(summary), "",
             f"- {summary['train_size']} labelled train images, {summary.get('test_size', '?')} test images; "
             f"{len(reps)} replicate(s): label-subset seeds {', '.join(str(r['subset_seed']) for r in reps)}, "
             f"init/data-order seeds {', '.join(str(r['seed']) for r in reps)}; network {arch['arch']} x"
             f"{arch['width']:g}, {summary['image_size']} px",
             f"- every trained arm: {budget_line(summary)}; batch {summary['batch_size']}; grid (lr per 256 x "
             "weight decay) " + ", ".join(f"({lr:g}, {wd:g})" for lr, wd in summary["grid"])
             + " (each arm's own LR grid, extended past an edge it chooses: see each record's grid_extended)",
             f"- measured before the run: {summary['budget']['classify_step_s']:.3f} s per classifier step "
             f"({summary['budget']['threads']} thread(s)); whole command {secs(summary['elapsed_s'])}"
             + (f"; {preset_line(cfg)}" if cfg.get("preset") else ""), "",
             "Accuracies are test top-1, mean ± sd [95% t-interval] over the replicates; each replicate's model was "
             "chosen on validation splits of its own labelled subset and read the test split once. Worst class: "
             "accuracy (recall) of the replicate's weakest class, averaged.", ""]
    header = "| arm | labels | top-1 | worst class | macro-F1 | steps (epochs) | chosen |"
    rule = "|---|---:|---:|---:|---:|---:|---|"
    for f in summary["fractions"]:
        rows = [r for r in summary.get("rows", []) if r["fraction"] == f]
        if not rows:
            continue
        lines += [f"## Experiment A: {pct(f)} of the labels ({rows[0]['label_count']} images), the same images for "
                  "every arm", "", header, rule]
        lines += [row_line(r, summary) for r in rows]
        lines.append("")
    if summary.get("paired"):
        lines += ["## The declared comparisons, over seeds (Holm over the whole family)", "",
                  "Each comparison pairs the replicates by index (the same label subset within a fraction, the same "
                  "test images). p: paired t-test over seeds; sign-flip: the exact permutation test over seeds "
                  "(its smallest attainable p is given: few seeds cannot reach 0.05). Both Holm-adjusted over all "
                  f"{summary['paired'][0].get('family_size', len(summary['paired']))} declared comparisons. "
                  "A - B: mean over seeds [two-level bootstrap 95% interval: seeds and test images].", "",
                  "| exp. | A | B | seeds | A - B [95% bootstrap] | t-test p (Holm) | sign-flip p (Holm; min) | "
                  "verdict |", "|---|---|---|---:|---:|---:|---:|---|"]
        for p in summary["paired"]:
            d, bt = p["diff"], p.get("diff_boot") or {}
            ci = f" [{bt['ci_low']:+.4f}, {bt['ci_high']:+.4f}]" if bt else ""
            fb = p.get("fraction_b", p["fraction"])
            lines.append(f"| {p.get('experiment', 'A')} | {title(p['a'], summary)} ({pct(p['fraction'])}) | "
                         f"{title(p['b'], summary)} ({pct(fb)}) | {p['replicates']} | {d['mean']:+.4f}{ci} | "
                         f"{p['p']:.3g} ({p['p_holm']:.3g}) | {p['seeds_p']:.3g} ({p['seeds_p_holm']:.3g}; "
                         f"{p['min_p_sign_flip']:.3g}) | {p['verdict'].split(';')[0]} |")
        lines += ["", "McNemar's exact test per seed (images only A right / only B right) describes single runs and "
                  "is not used as evidence about the arms.", ""]
    full = find_row(summary, "supervised", 1.0)
    if full is not None:
        lines += [f"## Experiment B: SimCLR on {pct(small)} of the labels vs from scratch on all of them", "",
                  "| arm | labels | top-1 | vs from scratch, 100% | worst class | steps (epochs) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm in ("linear", "finetune", "supervised"):
            r = find_row(summary, arm, small)
            if r is not None:
                lines.append(f"| {title(arm, summary)} | {r['label_count']} ({pct(small)}) | {acc(r)} | "
                             f"{r['mean'] - full['mean']:+.4f} | {r['worst_class']:.3f} | {budget_cell(r)} |")
        lines += [f"| {title('supervised', summary)} | {full['label_count']} (100%) | {acc(full)} | reference | "
                  f"{full['worst_class']:.3f} | {budget_cell(full)} |", ""]
    lines += per_class_lines(summary)
    lines += compute_lines(summary)
    lines += edge_lines(summary)
    lines += ["## Plots", "", "![accuracy vs label fraction](accuracy_vs_fraction.png)", "",
              "![accuracy vs compute](accuracy_vs_compute.png)", "",
              "![validation curves](training_curves.png)", "",
              *[f"![confusion matrix of {title(a, summary)} at {pct(f)} (summed over its replicates)]({name})\n"
                for name, a, f in confusion_panels(summary)],
              "## Protocol", "", *protocol_lines(summary), ""]
    return "\n".join(lines)


def source_lines(summary: dict[str, Any]) -> list[str]:
    pre = summary["pretraining"]
    if pre.get("source"):
        return [f"- Encoder: imported `{pre['source']}` (format {pre['format']}, read from `{pre['uri']}`; input "
                f"normalisation of the SimCLR arms: {pre['normalization']}; pretraining "
                + (f"{secs(pre['train_time_s'])} of epoch time)" if pre.get("train_time_s") is not None
                   else "time unknown, not counted)")]
    wall = f", {secs(pre['wall_time_s'])} wall in this command" if pre.get("wall_time_s") else ""
    return [f"- SimCLR checkpoint: `{pre['checkpoint']}` (epoch {pre['epoch']}; pretraining "
            f"{secs(pre['train_time_s'])} of epoch time{wall})"]


def preset_line(cfg: dict[str, Any]) -> str:
    return f"preset `{cfg['preset']}` (`python -m simclr_dist.experiments --preset {cfg['preset']}`)"


def row_line(r: dict[str, Any], summary: dict[str, Any]) -> str:
    return (f"| {title(r['arm'], summary)} | {r['label_count']} | {acc(r)} | {r['worst_class']:.3f} | "
            f"{r['macro_f1']:.3f} | {budget_cell(r)} | {chosen_cell(r)} |")


def budget_line(summary: dict[str, Any]) -> str:
    """How long every trained arm trained: a fixed number of steps, or until early stopping on validation."""
    cfg = summary.get("config", {})
    if summary.get("steps"):
        return (f"{summary['steps']} optimiser steps at every fraction (epochs grow as the subset shrinks), cosine "
                "decay")
    return (f"until early stopping on its own validation split (max epochs {cfg.get('max_epochs')}, patience "
            f"{cfg.get('patience')} per fraction; constant LR), then retrained on the whole subset for the chosen "
            "number of epochs")


PER_CLASS_ARMS = ("finetune", "supervised", "linear", "pixels")  # the arms of the declared comparisons


def per_class_lines(summary: dict[str, Any]) -> list[str]:
    """Per-class recall of the declared comparisons' arms at every fraction, mean [95% t-interval over seeds], with
    balanced accuracy and the worst class (the class of lowest mean recall) under them. Rows written before the
    intervals existed (no ``recall_by_class``) fall back to the mean over their records."""
    names = summary.get("classes") or [str(i) for i in range(summary.get("num_classes", 0))]
    if not names:
        return []
    tables: list[str] = []
    for f in sorted({r["fraction"] for r in summary.get("rows", [])}):
        rows = [r for r in (find_row(summary, a, f) for a in PER_CLASS_ARMS) if r is not None]
        cells = [class_cells(summary, r) for r in rows]
        rows = [r for r, c in zip(rows, cells) if c is not None]
        cells = [c for c in cells if c is not None]
        if not rows:
            continue
        tables += [f"### {pct(f)} of the labels", "",
                   "| class | " + " | ".join(f"{title(r['arm'], summary)} (n={r['n']})" for r in rows) + " |",
                   "|---|" + "---:|" * len(rows)]
        tables += [f"| {name} | " + " | ".join(c[i] for c in cells) + " |" for i, name in enumerate(names)]
        tables += ["| *balanced accuracy* | " + " | ".join(interval(r.get("balanced_accuracy")) for r in rows) + " |",
                   "| *worst class* | " + " | ".join(worst_cell(r, names) for r in rows) + " |", ""]
    if not tables:
        return []
    return ["## Per-class recall over seeds", "",
            "Recall of each test class, mean over the replicates [95% t-interval over seeds, not clipped to 0..1]; "
            "balanced accuracy (the mean of the class recalls) and the worst class (lowest mean recall) under each "
            "table.", "", *tables]


def class_cells(summary: dict[str, Any], row: dict[str, Any]) -> list[str] | None:
    """One column of a per-class table: ``mean [lo, hi]`` per class, or the records' mean when no interval."""
    if row.get("recall_by_class"):
        return [interval(s) for s in row["recall_by_class"]]
    recs = [r["per_class_recall"] for r in summary.get("records", [])
            if (r["arm"], r["fraction"]) == (row["arm"], row["fraction"]) and "per_class_recall" in r]
    return [f"{v:.3f}" for v in np.mean(recs, axis=0)] if recs else None


def interval(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    if s.get("n", 0) < 2 or s.get("ci_low") is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def worst_cell(row: dict[str, Any], names: list[str]) -> str:
    i = row.get("worst_class_index")
    if i is None:
        return f"{row['worst_class']:.3f} (per seed)"
    return f"{names[i]}: {interval(row.get('worst_class_recall'))}"


def protocol_lines(summary: dict[str, Any]) -> list[str]:
    cfg = summary["config"]
    some = next((r for r in summary["records"] if r.get("lr_rule")), None)
    return [
        "- **Label subsets**: class-balanced, drawn with the replicate's subset seed, nested across fractions, "
        "identical for every arm and baseline of a replicate (indices in `results.json`).",
        f"- **Model selection**: each labelled subset is split class-stratified into fit/validation "
        f"({100 * cfg['val_fraction']:g}% per class, at most 200; k-fold when a class has fewer than 10 labels). "
        "Every trained arm runs every grid point on the fit part and is scored on validation (mean over folds); the "
        "chosen point is retrained on the whole subset, and only that final model reads the test split. The "
        "probes choose their L2 on the same splits, then refit on the whole subset.",
        f"- **Budget**: every trained arm: {budget_line(summary)}; SGD with Nesterov momentum 0.9. The batch is "
        "capped at the label count; "
        "the peak LR keeps the nominal batch: " + (f"`{some['lr_rule']}`." if some else "lr x batch / 256."),
        "- **Arms**: SimCLR fine-tuned (whole network from the checkpoint + a new linear head) and from scratch "
        "(the same network randomly initialised) share the loop, augmentation and grid; the linear probe is "
        "multinomial logistic regression (L-BFGS, standardised features) on the frozen encoder. Baselines: "
        "logistic regression on raw pixels; a randomly initialised encoder (probe and kNN); kNN of the SimCLR "
        f"encoder (cosine, temperature 0.1), k chosen on the same validation splits from {cfg['knn_k']}."
        + (" The random-init encoder is probed as initialised and again with its BatchNorm statistics "
           "recalibrated on each subset's images (no labels, no weights changed): 'random init, BN recalibrated'."
           if any("bn_recalibrated_on" in r for r in summary["records"]) else ""),
        *loader_lines(summary),
        "- **Statistics**: " + summary.get("statistics", "mean ± sample sd and the 95% Student-t interval over "
                                           "replicates."),
    ]


def loader_lines(summary: dict[str, Any]) -> list[str]:
    """How the trained arms' batches were made, when the study used more than one way: final runs and selection
    runs counted per loader (``per_seed.csv`` says which run used which)."""
    trained = [r for r in summary.get("records", []) if r.get("classifier_loader")]
    finals = Counter(r["classifier_loader"] for r in trained)
    tuned = sorted({k for r in trained for k in r.get("selection_loaders") or []})
    if len(set(finals) | set(tuned)) < 2:
        return []
    counts = ", ".join(f"{n} final run(s) {k}" for k, n in sorted(finals.items()))
    return [f"- **Batches**: the study changed how the trained arms' batches are made while it ran ({counts}; "
            f"selection runs: {', '.join(tuned)}): the torch DataLoader applies the pad-crop + flip per image, "
            "the resident batches apply it to the whole batch at once, with the same support bit for bit and the "
            "same distribution of crops and flips (other draws; tests/run/test_classifier_resident.py), 1.2x "
            "faster a step on 2 CPU cores (docs/performance.md, bench.classifier_loader)."]


def compute_lines(summary: dict[str, Any]) -> list[str]:
    """Every arm's cost over all its replicates, tuning included, and the pretraining once, amortised."""
    rows = [r for r in summary.get("rows", []) if "total_time_s" in r]
    if not rows:
        return []
    pre = summary["pretraining"]
    ssl_runs = sum(r["n"] for r in rows if r["arm"] in ("finetune", "linear") or r["arm"].startswith("knn"))
    lines = ["## Compute (this machine, tuning included)", "",
             "Seconds and images over every replicate of an arm: the final runs plus its grid (with `--tune-once` "
             "the grid runs on the first replicate only and its choice is reused). Probes: feature extraction and "
             "fits. Pretraining is not in these rows: "
             + (f"it took {secs(pre['train_time_s'])} of epoch time once, shared by the {ssl_runs} SimCLR results "
                f"below ({secs(pre['train_time_s'] / max(ssl_runs, 1))} each, amortised)."
                if pre.get("train_time_s") else "its cost is unknown (an imported encoder)."), "",
             "| fraction | arm | replicates | total | final runs | tuning | images processed (tuning) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        img = f"{r['images_processed']:,} ({r['tuning_images']:,})" if r["images_processed"] else "-"
        lines.append(f"| {pct(r['fraction'])} | {title(r['arm'], summary)} | {r['n']} | {secs(r['total_time_s'])} | "
                     f"{secs(r['final_time_s'])} | {secs(r['tuning_time_s'])} | {img} |")
    total = sum(r["total_time_s"] for r in rows)
    lines += ["", f"All arms: {secs(total)} of training and probing; the whole command {secs(summary['elapsed_s'])} "
              "in its last invocation (runs finished in earlier invocations were read back, their time counted "
              "above)."]
    runs = summary.get("invocations") or []
    if runs:
        wall = sum(x["elapsed_s"] for x in runs)
        lines.append(f"Wall time of the study: {secs(wall)} over {len(runs)} invocation(s) recorded in the runs "
                     f"cache's `invocations.json` (first {runs[0]['started_at']}, last {runs[-1]['started_at']}; "
                     "an invocation stopped by a kill counts until the last part it trained)"
                     + (f"; {sum('reconstructed' in x for x in runs)} of them reconstructed afterwards (each line "
                        "says from what), and invocations before the log began are not in it: a lower bound."
                        if any("reconstructed" in x for x in runs) else "."))
    return [*lines, ""]


def edge_lines(summary: dict[str, Any]) -> list[str]:
    """Grid choices at an edge: a trained arm's after its extensions, a probe's L2 or k; none is the goal."""
    rows = [r for r in summary.get("rows", []) if r.get("edge_replicates") or r.get("grid_extended")]
    lines = ["## Grid edges", ""]
    if not rows:
        return lines + ["No choice sat on an edge of its grid (trained arms after their extensions, probes' L2 and "
                        "k).", ""]
    for r in rows:
        ext = (f"grid extended to {', '.join(f'{v:g}' for v in r['grid_extended'])}; "
               if r.get("grid_extended") else "")
        still = (f"still on an edge in replicate(s) {', '.join(edge_cell(summary, r, i) for i in r['edge_replicates'])}"
                 if r.get("edge_replicates") else "inside the extended grid")
        lines.append(f"- {title(r['arm'], summary)} at {pct(r['fraction'])}: {ext}{still}")
    bounds = bound_notes(summary, rows)
    if bounds:
        lines += ["", "Of these, edges that are bounds of the method rather than a grid too small: "
                  + "; ".join(bounds) + "."]
    return [*lines, ""]


def bound_notes(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Why a probe's edge cannot be extended, for the kinds of edge present: L2 at the grid's bottom (next to no
    penalty), k = 1, and a k capped at the labels its fit split holds (below the grid's top)."""
    cfg = summary.get("config", {})
    l2s = [float(v) for v in str(cfg.get("l2_grid") or "").split(",") if v.strip()]
    ks = [int(float(v)) for v in str(cfg.get("knn_k") or "").split(",") if v.strip()]
    edges = [x for x in summary.get("records", []) for r in rows
             if (x["arm"], x["fraction"]) == (r["arm"], r["fraction"]) and x.get("replicate") in
             (r.get("edge_replicates") or []) and x["arm"] not in ("finetune", "supervised")]
    notes = []
    if l2s and any(x.get("chosen", {}).get("l2") == min(l2s) for x in edges):
        notes.append(f"L2 {min(l2s):g} is next to no penalty on standardised features")
    if any(x.get("chosen", {}).get("k") == 1 for x in edges):
        notes.append("k = 1 is the smallest k")
    capped = sorted({x["chosen"]["k"] for x in edges if x.get("grid_edge") == "high" and ks
                     and x.get("chosen", {}).get("k", max(ks)) < max(ks)})
    if capped:
        notes.append(f"k {', '.join(str(k) for k in capped)} is all the labels of the smallest fit split (k is capped "
                     f"at the labels it fits on, below the grid's top {max(ks)})")
    return notes


def edge_cell(summary: dict[str, Any], row: dict[str, Any], replicate: int) -> str:
    """``3 (k 1, low)``: a replicate on an edge, with the value it chose and which edge."""
    rec = next((x for x in summary.get("records", []) if (x["arm"], x["fraction"], x.get("replicate")) ==
                (row["arm"], row["fraction"], replicate)), None)
    if rec is None or not rec.get("chosen"):
        return str(replicate)
    value = ", ".join(f"{k} {v:g}" for k, v in rec["chosen"].items() if isinstance(v, (int, float)))
    edge = rec.get("edge_after_extension") or rec.get("grid_edge")
    return f"{replicate} ({value}{', ' + edge if isinstance(edge, str) else ''})"


def status_lines(summary: dict[str, Any]) -> list[str]:
    """An unfinished study says so first: what is done, what is not, how it continues."""
    if summary.get("complete"):
        return []
    done = sorted({(r["fraction"], r["arm"]) for r in summary["records"] if r["arm"] in ("finetune", "supervised")})
    planned = sum(p.get("cells", 0) for p in summary.get("budget", {}).get("parts", {}).values())
    trained = sum(r["arm"] in ("finetune", "supervised") for r in summary["records"])
    cfg = summary.get("config", {})
    rerun = f"--preset {cfg['preset']}" if cfg.get("preset") else "the same flags"
    return [f"**In progress**: {trained} of {planned} trained cells finished "
            f"({', '.join(f'{a} {pct(f)}' for f, a in done) or 'none yet'}); a fraction's rows and tests cover the "
            f"replicates finished so far. Rerunning `python -m simclr_dist.experiments {rerun}` with the same "
            "`--out` reads every finished run back and trains only the rest.", ""]
