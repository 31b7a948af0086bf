"""``python -m simclr_dist.evaluate``: linear probe, kNN and fine-tuning of a SimCLR checkpoint in shared storage.

Why these three: the linear probe on frozen features is the paper's headline metric; kNN needs no training and
matches the online monitor of pretraining; fine-tuning on 1%/10%/100% of the labels answers the project's
question. Results are JSON files beside the run's checkpoints (``RUN/eval/<checkpoint>/<protocol>.json``) listed in
the run's append-only ``RUN/eval/index.jsonl``, so an evaluator that watches a run is idempotent and its history
survives checkpoint pruning. ``--pretrained FORMAT:PATH_OR_URI`` evaluates an imported encoder instead
(:mod:`simclr_dist.run.store.pretrained`), with the input normalisation the importer records.

This module is the command: flags, dispatch and the table; the protocols are :mod:`simclr_dist.run.train.evaluation`,
the jobs and result files :mod:`simclr_dist.run.eval.jobs`, fine-tuning the one loop
(:mod:`simclr_dist.run.train.classify_loop`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from simclr_dist.config import parse_into
from simclr_dist.config.evaluate import EvalConfig
from simclr_dist.console import emit
from simclr_dist.report.pretraining_curve import curve_rows, write_curve
from simclr_dist.run.eval import store as eval_store
from simclr_dist.run.jobs.classify_job import require_complete
from simclr_dist.run.eval.jobs import (
    evaluate_checkpoint,
    evaluate_latest,
    evaluate_pretrained,
    result_name,
    watch_run,
)
from simclr_dist.run.train.evaluation import select_device
from simclr_dist.run.jobs.failure import FAILURES, fail


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    return parse_into(EvalConfig, argv, "python -m simclr_dist.evaluate",
                      "Linear probe, kNN and fine-tuning of SimCLR checkpoints in shared storage.")


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per result: checkpoint, epoch, protocol, labels, top-1, top-5, wall time (cached = read back)."""
    names = [str(r["checkpoint"]).rstrip("/").rsplit("/", 1)[-1] for r in results]
    w = max([len("checkpoint"), *map(len, names)])
    header = f"{'checkpoint':<{w}} {'epoch':>5} {'protocol':<14} {'labels':>7} {'top-1':>7} {'top-5':>7} {'time':>8}"
    rows = [header, "-" * len(header)]
    for name, r in zip(names, results):
        fraction = r.get("label_fraction")
        fraction = None if r["protocol"] != "finetune" and fraction in (None, 1.0) else fraction
        proto = result_name(r["protocol"], fraction, r.get("queries", "test"))
        when = "cached" if r.get("cached") else f"{r['wall_time_s']:.1f}s"
        epoch = "-" if r.get("checkpoint_epoch") is None else r["checkpoint_epoch"]  # imported: no epoch
        rows.append(f"{name:<{w}} {epoch:>5} {proto:<14} {r['label_count']:>7} {r['top1']:>7.4f} "
                    f"{r['top5']:>7.4f} {when:>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    try:
        ecfg = parse_args(argv).validate()
        device = select_device()
        if ecfg.threads:
            torch.set_num_threads(ecfg.threads)
        if ecfg.watch:
            results = watch_run(ecfg.run, ecfg, device=device)
        elif ecfg.run is not None:
            results = evaluate_latest(ecfg.run, ecfg, device=device)
        elif ecfg.pretrained is not None:
            results = evaluate_pretrained(ecfg.pretrained, ecfg, device=device)
        else:
            require_complete(ecfg.checkpoint)
            results = evaluate_checkpoint(ecfg.checkpoint, ecfg, device=device)
    except FAILURES as e:
        return fail(e)
    except KeyboardInterrupt:
        emit("\n[eval] interrupted; every result completed so far is saved")
        return 130
    emit("\n" + format_table(results))
    if ecfg.run is not None:  # the run's whole history, also of checkpoints pruned since
        entries = eval_store.read_index(ecfg.run)
        emit(f"\n[eval] history of {ecfg.run} ({eval_store.index_uri(ecfg.run)}):\n"
             + eval_store.format_history(entries))
        if ecfg.curve is not None:
            name = ecfg.run.rstrip("/").rsplit("/", 1)[-1]
            title = f"{name}: accuracy vs pretraining ({ecfg.queries} queries)"
            csv_uri = write_curve(curve_rows(entries), ecfg.curve, title=title)
            emit(f"[eval] pretraining curve: {ecfg.curve} ({csv_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
