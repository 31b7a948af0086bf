"""Find the complete checkpoints of a run in shared storage (local/NFS, s3://, gs://) without ever reading a
half-written one.

A run directory ``STORAGE/NAME/`` holds Ray's ``checkpoint_<timestamp>/`` directories. ``train.save_checkpoint``
writes ``checkpoint.pt`` and then ``manifest.json`` (checksum, size, epoch) into a local temporary directory, but
Ray uploads that directory with ``pyarrow.fs.copy_files``, which copies files in no fixed order (in parallel on a
filesystem, non-atomically). So in storage a manifest can appear before ``checkpoint.pt`` is complete, and the
manifest itself can be half-copied. A checkpoint is therefore *complete* only when its manifest parses and
``checkpoint.pt`` has the manifest's byte count; ``train.load_checkpoint`` then verifies the checksum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from simclr_dist import storage
from simclr_dist.train import CHECKPOINT_FILE, MANIFEST_FILE

CHECKPOINT_PREFIX = "checkpoint_"


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint directory and the facts its manifest gives without loading the weights."""

    uri: str
    name: str
    epoch: int
    step: int
    manifest: dict[str, Any]


def read_complete(checkpoint_uri: str) -> CheckpointRef | None:
    """The checkpoint's reference if it is completely written, else ``None`` (missing, or still being copied)."""
    fs, path = storage.resolve(checkpoint_uri)
    return _complete(fs, path, checkpoint_uri)


def _complete(fs: pafs.FileSystem, path: str, uri: str) -> CheckpointRef | None:
    manifest_info, ckpt_info = fs.get_file_info([f"{path}/{MANIFEST_FILE}", f"{path}/{CHECKPOINT_FILE}"])
    if manifest_info.type != pafs.FileType.File or ckpt_info.type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(manifest_info.path) as f:
            manifest = json.loads(f.read())
        epoch, step, size = int(manifest["epoch"]), int(manifest["step"]), manifest["bytes"]
    except (FileNotFoundError, ValueError, TypeError, KeyError):  # deleted meanwhile, or a half-copied manifest
        return None
    if ckpt_info.size != size:  # checkpoint.pt still being copied
        return None
    return CheckpointRef(uri, uri.rstrip("/").rsplit("/", 1)[-1], epoch, step, manifest)


def list_complete_checkpoints(run_uri: str) -> list[CheckpointRef]:
    """Complete ``checkpoint_*`` directories of a run, oldest first (by epoch, then step, then name).

    A run directory that does not exist (yet) has no checkpoints: a watcher may start before training does.
    """
    fs, path = storage.resolve(run_uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return []
    refs = []
    for entry in entries:
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX):
            ref = _complete(fs, entry.path, storage.join(run_uri, entry.base_name))
            if ref is not None:
                refs.append(ref)
    return sorted(refs, key=lambda r: (r.epoch, r.step, r.name))


def latest_checkpoint(run_uri: str) -> str | None:
    """URI of the run's complete checkpoint with the highest epoch, or ``None`` when it has none."""
    refs = list_complete_checkpoints(run_uri)
    return refs[-1].uri if refs else None
