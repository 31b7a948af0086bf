"""Where the curves meet: SimCLR against supervised training as labels grow and as training time grows.

Read from an experiments ``results.json`` (``python -m simclr_dist.experiments``). Two plots: test accuracy against
the label fraction (one line per arm), and test accuracy against training wall time at a label fraction (supervised
and fine-tuned per epoch, the fine-tuned arm starting after its pretraining time; the linear probe a level from the
moment it exists; every curve is held level after its last point, since a trained model stays available).
Each crossing of a SimCLR arm with the supervised curve is found by linear interpolation between
measured points (log label fraction, log time) and marked; where the curves do not cross in the measured range the
plot and the text say which one stays ahead. The curves are the measured points joined by straight lines: a crossing
is located only as finely as the fractions and epochs that were run.
"""

from __future__ import annotations

import io
import itertools
import math
from typing import Any

COLORS = {"linear": "tab:blue", "finetune": "tab:green", "supervised": "tab:red"}
TITLES = {"linear": "SimCLR + linear head", "finetune": "SimCLR fine-tuned", "supervised": "supervised from scratch"}

Curve = list[tuple[float, float]]


def crossings(a: Curve, b: Curve, *, log_x: bool = True) -> list[tuple[float, float]]:
    """Points (x, y) where piecewise-linear curves ``a`` and ``b`` (sorted (x, y) points) cross within the x range
    both cover; interpolation in log x when ``log_x``. A touch at a measured point counts once."""
    if len(a) < 1 or len(b) < 1:
        return []
    tx = (lambda x: math.log(x)) if log_x else (lambda x: x)
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if lo > hi:
        return []
    xs = sorted({x for x, _ in a + b if lo <= x <= hi})

    def at(curve: Curve, x: float) -> float:
        if len(curve) == 1 or x <= curve[0][0]:
            return curve[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(curve):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (tx(x) - tx(x0)) / (tx(x1) - tx(x0))
        return curve[-1][1]

    out: list[tuple[float, float]] = []
    diffs = [(x, at(a, x) - at(b, x)) for x in xs]
    for (x0, d0), (x1, d1) in itertools.pairwise(diffs):
        if d0 == 0 and (not out or out[-1][0] != x0):
            out.append((x0, at(b, x0)))
        elif d0 * d1 < 0:
            f = d0 / (d0 - d1)
            x = math.exp(tx(x0) + f * (tx(x1) - tx(x0))) if log_x else x0 + f * (x1 - x0)
            out.append((x, at(b, x)))
    if diffs and diffs[-1][1] == 0 and (not out or out[-1][0] != diffs[-1][0]):
        out.append((diffs[-1][0], at(b, diffs[-1][0])))
    return out


def leader(a: Curve, b: Curve) -> str:
    """Which curve is above over the common range where they do not cross: 'a', 'b' or 'none' (no overlap)."""
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    pts_a = [y for x, y in a if lo <= x <= hi] or [a[-1][1]]
    pts_b = [y for x, y in b if lo <= x <= hi] or [b[-1][1]]
    if lo > hi:
        return "none"
    return "a" if sum(pts_a) / len(pts_a) > sum(pts_b) / len(pts_b) else "b"


# ----------------------------------------------------------------------------------------------- the curves
def results(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (arm, label fraction): ``arm, fraction, top1, train_time_s`` (+ ``history`` with per-epoch test
    accuracy in the first results format). Today's files hold ``records`` (one per replicate, test read once at the
    end): the row is the mean over replicates, and its time the final run's training time (selection excluded, the
    same grid for both trained arms)."""
    if isinstance(summary.get("results"), list):
        return summary["results"]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in summary.get("records") or []:
        if r.get("arm") in TITLES and r.get("top1") is not None:
            groups.setdefault((r["arm"], float(r["fraction"])), []).append(r)

    def mean(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [float(r[key]) for r in rs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return [{"arm": arm, "fraction": frac, "top1": mean(rs, "top1"), "train_time_s": mean(rs, "train_time_s"),
             "replicates": len(rs)} for (arm, frac), rs in sorted(groups.items())]


def fraction_curves(summary: dict[str, Any]) -> dict[str, Curve]:
    """(label fraction, test top-1) per arm, sorted by fraction."""
    out: dict[str, Curve] = {}
    for r in results(summary):
        if r.get("top1") is not None:
            out.setdefault(r["arm"], []).append((float(r["fraction"]), float(r["top1"])))
    return {arm: sorted(pts) for arm, pts in out.items()}


def time_curves(summary: dict[str, Any], fraction: float) -> dict[str, Curve]:
    """(cumulative training seconds, test top-1) per arm at one label fraction, from the per-epoch histories. The
    SimCLR arms start after the pretraining time (when it is known); the linear arm is one point, held level."""
    pre = (summary.get("pretraining") or {}).get("train_time_s")
    out: dict[str, Curve] = {}
    for r in results(summary):
        if r["fraction"] != fraction or r.get("top1") is None:
            continue
        ssl = r["arm"] in ("linear", "finetune")
        if ssl and pre is None:
            continue  # an imported encoder: its pretraining cost is unknown
        start = pre if ssl else 0.0
        hist = [h for h in r.get("history") or [] if h.get("test_top1") is not None]
        if hist:
            t, pts = start, []
            for h in hist:
                t += h.get("epoch_time_s", 0.0) + h.get("eval_time_s", 0.0)
                pts.append((t, float(h["test_top1"])))
            out[r["arm"]] = pts
        else:
            end = r.get("time_with_pretraining_s") if ssl else r.get("train_time_s")
            if end is None and ssl and r.get("train_time_s") is not None:
                end = pre + r["train_time_s"]
            if end:
                out[r["arm"]] = [(float(end), float(r["top1"]))]
    return out


def extend_level(curve: Curve, until: float) -> Curve:
    """A finished model's accuracy stays available: hold the last value to ``until``."""
    return curve + [(until, curve[-1][1])] if curve and until > curve[-1][0] else curve


