"""Two-view SimCLR loader over FFCV ``.beton`` file(s), behind the interface of :mod:`simclr_dist.data.loader`.

Pipeline per batch: FFCV reads pages through the OS cache (``os_cache=True``) and, in numba-compiled parallel
code, decodes each image once and crops + resizes it twice (:mod:`.decode`): the CPU side, ``cpu_batches()``. The
rest of the recipe runs as batched tensor ops on the training device (:mod:`.gpu_augment`; why: docs/ffcv.md "FFCV data
path").

Reproducibility (a resumed epoch is replayed exactly): the order is a permutation drawn from (seed, epoch),
sharded by rank like ``DistributedSampler(drop_last=True)``; crop boxes come from a counter-based hash of
(seed, epoch, sample, view), so they do not depend on which numba thread decodes which sample; the tensor
ops draw from a ``torch.Generator`` reseeded from (seed, rank, epoch). ``set_epoch`` sets all three.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from simclr_dist.data.ffcv.beton import (IMAGE_FIELD, LABEL_FIELD, BetonError, check_beton, resolve_betons,
                                         sharded_sources)
from simclr_dist.data.epoch_order import batch_seed
from simclr_dist.data.ffcv.decode import EpochSeed, mix64, two_view_decoder
from simclr_dist.data.device import training_device


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


class FFCVPretrainLoader:
    """``len()``, ``set_epoch(epoch)`` and iteration over ``(view1, view2, label)`` like ``TorchPretrainLoader``.

    Two stages: :meth:`cpu_batches` is the CPU side (FFCV's compiled decode + two crops per image, uint8), the
    iteration adds the rest of the recipe as batched tensor ops on ``self.device`` (:mod:`gpu_augment`)."""

    def __init__(self, spec: Any, batches_ahead: int = 3):  # a simclr_dist.data.loader.LoaderSpec
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        from simclr_dist.data.augment import default_augment
        from simclr_dist.data.datasets import dataset_info, reads_embedded
        from simclr_dist.data.ffcv.gpu_augment import BatchedViewAugment

        if not spec.beton:
            if not reads_embedded(spec.dataset, spec.root):
                raise BetonError("--loader ffcv needs --beton PATH (make one with python -m simclr_dist.data.convert)")
            from simclr_dist.data.ffcv.convert import embedded_beton
            spec = replace(spec, beton=embedded_beton(spec.dataset, spec.split, spec.image_size))
        self.spec = spec
        self.files = resolve_betons(spec.beton)
        self.info = check_beton(self.files, world_size=spec.world_size, batch_size=spec.batch_size)
        self.augment = default_augment(dataset_info(spec.dataset), spec.augment, image_size=spec.image_size,
                                       jitter_strength=spec.jitter_strength)
        self.device = training_device(spec)
        self.threads = cpu_budget(spec.num_workers)
        self.augment2 = self.augment if spec.augment2 is None else default_augment(
            dataset_info(spec.dataset), spec.augment2, image_size=spec.image_size, jitter_strength=spec.jitter_strength)
        if ("crop" in self.augment.components) != ("crop" in self.augment2.components):
            raise ValueError(f"augment2 {spec.augment2!r}: the ffcv loader crops both views alike (in one decode); "
                             "give both branches crop or neither, or use the torch loader")
        self.views = BatchedViewAugment(self.augment, self.device)
        self.views2 = None if spec.augment2 is None else BatchedViewAugment(self.augment2, self.device)  # None: views
        self.generator = torch.Generator(device=self.device)
        self.seed = EpochSeed()
        crop_scale = self.augment.crop_scale if "crop" in self.augment.components else None
        decoder = two_view_decoder(self.augment.image_size, crop_scale, self.seed, scaled_decode=spec.scaled_decode,
                                   resample=spec.resample)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        pipelines = {IMAGE_FIELD: [decoder, ToTensor(), *to_device], LABEL_FIELD: [IntDecoder(), ToTensor()]}
        indices = None
        if spec.subset:  # --train-subset (embedded datasets only): the beton holds the split in the dataset's order
            from simclr_dist.data.datasets import load_dataset
            from simclr_dist.data.splits import fixed_subset_indices
            labels = load_dataset(spec.dataset, spec.split, root=spec.root, image_size=spec.image_size).targets
            indices = fixed_subset_indices(torch.as_tensor(labels).numpy(), spec.subset)
            if indices is not None and len(indices) < spec.batch_size * spec.world_size:
                raise ValueError(f"--train-subset {spec.subset}: {len(indices)} images is fewer than one global "
                                 f"batch ({spec.batch_size * spec.world_size}); lower --batch-size")
        with sharded_sources(self.files):
            self.loader = Loader(self.files[0], batch_size=spec.batch_size, num_workers=self.threads, os_cache=True,
                                 indices=None if indices is None else np.sort(indices),
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
                v2 = (self.views2 or self.views)(views[:, 1], self.generator)
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
