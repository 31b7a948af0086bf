"""``python -m simclr_dist.sweep tune/<study>.yaml``: SimCLR ablations (paper Fig. 5, Fig. 9, Table 5) on Ray Tune.

The command reads a sweep file (:mod:`simclr_dist.config.sweep`), checks every trial before any starts
(:mod:`simclr_dist.run.studies.sweep_plan`), runs the trials as Ray Train runs inside Tune, ASHA stopping the weak ones
(:mod:`simclr_dist.run.studies.sweep_run`), and prints the table that :mod:`simclr_dist.report.sweep` also writes with the plots.
``--curves RESULTS_JSON`` instead draws where SimCLR and supervised training meet, from an experiments results file
(:mod:`simclr_dist.report.crossings`). ``--render-from DIR`` instead writes a finished sweep's tables and plots again
with the current report code, from the trials.csv and results.csv it wrote: a sweep takes hours, a report changes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from simclr_dist.console import CommandParser
from simclr_dist.config import ConfigError
from simclr_dist.config.sweep import SweepError, SweepSpec, load_spec
from simclr_dist.data.datasets import DatasetError
from simclr_dist.report import crossings
from simclr_dist.report.sweep import read_results, table_markdown, write_results
from simclr_dist import storage
from simclr_dist.run.jobs.launch import RunError
from simclr_dist.run.studies.sweep_run import run_sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = CommandParser(prog="python -m simclr_dist.sweep",
                                description="SimCLR ablations on Ray Tune: each trial is a Ray Train run.")
    p.add_argument("sweep_file", nargs="?", help="a sweep definition, e.g. tune/temperature.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the file: a pretraining field (epochs=5; a list makes a grid: "
                        "temperature=[0.1,0.5]), a resource (num_workers=2), concurrency, num_samples, "
                        "scheduler=none, scheduler.grace_period=2, "
                        "objective.metric=val_knn_top1, study=NAME")
    p.add_argument("--storage-path", help="shared storage for the sweep (local/NFS path, s3://, gs://); "
                                          "default: the file's storage_path, else ./runs/sweeps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept, "
                                                         "unfinished ones resume from their last checkpoint")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: also rerun trials that failed")
    p.add_argument("--dry-run", action="store_true", help="validate, print the trials and their resources, run nothing")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (also capped by the cluster)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--curves", metavar="RESULTS_JSON",
                   help="instead of a sweep: plot where SimCLR and supervised meet (accuracy vs label fraction and vs "
                        "training time, crossings marked) from an experiments results.json (path or URI)")
    p.add_argument("--curves-fraction", type=float, metavar="F",
                   help="with --curves: the label fraction of the time plot (default: the largest)")
    p.add_argument("--render-from", metavar="DIR",
                   help="instead of a sweep: write the sweep file's tables and plots again with this version's "
                        "report code from the trials.csv and results.csv in DIR (its study directory, or a copy, "
                        "e.g. tune/results/temperature-fmnist-cpu); runs no trial, starts no Ray")
    p.add_argument("--out", help="with --curves: output directory (default: next to the results file); with "
                                 "--render-from: where to write (default: DIR itself)")
    return p.parse_args(argv)


RUN_FLAGS = ("resume", "retry_failed", "dry_run", "max_concurrent", "ray_address", "storage_path", "curves")


def render(args: argparse.Namespace, spec: SweepSpec) -> dict[str, Any]:
    """``--render-from``: the written rows read back and written again, as :func:`run_sweep` returns them."""
    used = [f"--{f.replace('_', '-')}" for f in RUN_FLAGS if getattr(args, f) not in (None, False)]
    if used:
        raise SweepError(f"--render-from: renders a finished sweep and runs nothing; drop {', '.join(used)}")
    rows, references = read_results(spec, args.render_from)
    return {"rows": rows, "references": references,
            "files": write_results(spec, rows, references, args.out or args.render_from)}


def curves(args: argparse.Namespace) -> int:
    try:
        summary = storage.read_json(args.curves)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON
        raise SweepError(f"--curves {args.curves}: cannot read an experiments results.json "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(summary, dict) or not (isinstance(summary.get("results"), list)
                                             or isinstance(summary.get("records"), list)):
        raise SweepError(f"--curves {args.curves}: not an experiments results.json (no 'records' list)")
    fractions = sorted({r["fraction"] for r in crossings.results(summary)})
    if args.curves_fraction is not None and args.curves_fraction not in fractions:
        raise SweepError(f"--curves-fraction: {args.curves_fraction:g} was not run; the file has "
                         f"{', '.join(f'{f:g}' for f in fractions)}")
    out = args.out or (args.curves.rsplit("/", 1)[0] if "/" in args.curves else ".")
    analysis = crossings.analyse(summary, args.curves_fraction)
    for name, png in crossings.plots(summary, analysis).items():
        storage.write_bytes(storage.join(out, name), png)
        print(f"  {name}: {storage.join(out, name)}")
    storage.write_json(storage.join(out, "curves.json"), analysis)
    text = crossings.markdown(summary, analysis)
    storage.write_bytes(storage.join(out, "curves.md"), text.encode())
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.curves and not args.render_from:
            return curves(args)
        if not args.sweep_file:
            raise SweepError("name a sweep file (e.g. tune/temperature.yaml), or pass --curves RESULTS_JSON")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise SweepError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
        overrides = list(args.overrides) + ([f"storage_path={args.storage_path}"] if args.storage_path else [])
        spec = load_spec(args.sweep_file, overrides)
        out = render(args, spec) if args.render_from else \
            run_sweep(spec, resume=args.resume, retry_failed=args.retry_failed, dry_run=args.dry_run,
                      max_concurrent=args.max_concurrent, ray_address=args.ray_address)
    except (ConfigError, DatasetError, storage.StorageError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunError) else 2
    if args.dry_run:
        return 0
    rows = out["rows"]
    print("\n" + table_markdown(spec, rows, out["references"]))
    print("results:")
    for name, where in out["files"].items():
        print(f"  {name}: {where}")
    failed = [r for r in rows if r["status"] != "OK"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trial(s) failed (see the error column)")
    return 1 if rows and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
