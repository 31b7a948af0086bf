"""Two-view SimCLR loader over FFCV ``.beton`` file(s), behind the same interface as the torch loader.

Pipeline per batch: FFCV reads pages through the OS cache (``os_cache=True``) and, in numba-compiled parallel
code, decodes each image once and crops + resizes it twice (:mod:`simclr_dist.data.ffcv_decode`). The rest of the
recipe runs as batched tensor ops on the training device (:mod:`simclr_dist.data.gpu_augment`; why: README
"FFCV data path").

Reproducibility (a resumed epoch is replayed exactly): the order is a permutation drawn from (seed, epoch),
sharded by rank like ``DistributedSampler(drop_last=True)``; crop boxes come from a counter-based hash of
(seed, epoch, sample, view), so they do not depend on which numba thread decodes which sample; the tensor
ops draw from a ``torch.Generator`` reseeded from (seed, rank, epoch). ``set_epoch`` sets all three.

Several shards (``x-0000k-of-0000N.beton``, a list or a glob) are read as one dataset: their metadata and
allocation tables are concatenated with per-file address offsets and a memory manager maps each address to its
file, so shuffling is global and the pipeline is compiled once.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simclr_dist.data.datasets import DatasetError
from simclr_dist.data.epoch_order import batch_seed
from simclr_dist.data.ffcv_decode import EpochSeed, mix64, two_view_decoder

if TYPE_CHECKING:
    from simclr_dist.data.loaders import LoaderSpec

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
def _sharded_sources(files: Sequence[str]) -> Iterator[None]:
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


# ---------------------------------------------------------------------------- order
def rank_sharded_order(rank: int, world_size: int, seed: int) -> Any:
    """FFCV instantiates ``order(loader)`` when ``order`` is a TraversalOrder instance: this factory is one."""
    from ffcv.traversal_order.base import TraversalOrder

    class RankSharded(TraversalOrder):
        """A permutation of (seed, epoch), cut to a multiple of world_size, then every world_size-th from rank;
        ``[start:stop]`` of it when set (a resumed epoch goes on at batch ``start / B``; FFCV's drop_last is only
        its cut at ``len(loader) * B``, so a shortened order must end at ``stop`` itself)."""

        start, stop = 0, None

        def sample_order(self, epoch: int) -> np.ndarray:
            n = len(self.indices)
            perm = np.random.default_rng([seed, epoch]).permutation(n)[: n // world_size * world_size]
            return self.indices[perm[rank::world_size]][self.start:self.stop]

    class Factory(TraversalOrder):
        def __init__(self) -> None:  # no loader yet: FFCV calls us with it
            pass

        def __call__(self, loader: Any) -> RankSharded:
            return RankSharded(loader)

        def sample_order(self, epoch: int) -> np.ndarray:
            raise TypeError("factory only")

    return Factory()


# ---------------------------------------------------------------------------- the loader
def cpu_budget(requested: int = 0) -> int:
    """FFCV decode threads: ``requested`` if > 0, else the CPUs Ray reserved for this worker, else torch's threads.

    Never more than numba's thread pool (it is sized at import) nor the usable cores.
    """
    import numba

    n = requested
    ray = sys.modules.get("ray")  # only a process that imported Ray can be a Ray worker
    if n <= 0 and ray is not None:
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    if n <= 0:
        n = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, usable, numba.config.NUMBA_NUM_THREADS))


def _default_device(spec: "LoaderSpec") -> torch.device:
    if spec.device:
        return torch.device(spec.device)
    if "ray.train" in sys.modules:
        with contextlib.suppress(Exception):  # outside a Ray Train worker get_context() raises
            import ray.train
            import ray.train.torch
            ray.train.get_context()
            return ray.train.torch.get_device()
    return torch.device("cuda" if spec.pin_memory and torch.cuda.is_available() else "cpu")


class FFCVPretrainLoader:
    """``len()``, ``set_epoch(epoch)`` and iteration over ``(view1, view2, label)`` like ``TorchPretrainLoader``.

    Two stages: :meth:`cpu_batches` is the CPU side (FFCV's compiled decode + two crops per image, uint8), the
    iteration adds the rest of the recipe as batched tensor ops on ``self.device`` (:mod:`gpu_augment`)."""

    def __init__(self, spec: "LoaderSpec", batches_ahead: int = 3):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        from simclr_dist.data.augment import default_augment
        from simclr_dist.data.datasets import dataset_info, reads_embedded
        from simclr_dist.data.gpu_augment import BatchedViewAugment

        if not spec.beton:
            if not reads_embedded(spec.dataset, spec.root):
                raise BetonError("--loader ffcv needs --beton PATH (make one with python -m simclr_dist.data.convert)")
            from simclr_dist.data.convert import embedded_beton
            spec = replace(spec, beton=embedded_beton(spec.dataset, spec.split, spec.image_size))
        self.spec = spec
        self.files = resolve_betons(spec.beton)
        self.info = check_beton(self.files, world_size=spec.world_size, batch_size=spec.batch_size)
        self.augment = default_augment(dataset_info(spec.dataset), spec.augment, image_size=spec.image_size,
                                       jitter_strength=spec.jitter_strength)
        self.device = _default_device(spec)
        self.threads = cpu_budget(spec.num_workers)
        self.views = BatchedViewAugment(self.augment, self.device)
        self.generator = torch.Generator(device=self.device)
        self.seed = EpochSeed()
        crop_scale = self.augment.crop_scale if "crop" in self.augment.components else None
        decoder = two_view_decoder(self.augment.image_size, crop_scale, self.seed, scaled_decode=spec.scaled_decode,
                                   resample=spec.resample)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        pipelines = {IMAGE_FIELD: [decoder, ToTensor(), *to_device], LABEL_FIELD: [IntDecoder(), ToTensor()]}
        with _sharded_sources(self.files):
            self.loader = Loader(self.files[0], batch_size=spec.batch_size, num_workers=self.threads, os_cache=True,
                                 order=rank_sharded_order(spec.rank, spec.world_size, spec.seed),
                                 distributed=spec.world_size > 1, seed=spec.seed, pipelines=pipelines,
                                 drop_last=True, batches_ahead=batches_ahead)
        _reuse_buffers(self.loader)
        self.outputs = {name: i for i, name in enumerate(self.loader.pipeline_specs)}
        self.epoch, self.start_batch = 0, 0
        self._live: Any = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _apply_epoch(self, epoch: int) -> None:
        s = self.spec
        self.loader.next_epoch = epoch                     # the order: (seed, epoch)
        order = self.loader.traversal_order
        order.start, order.stop = self.start_batch * s.batch_size, len(self.loader) * s.batch_size
        self.seed.set(mix64(s.seed, epoch))                # the crops: (seed, epoch, sample, view)

    def __len__(self) -> int:
        return len(self.loader)

    def _close_live(self) -> None:
        """Stop a previous epoch's decode thread before reseeding (it would read the new seed)."""
        if self._live is not None:
            self._live.close()
            self._live.join()
            self._live = None

    def cpu_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next epoch's CPU side: ``(views, labels)`` with uint8 views ``(B, 2, S, S, 3)`` (on ``self.device``
        when it is a GPU). Both are FFCV's reused buffers, valid until ``batches_ahead`` batches later."""
        self._close_live()
        _record_thread_errors()
        self._apply_epoch(self.epoch)
        self.epoch, self.start_batch = self.epoch + 1, 0  # iterating again without set_epoch: the next epoch
        if self.device.type == "cuda":  # the reused device buffers may still be read by the last epoch's kernels
            torch.cuda.current_stream(self.device).synchronize()
        self._live = it = iter(self.loader)
        o = self.outputs
        try:
            for batch in _drain(it):
                yield batch[o[IMAGE_FIELD]], batch[o[LABEL_FIELD]]
        finally:
            if self._live is it:
                self._close_live()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, first, s = self.epoch, self.start_batch, self.spec  # read before cpu_batches moves to the next epoch
        for b, (views, labels) in enumerate(self.cpu_batches(), start=first):
            # the tensor ops of batch b: (seed, rank, epoch, b), whether the epoch started at 0 or at b
            self.generator.manual_seed(batch_seed(s.seed, s.rank, epoch, b))
            # FFCV reuses its output buffers a few batches later: the views are fresh tensors, the label a copy.
            with _single_threaded(self.device.type == "cpu"):
                v1 = self.views(views[:, 0], self.generator)
                v2 = self.views(views[:, 1], self.generator)
            yield v1, v2, labels.reshape(-1).clone()


