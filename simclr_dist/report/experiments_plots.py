"""The study's figures, drawn from its summary: accuracy vs labels with 95% intervals, the validation curves the
grid choices were made on, and confusion matrices of the headline arms.

Why validation curves and no test curves: the test split is read once per final model, so there is no test curve
to draw; what the selection saw is the validation accuracy along training, per replicate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simclr_dist.report.experiments import find_row, title

COLORS = {"linear": "tab:blue", "finetune": "tab:green", "supervised": "tab:red", "knn-20": "tab:cyan",
          "knn-200": "tab:olive", "random-linear": "tab:gray", "random-knn-20": "silver", "random-knn-200": "tan",
          "pixels": "tab:purple"}


def plots(summary: dict[str, Any]) -> dict[str, Any]:
    """Figures keyed by file name (only those the summary has data for)."""
    import matplotlib

    matplotlib.use("Agg")
    figs = {"accuracy_vs_fraction.png": accuracy_vs_fraction(summary)}
    if any(r.get("curves") for r in summary["records"]):
        figs["training_curves.png"] = training_curves(summary)
    cm = confusion_matrices(summary)
    if cm is not None:
        figs["confusion_matrix.png"] = cm
    return figs


def accuracy_vs_fraction(summary: dict[str, Any]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    rows = summary.get("rows", [])
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = sorted((r for r in rows if r["arm"] == arm and r["fraction"] in summary["fractions"]),
                      key=lambda r: r["fraction"])
        if not mine:
            continue
        x = [100 * r["fraction"] for r in mine]
        y = [r["mean"] for r in mine]
        err = [[r["mean"] - r["ci_low"] for r in mine], [r["ci_high"] - r["mean"] for r in mine]]
        style = "o-" if arm in ("linear", "finetune", "supervised") else "s--"
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, ms=4, lw=1.2, color=COLORS.get(arm), label=title(arm, summary))
    full = find_row(summary, "supervised", 1.0)
    if full is not None:
        ax.axhspan(full["ci_low"], full["ci_high"], color=COLORS["supervised"], alpha=0.12)
        ax.axhline(full["mean"], color=COLORS["supervised"], ls=":", lw=1,
                   label=f"from scratch, all labels ({full['mean']:.3f})")
    ax.set_xscale("log")
    fr = summary["fractions"]
    ax.set_xticks([100 * f for f in fr], [f"{100 * f:g}%" for f in fr])
    ax.minorticks_off()
    n = len(summary["replicates"])
    ax.set(xlabel="labelled training images (fraction of the train split)", ylabel="test top-1 accuracy",
           title=f"{summary['dataset']}: accuracy vs labels (mean of {n} replicate(s), 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def training_curves(summary: dict[str, Any]):
    """Validation top-1 along training of each cell's chosen grid point (one thin line per replicate and fold)."""
    import matplotlib.pyplot as plt

    trained = [r for r in summary["records"] if r.get("curves")]
    keys = sorted({(r["fraction"], r["arm"]) for r in trained})
    fractions = sorted({f for f, _ in keys})
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.6 * len(fractions), 3.8), squeeze=False)
    for ax, f in zip(axes[0], fractions):
        for r in (r for r in trained if r["fraction"] == f):
            for curve in r["curves"]:
                pts = [p for p in curve if "val_top1" in p]
                ax.plot([p["step"] for p in pts], [p["val_top1"] for p in pts], ".-", lw=0.9, ms=3, alpha=0.8,
                        color=COLORS.get(r["arm"]))
        for arm in sorted({a for g, a in keys if g == f}):
            ax.plot([], [], color=COLORS.get(arm), label=title(arm, summary))
        ax.set(title=f"{100 * f:g}% of the labels", xlabel="optimiser step", ylabel="validation top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['dataset']}: validation curves of the chosen grid points (selection runs; the test split "
                 "is not read during training)", fontsize=9)
    fig.tight_layout()
    return fig


def confusion_matrices(summary: dict[str, Any]):
    """Row-normalised confusion matrices, summed over replicates, of the trained arms at the small fraction and of
    the supervised reference on all labels."""
    import matplotlib.pyplot as plt

    small = summary["small_fraction"]
    panels = [(a, small) for a in ("finetune", "supervised", "linear")] + [("supervised", 1.0)]
    panels = [(a, f) for a, f in dict.fromkeys(panels)
              if any(r["arm"] == a and r["fraction"] == f and "confusion" in r for r in summary["records"])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    names = summary.get("classes") or [str(i) for i in range(summary.get("num_classes", 0))]
    for ax, (arm, f) in zip(axes[0], panels):
        cm = sum(np.asarray(r["confusion"], dtype=np.float64) for r in summary["records"]
                 if r["arm"] == arm and r["fraction"] == f and "confusion" in r)
        cm = cm / np.maximum(1, cm.sum(1, keepdims=True))
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        for i in range(len(cm)):
            ax.text(i, i, f"{cm[i, i]:.2f}", ha="center", va="center", fontsize=5,
                    color="white" if cm[i, i] > 0.5 else "black")
        ax.set(title=f"{title(arm, summary)}, {100 * f:g}%", xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return fig
