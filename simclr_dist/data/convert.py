"""``python -m simclr_dist.data.convert``: write a dataset split to FFCV ``.beton`` file(s).

The command: flags, the plan, the report. The writing lives in :mod:`simclr_dist.data.ffcv.convert`; what is
here besides the flags is the upload of a URI output (``s3://...``, ``gs://...``) through the storage layer, which
the data layer may not import.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from functools import partial

from simclr_dist.console import CommandParser, Progress
from simclr_dist.data.datasets import DATASETS, DatasetError, dataset_info
from simclr_dist.data.ffcv.convert import SMART_THRESHOLD, WRITE_MODES, ConvertSpec, convert

UPLOAD_CHUNK = 64 << 20


def upload(out: str, local_files: list[str], progress: str | None = None) -> list[str]:
    """Stream finished files next to ``out``'s URI; on a filesystem write a temporary sibling and move it into place
    (an object-store put is atomic already). Returns the URIs. A large dataset's upload is a wait of its own, so it
    shows progress in bytes (``progress``: the display mode, ``"off"`` for ``--no-progress``)."""
    import pyarrow.fs as pafs

    from simclr_dist import storage

    uris = []
    size = sum(os.path.getsize(f) for f in local_files)
    with Progress(size, f"upload -> {out.rsplit('/', 1)[0]}", unit="B", unit_scale=True, mode=progress) as bar:
        for local in local_files:
            uri = storage.join(out.rsplit("/", 1)[0], os.path.basename(local))
            fs, path = storage.resolve(uri)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            local_fs = isinstance(fs, pafs.LocalFileSystem)
            target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local_fs else path
            with open(local, "rb") as src, fs.open_output_stream(target) as dst:
                while chunk := src.read(UPLOAD_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
            if local_fs:
                fs.move(target, path)
            uris.append(uri)
    return uris


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m simclr_dist.data.convert",
                                description="Write a dataset split to FFCV .beton file(s).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--split", default=None, help="split to convert (default: the dataset's pretraining split)")
    p.add_argument("--data-root", default=None, help="directory holding the dataset (not needed for digits)")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10/cifar100/stl10")
    p.add_argument("--out", required=True, help="output PATH.beton (local path or s3://... / gs://... URI)")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="downscale so the longest side is at most this (e.g. 256-512 for ImageNet); default: keep")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize in-memory datasets (digits, CIFAR, STL-10) at load, as the torch path does with the "
                        "same pretraining flag; file-based datasets keep their size (see --max-resolution)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for jpg/smart")
    p.add_argument("--write-mode", default="smart", choices=WRITE_MODES,
                   help=f"raw pixels, JPEG, or smart (JPEG only above {SMART_THRESHOLD} raw bytes)")
    p.add_argument("--num-workers", type=int, default=0, help="writer processes (0: all usable CPUs)")
    p.add_argument("--shards", type=int, default=1, help="write N files in parallel: PATH-0000k-of-0000N.beton")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="skip unreadable images (and report how many) instead of failing")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress display (by default: a bar on a terminal, a plain line every 10 s otherwise; "
                        "$SIMCLR_DIST_PROGRESS=bar|lines|off|auto overrides)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        split = ns.split or dataset_info(ns.dataset).pretrain_split
        spec = ConvertSpec(dataset=ns.dataset, split=split, out=ns.out, data_root=ns.data_root,
                           download=ns.download, max_resolution=ns.max_resolution, image_size=ns.image_size,
                           jpeg_quality=ns.jpeg_quality,
                           write_mode=ns.write_mode, num_workers=ns.num_workers, shards=ns.shards,
                           skip_corrupt=ns.skip_corrupt, progress=ns.progress)
        result = convert(spec, upload=partial(upload, spec.out, progress=None if ns.progress else "off"))
    except DatasetError as e:  # ConvertError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be written (a read-only or virtual filesystem, a missing directory)
        print(f"error: --out {ns.out}: cannot write there ({e.strerror or type(e).__name__})", file=sys.stderr)
        return 2
    for f in result.files:
        print(f)
    if result.skipped:
        i, name, reason = result.skipped[0]
        print(f"skipped {len(result.skipped)} unreadable image(s), e.g. {name} (index {i}): {reason}", file=sys.stderr)
    print(f"wrote {result.num_samples} samples to {len(result.files)} file(s) in {result.seconds:.1f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
