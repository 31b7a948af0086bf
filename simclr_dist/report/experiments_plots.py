"""The study's figures, drawn from its summary as PNG bytes: accuracy vs labels with 95% intervals, the validation
curves the grid choices were made on, and confusion matrices of the headline arms.

Why validation curves and no test curves: the test split is read once per final model, so there is no test curve
to draw; what the selection saw is the validation accuracy along training, per replicate. Figures are drawn on an
Agg canvas (no display, no pyplot state), like :func:`simclr_dist.report.classes.confusion_png`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from simclr_dist.report.classes import confusion_png
from simclr_dist.report.experiments import find_row, title

COLORS = {"linear": "tab:blue", "finetune": "tab:green", "supervised": "tab:red", "knn-20": "tab:cyan",
          "knn-200": "tab:olive", "random-linear": "tab:gray", "random-knn-20": "silver", "random-knn-200": "tan",
          "pixels": "tab:purple"}


def figure(width: float, height: float, ncols: int = 1):
    """(figure, axes row) on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes keyed by file name (only the figures the summary has data for)."""
    figs = {"accuracy_vs_fraction.png": png(accuracy_vs_fraction(summary))}
    if any(r.get("curves") for r in summary["records"]):
        figs["training_curves.png"] = png(training_curves(summary))
    figs.update(confusion_matrices(summary))
    return figs


def accuracy_vs_fraction(summary: dict[str, Any]):
    fig, (ax,) = figure(7.2, 4.6)
    rows = summary.get("rows", [])
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = sorted((r for r in rows if r["arm"] == arm and r["fraction"] in summary["fractions"]),
                      key=lambda r: r["fraction"])
        if not mine:
            continue
        x = [100 * r["fraction"] for r in mine]
        y = [r["mean"] for r in mine]
        err = [[r["mean"] - (r["ci_low"] if r["ci_low"] is not None else r["mean"]) for r in mine],
               [(r["ci_high"] if r["ci_high"] is not None else r["mean"]) - r["mean"] for r in mine]]
        style = "o-" if arm in ("linear", "finetune", "supervised") else "s--"
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, ms=4, lw=1.2, color=COLORS.get(arm), label=title(arm, summary))
    full = find_row(summary, "supervised", 1.0)
    if full is not None:
        if full["ci_low"] is not None:
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
    trained = [r for r in summary["records"] if r.get("curves")]
    keys = sorted({(r["fraction"], r["arm"]) for r in trained})
    fractions = sorted({f for f, _ in keys})
    fig, axes = figure(4.6 * len(fractions), 3.8, len(fractions))
    for ax, f in zip(axes, fractions):
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


def confusion_matrices(summary: dict[str, Any]) -> dict[str, bytes]:
    """Confusion matrices summed over the replicates: ``confusion_matrix.png`` of SimCLR fine-tuned at the small
    fraction (the headline arm), ``confusion_<arm>-<fraction>.png`` of the other trained arms and the reference."""
    small = summary["small_fraction"]
    panels = [(a, small) for a in ("finetune", "supervised", "linear")] + [("supervised", 1.0)]
    out = {}
    for arm, f in dict.fromkeys(panels):
        rs = [r for r in summary["records"] if r["arm"] == arm and r["fraction"] == f and "confusion" in r]
        if not rs:
            continue
        cm = np.sum([np.asarray(r["confusion"]) for r in rs], axis=0)
        name = "confusion_matrix.png" if not out else f"confusion_{arm}-{f:g}.png"
        out[name] = confusion_png(cm, summary.get("classes"), title=f"{title(arm, summary)}, {100 * f:g}% of the "
                                  f"labels ({len(rs)} replicate(s) summed; rows normalised)")
    return out