def analyse(summary: dict[str, Any], fraction: float | None = None) -> dict[str, Any]:
    """Every crossing of a SimCLR arm with the supervised curve, vs label fraction and vs time (at ``fraction``,
    default the largest fraction the supervised arm ran), with one sentence each (``fraction_text``,
    ``time_text``)."""
    fc = fraction_curves(summary)
    fractions = sorted({r["fraction"] for r in results(summary) if r["arm"] == "supervised"})
    shared = sorted(set(fractions) & {r["fraction"] for r in results(summary) if r["arm"] != "supervised"})
    if fraction is None:  # the largest fraction where supervised and a SimCLR arm both ran
        fraction = max(shared or fractions) if fractions else None
    tc = time_curves(summary, fraction) if fraction is not None else {}
    t_end = max((p[0] for c in tc.values() for p in c), default=0.0)
    out: dict[str, Any] = {"fraction": fraction, "by_fraction": [], "by_time": [], "fraction_text": [],
                           "time_text": []}
    sup = fc.get("supervised")
    for arm in ("linear", "finetune"):
        title = TITLES[arm]
        if sup and fc.get(arm):
            found = crossings(fc[arm], sup)
            out["by_fraction"] += [{"arm": arm, "fraction": x, "top1": y} for x, y in found]
            if found:
                out["fraction_text"].append(f"{title} and supervised cross at " + ", ".join(
                    f"{100 * x:.3g}% of the labels (top-1 {y:.3f})" for x, y in found) + ".")
            else:
                ahead = title if leader(fc[arm], sup) == "a" else "supervised"
                lo, hi = max(fc[arm][0][0], sup[0][0]), min(fc[arm][-1][0], sup[-1][0])
                out["fraction_text"].append(f"{title} and supervised do not cross between {100 * lo:g}% and "
                                         f"{100 * hi:g}% of the labels (where both were run): {ahead} is ahead "
                                         "throughout.")
        sup_t = extend_level(tc.get("supervised", []), t_end)
        if sup_t and tc.get(arm):
            mine = extend_level(tc[arm], t_end)
            found = crossings(mine, sup_t)
            out["by_time"] += [{"arm": arm, "time_s": x, "top1": y} for x, y in found]
            where = f"At {100 * fraction:g}% of the labels"
            if found:
                out["time_text"].append(f"{where}, {title} and supervised cross after " + ", ".join(
                    f"{x:.0f} s of training (top-1 {y:.3f})" for x, y in found) + ".")
            else:
                lead = leader(mine, sup_t)
                ahead = {"a": title, "b": "supervised"}.get(lead)
                out["time_text"].append(
                    f"{where}, {title} and supervised do not cross in the measured time"
                    + (f": {ahead} is ahead wherever both have a model." if ahead else
                       f": {title} exists only after {mine[0][0]:.0f} s, when supervised training had ended."))
    return out


