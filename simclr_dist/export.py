"""``simclr-export RUN_OR_CHECKPOINT --format simclr-dist|torchvision|onnx|torchscript --out PATH``: an encoder
leaves the project.

SOURCE is a pretraining run directory (its newest complete checkpoint) or a checkpoint directory, a local path or
``s3://``/``gs://`` URI. Nothing existing is overwritten.

- ``simclr-dist`` publishes it (network + config + history, no optimizer, SHA-256 pinned in ``SHA256SUMS`` beside
  OUT, a model card): load it with ``--pretrained simclr-dist:OUT``.
- ``torchvision`` writes the encoder's state dict under torchvision's names, ``OUT.safetensors`` (safetensors, the
  input contract in its header) or ``OUT.pt``/``.pth`` (torch.save): ``m = torchvision.models.resnet50();
  m.fc = torch.nn.Identity(); m.load_state_dict(safetensors.torch.load_file(OUT), strict=True)``; refused in one
  line for a network torchvision does not build (width other than 1, the CIFAR stem).
- ``onnx`` (``OUT.onnx``, opset 17, dynamic batch axis) and ``torchscript`` (``OUT.pt``/``.ts``) hold any encoder.

Every export but ``simclr-dist`` is loaded back by its consumer (torchvision, onnxruntime, ``torch.jit.load``) and
run on real test images before it is written; features that differ from the encoder's beyond the tolerance refuse
the export. Beside OUT, ``OUT.json`` gives the input contract (image size, mean/std), the SHA-256 and the parity.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from simclr_dist import storage
from simclr_dist.config import PretrainedError
from simclr_dist.console import CommandParser, emit
from simclr_dist.data.datasets import DatasetError
from simclr_dist.run.store.checkpoint import CheckpointError
from simclr_dist.run.store.interchange import PARITY_IMAGES, export_encoder
from simclr_dist.run.store.publish import PublishError, publish

FORMATS = ("simclr-dist", "torchvision", "onnx", "torchscript")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="simclr-export", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("source", help="a pretraining run directory or checkpoint directory (path, s3://, gs://)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="simclr-dist (published, pinned), torchvision (state dict), onnx or torchscript")
    p.add_argument("--out", required=True,
                   help="simclr-dist: a new directory; torchvision: FILE.safetensors or FILE.pt; onnx: FILE.onnx; "
                        "torchscript: FILE.pt or FILE.ts")
    p.add_argument("--parity-images", type=int, default=PARITY_IMAGES,
                   help=f"real test images the export must reproduce the encoder's features on (default: "
                        f"{PARITY_IMAGES})")
    p.add_argument("--data-root", default=None,
                   help="where the encoder's dataset lives, for the parity images (default: the run's; the "
                        "embedded digits when it cannot be read)")
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
            emit(f"published {facts['arch']} x{facts['width']:g} ({facts['epochs_trained']} epochs on "
                 f"{facts['dataset']}) to {args.out}\n  sha256 {facts['sha256']}\n  load with: --pretrained "
                 f"{shlex.quote('simclr-dist:' + args.out)}")
            return 0
        done = export_encoder(args.source, args.format, args.out, parity_n=args.parity_images,
                              data_root=args.data_root)
    except json.JSONDecodeError as e:
        print(f"error: --evaluation: not JSON ({e})", file=sys.stderr)
        return 2
    except (PublishError, CheckpointError, PretrainedError, DatasetError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = done.facts
    emit(f"wrote {done.out}: {done.detail}\n"
         f"  encoder: {f.arch} width {f.width:g}x ({'CIFAR' if f.cifar_stem else 'ImageNet'} stem), {f.feat_dim}-d "
         f"features, from {f.checkpoint}\n"
         f"  input: float32 (N, 3, {f.image_size}, {f.image_size}), (pixels / 255 - mean) / std with mean "
         f"{list(f.mean)} std {list(f.std)}\n"
         f"  parity with the PyTorch encoder: {done.parity.text()}\n"
         f"  sha256 {done.sha256}; input contract and parity in {done.sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
