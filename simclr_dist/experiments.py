"""``python -m simclr_dist.experiments``: Experiments A and B under one fair protocol, as one report.

The proposal's primary metric: accuracy of the self-supervised model against (A) the same network trained from
scratch on the same few labels, and (B) the same network trained supervised on *all* labels. Arms: the frozen
SimCLR encoder + a linear probe, SimCLR fine-tuned, the network from scratch; baselines on the same subsets:
logistic regression on raw pixels, a randomly initialised encoder (probe and kNN), kNN of the SimCLR encoder.

The protocol (:mod:`simclr_dist.run.studies.experiment_plan`): every trained arm trains at every label fraction
until early stopping on its own validation split (carved from its labelled subset) says it has converged, its LR
chosen on that split from its own grid (extended past an edge it chooses), then retrains on the whole subset for
the chosen epochs; the test split is read once, by the chosen model; the seed (its own label subset and
initialisation) is the unit: paired t-tests and exact sign-flip tests over seeds, Holm over the declared family,
two-level bootstrap intervals, per-class recall, worst-class accuracy and macro-F1. ``--steps N`` is the old
fixed-budget override. ``--preset fashion-mnist-cpu`` runs the whole study, pretraining
included, on a 2-core machine; ``--preset fashion-mnist-gpu`` is its paper-scale version for a GPU cluster.

This module is the command: flags, the plan and the report; the work is :mod:`simclr_dist.run.studies.experiment_run`,
the tables and plots :mod:`simclr_dist.report.experiments`.
"""

from __future__ import annotations

import sys
import time
import uuid
from datetime import datetime, timezone

import torch

from simclr_dist.config import parse_into
from simclr_dist.config.experiments import ARMS, ExperimentsConfig
from simclr_dist.console import emit
from simclr_dist.report.experiments import format_table, summarise
from simclr_dist import storage
from simclr_dist.run.studies.experiment_plan import make_plan
from simclr_dist.run.studies.experiment_run import StudyPaused, execute, plan_budget, write_outputs
from simclr_dist.run.studies.run_cache import SUFFIX, pack, record_invocation, unpack
from simclr_dist.run.jobs.failure import FAILURES, fail
from simclr_dist.run.store.checkpoint import MANIFEST_FILE
from simclr_dist.run.train.tracking import log_to_run

__all__ = ["ARMS", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> ExperimentsConfig:
    return parse_into(ExperimentsConfig, argv, "python -m simclr_dist.experiments",
                      "Experiments A/B: SimCLR (linear probe, fine-tuned) vs the same network trained from scratch "
                      "on the same few labels and on all of them, under one fair protocol.", one_line=True)


def main(argv: list[str] | None = None) -> int:
    try:
        ecfg = parse_args(argv)
        if ecfg.runs_cache is not None and not ecfg.dry_run:
            check_cache(ecfg.runs_cache)  # before the plan: a study must not pretrain, then fail at its first pack
        plan = make_plan(ecfg)
    except FAILURES as e:
        return fail(e)

    if plan.ecfg.dry_run:
        if plan.ecfg.threads:
            torch.set_num_threads(plan.ecfg.threads)
        plan_budget(plan)
        emit(f"[exp] dry run: {plan.trainings()} classifier runs planned; nothing trained")
        return 0

    runs = storage.join(plan.out, "runs")
    cache = plan.ecfg.runs_cache
    if cache is not None:
        try:
            cached = [n for n in storage.list_names(cache) if n.endswith(SUFFIX)]
            copied = unpack(cache, runs)
        except FAILURES as e:
            return fail(e)
        emit(f"[exp] --runs-cache {cache}: {copied} finished run(s) taken into {runs}" if copied else
             f"[exp] --runs-cache {cache}: nothing to take (every cached run is in {runs} already)" if cached else
             f"[exp] --runs-cache {cache}: empty (no finished run cached yet); each run the study finishes is added")

    started_at, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    invocation = uuid.uuid4().hex[:12]  # two invocations may start in the same second
    finished_records = 0
    latest: dict | None = None  # the last summary written, for a stop to rewrite with its whole wall time

    def log_invocation(complete: bool) -> list[dict] | None:
        """This invocation's wall time into the cache's log (a study spans sessions: its total is the sum)."""
        if cache is None:
            return None
        return record_invocation(cache, started_at, time.perf_counter() - t0, finished_records, complete,
                                 invocation=invocation)

    def wind_down() -> None:
        """A study stopped before its end: the runs its unfinished part finished (a grid so far) go to the next
        session too, this invocation's wall time into the log, and the report of what is done says it."""
        if cache is not None:
            pack(runs, cache)
        invocations = log_invocation(False)
        if latest is not None:
            write_outputs(plan.out, {**latest, "elapsed_s": time.perf_counter() - t0}
                          | ({"invocations": invocations} if cache is not None else {}))

    def progress(plan, records, pretraining, budget, elapsed, complete, data):
        # what is done so far, with its tables, tests and plots: a study that spans sessions has a report each time
        nonlocal finished_records, latest
        finished_records = len(records)
        summary = summarise(plan, records, pretraining, budget, elapsed=elapsed, complete=complete, data=data)
        if cache is not None:
            pack(runs, cache)
            summary["invocations"] = log_invocation(complete)
        write_outputs(plan.out, summary)
        latest = summary

    try:
        done = execute(plan, on_update=progress)
    except FAILURES as e:
        return fail(e)
    except StudyPaused as e:
        wind_down()
        emit(f"\n[exp] paused: {e}. What is done is in {storage.join(plan.out, 'report.md')}"
             + (f" and {cache}" if cache is not None else "") + "; rerun the same command to go on")
        return 0
    except KeyboardInterrupt:
        try:
            wind_down()
        except FAILURES:
            pass  # the log is a record, not the work: an interrupted study still ends in its one line
        emit(f"\n[exp] interrupted; finished runs are kept in {plan.out} and reused by a rerun")
        return 130
    summary = summarise(done["plan"], done["records"], done["pretraining"], done["budget"],
                        elapsed=done["elapsed_s"], complete=True, data=done["data"])
    finished_records = len(done["records"])
    if cache is not None:
        summary["invocations"] = log_invocation(True)
    write_outputs(plan.out, summary)
    track_study(done["plan"], summary)
    emit("\n" + format_table(summary))
    emit(f"\n[exp] done in {summary['elapsed_s'] / 60:.1f} min: {storage.join(plan.out, 'report.md')}")
    return 0


def check_cache(cache: str) -> None:
    """``--runs-cache`` must be writable (every finished run is packed into it): one line naming it otherwise."""
    storage.check_writable(cache, flag="--runs-cache")


def track_study(plan, summary: dict) -> None:
    """The study's rows (mean test top-1 per arm and fraction) into the tracking of the pretraining run whose
    checkpoint it studied, at that checkpoint's step; an imported or published encoder has no run to log to."""
    source = plan.checkpoint or (plan.pretrained.uri if plan.pretrained is not None
                                 and plan.pretrained.format == "simclr-dist" else None)
    if source is None or not storage.exists(storage.join(source, MANIFEST_FILE)):
        return
    step = storage.read_json(storage.join(source, MANIFEST_FILE)).get("step", 0)
    metrics = {f"experiments/{r['arm']}/{100 * r['fraction']:g}pct/top1": float(r["mean"])
               for r in summary.get("rows", [])}
    kinds = log_to_run(source.rstrip("/").rsplit("/", 1)[0], metrics, step)
    if kinds:
        emit(f"[exp] logged {len(metrics)} result(s) to the pretraining run's {' and '.join(kinds)} tracking")


if __name__ == "__main__":
    sys.exit(main())
