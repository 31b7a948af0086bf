"""Checkpoints of a run in shared storage (local/NFS, s3://, gs://): their format, how they are written without
stalling training, and how they are read without trusting them.

- **Complete or ignored.** A run directory ``STORAGE/NAME/`` holds Ray's ``checkpoint_<timestamp>/`` directories.
  ``checkpoint.pt`` is uploaded first and ``manifest.json`` (checksum, size, epoch, step) last, by our own
  uploader, because Ray's default copy has no order. A checkpoint is *complete* only when its manifest parses and
  ``checkpoint.pt`` has the manifest's byte count; :func:`load_checkpoint` then verifies the checksum.
- **Data, not code.** A checkpoint is read with ``torch.load(weights_only=True)``: one from shared storage (or
  ``--pretrained simclr-dist:s3://...`` of someone else's run) cannot run code on the reader; the checksum proves
  completeness, not origin. So the state holds only tensors, containers, numbers and strings (:func:`plain`).
- **Training waits for a copy, not an upload.** :class:`AsyncCheckpointer` copies the state to CPU memory (the
  only part the step waits for) and hands it to Ray's asynchronous upload thread, which serialises and uploads it
  (manifest last) while training goes on; Ray registers checkpoints in report order.
- **Storage faults.** Each file of an upload is retried with backoff (:func:`simclr_dist.storage.retry`) while the
  store is away, so an outage shorter than the budget costs a late checkpoint, not the run; one that outlasts it,
  or a full disk (not retried), ends the run in one line naming the checkpoint that was not saved and the last
  complete one, which stays intact (the failed directory never gets a manifest; its partial files are removed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow.fs as pafs
import torch

from simclr_dist.config import ARCH_FIELDS
from simclr_dist import storage
from simclr_dist.console import emit
from simclr_dist.run.store.chaos import chaos_once

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"
# 1: epoch-end checkpoints (commit 1af4297 on). 2: adds the position inside an epoch ("batch") and the epoch's
# partial loss sums, so a resume continues mid-epoch; version 1 files load as epoch-end checkpoints.
FORMAT_VERSION = 2

CHECKPOINT_PREFIX = "checkpoint_"


class CheckpointError(ValueError):
    """A checkpoint that must not or cannot be loaded (incomplete, corrupt, unsafe); one line naming the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding pickled objects (anything but data): refused by ``weights_only=True``, never retried."""


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint directory and the facts its manifest gives without loading the weights."""

    uri: str
    name: str
    epoch: int  # epochs completed
    step: int   # optimizer steps done
    manifest: dict[str, Any]

    @property
    def batch(self) -> int:
        """Batches done of epoch ``epoch + 1`` (0: an epoch-end checkpoint)."""
        return int(self.manifest.get("batch", 0))


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
    """Complete ``checkpoint_*`` directories of a run, oldest first (by step, then name).

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
    return sorted(refs, key=lambda r: (r.step, r.epoch, r.name))


def latest_checkpoint(run_uri: str) -> str | None:
    """URI of the run's complete checkpoint with the most steps, or ``None`` when it has none."""
    refs = list_complete_checkpoints(run_uri)
    return refs[-1].uri if refs else None


