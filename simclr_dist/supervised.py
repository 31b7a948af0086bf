"""``python -m simclr_dist.supervised``: the SimCLR network trained with labels, under Ray Train like pretraining.

Why this exists: the project's question is whether self-supervised pretraining beats plain supervised training on
the same (few) labels, so the baseline is *the same network* (encoder + a linear classifier) trained on *the same
class-balanced label subset* (``--fraction``, ``--subset-seed``), scaled the same way as pretraining: a
``TorchTrainer`` with DDP over the workers, a checkpoint per epoch in ``STORAGE/NAME``, resume by rerunning.
``--init-checkpoint`` starts from a SimCLR checkpoint's encoder (fine-tuning, the very same loop);
``--init-pretrained FORMAT:PATH_OR_URI`` from an imported encoder; ``--no-ray`` runs the loop in this process.
``--steps`` fixes the number of updates whatever the label count; ``--val-split K`` is a model-selection run that
holds out part of the subset, reports on it and never reads the test split.

This module is the command: flags and the summary line; the run is planned and driven by
:mod:`simclr_dist.run.jobs.classify_job` and trained by the one loop, :mod:`simclr_dist.run.train.classify_loop`.
"""

from __future__ import annotations

import sys

from simclr_dist.config import parse_into
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist import storage
from simclr_dist.run.jobs.classify_job import RESULTS_FILE, run_classifier
from simclr_dist.run.jobs.failure import FAILURES, fail


def parse_args(argv: list[str] | None = None) -> SupervisedConfig:
    return parse_into(SupervisedConfig, argv, "python -m simclr_dist.supervised",
                      "Supervised baseline (or SimCLR fine-tuning with --init-checkpoint, or fine-tuning an imported "
                      "encoder with --init-pretrained) of the SimCLR network on a class-balanced label fraction, "
                      "under Ray Train.", one_line=True)


def main(argv: list[str] | None = None) -> int:
    try:
        result = run_classifier(parse_args(argv))  # flag errors are ConfigErrors: one line, exit 2
    except FAILURES as e:
        return fail(e)
    p = result["params"]
    score = (f"validation top-1 {result['val_top1']:.4f} (split {p['val_split']}; the test split was not read)"
             if p["val_split"] is not None else f"test top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    print(f"\n{result['arm']} on {result['label_count']} labels ({result['label_fraction']:g}): {score} after "
          f"{p['steps']} steps ({result['epochs_done']} epochs, {result['train_time_s']:.0f}s training, "
          f"{result['wall_time_s']:.0f}s wall); results in {storage.join(result['run'], RESULTS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
