"""Shared storage through pyarrow filesystems: local/NFS paths, ``s3://`` and ``gs://`` URIs alike.

Why pyarrow: Ray Train persists checkpoints through the same filesystems, so a path that works for training
works here, and S3 credentials come from the environment / instance role, never from our files.
Writes are atomic (temporary name, then rename or single-object put) so a reader never sees half a file.

Two more things every writer of shared storage needs live here, on the ground floor, so checkpoints, evaluation
results and the run lease share them:

- **Retry with backoff** (:func:`retry`): an object store or NFS server that goes away for a while (a restart, a
  network blip) costs a wait, not the run; one that stays away ends the caller with one line after a bounded wait
  (``SIMCLR_STORAGE_RETRY_S``, default 300 s). A full or read-only disk is not retried: waiting cannot fix it.
- **One writer per run** (:class:`Lease`): a small JSON file in the run directory naming its writer, renewed while
  the run lives; a second run of the same storage path and name is refused in one line, and the successor of a
  run that crashed takes the lease over once it has expired.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(OSError):
    """Storage is missing, unreachable or not writable; one-line message naming the path."""


class StorageFullError(StorageError):
    """No space left (or quota exceeded, or read-only) where a file was written: not retried; names the file."""


class LeaseError(StorageError):
    """The run directory is leased by another live writer (a second run of the same storage path and name)."""


# errnos a retry cannot fix: the disk is full, over quota, read-only or forbids the write
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
RETRY_ENV = "SIMCLR_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
T = TypeVar("T")


def reason(e: BaseException) -> str:
    """The first line of an exception, or its type when it has no message."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def is_permanent(e: BaseException) -> bool:
    """A write error that waiting cannot fix (no space, read-only, forbidden); everything else may be transient."""
    if isinstance(e, (StorageFullError, LeaseError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True
    if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS:
        return True
    text = str(e)
    return "No space left on device" in text or "Read-only file system" in text


def retry_budget_s() -> float:
    """Seconds a storage operation is retried before the run ends: ``SIMCLR_STORAGE_RETRY_S`` (default 300)."""
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def retry(fn: Callable[[], T], what: str, *, budget_s: float | None = None, first_wait_s: float = 1.0,
          max_wait_s: float = 15.0, log: Callable[[str], None] = lambda msg: None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried with exponential backoff (``first_wait_s``, doubling, at most ``max_wait_s`` apart) while it
    raises a transient ``OSError`` and ``budget_s`` (default :func:`retry_budget_s`) has not run out.

    Why: pyarrow's own S3 retries span a second or two; an object store restarting takes tens of seconds. A
    permanent error (:func:`is_permanent`) is raised at once; when the budget runs out the last error becomes one
    :class:`StorageError` line naming ``what``, the attempts and the time waited. ``log`` hears the first failure
    and the recovery, not every attempt.
    """
    budget = retry_budget_s() if budget_s is None else budget_s
    start, wait, attempt = time.monotonic(), first_wait_s, 0
    while True:
        attempt += 1
        try:
            result = fn()
        except OSError as e:
            if is_permanent(e):
                raise
            waited = time.monotonic() - start
            if waited + wait > budget:
                raise StorageError(f"{what}: storage unreachable for {waited:.0f} s ({attempt} attempts, retry "
                                   f"budget {budget:g} s, {RETRY_ENV}): {reason(e)}") from e
            if attempt == 1:
                log(f"[storage] {what}: {reason(e)}; retrying with backoff for up to {budget:g} s")
            sleep(wait)
            wait = min(wait * 2, max_wait_s)
            continue
        if attempt > 1:
            log(f"[storage] {what}: succeeded after {attempt} attempts ({time.monotonic() - start:.1f} s)")
        return result


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises several types; the user needs the URI and the reason
        raise StorageError(f"{uri}: cannot open storage ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_names(uri: str) -> list[str]:
    """Names of the entries directly under a directory or prefix, sorted; [] when it does not exist."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.path.rstrip("/").rsplit("/", 1)[-1] for info in infos)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: object stores put a whole object; on a filesystem we write a sibling and rename."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a full disk: drop the partial sibling, so the failed write frees what it took
            if os.path.exists(tmp):
                os.remove(tmp)
            if is_permanent(e) and not isinstance(e, FileNotFoundError):
                raise StorageFullError(f"{uri}: not written ({reason(e)}; {len(data):,} bytes)") from e
            raise
    else:
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def check_writable(uri: str, flag: str = "--storage-path") -> None:
    """Create the directory and round-trip a probe file, so a bad ``--storage-path`` (or the ``flag`` that named
    ``uri``) fails before training."""
    fs, path = resolve(uri)
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(path, recursive=True)
        write_bytes(probe, b"ok")
        fs.delete_file(resolve(probe)[1])
    except StorageError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"{flag} {uri}: not writable ({reason})") from e


# ---------------------------------------------------------------------------- one writer per run
LEASE_FILE = ".lease.json"
LEASE_TTL_ENV = "SIMCLR_LEASE_TTL_S"
DEFAULT_LEASE_TTL_S = 60.0


def lease_ttl_s() -> float:
    """How long a lease lives without renewal: ``SIMCLR_LEASE_TTL_S`` (default 60 s; renewed every third of it)."""
    return float(os.environ.get(LEASE_TTL_ENV, DEFAULT_LEASE_TTL_S))


@dataclass
class Lease:
    """A run directory's writer, as a file ``RUN/.lease.json`` {owner, host, pid, expires_at} renewed every
    ``ttl_s / 3`` s by a daemon thread while the run lives.

    Why a file in storage, not a lock: the run directory is the only thing two drivers on different machines
    share (NFS, S3, GCS), and a crashed driver cannot release anything; its lease simply expires, and the next run
    takes it over. Object stores have no compare-and-swap here, so :meth:`acquire` writes its claim, waits
    ``settle_s`` and reads it back: of two runs starting within that window, the one whose claim was overwritten
    steps back (last writer wins, both see the same file). Expiry compares wall clocks, so hosts sharing a run
    need clocks within a fraction of the TTL (NTP).
    """

    run_uri: str
    ttl_s: float = field(default_factory=lease_ttl_s)
    settle_s: float = 0.5
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    log: Callable[[str], None] = lambda msg: None
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return join(self.run_uri, LEASE_FILE)

    def holder(self) -> dict[str, Any] | None:
        """The lease file's content, or ``None`` when there is none (or it is unreadable: a torn local write)."""
        try:
            return read_json(self.uri)
        except (FileNotFoundError, ValueError):
            return None
        except OSError as e:
            if "not found" in str(e).lower() or "NoSuchKey" in str(e):
                return None
            raise

    def _claim(self) -> None:
        write_json(self.uri, {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                              "expires_at": time.time() + self.ttl_s, "ttl_s": self.ttl_s})

    def _refusal(self, h: dict[str, Any]) -> LeaseError:
        left = float(h.get("expires_at", 0)) - time.time()
        return LeaseError(f"run {self.run_uri} is being written by another run ({h.get('host')} pid {h.get('pid')}; "
                          f"its lease expires in {max(left, 0):.0f} s unless renewed): one writer per run; wait "
                          f"for it to end, or choose another --name")

    def acquire(self) -> Lease:
        """Take the lease (a free, expired or own one) and start renewing it; :class:`LeaseError` when held."""
        h = self.holder()
        if h is not None and h.get("owner") != self.owner and float(h.get("expires_at", 0)) > time.time():
            raise self._refusal(h)
        if h is not None and h.get("owner") != self.owner:
            self.log(f"[storage] {self.uri}: taking over the expired lease of {h.get('host')} pid {h.get('pid')}")
        self._claim()
        time.sleep(self.settle_s)
        h = self.holder()
        if h is None or h.get("owner") != self.owner:
            raise self._refusal(h or {})
        self._thread = threading.Thread(target=self._renew, name="simclr-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        """Every ttl/3: rewrite the claim while it is still ours; stop (and set ``lost``) if another run took it."""
        while not self._stop.wait(self.ttl_s / 3):
            try:
                h = self.holder()
                if h is not None and h.get("owner") != self.owner:
                    self.lost.set()
                    self.log(f"[storage] {self.uri}: lease taken over by {h.get('host')} pid {h.get('pid')} "
                             "(this run was out of touch longer than the lease); no longer renewing")
                    return
                self._claim()
            except OSError as e:  # storage away for a while: the next tick tries again, the TTL covers two misses
                self.log(f"[storage] {self.uri}: lease not renewed ({reason(e)}); retrying")

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours (a crashed run's simply expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            h = self.holder()
            if h is not None and h.get("owner") == self.owner:
                fs, path = resolve(self.uri)
                fs.delete_file(path)
        except OSError:
            pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------- Ray's own storage I/O, retried
class RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that passes every call to ``base`` through :func:`retry`.

    Why: Ray Train's controller writes its checkpoint index (``checkpoint_manager_snapshot.json``) to storage after
    registering each checkpoint, without retries, so an object store that restarts for half a minute would end the
    run although our own uploads wait for it. Handing Ray this filesystem (``RunConfig(storage_filesystem=...)``, see
    :func:`ray_filesystem`) gives Ray's writes the same backoff and budget. A write is buffered in memory and put
    whole on close, so a failed attempt is retried from its first byte.
    """

    def __init__(self, base: pafs.FileSystem, budget_s: float | None = None) -> None:
        self.base, self.budget_s = base, budget_s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingHandler) and self.base.equals(other.base)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self):
        return RetryingHandler, (self.base, self.budget_s)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry(fn, f"{self.base.type_name} {what}", budget_s=self.budget_s)

    def get_type_name(self) -> str:
        return f"retrying-{self.base.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry("stat", lambda: self.base.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(f"list {selector.base_dir}", lambda: self.base.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(f"mkdir {path}", lambda: self.base.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry(f"delete {path}", lambda: self.base.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(f"delete {path}/*", lambda: self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise StorageError("refusing to delete the root of a storage filesystem")

    def delete_file(self, path: str) -> None:
        self._retry(f"delete {path}", lambda: self.base.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry(f"move {src}", lambda: self.base.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(f"copy {src}", lambda: self.base.copy_file(src, dest))

    def open_input_stream(self, path: str):
        data = self._retry(f"read {path}", lambda: _read_all(self.base, path))
        return pa.BufferReader(data)

    def open_input_file(self, path: str):
        data = self._retry(f"read {path}", lambda: _read_all(self.base, path))
        return pa.BufferReader(data)

    def open_output_stream(self, path: str, metadata: Any = None):
        return pa.PythonFile(_PutOnClose(self, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None):
        raise StorageError(f"{path}: appending is not supported by object stores; write the whole file")


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


class _PutOnClose(io.RawIOBase):
    """A file object that collects what is written and puts it whole, retried, when closed."""

    def __init__(self, handler: RetryingHandler, path: str) -> None:
        super().__init__()
        self.handler, self.path, self.buf = handler, path, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.buf.write(b)

    def close(self) -> None:
        if not self.closed:
            data = self.buf.getvalue()

            def put() -> None:
                with self.handler.base.open_output_stream(self.path) as f:
                    f.write(data)
            self.handler._retry(f"write {self.path}", put)
        super().close()


def ray_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) to hand Ray Train for a storage URI: object stores wrapped in :class:`RetryingHandler`;
    a local/NFS path as it is, ``(None, uri)`` (Ray's own local filesystem)."""
    if "://" not in uri:
        return None, uri
    fs, path = resolve(uri)
    return pafs.PyFileSystem(RetryingHandler(fs)), path
