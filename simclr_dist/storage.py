"""Shared storage through pyarrow filesystems: local/NFS paths, ``s3://`` and ``gs://`` URIs alike.

Why pyarrow: Ray Train persists checkpoints through the same filesystems, so a path that works for training
works here, and S3 credentials come from the environment / instance role, never from our files.
Writes are atomic (temporary name, then rename or single-object put) so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs


class StorageError(OSError):
    """Storage is missing, unreachable or not writable; one-line message naming the path."""


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


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: object stores put a whole object; on a filesystem we write a sibling and rename."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def check_writable(uri: str) -> None:
    """Create the directory and round-trip a probe file, so a bad ``--storage-path`` fails before training."""
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
        raise StorageError(f"--storage-path {uri}: not writable ({reason})") from e
