"""A finished sweep as tables and plots: results.csv (cells and references), trials.csv, results.md, and the figure of
whatever the study searched.

Why one place: the per-cell table (mean over seeds, sd, 95% t-interval, every seed's value), the reference rows
(raw pixels and the randomly initialised encoder, on the trials' split and probe), the heatmap of augmentation pairs
(paper Figure 5, with row and column means over the distinct policies of a row), the accuracy-vs-batch-size lines
(Figure 9) and the accuracy-vs-temperature lines (Table 5) are all read from the same rows, stopped and failed trials
included, so what a plot shows is what the table lists. A cell is one point of the search space; its trials are its
seeds (``seeds: N``). A trial without a value (failed, unfinished) is counted in its cell, never averaged.
:func:`read_results` reads the rows back from the CSVs written here, so a changed report renders a finished sweep
again (``--render-from``) without its hours of trials.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from simclr_dist.config.pretrain import PretrainConfig
from simclr_dist.config.sweep import Dimension, SweepError, SweepSpec
from simclr_dist.data.augment import COMPONENTS, parse_components
from simclr_dist.report.stats import Summary, summarize
from simclr_dist import storage

Rows = list[dict[str, Any]]
RESULT_FILES = {"csv": "results.csv", "trials_csv": "trials.csv", "markdown": "results.md"}
CONFIDENCE = 0.95
REFERENCE_TEXT = {"pixels": "raw pixels (no network)", "random-init": "random-init encoder (no pretraining)"}


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def value_text(v: Any) -> str:
    """A searched value as written in a sweep file (0.5, 10, True), not as a measurement."""
    return f"{v:g}" if isinstance(v, float) else fmt(v)


def finite(v: Any) -> bool:
    """A number that can be averaged (not None, NaN or infinite)."""
    try:
        return v is not None and not isinstance(v, bool) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def measured(spec: SweepSpec, row: dict[str, Any]) -> bool:
    """A trial whose objective counts: finished (or stopped by the scheduler) with a finite value. A NaN objective
    (the trial never reported a number) counts as failed, never averaged."""
    return row.get("status") == "OK" and finite(row.get(spec.metric))


# ----------------------------------------------------------------------------------------------- cells over seeds
@dataclass
class Cell:
    """One point of the search space (or one reference) over its seeds."""

    fields: dict[str, Any]       # the cell's search values; a reference: {"reference": name}
    values: dict[Any, float]     # seed (a trial id without seeds) -> the objective of a measured trial
    trials: int                  # trials of the cell, whatever their status
    early: bool = False          # a value comes from a trial the scheduler stopped early
    reference: str = ""          # "" for a cell of the search space

    @property
    def failed(self) -> int:
        return self.trials - len(self.values)

    @property
    def summary(self) -> Summary | None:
        return summarize(list(self.values.values()), CONFIDENCE) if self.values else None

    @property
    def mean(self) -> float:
        return self.summary.mean if self.values else math.nan

    def count(self) -> str:
        """``3``; ``2 of 3 (1 failed)`` when a trial has no value."""
        n = len(self.values)
        return str(n) if not self.failed else f"{n} of {self.trials} ({self.failed} failed)"


def cell_key(spec: SweepSpec, row: dict[str, Any]) -> str:
    """The cell a trial belongs to: its search values (seed excluded: it is the replicate)."""
    return json.dumps([row.get(k) for k in spec.search], default=str)


def cells(spec: SweepSpec, rows: Rows) -> list[Cell]:
    """The cells of the trials, best mean first (cells with no measured trial last)."""
    out: dict[str, Cell] = {}
    for r in rows:
        cell = out.setdefault(cell_key(spec, r), Cell({k: r.get(k) for k in spec.search}, {}, 0))
        cell.trials += 1
        if measured(spec, r):
            cell.values[r["seed"] if r.get("seed") is not None else r["trial"]] = float(r[spec.metric])
            cell.early |= bool(r.get("note"))
    sign = -1 if spec.mode == "max" else 1
    return sorted(out.values(), key=lambda c: (not c.values, sign * (c.mean if c.values else 0.0)))


def reference_cells(spec: SweepSpec, references: Rows) -> list[Cell]:
    """One cell per reference (pixels; the random-init encoder over its seeds), in the order they were scored."""
    out: dict[str, Cell] = {}
    for r in references:
        name = r["reference"] + (f" ({r['of']})" if r.get("of") else "")
        cell = out.setdefault(name, Cell({"reference": name}, {}, 0, reference=r["reference"]))
        cell.trials += 1
        if finite(r.get(spec.metric)):
            cell.values[r.get("seed")] = float(r[spec.metric])
    return list(out.values())


def init_cell(refs: list[Cell]) -> Cell | None:
    """The random-init reference the cells are paired with: the one there is (None without seeds to pair on, or when
    the trials' networks differ and there are several)."""
    inits = [c for c in refs if c.reference == "random-init"]
    return inits[0] if len(inits) == 1 and any(s is not None for s in inits[0].values) else None


def gain_over_init(cell: Cell, init: Cell | None) -> Summary | None:
    """What pretraining added to the encoder it started from: the cell minus the random-init reference of the same
    seed (the trial's own initial weights), over the seeds both have; mean and t-interval of those differences."""
    if init is None:
        return None
    common = [s for s in cell.values if s in init.values]
    return summarize([cell.values[s] - init.values[s] for s in common], CONFIDENCE) if common else None


def seeds_of(spec: SweepSpec, all_cells: list[Cell]) -> list[Any]:
    """The per-seed columns: the sweep's seeds, plus any other seed a reference was scored at."""
    seen = list(spec.seeds or [])
    for c in all_cells:
        seen += [s for s in c.values if s is not None and (spec.seeds or c.reference) and s not in seen]
    return seen


# ----------------------------------------------------------------------------------------------- tables
def cells_csv(spec: SweepSpec, rows: Rows, references: Rows = ()) -> str:
    """results.csv: one row per cell (kind=cell) and per reference (kind=reference): n, failed, mean, sd, the 95%
    t-interval over seeds and the objective of every seed (``seed_<s>``; blank where that seed has no value)."""
    refs = reference_cells(spec, references)
    all_cells = cells(spec, rows) + refs
    seeds = seeds_of(spec, all_cells)
    init = init_cell(refs)
    cols = (["kind", "reference", *spec.search, "metric", "n", "trials", "failed", "mean", "sd", "ci95_lo",
             "ci95_hi"] + [f"seed_{s}" for s in seeds]
            + (["gain_vs_init_mean", "gain_vs_init_ci95_lo", "gain_vs_init_ci95_hi"] if init else []) + ["note"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for c in all_cells:
        s = c.summary
        row: dict[str, Any] = {"kind": "reference" if c.reference else "cell",
                               "reference": c.fields["reference"] if c.reference else "",
                               **({} if c.reference else c.fields), "metric": spec.metric, "n": len(c.values),
                               "trials": c.trials, "failed": c.failed,
                               "note": "stopped early by the scheduler" if c.early else ""}
        if s is not None:
            row.update(mean=s.mean, sd="" if s.n < 2 else s.sd, ci95_lo="" if s.n < 2 else s.ci_low,
                       ci95_hi="" if s.n < 2 else s.ci_high)
        row.update({f"seed_{k}": v for k, v in c.values.items() if k in seeds})
        g = gain_over_init(c, init) if init and not c.reference else None
        if g is not None:
            row.update(gain_vs_init_mean=g.mean, gain_vs_init_ci95_lo="" if g.n < 2 else g.ci_low,
                       gain_vs_init_ci95_hi="" if g.n < 2 else g.ci_high)
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})
    return buf.getvalue()


def table_csv(rows: Rows) -> str:
    """trials.csv: one row per trial (every status), its seed and error."""
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


def interval_text(s: Summary | None, digits: int = 3) -> tuple[str, str]:
    """(``mean ± half-width``, ``[lo, hi]``) of a summary; the mean alone for one value, ``-`` for none."""
    if s is None:
        return "-", ""
    if s.n < 2:
        return f"{s.mean:.{digits}f}", ""
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}", f"[{s.ci_low:.{digits}f}, {s.ci_high:.{digits}f}]"


