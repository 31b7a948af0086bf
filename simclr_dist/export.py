"""``python -m simclr_dist.export SOURCE --format simclr-dist|torchvision --out PATH``: an encoder leaves the project.

SOURCE is a pretraining run directory (its newest complete checkpoint) or a checkpoint directory, a local path or
``s3://``/``gs://`` URI. ``simclr-dist`` publishes it (network + config + history, no optimizer, SHA-256 pinned in
``SHA256SUMS`` beside OUT, a model card): load it with ``--pretrained simclr-dist:OUT``. ``torchvision`` writes the
encoder's state dict under torchvision's names: ``m = torchvision.models.resnet50(); m.fc = torch.nn.Identity();
m.load_state_dict(torch.load(OUT), strict=True)``. Nothing existing is overwritten.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys

import torch

from simclr_dist.console import CommandParser
from simclr_dist import storage
from simclr_dist.config import PretrainedError
from simclr_dist.run.store.checkpoint import CheckpointError
from simclr_dist.run.store.publish import PublishError, publish, torchvision_state_dict

FORMATS = ("simclr-dist", "torchvision")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="python -m simclr_dist.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a pretraining run directory or checkpoint directory (path, s3://, gs://)")
    p.add_argument("--format", required=True, choices=FORMATS, help="simclr-dist (published) or torchvision")
    p.add_argument("--out", required=True, help="the new directory (simclr-dist) or file (torchvision)")
    p.add_argument("--command", default="", help="simclr-dist: the command that trained it, for the model card")
    p.add_argument("--evaluation", default=None,
                   help="simclr-dist: a JSON object of evaluation results for the model card, "
                        "e.g. '{\"knn_top1\": 0.8}'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "simclr-dist":
            evaluation = json.loads(args.evaluation) if args.evaluation else None
            facts = publish(args.source, args.out, command=args.command, evaluation=evaluation)
            print(f"published {facts['arch']} x{facts['width']:g} ({facts['epochs_trained']} epochs on "
                  f"{facts['dataset']}) to {args.out}\n  sha256 {facts['sha256']}\n  load with: --pretrained "
                  f"{shlex.quote('simclr-dist:' + args.out)}")
        else:
            if storage.exists(args.out):
                raise PublishError(f"{args.out}: exists; nothing is overwritten")
            state, arch = torchvision_state_dict(args.source)
            buf = io.BytesIO()
            torch.save(state, buf)
            storage.write_bytes(args.out, buf.getvalue())
            print(f"wrote {len(state)} tensors to {args.out}: torchvision.models.{arch}() with fc = Identity loads "
                  "it with strict=True")
    except json.JSONDecodeError as e:
        print(f"error: --evaluation: not JSON ({e})", file=sys.stderr)
        return 2
    except (PublishError, CheckpointError, PretrainedError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
