"""``python -m simclr_dist.results RESULTS_JSON``: redraw a study's report and the README's results block from its
``results.json`` alone (no training, no data): ``--render DIR`` writes report.md, results.csv and the plots;
``--readme README.md`` rewrites the block between the results markers; ``--check`` changes nothing and exits 1 when
the README's block is not what the file gives (the test suite runs it on the committed study).
"""

from __future__ import annotations

import os
import sys

from simclr_dist.console import CommandParser, emit
from simclr_dist.report.readme_table import readme_table, replace_block
from simclr_dist.report.results_file import read_results
from simclr_dist.run.studies.experiment_run import write_outputs


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m simclr_dist.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="an experiments results.json (path or URI)")
    parser.add_argument("--render", metavar="DIR", help="write report.md, results.csv and the plots into DIR")
    parser.add_argument("--readme", metavar="PATH", help="the README whose results block this file fills")
    parser.add_argument("--check", action="store_true", help="with --readme: only compare, exit 1 if it differs")
    parser.add_argument("--restat", action="store_true",
                        help="recompute the rows and declared tests from the records with this version's statistics "
                             "(reads the dataset's test labels; writes the file back when --render is its folder)")
    args = parser.parse_args(argv)
    try:
        summary = read_results(args.results)
        if args.restat:
            from simclr_dist.config import PretrainConfig
            from simclr_dist.report.experiments import restat
            from simclr_dist.run.train.evaluation import load_eval_data

            data = load_eval_data(PretrainConfig(dataset=summary["dataset"], image_size=summary["image_size"]).resolved())
            summary = restat(summary, data.test_labels(), data.num_classes)
        if args.render:
            write_outputs(args.render, summary)
            emit(f"[results] report, table and plots of {args.results} in {args.render}")
        if args.readme:
            with open(args.readme, encoding="utf-8") as f:
                text = f.read()
            # the file as the README links it (relative to the README), whatever directory this runs from
            source = os.path.relpath(os.path.abspath(args.results), os.path.dirname(os.path.abspath(args.readme)))
            new = replace_block(text, readme_table(summary, source), args.readme)
            if args.check:
                if new != text:
                    print(f"error: {args.readme}: its results block differs from {args.results}; regenerate it with "
                          f"python -m simclr_dist.results {args.results} --readme {args.readme}", file=sys.stderr)
                    return 1
                emit(f"[results] {args.readme} agrees with {args.results}")
            elif new != text:
                with open(args.readme, "w", encoding="utf-8") as f:
                    f.write(new)
                emit(f"[results] {args.readme}: results block regenerated from {args.results}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