def per_seed_text(c: Cell) -> str:
    """``s0 0.712, s1 0.695, s2 0.730``: every value labelled by its seed, in seed order (a cell without seeds: by
    trial id)."""
    def order(k: Any) -> tuple[bool, Any]:
        return (not isinstance(k, int), k if isinstance(k, int) else str(k))
    return ", ".join(f"{'s' if isinstance(k, int) else ''}{k} {c.values[k]:.3f}" for k in sorted(c.values, key=order))


def cells_markdown(spec: SweepSpec, rows: Rows, references: Rows = ()) -> str:
    """The per-cell table (best mean first), the reference rows below it, and what its numbers are."""
    keys = list(spec.search)
    all_cells = cells(spec, rows)
    refs = reference_cells(spec, references)
    init = init_cell(refs)
    head = keys + [f"{spec.metric} (mean ± 95% CI)", "95% CI", "sd", "n", "per seed"] + (
        ["minus random init (paired by seed)"] if init else [])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * len(keys) + "---:|---|---:|---|---|" + ("---:|" if init else "")]

    def line(first: list[str], c: Cell) -> str:
        s = c.summary
        mean, ci = interval_text(s)
        sd = f"{s.sd:.3f}" if s is not None and s.n >= 2 else ""
        per = per_seed_text(c) if len(c.values) > 1 else ""
        cols = [*first, mean + ("*" if c.early else ""), ci, sd, c.count(), per]
        if init:
            g = gain_over_init(c, init) if not c.reference else None
            cols.append("" if g is None else f"{g.mean:+.3f}" + ("" if g.n < 2 else f" ± {g.half_width:.3f}"))
        return "| " + " | ".join(cols) + " |"

    for c in all_cells:
        lines.append(line([value_text(c.fields[k]).replace("|", "\\|") for k in keys], c))
    for c in refs:
        name = REFERENCE_TEXT.get(c.reference, c.reference) + c.fields["reference"][len(c.reference):]
        lines.append(line([f"*reference: {name}*"] + [""] * (len(keys) - 1), c))
    seeds = f"seeds {', '.join(map(str, spec.seeds))}" if spec.seeds else "one trial a cell"
    early = " `*`: a value from a trial stopped early by the scheduler." if any(c.early for c in all_cells) else ""
    ref_note = (" Reference rows: no pretraining, scored by the trials' own evaluation on the same split: the raw "
                "pixels the encoder sees (image_size^2 x 3 values; no seed), and the trials' network at its random "
                "initialisation for every seed." if refs else "")
    if init:
        ref_note += (" Minus random init: the cell's value minus the random-init row of the same seed (the weights "
                     "that trial started from), mean ± 95% t-interval over seeds: what pretraining added.")
    return ("\n".join(lines) + f"\n\nMean over the cell's seeds ({seeds}), each seed a separate trial (its own init, "
            f"data order and augmentation draws); ± is the half-width of the 95% t-interval over seeds "
            f"(t(0.975, n-1) x sd / sqrt(n)); n: the trials measured, a failed or unfinished trial counted as "
            f"failed, never averaged.{early}{ref_note}\n")


