"""Accuracy against pretraining length: what an encoder gains from each further epoch, from a run's eval index.

Why from the index: ``simclr_dist.evaluate --run R --watch`` scores every checkpoint once and appends a line per
result to ``R/eval/index.jsonl`` (epoch, step, pretraining seconds, protocol, top-1), so the curve is a pure
function of that file and can be redrawn at any time, also after pruned checkpoints are gone.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Any

from simclr_dist import storage

COLUMNS = ("protocol", "epoch", "step", "train_s", "label_count", "top1")


def curve_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (protocol, epoch): the latest evaluation of that checkpoint, sorted by protocol then epoch."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for e in entries:
        if e.get("epoch") is None or e.get("top1") is None:
            continue
        latest[(str(e["protocol"]), int(e["epoch"]))] = e
    return [{k: latest[key].get(k) if k != "protocol" else key[0] for k in COLUMNS} | {"epoch": key[1]}
            for key in sorted(latest)]


def write_curve(rows: list[dict[str, Any]], out_png: str, *, title: str) -> str:
    """``out_png`` (accuracy vs epochs on a log-2 axis, and vs pretraining hours) and the same rows as CSV beside
    it; returns the CSV's URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["protocol"]].append(r)
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for protocol, rs in sorted(by.items()):
        ax_e.plot([r["epoch"] for r in rs], [r["top1"] for r in rs], marker="o", label=protocol)
        if all(r.get("train_s") for r in rs):
            ax_t.plot([r["train_s"] / 3600 for r in rs], [r["top1"] for r in rs], marker="o", label=protocol)
    ax_e.set_xscale("log", base=2)
    ax_e.set_xlabel("pretraining epochs")
    ax_t.set_xlabel("pretraining wall time (hours, this machine)")
    ax_e.set_ylabel("top-1")
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
    ax_e.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(out_png, buf.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_uri = out_png.rsplit(".", 1)[0] + ".csv"
    storage.write_bytes(csv_uri, text.getvalue().encode())
    return csv_uri
