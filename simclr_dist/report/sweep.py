"""A finished sweep as tables and plots: results.csv, results.md, and the figure of whatever the study searched.

Why one place: the table, the heatmap of augmentation pairs (paper Figure 5, with its row and column means), the
accuracy-vs-batch-size lines (Figure 9, one line per epoch budget) and the accuracy-vs-temperature lines (Table 5,
one line per l2-normalisation setting) are all read from the same rows, stopped and failed trials included, so
what a plot shows is what the table lists.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from simclr_dist.config.sweep import Dimension, SweepSpec
from simclr_dist.data.augment import COMPONENTS, parse_components
from simclr_dist import storage

Rows = list[dict[str, Any]]


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table_csv(rows: Rows) -> str:
    buf = io.StringIO()
    cols = list(rows[0]) if rows else ["trial", "status"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})
    return buf.getvalue()


def objective_text(spec: SweepSpec) -> str:
    if spec.metric.startswith("online_probe"):
        kind = ("the online linear probe (a head trained on detached features during pretraining; it lags an "
                "encoder that moves fast, so a short-rung ASHA favours slow learners)")
    elif "linear" in spec.metric:
        kind = "a logistic-regression probe on frozen features"
    else:
        kind = "kNN"
    return (f"Objective: `{spec.metric}` ({spec.mode}), {kind} on a fixed stratified 20% validation split of the "
            "labelled train split (fitted on the other 80%; never the test split).")


def table_markdown(spec: SweepSpec, rows: Rows) -> str:
    cols = [c for c in (list(rows[0]) if rows else ["trial", "status"])
            if c in ("trial", "status", spec.metric, "error") or any(r.get(c) not in (None, "") for r in rows)]
    desc = f"{spec.description.strip()}\n\n" if spec.description.strip() else ""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in cols) + " |")
    heat = heatmap(spec, rows)
    extra = f"\n## Augmentation pairs\n\n{heatmap_markdown(heat)}" if heat else ""
    return f"# {spec.study}\n\n{desc}{objective_text(spec)}\n\n" + "\n".join(lines) + "\n" + extra


# ----------------------------------------------------------------------------------------------- the heatmap
def heatmap(spec: SweepSpec, rows: Rows) -> dict[str, Any] | None:
    """The augmentation-pair matrix of a study that searches ``augment``: components, values[i][j] (NaN where no
    measured trial), the row means, and which cells come from trials the scheduler stopped early."""
    dim = spec.search.get("augment")
    ok = [r for r in rows if r["status"] == "OK" and r.get(spec.metric) is not None]
    if dim is None or not ok:
        return None
    if not dim.components:  # a plain list of policies: the components of its one- and two-component policies
        used = {c for r in ok for c in parse_components(r["augment"] or "")}
        dim = Dimension("grid", dim.values, tuple(c for c in COMPONENTS if c in used))
    by_policy = {",".join(parse_components(r["augment"] or "")): r for r in ok}
    comps = list(dim.components)
    n = len(comps)
    values = [[math.nan] * n for _ in range(n)]
    early = set()
    for i in range(n):
        for j in range(n):
            r = by_policy.get(dim.policy(comps[i], comps[j]))
            if r is not None:
                values[i][j] = r[spec.metric]
                if r.get("note"):
                    early.add((i, j))
    means = [nanmean(row) for row in values]
    return {"components": comps, "values": values, "row_means": means, "col_means": means if symmetric(values)
            else [nanmean([values[i][j] for i in range(n)]) for j in range(n)], "early": early,
            "with": list(dim.with_), "metric": spec.metric}


def nanmean(xs: list[float]) -> float:
    finite = [x for x in xs if not math.isnan(x)]
    return sum(finite) / len(finite) if finite else math.nan


def symmetric(values: list[list[float]]) -> bool:
    n = len(values)
    return all(values[i][j] == values[j][i] or (math.isnan(values[i][j]) and math.isnan(values[j][i]))
               for i in range(n) for j in range(n))


def heatmap_markdown(heat: dict[str, Any]) -> str:
    comps, vals = heat["components"], heat["values"]
    def cell(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.3f}"
    lines = ["| | " + " | ".join(comps) + " | mean |", "|---|" + "---:|" * (len(comps) + 1)]
    for i, c in enumerate(comps):
        lines.append(f"| **{c}** | " + " | ".join(cell(v) + ("*" if (i, j) in heat["early"] else "")
                                                  for j, v in enumerate(vals[i])) + f" | {cell(heat['row_means'][i])} |")
    lines.append("| **mean** | " + " | ".join(cell(v) for v in heat["col_means"]) + " | |")
    note = f" Every policy also holds {', '.join(heat['with'])}." if heat["with"] else ""
    stopped = " `*`: stopped early by the scheduler (its last rung's value)." if heat["early"] else ""
    return "\n".join(lines) + (f"\n\nDiagonal: one transformation; off-diagonal: both (applied in the pipeline's "
                                f"fixed order, so the matrix is symmetric).{note}{stopped}\n")


def plot_heatmap(plt, spec: SweepSpec, heat: dict[str, Any]):
    """Figure 5's layout: the pair matrix, its row means as the last column and column means as the last row."""
    comps, vals, n = heat["components"], heat["values"], len(heat["components"])
    full = [row + [heat["row_means"][i]] for i, row in enumerate(vals)] + [heat["col_means"] + [math.nan]]
    finite = [v for row in full for v in row if not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(1.0 * n + 2.6, 0.9 * n + 2.0))
    im = ax.imshow(full, cmap="Greens", vmin=min(finite), vmax=max(finite))
    ax.axvline(n - 0.5, color="k", lw=2)
    ax.axhline(n - 0.5, color="k", lw=2)
    ax.set_xticks(range(n + 1), comps + ["mean"], rotation=45, ha="right")
    ax.set_yticks(range(n + 1), comps + ["mean"])
    ax.set_xlabel("transformation")
    ax.set_ylabel("transformation")
    mid = (min(finite) + max(finite)) / 2
    for i in range(n + 1):
        for j in range(n + 1):
            v = full[i][j]
            if not math.isnan(v):
                star = "*" if i < n and j < n and (i, j) in heat["early"] else ""
                ax.text(j, i, f"{100 * v:.1f}{star}", ha="center", va="center", fontsize=8,
                        color="w" if v > mid else "k")
    label = spec.metric.replace("_", " ")
    one_branch = (" on one branch (the other: " + ", ".join(heat["with"]) + " only)") if heat["with"] else ""
    ax.set_title(f"{spec.study}: {label} (%){one_branch}\n(diagonal: one transformation; off-diagonal: both"
                 + ("; * stopped early" if heat["early"] else "") + ")", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"{label} (%)", format=lambda x, _: f"{100 * x:.0f}")
    return fig