def trials_markdown(spec: SweepSpec, rows: Rows) -> str:
    cols = [c for c in (list(rows[0]) if rows else ["trial", "status"])
            if c in ("trial", "status", spec.metric, "error") or any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join((value_text if c in spec.search else fmt)(row.get(c)).replace("|", "\\|")
                                       for c in cols) + " |")
    return "\n".join(lines) + "\n"


def table_markdown(spec: SweepSpec, rows: Rows, references: Rows = ()) -> str:
    """results.md: the cells over seeds with the references, the augmentation-pair matrix (if any), every trial."""
    desc = f"{spec.description.strip()}\n\n" if spec.description.strip() else ""
    heat = heatmap(spec, rows, references)
    extra = f"\n## Augmentation pairs\n\n{heatmap_markdown(heat)}" if heat else ""
    return (f"# {spec.study}\n\n{desc}{objective_text(spec)}\n\n## Cells\n\n{cells_markdown(spec, rows, references)}"
            f"{extra}\n## Trials\n\n{trials_markdown(spec, rows)}")


# ----------------------------------------------------------------------------------------------- the heatmap
def heatmap(spec: SweepSpec, rows: Rows, references: Rows = ()) -> dict[str, Any] | None:
    """The augmentation-pair matrix of a study that searches ``augment`` alone: components, values[i][j] (the mean
    over seeds of the cell's policy; NaN where no measured trial), half[i][j] (its 95% half-width; NaN for n < 2),
    the row and column means over the DISTINCT policies of each row and column (a policy that fills two cells of a
    row, e.g. crop,color at (color, crop) and (color, color), counts once) with their half-widths, which cells come
    from trials the scheduler stopped early, and the reference cells."""
    dim = spec.search.get("augment")
    if dim is None or set(spec.search) != {"augment"} or not any(measured(spec, r) for r in rows):
        return None
    every = {",".join(parse_components(c.fields["augment"] or "")): c for c in cells(spec, rows)}
    by_policy = {p: c for p, c in every.items() if c.values}
    if not dim.components:  # a plain list of policies: the components of its one- and two-component policies
        used = {p for c in by_policy for p in parse_components(c)}
        dim = Dimension("grid", dim.values, tuple(c for c in COMPONENTS if c in used))
    comps = list(dim.components)
    n = len(comps)
    values = [[math.nan] * n for _ in range(n)]
    half = [[math.nan] * n for _ in range(n)]
    failed = [[0] * n for _ in range(n)]  # trials of the cell's policy without a value
    early = set()
    for i in range(n):
        for j in range(n):
            failed[i][j] = every[dim.policy(comps[i], comps[j])].failed if dim.policy(comps[i], comps[j]) in every \
                else 0
            c = by_policy.get(dim.policy(comps[i], comps[j]))
            if c is not None:
                s = c.summary
                values[i][j], half[i][j] = s.mean, (s.half_width if s.n >= 2 else math.nan)
                if c.early:
                    early.add((i, j))
    rows_p = [[dim.policy(comps[i], comps[j]) for j in range(n)] for i in range(n)]
    cols_p = [[dim.policy(comps[i], comps[j]) for i in range(n)] for j in range(n)]
    row_means = [policy_mean(ps, by_policy) for ps in rows_p]
    col_means = [policy_mean(ps, by_policy) for ps in cols_p]
    return {"components": comps, "values": values, "half": half, "failed": failed, "early": early,
            "with": list(dim.with_),
            "metric": spec.metric, "row_means": [m for m, _ in row_means], "row_half": [h for _, h in row_means],
            "col_means": [m for m, _ in col_means], "col_half": [h for _, h in col_means],
            "references": reference_cells(spec, references)}