def _reuse_buffers(loader: Any) -> None:
    """Allocate FFCV's batch buffers (pinned where CUDA exists) once per loader instead of once per epoch.

    FFCV's ``EpochIterator`` asks the pipeline graph for fresh buffers at every epoch: ``batches_ahead + 2`` slots of
    every output and every decode scratch area (a max-size image per sample), pinned and first touched anew. The
    loader runs one epoch at a time (the previous epoch's thread is joined first), so one set serves every epoch."""
    graph, cache = loader.graph, {}
    allocate = graph.allocate_memory

    def reuse(batch_size: int, batches_ahead: int) -> Any:
        if (batch_size, batches_ahead) not in cache:
            cache[batch_size, batches_ahead] = allocate(batch_size, batches_ahead)
        return cache[batch_size, batches_ahead]

    graph.allocate_memory = reuse


@contextlib.contextmanager
def _single_threaded(enabled: bool) -> Iterator[None]:
    """Run the CPU tensor ops on one thread while FFCV's decode threads run beside them: torch's OpenMP team
    spin-waits at every barrier for threads whose cores the decoders hold (measured at 96 px, 2 CPUs: 20 views/s
    with 2 threads, ~400 with 1). Restores the caller's (training) thread count."""
    n = torch.get_num_threads()
    if not enabled or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_THREAD_ERRORS: dict[int, BaseException] = {}


def _record_thread_errors() -> None:
    """Keep the exception of a dying FFCV decode thread so the training thread can raise it (once per process)."""
    previous = threading.excepthook
    if getattr(previous, "records_ffcv_errors", False):
        return

    def hook(args: Any) -> None:
        if args.thread is not None and args.exc_value is not None:
            _THREAD_ERRORS[args.thread.ident] = args.exc_value
        previous(args)

    hook.records_ffcv_errors = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _drain(it: Any) -> Iterator[tuple]:
    """``EpochIterator.__next__`` plus a liveness check: FFCV's decode thread has no error handling, so if it
    dies (a numba error, a bad file) its consumer would otherwise wait on the queue forever."""
    import queue

    from ffcv.loader.epoch_iterator import IS_CUDA

    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
        except queue.Empty:
            if it.is_alive() or not it.output_queue.empty():
                continue
            err = _THREAD_ERRORS.pop(it.ident, None)
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}" if err else "no batch and no error"
            raise RuntimeError(f"FFCV decode thread stopped ({reason})") from err
        if item is None:
            it.close()
            return
        slot, batch = item
        if IS_CUDA:
            it.current_stream.wait_stream(it.cuda_streams[slot])
        yield batch