# ---------------------------------------------------------------------------- the pretraining state: its schema
@dataclass
class PretrainState:
    """Everything a pretraining checkpoint holds (``checkpoint.pt``), the one schema the loop writes and a resume
    reads. Format 2; a format-1 file lacks the fields after ``history`` and reads with their defaults.

    Position: ``epoch`` epochs completed, then ``batch`` batches of the next one, ``step`` steps in all.
    ``epoch_loss_sums``: the running loss sum of that epoch on every rank (rank order), so a mid-epoch resume
    reports the epoch's mean loss as an uninterrupted run would. ``init_knn``: the kNN baseline of the
    initial encoder, still to be reported with the first epoch's metrics.
    """

    model: dict[str, Any]            # SimCLRModel.state_dict() (encoder.* and head.*)
    optimizer: dict[str, Any]
    scaler: dict[str, Any]           # GradScaler (empty when fp16 is off)
    config: dict[str, Any]           # PretrainConfig.to_dict() of the run
    epoch: int
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per finished epoch
    batch: int = 0
    steps_per_epoch: int | None = None
    schedule: dict[str, Any] | None = None  # WarmupCosine.state_dict()
    epoch_loss_sums: list[torch.Tensor] | None = None
    init_knn: dict[str, float] = field(default_factory=dict)
    tracking: dict[str, str] = field(default_factory=dict)  # {"mlflow_run_id": ...}: a resume continues that run
    online_probe: dict[str, Any] = field(default_factory=dict)  # --online-probe: its head and optimizer state
    format_version: int = FORMAT_VERSION

    REQUIRED = ("model", "optimizer", "scaler", "config", "epoch", "step")

    def to_dict(self) -> dict[str, Any]:
        """The dict ``checkpoint.pt`` stores (shallow: tensors are not copied here; the saver copies once)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any], where: str = "checkpoint") -> PretrainState:
        """The typed state of a loaded ``checkpoint.pt``; :class:`CheckpointError` naming the missing field."""
        missing = [k for k in cls.REQUIRED if k not in state]
        if missing:
            raise CheckpointError(f"{where}: not a pretraining checkpoint (no {', '.join(missing)})")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in state.items() if k in known}
        kw.setdefault("format_version", 1)
        return cls(**kw)


# ---------------------------------------------------------------------------- the state: data only
def plain(obj: Any, *, copy: bool = False, where: str = "state") -> Any:
    """``obj`` as ``torch.load(weights_only=True)`` reads it back: tensors (on CPU, cloned when ``copy``), dicts,
    lists, tuples, numbers, strings, None. numpy scalars/arrays become Python numbers/tensors; any other object
    raises ``TypeError`` naming its key path, so a state that could not be resumed fails when it is *saved*."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if copy else t.cpu()
    if isinstance(obj, dict):
        return {k: plain(v, copy=copy, where=f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, copy=copy, where=f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if type(obj).__module__ == "numpy":  # np.float64 from a metric (a float subclass), an np.ndarray of indices
        return obj.item() if getattr(obj, "ndim", 0) == 0 else torch.as_tensor(obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.Size)):
        return obj
    raise TypeError(f"checkpoint {where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be saved "
                    "(checkpoints hold tensors, containers, numbers and strings only, to load with weights_only=True)")


def save_checkpoint(directory: str, state: dict[str, Any]) -> str:
    """Write ``checkpoint.pt`` then a manifest with its checksum; the manifest is written last, so a
    directory without a matching manifest is incomplete and :func:`load_checkpoint` refuses it."""
    buf = io.BytesIO()
    torch.save(plain(state), buf)
    data = buf.getvalue()
    storage.write_bytes(os.path.join(directory, CHECKPOINT_FILE), data)
    cfg = state["config"]
    manifest = {"format_version": state.get("format_version", FORMAT_VERSION),
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "epoch": state["epoch"], "step": state["step"], "batch": state.get("batch", 0),
                "epochs": cfg.get("epochs"), "steps_per_epoch": state.get("steps_per_epoch"),
                "arch": {k: cfg.get(k) for k in ARCH_FIELDS}, "dataset": cfg.get("dataset"),
                "history": plain(state.get("history", []))}
    storage.write_json(os.path.join(directory, MANIFEST_FILE), manifest)
    return directory


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint directory (local path or URI); :class:`CheckpointError` in one line when it
    is incomplete, corrupt, from a newer format, or holds anything but data (``weights_only=True``)."""
    manifest_uri, ckpt_uri = storage.join(directory, MANIFEST_FILE), storage.join(directory, CHECKPOINT_FILE)
    if not storage.exists(manifest_uri):
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {MANIFEST_FILE}); it was not fully written")
    manifest = storage.read_json(manifest_uri)
    if int(manifest.get("format_version", 1)) > FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {manifest['format_version']} is newer than this "
                              f"simclr-dist reads ({FORMAT_VERSION}); upgrade simclr-dist")
    data = storage.read_bytes(ckpt_uri)
    if len(data) != manifest.get("bytes", len(data)):
        raise CheckpointError(f"{ckpt_uri}: truncated ({len(data):,} of {manifest['bytes']:,} bytes in "
                              f"{MANIFEST_FILE}); the checkpoint is incomplete")
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CheckpointError(f"{ckpt_uri}: checksum mismatch with {MANIFEST_FILE}; the checkpoint is corrupt")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{ckpt_uri}: refused to load: {_refusal(e)}") from None
    except RuntimeError as e:  # not a torch zip/pickle at all
        raise CheckpointError(f"{ckpt_uri}: not a torch checkpoint ({str(e).strip().splitlines()[0]})") from None


def _refusal(e: Exception) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"a pickled {m.group(1)} object" if m else "something other than tensors and containers"
    return (f"it holds {what}, which could run code; checkpoints are read with weights_only=True "
            "(tensors, containers, numbers and strings)")


# ---------------------------------------------------------------------------- writing: ordered, in the background
def make_uploader(run_uri: str, *, state: dict[str, Any] | None = None, kill_in_upload_epoch: int = -1,
                  done: threading.Event | None = None, previous: str | None = None,
                  saved: Callable[[str], None] | None = None, log: Callable[[str], None] = emit):
    """Ray Train ``checkpoint_upload_fn``: (serialise ``state`` into the local directory, when given, then)
    upload ``checkpoint.pt`` first and ``manifest.json`` last.

    Ray's default upload (``pyarrow.fs.copy_files``) copies files in no particular order, so a crash mid-upload
    could leave a manifest beside half the weights. With this order, a directory in storage that has a manifest
    is complete (and the manifest's checksum proves it); Ray itself only registers the directory for resume
    after this function returns. Each file is retried with backoff while storage is away; when it cannot be
    written (budget spent, disk full) the partial directory is removed and one :class:`StorageError` line names
    this checkpoint and ``previous`` (the last one saved, which is intact). ``kill_in_upload_epoch`` is the
    ``--chaos-kill-in-upload`` drill (epoch-end checkpoints only); ``done`` is set when the function ends,
    however it ends; ``saved(dir_name)`` is called once the manifest is in storage.
    """
    def upload(checkpoint, dir_name: str):
        import ray.train

        try:
            if state is not None and not os.path.exists(os.path.join(checkpoint.path, MANIFEST_FILE)):
                save_checkpoint(checkpoint.path, state)  # in Ray's upload thread: training goes on meanwhile
            dest = storage.join(run_uri, dir_name)
            epoch, batch, step = _position_of(checkpoint.path)
            names = sorted(os.listdir(checkpoint.path), key=lambda n: n == MANIFEST_FILE)  # manifest last
            try:
                for name in names:
                    with open(os.path.join(checkpoint.path, name), "rb") as f:
                        data = f.read()
                    if name == CHECKPOINT_FILE and (epoch, batch) == (kill_in_upload_epoch, 0):
                        half = data[: len(data) // 2]
                        chaos_once(run_uri, "upload", lambda: storage.write_bytes(storage.join(dest, name), half))
                    target = storage.join(dest, name)
                    storage.retry(lambda: storage.write_bytes(target, data), f"checkpoint upload {target}", log=log)
            except OSError as e:
                raise _not_saved(e, dest, step, previous) from e
            if saved is not None:
                saved(dir_name)
            fs, path = storage.resolve(dest)
            return ray.train.Checkpoint(path=path, filesystem=_ray_storage_fs() or fs)
        finally:
            if done is not None:
                done.set()
    return upload


def _ray_storage_fs() -> pafs.FileSystem | None:
    """The filesystem Ray Train was given for this run (a retrying one for object stores: launch.fit), so the
    checkpoint this uploader returns is on it, as Ray requires; None outside a Ray Train worker."""
    try:
        import ray.train

        return ray.train.get_context().get_storage().storage_filesystem
    except Exception:  # not in a Ray Train worker (the drills, a --no-ray run)
        return None


def _not_saved(e: OSError, dest: str, step: int, previous: str | None) -> storage.StorageError:
    """The one line a failed upload ends the run with; removes the partial directory (it has no manifest, so it
    was never complete) where storage still answers, so a full disk gets back what the failed save took."""
    try:
        fs, path = storage.resolve(dest)
        fs.delete_dir(path)
    except Exception:  # storage away: the directory has no manifest, readers skip it
        pass
    if previous is None:  # the first save of this attempt: the run's newest complete one, if storage answers
        try:
            previous = latest_checkpoint(dest.rstrip("/").rsplit("/", 1)[0])
            previous = previous.rstrip("/").rsplit("/", 1)[-1] if previous else None
        except Exception:
            previous = None
    kept = (f"the previous checkpoint {previous} is intact and a rerun resumes from it" if previous else
            "no complete checkpoint of this run is known; a rerun resumes from the newest complete one, if any")
    cls = storage.StorageFullError if storage.is_permanent(e) else storage.StorageError
    return cls(f"checkpoint at step {step} not saved ({storage.reason(e)}); {kept}")


def _position_of(local_dir: str) -> tuple[int, int, int]:
    """(epoch, batch, step) of a locally serialised checkpoint, from its manifest."""
    with open(os.path.join(local_dir, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    return manifest["epoch"], manifest.get("batch", 0), manifest["step"]


class AsyncCheckpointer:
    """Report a checkpoint to Ray Train while training goes on (every rank calls :meth:`report` together).

    Rank 0 copies the state to CPU memory (what the step waits for), then Ray's single upload thread
    (``CheckpointUploadMode.ASYNC``) serialises it, uploads it with :func:`make_uploader` and registers it, in
    report order. Ray's controller takes one report per worker per poll (every 2 s), so uploads can fall behind
    a short interval: :meth:`busy` says so, and the loop then defers a step/time checkpoint to the next step
    rather than wait; a save that must happen now (an epoch end) waits for the previous upload, counted in the
    blocked time. At most two snapshots are in memory.
    """

    def __init__(self, run_uri: str, rank: int, *, kill_in_upload_epoch: int = -1):
        self.run_uri, self.rank, self.kill_in_upload_epoch = run_uri, rank, kill_in_upload_epoch
        self._inflight: threading.Event | None = None
        self.blocked_s: list[float] = []  # per save (rank 0): how long the training thread was held
        self.last_saved: str | None = None  # the newest checkpoint this attempt put in storage (named on failure)

    def _saved(self, dir_name: str) -> None:
        self.last_saved = dir_name

    def busy(self) -> bool:
        """Rank 0's previous checkpoint is still being serialised/uploaded (always False on other ranks)."""
        return self._inflight is not None and not self._inflight.is_set()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> float:
        """``ray.train.report`` with an asynchronous checkpoint of ``state`` (rank 0; ``None`` elsewhere, and for a
        metrics-only report). Returns the seconds this call held the training thread."""
        import ray.train

        t0 = time.perf_counter()
        ckpt, upload = None, None
        if self.rank == 0 and state is not None:
            if self._inflight is not None:
                self._inflight.wait()
            snapshot = plain(state, copy=True)
            local = tempfile.mkdtemp(prefix="simclr-ckpt-")
            self._inflight = threading.Event()
            ckpt = ray.train.Checkpoint.from_directory(local)
            upload = make_uploader(self.run_uri, state=snapshot, kill_in_upload_epoch=self.kill_in_upload_epoch,
                                   done=self._inflight, previous=self.last_saved, saved=self._saved)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_fn=upload,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        blocked = time.perf_counter() - t0
        if ckpt is not None:
            self.blocked_s.append(blocked)
        return blocked
