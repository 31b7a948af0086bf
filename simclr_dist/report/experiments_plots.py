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
from simclr_dist.report.experiments import title

COLORS = {"linear": "tab:blue", "finetune": "tab:green", "supervised": "tab:red", "knn-20": "tab:cyan",
          "knn-200": "tab:olive", "random-linear": "tab:gray", "random-knn-20": "silver", "random-knn-200": "tan",
          "pixels": "tab:purple", "knn": "tab:cyan", "random-knn": "silver",
          "random-bn-linear": "tab:brown", "random-bn-knn": "rosybrown"}
MAIN = ("finetune", "supervised", "linear")  # drawn strong; the baselines muted behind them


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
    if any("total_time_s" in r for r in summary.get("rows", [])):
        figs["accuracy_vs_compute.png"] = png(accuracy_vs_compute(summary))
    if any(r.get("curves") for r in summary["records"]):
        figs["training_curves.png"] = png(training_curves(summary))
    figs.update(confusion_matrices(summary))
    return figs


def interval(r: dict[str, Any]) -> tuple[float, float]:
    """(low, high) of a row: the two-level bootstrap interval where there is one, else the t-interval."""
    lo = r.get("boot_low") if r.get("boot_low") is not None else r.get("ci_low")
    hi = r.get("boot_high") if r.get("boot_high") is not None else r.get("ci_high")
    return (r["mean"] if lo is None else lo), (r["mean"] if hi is None else hi)


def accuracy_vs_fraction(summary: dict[str, Any]):
    """Test top-1 against the labelled fraction on a log axis (0.1, 1, 10, 100%), every arm at every fraction it
    ran (from scratch at 100% is Experiment B's reference), 95% intervals; the three main arms strong, the
    baselines thin and pale."""
    fig, (ax,) = figure(7.6, 4.8)
    rows = summary.get("rows", [])
    arms = sorted(dict.fromkeys(r["arm"] for r in rows), key=lambda a: (a in MAIN, a))  # main arms drawn last
    for arm in arms:
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["fraction"])
        if not mine:
            continue
        x = [100 * r["fraction"] for r in mine]
        y = [r["mean"] for r in mine]
        lo_hi = [interval(r) for r in mine]
        err = [[m - lo for m, (lo, _) in zip(y, lo_hi)], [hi - m for m, (_, hi) in zip(y, lo_hi)]]
        main = arm in MAIN
        ax.errorbar(x, y, yerr=err, fmt="o-" if main else "s--", capsize=3 if main else 2, ms=5 if main else 3,
                    lw=2.0 if main else 0.9, alpha=1.0 if main else 0.45, color=COLORS.get(arm),
                    label=title(arm, summary), zorder=3 if main else 2)
    ax.set_xscale("log")
    xs = sorted({r["fraction"] for r in rows} | set(summary["fractions"]))
    ax.set_xticks([100 * f for f in xs], [f"{100 * f:g}%" for f in xs])
    ax.minorticks_off()
    n = len(summary["replicates"])
    return finish(fig, ax, xlabel="labelled training images (fraction of the train split, log scale)",
                  title=f"{summary['dataset']}: accuracy vs labels (mean over up to {n} seeds, 95% interval)")


def accuracy_vs_compute(summary: dict[str, Any]):
    """Test top-1 against each result's own compute per replicate (final run + its share of the tuning, seconds on
    this machine, log axis), one marker per (arm, fraction) labelled with the fraction; the pretraining, shared by
    every SimCLR result, is drawn as a vertical line (it is not in the points)."""
    fig, (ax,) = figure(7.6, 4.8)
    rows = [r for r in summary.get("rows", []) if r.get("total_time_s")]
    for r in sorted(rows, key=lambda r: (r["arm"] in MAIN, r["arm"])):
        main = r["arm"] in MAIN
        x = r["total_time_s"] / max(r["n"], 1)
        lo, hi = interval(r)
        ax.errorbar([x], [r["mean"]], yerr=[[r["mean"] - lo], [hi - r["mean"]]], fmt="o" if main else "s",
                    ms=6 if main else 4, capsize=2, alpha=1.0 if main else 0.45, color=COLORS.get(r["arm"]))
        ax.annotate(f"{100 * r['fraction']:g}%", (x, r["mean"]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                    alpha=1.0 if main else 0.6)
    for arm in sorted({r["arm"] for r in rows}, key=lambda a: (a not in MAIN, a)):
        ax.plot([], [], "o" if arm in MAIN else "s", color=COLORS.get(arm), alpha=1.0 if arm in MAIN else 0.45,
                label=title(arm, summary))
    pre = summary["pretraining"].get("train_time_s")
    if pre:
        ax.axvline(pre, color="tab:blue", ls=":", lw=1, label=f"SimCLR pretraining, once ({pre / 60:.0f} min)")
    ax.set_xscale("log")
    return finish(fig, ax, xlabel="seconds per replicate on this machine (final run + tuning share)",
                  title=f"{summary['dataset']}: accuracy vs compute")


def finish(fig, ax, *, xlabel: str, title: str):
    """The test-accuracy figures' common end: labels, grid, legend."""
    ax.set(xlabel=xlabel, ylabel="test top-1 accuracy", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty study has nothing to name
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


def confusion_panels(summary: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(file name, arm, fraction) of each confusion matrix the records allow: ``confusion_matrix.png`` for the first
    present of SimCLR fine-tuned, from scratch and the probe at the small fraction (the headline), then
    ``confusion_<arm>-<fraction>.png`` for the others and the from-scratch reference on all labels."""
    small = summary["small_fraction"]
    panels = [(a, small) for a in ("finetune", "supervised", "linear")] + [("supervised", 1.0)]
    present = [(a, f) for a, f in dict.fromkeys(panels)
               if any(r["arm"] == a and r["fraction"] == f and "confusion" in r for r in summary["records"])]
    return [("confusion_matrix.png" if i == 0 else f"confusion_{a}-{f:g}.png", a, f)
            for i, (a, f) in enumerate(present)]


def confusion_matrices(summary: dict[str, Any]) -> dict[str, bytes]:
    """Confusion matrices summed over the replicates, one per :func:`confusion_panels` entry."""
    out = {}
    for name, arm, f in confusion_panels(summary):
        rs = [r for r in summary["records"] if r["arm"] == arm and r["fraction"] == f and "confusion" in r]
        cm = np.sum([np.asarray(r["confusion"]) for r in rs], axis=0)
        out[name] = confusion_png(cm, summary.get("classes"), title=f"{title(arm, summary)}, {100 * f:g}% of the "
                                  f"labels ({len(rs)} replicate(s) summed; rows normalised)")
    return out