def policy_mean(policies: list[str], by_policy: dict[str, Cell]) -> tuple[float, float]:
    """(mean, 95% half-width) over the distinct measured ``policies``, each counted once at its mean over seeds; the
    interval is over the seeds at which every one of them was measured (their per-seed means), NaN below 2 seeds."""
    got = [by_policy[p] for p in dict.fromkeys(policies) if p in by_policy]
    if not got:
        return math.nan, math.nan
    mean = sum(c.mean for c in got) / len(got)
    common = [s for s in got[0].values if all(s in c.values for c in got)]
    if len(common) < 2:
        return mean, math.nan
    per_seed = [sum(c.values[s] for c in got) / len(got) for s in common]
    return mean, summarize(per_seed, CONFIDENCE).half_width


def reference_line(refs: list[Cell], scale: float = 1.0, digits: int = 3) -> str:
    """``pixels 0.800; random-init 0.700 ± 0.010 (n=3)``."""
    def one(c: Cell) -> str:
        s = c.summary
        if s is None:
            return f"{c.fields['reference']} -"
        txt = f"{scale * s.mean:.{digits}f}"
        return f"{c.fields['reference']} {txt}" + (f" ± {scale * s.half_width:.{digits}f} (n={s.n})" if s.n >= 2
                                                   else "")
    return "; ".join(one(c) for c in refs)


def heatmap_markdown(heat: dict[str, Any]) -> str:
    comps, vals, half = heat["components"], heat["values"], heat["half"]

    def cell(v: float, h: float = math.nan, failed: int = 0) -> str:
        text = "-" if math.isnan(v) else f"{v:.3f}" + ("" if math.isnan(h) else f" ± {h:.3f}")
        return text + (f" ({failed} failed)" if failed else "")
    lines = ["| | " + " | ".join(comps) + " | mean |", "|---|" + "---:|" * (len(comps) + 1)]
    for i, c in enumerate(comps):
        lines.append(f"| **{c}** | " + " | ".join(cell(v, half[i][j], heat["failed"][i][j])
                                                  + ("*" if (i, j) in heat["early"] else "")
                                                  for j, v in enumerate(vals[i]))
                     + f" | {cell(heat['row_means'][i], heat['row_half'][i])} |")
    lines.append("| **mean** | " + " | ".join(cell(v, h) for v, h in zip(heat["col_means"], heat["col_half"]))
                 + " | |")
    note = f" Every policy also holds {', '.join(heat['with'])}." if heat["with"] else ""
    stopped = " `*`: stopped early by the scheduler (its last rung's value)." if heat["early"] else ""
    refs = f" References (same split and probe): {reference_line(heat['references'])}." if heat["references"] else ""
    return "\n".join(lines) + (
        "\n\nCells: mean over seeds ± the 95% t-interval's half-width. Diagonal: one transformation; off-diagonal: "
        "both (applied in the pipeline's fixed order, so the matrix is symmetric). Means: a row's (column's) mean "
        "averages the DISTINCT policies of that row (column), each policy once at its mean over seeds; a policy that "
        "fills two cells of the row (e.g. (color, crop) and (color, color) are both crop,color when every policy "
        "holds crop) is not counted twice. Their ± is the 95% t-interval over the seeds of the per-seed means of "
        f"those policies.{note}{stopped}{refs}\n")


