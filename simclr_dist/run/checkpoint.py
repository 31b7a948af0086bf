"""Find the complete checkpoints of a run in shared storage (local/NFS, s3://, gs://) without ever reading a
half-written one.

A run directory ``STORAGE/NAME/`` holds Ray's ``checkpoint_<timestamp>/`` directories. :func:`save_checkpoint`
writes ``checkpoint.pt`` and then ``manifest.json`` (checksum, size, epoch) into a local temporary directory, but
Ray uploads that directory with ``pyarrow.fs.copy_files``, which copies files in no fixed order (in parallel on a
filesystem, non-atomically). So in storage a manifest can appear before ``checkpoint.pt`` is complete, and the
manifest itself can be half-copied. A checkpoint is therefore *complete* only when its manifest parses and
``checkpoint.pt`` has the manifest's byte count; :func:`load_checkpoint` then verifies the checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from simclr_dist.config import ARCH_FIELDS
from simclr_dist.run import storage
from simclr_dist.run.chaos import chaos_once

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

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


def save_checkpoint(directory: str, state: dict[str, Any]) -> str:
    """Write ``checkpoint.pt`` then a manifest with its checksum; the manifest is written last, so a
    directory without a matching manifest is incomplete and :func:`load_checkpoint` refuses it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    storage.write_bytes(os.path.join(directory, CHECKPOINT_FILE), data)
    cfg = state["config"]
    manifest = {"format_version": FORMAT_VERSION, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "epoch": state["epoch"], "step": state["step"], "arch": {k: cfg.get(k) for k in ARCH_FIELDS},
                "dataset": cfg.get("dataset"), "history": state.get("history", [])}
    storage.write_json(os.path.join(directory, MANIFEST_FILE), manifest)
    return directory


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint directory (local path or URI)."""
    manifest_uri, ckpt_uri = storage.join(directory, MANIFEST_FILE), storage.join(directory, CHECKPOINT_FILE)
    if not storage.exists(manifest_uri):
        raise ValueError(f"{directory}: incomplete checkpoint (no {MANIFEST_FILE}); it was not fully written")
    manifest = storage.read_json(manifest_uri)
    data = storage.read_bytes(ckpt_uri)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"{ckpt_uri}: checksum mismatch with {MANIFEST_FILE}; the checkpoint is corrupt")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def make_uploader(run_uri: str, *, kill_in_upload_epoch: int = -1):
    """Ray Train ``checkpoint_upload_fn``: upload ``checkpoint.pt`` first and ``manifest.json`` last.

    Ray's default upload (``pyarrow.fs.copy_files``) copies files in no particular order, so a crash mid-upload
    could leave a manifest beside half the weights. With this order, a directory in storage that has a manifest
    is complete (and the manifest's checksum proves it); Ray itself only registers the directory for resume
    after this function returns. ``kill_in_upload_epoch`` is the ``--chaos-kill-in-upload`` drill.
    """
    def upload(checkpoint, dir_name: str):
        import ray.train

        dest = storage.join(run_uri, dir_name)
        names = sorted(os.listdir(checkpoint.path), key=lambda n: n == MANIFEST_FILE)  # manifest last
        for name in names:
            with open(os.path.join(checkpoint.path, name), "rb") as f:
                data = f.read()
            if name == CHECKPOINT_FILE and kill_in_upload_epoch == _epoch_of(checkpoint.path):
                half = data[: len(data) // 2]
                chaos_once(run_uri, "upload", lambda: storage.write_bytes(storage.join(dest, name), half))
            storage.write_bytes(storage.join(dest, name), data)
        fs, path = storage.resolve(dest)
        return ray.train.Checkpoint(path=path, filesystem=fs)
    return upload


def _epoch_of(local_dir: str) -> int:
    with open(os.path.join(local_dir, MANIFEST_FILE)) as f:
        return json.load(f)["epoch"]
