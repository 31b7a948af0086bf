"""The read side of FFCV ``.beton`` files: find them, check them before training, and read several as one.

Why checks of our own: FFCV's ``Reader`` fails deep inside numba code or hangs on a truncated file, and a training
job should fail before it starts, with one line naming the file and the fix. Why a sharded reader: a dataset
converted with ``--shards N`` is N files; their metadata and allocation tables are concatenated with per-file
address offsets and a memory manager maps each address to its file, so shuffling is global and the pipeline is
compiled once. The writer (:mod:`simclr_dist.data.ffcv.convert`) imports this module, never the reverse.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simclr_dist.data.datasets import DatasetError

IMAGE_FIELD, LABEL_FIELD = "image", "label"
_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.beton$")


class BetonError(DatasetError):
    """A missing, unreadable or unsuitable .beton; one line naming the file and the fix."""


# ---------------------------------------------------------------------------- finding and checking files
def resolve_betons(beton: str | Sequence[str]) -> list[str]:
    """A path, a comma-separated list, a glob, or ``x.beton`` written with ``--shards`` -> existing files.

    A complete shard set is required (``-of-N`` names all N files) so a half-copied dataset fails here.
    """
    items = [p.strip() for p in beton.split(",")] if isinstance(beton, str) else [str(p) for p in beton]
    items = [p for p in items if p]
    if not items:
        raise BetonError("--beton: no file given")
    files: list[str] = []
    for item in items:
        if "://" in item:
            raise BetonError(f"--beton {item}: FFCV memory-maps its input, so it must be a local path; "
                             "copy the file to node-local disk first")
        path = os.path.expanduser(item)
        if glob.has_magic(path):
            found = sorted(glob.glob(path))
        elif os.path.exists(path):
            found = [path]
        else:  # x.beton converted with --shards N
            found = sorted(glob.glob(glob.escape(path[: -len(".beton")]) + "-[0-9]*-of-[0-9]*.beton")
                           if path.endswith(".beton") else [])
        if not found:
            raise BetonError(f"--beton {item}: no such file; create it with python -m simclr_dist.data.convert")
        files += [os.path.abspath(f) for f in found]
    files = list(dict.fromkeys(files))
    for f in files:
        if not os.path.isfile(f):
            raise BetonError(f"--beton {f}: not a file")
    _check_shard_sets(files)
    return files


def _check_shard_sets(files: list[str]) -> None:
    sets: dict[tuple[str, int], set[int]] = {}
    for f in files:
        if m := _SHARD_RE.match(f):
            sets.setdefault((m["stem"], int(m["n"])), set()).add(int(m["k"]))
    for (stem, n), have in sets.items():
        if missing := sorted(set(range(n)) - have):
            raise BetonError(f"--beton: shard {missing[0]} of {n} is missing ({stem}-{missing[0]:05d}-of-{n:05d}.beton"
                             f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); "
                             "was the conversion or copy interrupted?")


@dataclass(frozen=True)
class BetonInfo:
    files: tuple[str, ...]
    num_samples: int
    min_side: int            # smallest stored image side (crops upsample smaller images)
    max_side: int
    num_labels: int          # distinct labels >= 0 (0 for an unlabeled split)


def _read_header(path: str) -> Any:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    def unreadable(reason: str) -> BetonError:
        return BetonError(f"--beton {path}: not a readable FFCV .beton ({reason}); was it fully written?")

    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable FFCV file"
        raise unreadable(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    kinds = {n: type(h).__name__ for n, h in reader.handlers.items()}
    if not (isinstance(reader.handlers.get(IMAGE_FIELD), RGBImageField)
            and isinstance(reader.handlers.get(LABEL_FIELD), IntField)):
        have = ", ".join(f"{n} ({k})" for n, k in kinds.items()) or "none"
        raise BetonError(f"--beton {path}: has fields {have}; expected {IMAGE_FIELD} (RGBImageField) and "
                         f"{LABEL_FIELD} (IntField): convert with python -m simclr_dist.data.convert")
    table, size = reader.alloc_table, os.path.getsize(path)
    if len(reader.metadata) != reader.num_samples or len(table) < reader.num_samples:
        raise unreadable(f"{len(reader.metadata)} metadata rows, {len(table)} allocations for "
                         f"{reader.num_samples} samples")
    if len(table) and int((table["ptr"] + table["size"]).max()) > size:
        raise unreadable(f"image data extends past the end of the {size}-byte file")
    return reader


def inspect_beton(files: Sequence[str]) -> BetonInfo:
    """Header, fields and metadata only (no image is decoded): cheap enough for the preflight."""
    readers = [_read_header(f) for f in files]
    n = sum(int(r.num_samples) for r in readers)
    if n == 0:
        raise BetonError(f"--beton {files[0]}: contains no samples")
    fields = [{k: r.field_names.index(k) for k in (IMAGE_FIELD, LABEL_FIELD)} for r in readers]
    meta = [r.metadata[f"f{fx[IMAGE_FIELD]}"] for r, fx in zip(readers, fields)]
    sides = np.concatenate([np.minimum(m["height"], m["width"]) for m in meta])
    longs = np.concatenate([np.maximum(m["height"], m["width"]) for m in meta])
    labels = np.concatenate([r.metadata[f"f{fx[LABEL_FIELD]}"] for r, fx in zip(readers, fields)])
    return BetonInfo(tuple(files), n, int(sides.min()), int(longs.max()), int(np.unique(labels[labels >= 0]).size))


def check_beton(beton: str | Sequence[str], *, world_size: int, batch_size: int) -> BetonInfo:
    """Preflight: the files exist, are complete FFCV files with image+label, and hold >= one global batch."""
    info = inspect_beton(resolve_betons(beton))
    if info.num_samples < world_size * batch_size:
        raise BetonError(f"--beton {info.files[0]}: {info.num_samples} samples is fewer than one global batch "
                         f"({world_size} workers x {batch_size} = {world_size * batch_size}); lower --batch-size")
    return info


# ---------------------------------------------------------------------------- several files as one dataset
class ShardedReader:
    """The attributes FFCV's Loader reads from a ``Reader``, for several files concatenated.

    File k's addresses are offset by ``bases[k]`` (page-aligned running sizes) so every address stays unique
    and the allocation table still maps address -> size; sample ids are offset by the preceding counts.
    """

    def __init__(self, files: Sequence[str]):
        readers = [_read_header(f) for f in files]
        first = readers[0]
        for f, r in zip(files[1:], readers[1:]):
            if r.field_names != first.field_names or r.metadata_type != first.metadata_type:
                raise BetonError(f"--beton {f}: fields differ from {files[0]}; shards must come from one conversion")
        self.page_size = int(max(r.page_size for r in readers))
        sizes = [os.path.getsize(f) for f in files]
        self.bases = np.zeros(len(files), np.uint64)
        for k in range(1, len(files)):
            end = int(self.bases[k - 1]) + sizes[k - 1]
            self.bases[k] = -(-end // self.page_size) * self.page_size
        self.files = list(files)
        self.file_name = files[0]
        self.handlers, self.field_names = first.handlers, first.field_names
        self.metadata_type = first.metadata_type
        self.num_samples = sum(int(r.num_samples) for r in readers)
        metas, tables, offset = [], [], 0
        for base, r in zip(self.bases, readers):
            m, t = r.metadata.copy(), r.alloc_table.copy()
            for name in m.dtype.names:
                if m.dtype[name].names and "data_ptr" in m.dtype[name].names:
                    m[name]["data_ptr"] += base
            t["ptr"] += base
            t["sample_id"] += np.uint64(offset)
            metas.append(m)
            tables.append(t)
            offset += int(r.num_samples)
        self.metadata, self.alloc_table = np.concatenate(metas), np.concatenate(tables)
        self.metadata.setflags(write=False)


def _sharded_manager(reader: Any) -> Any:
    """An ``OSCacheManager`` whose reader finds the file of an address: one mmap per shard, reached by address.

    Why addresses and not a tuple of the mmap arrays: FFCV's parallel decoders (``prange``, any run with more than
    one decode thread) hand the memory state to a numba parfor, whose gufunc wrapper accepts a flat tuple of
    arrays (FFCV's own state) but rejects a nested tuple of arrays. So the state is four flat ``uint64`` arrays,
    the last holding each mmap's start address; the context keeps the mmaps alive while the loader exists."""
    import numba as nb
    from ffcv.memory_managers.base import MemoryContext, MemoryManager
    from ffcv.pipeline.compiler import Compiler

    class Context(MemoryContext):
        def __init__(self, manager: Any):
            self.manager, self.mmaps, self.starts = manager, None, None

        @property
        def state(self) -> tuple:
            return (self.manager.ptrs, self.manager.sizes, self.manager.reader.bases, self.starts)

        def __enter__(self) -> Any:
            if self.mmaps is None:
                self.mmaps = [np.memmap(f, "uint8", mode="c") for f in self.manager.reader.files]  # "c": never written; a stray write stays private
                self.starts = np.array([m.ctypes.data for m in self.mmaps], np.uint64)
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

    class Manager(MemoryManager):
        def __init__(self, reader: Any):
            super().__init__(reader)
            self.context = Context(self)

        def schedule_epoch(self, schedule: Any) -> Any:
            return self.context

        @property
        def state_type(self) -> Any:
            return nb.types.UniTuple(nb.uint64[::1], 4)

        def compile_reader(self) -> Any:
            u8_ptr = _u8_pointer()

            def read(address, state):
                ptrs, sizes, bases, starts = state
                size = sizes[np.searchsorted(ptrs, address)]
                shard = np.searchsorted(bases, address, side="right") - 1
                return nb.carray(u8_ptr(starts[shard] + (address - bases[shard])), size)

            return Compiler.compile(read, nb.uint8[::1](nb.uint64, self.state_type))

    return Manager(reader)


def _u8_pointer():
    """A numba intrinsic: uint64 address -> ``uint8*`` (for ``numba.carray``)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def u8_ptr(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
        return types.CPointer(types.uint8)(address), codegen

    return u8_ptr


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def sharded_sources(files: Sequence[str]) -> Iterator[None]:
    """FFCV's Loader builds its Reader and memory manager from module globals; swap in the sharded ones."""
    import ffcv.loader.loader as ffl

    if len(files) == 1:
        yield
        return
    with _PATCH_LOCK:
        saved = ffl.Reader, ffl.OSCacheManager
        ffl.Reader = lambda fname, custom_fields=None: ShardedReader(files)
        ffl.OSCacheManager = _sharded_manager
        try:
            yield
        finally:
            ffl.Reader, ffl.OSCacheManager = saved