def plot_heatmap(plt, spec: SweepSpec, heat: dict[str, Any]):
    """Figure 5's layout: the pair matrix of means over seeds, the row means (distinct policies) as the last column
    and the column means as the last row; the references under the title."""
    comps, vals, n = heat["components"], heat["values"], len(heat["components"])
    full = [row + [heat["row_means"][i]] for i, row in enumerate(vals)] + [heat["col_means"] + [math.nan]]
    halves = [row + [heat["row_half"][i]] for i, row in enumerate(heat["half"])] + [heat["col_half"] + [math.nan]]
    finite = [v for row in full for v in row if not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(1.15 * n + 2.6, 0.95 * n + 2.3))
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
            v, h = full[i][j], halves[i][j]
            failed = heat["failed"][i][j] if i < n and j < n else 0
            fail_text = f"\n{failed} failed" if failed else ""
            if not math.isnan(v):
                star = "*" if i < n and j < n and (i, j) in heat["early"] else ""
                text = f"{100 * v:.1f}{star}" + ("" if math.isnan(h) else f"\n±{100 * h:.1f}") + fail_text
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if v > mid else "k")
            elif failed:
                ax.text(j, i, fail_text.strip(), ha="center", va="center", fontsize=7, color="r")
    label = spec.metric.replace("_", " ")
    one_branch = (" on one branch (the other: " + ", ".join(heat["with"]) + " only)") if heat["with"] else ""
    seeds = f"mean of {len(spec.seeds)} seeds ± 95% CI; " if spec.seeds and len(spec.seeds) > 1 else ""
    refs = f"\nreferences: {reference_line(heat['references'], 100, 1)}" if heat["references"] else ""
    ax.set_title(f"{spec.study}: {label} (%){one_branch}\n({seeds}diagonal: one transformation; off-diagonal: both; "
                 "means: distinct policies once" + ("; * stopped early" if heat["early"] else "") + f"){refs}",
                 fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{label} (%)", format=lambda x, _: f"{100 * x:.0f}")
    return fig


# ----------------------------------------------------------------------------------------------- line plots
def plot_lines(plt, spec: SweepSpec, rows: Rows, x_key: str, references: Rows = ()):
    """The objective against ``x_key``: one line per value of the other searched fields, each point a cell's mean
    over seeds with its 95% t-interval as an error bar; the references as horizontal lines (the random-init
    encoder's interval as a band)."""
    label = spec.metric.replace("_", " ")
    others = [k for k in spec.search if k != x_key]
    groups: dict[str, list[Cell]] = {}
    for c in cells(spec, rows):
        key = ", ".join(f"{k}={c.fields[k]}" for k in others) or (
            f"epochs={spec.base['epochs']}" if "epochs" in spec.base else "")
        groups.setdefault(key, []).append(c)
    fig, ax = plt.subplots(figsize=(6, 4))
    ordered = sorted(groups.items(), key=lambda kv: natural(kv[0]))
    for g, (key, group) in enumerate(ordered):
        dodge = 1 + 0.04 * (g - (len(ordered) - 1) / 2)  # side by side on the log axis, so error bars do not overlap
        group.sort(key=lambda c: float(c.fields[x_key]))
        pts = [(float(c.fields[x_key]) * dodge, c.summary) for c in group if c.values]
        err = [0.0 if p[1].n < 2 else p[1].half_width for p in pts]
        line = ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=err, marker="o", capsize=3,
                           label=key or None)
        for c in group:  # failed trials shown where their cell is, never averaged in
            if c.failed:
                x = float(c.fields[x_key]) * dodge
                y = c.mean if c.values else None
                text = f"{c.failed} of {c.trials} failed"
                if y is None:
                    ax.annotate(text, (x, 0.97), xycoords=("data", "axes fraction"), fontsize=7, ha="center",
                                va="top", color=line[0].get_color(), bbox={"fc": "w", "ec": "none", "pad": 1})
                else:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7,
                                color=line[0].get_color())
    styles = {"pixels": ("0.4", "--"), "random-init": ("k", ":")}
    for c in reference_cells(spec, references):
        s = c.summary
        if s is None:
            continue
        color, ls = styles.get(c.reference, ("0.6", "-."))
        ax.axhline(s.mean, color=color, ls=ls, lw=1.2, label=f"reference: {c.fields['reference']}")
        if s.n >= 2:
            ax.axhspan(s.ci_low, s.ci_high, color=color, alpha=0.12, lw=0)
    ax.set_xscale("log", base=2 if x_key == "batch_size" else 10)
    xs = sorted({float(c.fields[x_key]) for group in groups.values() for c in group})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(label)
    seeds = f" (mean of {len(spec.seeds)} seeds ± 95% CI)" if spec.seeds and len(spec.seeds) > 1 else ""
    ax.set_title(f"{spec.study}: {label} vs {x_key.replace('_', ' ')}{seeds}", fontsize=9)
    ax.grid(alpha=0.3)
    if any(groups) or references:
        ax.legend(fontsize=7)
    return fig