# ----------------------------------------------------------------------------------------------- line plots
def plot_lines(plt, spec: SweepSpec, ok: Rows, x_key: str):
    """The objective against ``x_key``, one line per value of the other searched fields."""
    label = spec.metric.replace("_", " ")
    others = [k for k in spec.search if k != x_key]
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in ok:
        key = ", ".join(f"{k}={r[k]}" for k in others) or (
            f"epochs={spec.base['epochs']}" if "epochs" in spec.base else "")
        groups.setdefault(key, []).append((float(r[x_key]), r[spec.metric]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in sorted(groups.items(), key=lambda kv: natural(kv[0])):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key or None)
    ax.set_xscale("log", base=2 if x_key == "batch_size" else 10)
    xs = sorted({p[0] for pts in groups.values() for p in pts})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(label)
    ax.set_title(f"{spec.study}: {label} vs {x_key.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend(fontsize=8)
    return fig


def natural(key: str) -> list[Any]:
    """Sort "epochs=10" before "epochs=100"."""
    import re
    return [float(t) if re.fullmatch(r"[0-9.]+", t) else t for t in re.split(r"([0-9.]+)", key)]


def make_plots(spec: SweepSpec, rows: Rows) -> dict[str, bytes]:
    """PNG bytes by file name: the augmentation-pair heatmap, accuracy vs batch size (one line per epoch budget),
    accuracy vs temperature (one line per normalisation), whichever the study's search space has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "OK" and r.get(spec.metric) is not None]
    figs = {}
    heat = heatmap(spec, rows)
    if heat:
        figs["augmentation_heatmap.png"] = plot_heatmap(plt, spec, heat)
    if "batch_size" in spec.search and ok:
        figs["accuracy_vs_batch_size.png"] = plot_lines(plt, spec, ok, "batch_size")
    if "temperature" in spec.search and ok:
        figs["accuracy_vs_temperature.png"] = plot_lines(plt, spec, ok, "temperature")
    out = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def write_results(spec: SweepSpec, rows: Rows) -> dict[str, str]:
    """results.csv, results.md and plots/*.png under the experiment (local or URI); returns name -> location."""
    exp = spec.experiment_uri
    written = {"csv": storage.join(exp, "results.csv"), "markdown": storage.join(exp, "results.md")}
    storage.write_bytes(written["csv"], table_csv(rows).encode())
    storage.write_bytes(written["markdown"], table_markdown(spec, rows).encode())
    for name, png in make_plots(spec, rows).items():
        written[name] = storage.join(exp, "plots", name)
        storage.write_bytes(written[name], png)
    return written