# ----------------------------------------------------------------------------------------------- the plots
def plots(summary: dict[str, Any], analysis: dict[str, Any]) -> dict[str, bytes]:
    """``curves_vs_fraction.png`` and ``curves_vs_time.png`` with the crossings marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ds = summary.get("dataset", "")
    figs = {}
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for arm, pts in fraction_curves(summary).items():
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], "o-", color=COLORS.get(arm), label=TITLES.get(arm, arm))
    for k, c in enumerate(analysis["by_fraction"]):
        ax.plot(100 * c["fraction"], c["top1"], "kX", ms=11, zorder=5)
        ax.annotate(f"{100 * c['fraction']:.3g}%", (100 * c["fraction"], c["top1"]), xytext=(6, -14 - 10 * (k % 2)),
                    textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    fractions = sorted({r["fraction"] for r in results(summary)})
    ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set(xlabel="labelled training images (% of the train split, log scale)", ylabel="test top-1 accuracy",
           title=f"{ds}: where the curves meet, label fraction")
    figs["curves_vs_fraction.png"] = fig

    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    tc = time_curves(summary, analysis["fraction"]) if analysis["fraction"] is not None else {}
    t_end = max((p[0] for c in tc.values() for p in c), default=0.0)
    pre = (summary.get("pretraining") or {}).get("train_time_s")
    for arm, pts in tc.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o" if len(pts) == 1 else ".-", color=COLORS.get(arm),
                label=TITLES.get(arm, arm) + (" (incl. pretraining)" if arm != "supervised" else ""))
        if pts[-1][0] < t_end:  # a finished model's accuracy stays available
            ax.plot([pts[-1][0], t_end], [pts[-1][1]] * 2, ":", color=COLORS.get(arm), lw=1)
    if pre:
        ax.axvline(pre, color="grey", ls=":", lw=1, label=f"SimCLR pretraining ends ({pre:.0f} s)")
    for c in analysis["by_time"]:
        ax.plot(c["time_s"], c["top1"], "kX", ms=11, zorder=5)
        ax.annotate(f"{c['time_s']:.0f} s", (c["time_s"], c["top1"]), xytext=(6, -14), textcoords="offset points",
                    fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    frac = analysis["fraction"]
    ax.set(xlabel="training time, s (the final run's; log scale)", ylabel="test top-1 accuracy",
           title=f"{ds}: where the curves meet, training time"
           + (f" ({100 * frac:g}% of the labels)" if frac is not None else ""))
    figs["curves_vs_time.png"] = fig

    out = {}
    for name, f in figs.items():
        ax = f.axes[0]
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        text = analysis["fraction_text" if name == "curves_vs_fraction.png" else "time_text"]
        if text:
            f.text(0.01, -0.02, "\n".join(text), fontsize=7, va="top", wrap=True)
        buf = io.BytesIO()
        f.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(f)
        out[name] = buf.getvalue()
    return out


def markdown(summary: dict[str, Any], analysis: dict[str, Any]) -> str:
    return (f"# Where the curves meet ({summary.get('dataset', '')})\n\n"
            + "\n".join(f"- {s}" for s in analysis["fraction_text"] + analysis["time_text"]) + "\n\n"
            "![accuracy vs label fraction](curves_vs_fraction.png)\n![accuracy vs training time](curves_vs_time.png)\n")