def natural(key: str) -> list[Any]:
    """Sort "epochs=10" before "epochs=100"."""
    import re
    return [float(t) if re.fullmatch(r"[0-9.]+", t) else t for t in re.split(r"([0-9.]+)", key)]


def make_plots(spec: SweepSpec, rows: Rows, references: Rows = ()) -> dict[str, bytes]:
    """PNG bytes by file name: the augmentation-pair heatmap, accuracy vs batch size (one line per epoch budget),
    accuracy vs temperature (one line per normalisation), whichever the study's search space has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if measured(spec, r)]
    figs = {}
    heat = heatmap(spec, rows, references)
    if heat:
        figs["augmentation_heatmap.png"] = plot_heatmap(plt, spec, heat)
    if "batch_size" in spec.search and ok:
        figs["accuracy_vs_batch_size.png"] = plot_lines(plt, spec, rows, "batch_size", references)
    if "temperature" in spec.search and ok:
        figs["accuracy_vs_temperature.png"] = plot_lines(plt, spec, rows, "temperature", references)
    out = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def write_results(spec: SweepSpec, rows: Rows, references: Rows = (), out: str | None = None) -> dict[str, str]:
    """results.csv (cells and references), trials.csv, results.md and plots/*.png under ``out`` (local or URI;
    default: the experiment); returns name -> location."""
    exp = out or spec.experiment_uri
    written = {name: storage.join(exp, file) for name, file in RESULT_FILES.items()}
    storage.write_bytes(written["csv"], cells_csv(spec, rows, references).encode())
    storage.write_bytes(written["trials_csv"], table_csv(rows).encode())
    storage.write_bytes(written["markdown"], table_markdown(spec, rows, references).encode())
    for name, png in make_plots(spec, rows, references).items():
        written[name] = storage.join(exp, "plots", name)
        storage.write_bytes(written[name], png)
    return written


# ----------------------------------------------------------------------------------------------- reading back
TEXT_COLUMNS = ("trial", "status", "note", "error")
INT_COLUMNS = ("seed", "epochs_done", "n", "trials")
REFERENCE_COLUMNS = ("kind", "reference", "metric", "n", "trials", "mean")


def read_results(spec: SweepSpec, directory: str) -> tuple[Rows, Rows]:
    """The trial rows and reference rows behind a finished sweep's files (its trials.csv and results.csv), typed as
    the sweep made them, so :func:`write_results` renders them again with the current report code without rerunning
    a trial or starting Ray. Raises a one-line :class:`SweepError` naming the file (and line) that does not fit
    ``spec``."""
    return (read_trials(spec, storage.join(directory, RESULT_FILES["trials_csv"])),
            read_references(spec, storage.join(directory, RESULT_FILES["csv"])))


def read_csv(uri: str, need: list[str], source: str) -> list[dict[str, str]]:
    """The rows of a CSV the report wrote, or a one-line error: unreadable, or without one of the ``need`` columns."""
    try:
        text = storage.read_bytes(uri).decode()
    except (FileNotFoundError, NotADirectoryError):  # a missing directory, or the path of a file
        raise SweepError(f"{uri}: no such file (--render-from names the directory a sweep wrote its results to)") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"{uri}: cannot read ({storage.reason(e)})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    if missing:
        raise SweepError(f"{uri}: no column {', '.join(missing)}: not the {uri.rsplit('/', 1)[-1]} of a sweep of "
                         f"{source}")
    return list(reader)


def number(where: str, column: str, text: str) -> float | int | None:
    """A number column as the sweep wrote it: blank is None, counts and seeds are ints, the rest floats (a float's
    text is its repr, so it reads back exactly, NaN included)."""
    if text == "":
        return None
    try:
        return int(text) if column in INT_COLUMNS else float(text)
    except ValueError:
        raise SweepError(f"{where}: {column} {text!r} is not a number") from None


def searched_value(spec: SweepSpec, where: str, key: str, text: str) -> Any:
    """A trial's value of a searched field, typed as the spec holds it: a grid or choice value is matched by its
    text (so 10.0 stays a float and True a bool); a value the spec does not search means another sweep's table."""
    dim = spec.search[key]
    if dim.kind in ("uniform", "loguniform"):
        return number(where, key, text)
    by_text = {"" if v is None else str(v): v for v in dim.values}
    if text not in by_text:
        raise SweepError(f"{where}: {key} {text!r} is not a value {spec.source} searches "
                         f"({', '.join(by_text)}): the trials of another sweep file?")
    return by_text[text]


def read_trials(spec: SweepSpec, uri: str) -> Rows:
    """trials.csv back as :func:`~simclr_dist.run.studies.sweep_run.collect_rows` made it, in its order (best first,
    as the report lists them)."""
    need = ["trial", "status", *spec.search, *(["seed"] if spec.seeds else []), spec.metric]
    raw = read_csv(uri, need, spec.source)
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    stray = [c for c in (raw[0] if raw else {}) if c in fields and c not in need]
    if stray:
        raise SweepError(f"{uri}: column {stray[0]!r} is a pretraining field {spec.source} does not search: the "
                         "trials of another sweep file?")
    rows = []
    for line, r in enumerate(raw, 2):
        where = f"{uri} line {line}"
        rows.append({c: v if c in TEXT_COLUMNS else searched_value(spec, where, c, v) if c in spec.search
                     else number(where, c, v) for c, v in r.items()})
        if spec.seeds and rows[-1]["seed"] not in spec.seeds:
            raise SweepError(f"{where}: seed {rows[-1]['seed']} is not one of the seeds {spec.seeds} of "
                             f"{spec.source}: the trials of another sweep file?")
    return rows


def read_references(spec: SweepSpec, uri: str) -> Rows:
    """The reference rows behind results.csv's reference lines (:func:`reference_line_rows`); every line must be of
    the spec's objective."""
    refs = []
    for line, r in enumerate(read_csv(uri, [*REFERENCE_COLUMNS, *spec.search], spec.source), 2):
        where = f"{uri} line {line}"
        if r["metric"] != spec.metric:
            raise SweepError(f"{where}: metric {r['metric']!r}, but {spec.source} selects on {spec.metric!r}: the "
                             "results of another sweep file?")
        if r["kind"] == "reference":
            refs += reference_line_rows(spec, where, r)
    return refs


def reference_line_rows(spec: SweepSpec, where: str, r: dict[str, str]) -> Rows:
    """One reference line as the rows :func:`reference_cells` grouped into it: a row per seed column with a value,
    the seedless value (the pixels) from the mean of a line without seed columns, and a row without a value per
    failed one. Only the objective comes back (results.csv holds no other accuracy of a reference, and the report
    reads no other)."""
    name, _, of = r["reference"].partition(" (")
    base = {"reference": name, "of": of[:-1]}  # reference_cells wrote "name (of)"
    values = [(number(where, "seed", c[len("seed_"):]), number(where, c, v)) for c, v in r.items()
              if c.startswith("seed_") and v]
    n, trials = number(where, "n", r["n"]), number(where, "trials", r["trials"])
    if not values and n:
        values = [(None, number(where, "mean", r["mean"]))]
    if len(values) != n:
        raise SweepError(f"{where}: reference {r['reference']!r} has n={n} but {len(values)} values to read back")
    return ([{**base, "seed": s, spec.metric: v} for s, v in values]
            + [{**base, "seed": None, spec.metric: None} for _ in range(trials - n)])
