"""The writer of FFCV ``.beton`` files: a dataset split -> one file or N shards, written atomically.

Why a conversion step: FFCV reads fixed-layout pages through the OS page cache and decodes + crops in
compiled code, so the per-sample Python work of the torch path disappears from training. The source is
always :func:`simclr_dist.data.datasets.load_dataset` (the same images the torch path trains on).

Each file holds an ``image`` (``RGBImageField``) and a ``label`` (``IntField``, -1 for unlabeled splits).
``shards=N`` writes N files in parallel (``PATH-00000-of-0000N.beton``), each a contiguous slice of the
split. Every file is written under a temporary name and renamed only once it is complete and re-read (with the
read side, :mod:`.beton`), so an interrupted conversion never leaves a file that looks finished. A URI output is
written to a local temporary directory and handed to the caller's ``upload`` (the command uploads to storage).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simclr_dist.console import Progress
from simclr_dist.data.datasets import DATASETS, DatasetError, dataset_info, load_dataset
from simclr_dist.data.ffcv.beton import IMAGE_FIELD, LABEL_FIELD, inspect_beton

WRITE_MODES = ("raw", "jpg", "smart")
# 'smart' stores an image as JPEG when its raw pixels exceed this many bytes (a 128x128 RGB image): small
# images (digits, CIFAR, STL-10) stay raw, so reading them costs a memcpy instead of a JPEG decode.
SMART_THRESHOLD = 128 * 128 * 3
PAGE_SIZE = 8 << 20  # FFCV's default page; one sample must fit in one page


class ConvertError(DatasetError):
    """Conversion failed; one line naming the file or sample and what to do."""


@dataclass(frozen=True)
class ConvertSpec:
    dataset: str
    split: str
    out: str                        # PATH.beton, local or URI
    data_root: str | None = None
    download: bool = False
    max_resolution: int | None = None   # longest side after (area) downscaling; None keeps the source size
    image_size: int | None = None   # in-memory sets (digits, CIFAR, STL-10): resize at load like the torch path
    jpeg_quality: int = 90
    write_mode: str = "smart"
    num_workers: int = 0            # writer processes over all shards; 0 = usable CPUs
    shards: int = 1
    skip_corrupt: bool = False
    chunk_size: int = 64            # samples per writer work item
    progress: bool = True

    def validate(self) -> "ConvertSpec":
        def bad(flag: str, msg: str) -> None:
            raise ConvertError(f"--{flag.replace('_', '-')}: {msg}")

        if self.dataset not in DATASETS:
            bad("dataset", f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.write_mode not in WRITE_MODES:
            bad("write_mode", f"unknown mode {self.write_mode!r}; choose from {', '.join(WRITE_MODES)}")
        if not 1 <= self.jpeg_quality <= 100:
            bad("jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")
        if self.max_resolution is not None and not 8 <= self.max_resolution <= 65535:
            bad("max_resolution", f"must be in [8, 65535] (FFCV stores sides as uint16), got {self.max_resolution}")
        if self.image_size is not None and self.image_size < 8:
            bad("image_size", f"must be >= 8 pixels, got {self.image_size}")
        if self.shards < 1:
            bad("shards", f"must be >= 1, got {self.shards}")
        if self.num_workers < 0:
            bad("num_workers", f"must be >= 0, got {self.num_workers}")
        if not self.out.endswith(".beton"):
            bad("out", f"must end with .beton, got {self.out!r}")
        return self


@dataclass
class ConvertResult:
    files: list[str]                 # final paths/URIs, in shard order
    num_samples: int                 # written, over all shards
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (index, file, reason) of corrupt items
    seconds: float = 0.0


# ---------------------------------------------------------------------------- naming
def shard_name(out: str, index: int, count: int) -> str:
    """``x.beton`` -> ``x-00001-of-00004.beton``; a single shard keeps the plain name."""
    if count == 1:
        return out
    return f"{out[: -len('.beton')]}-{index:05d}-of-{count:05d}.beton"


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------- source
class _Source:
    """``load_dataset`` items as FFCV wants them: (HWC uint8 numpy, int label).

    A sample that cannot be read (corrupt/truncated file) becomes a 1x1 placeholder and its index is flagged
    in shared memory, because an exception inside FFCV's writer processes would leave the parent waiting
    forever for a sample count that never arrives. The caller reads the flags afterwards and either fails
    naming the file or rewrites the shard without those samples (``--skip-corrupt``).
    """

    def __init__(self, spec: ConvertSpec):
        self.spec = spec
        self.dataset = load_dataset(spec.dataset, spec.split, root=spec.data_root, download=spec.download,
                                    image_size=spec.image_size)
        self.flags: Any = None  # set per shard, before FFCV forks its writer processes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def describe(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[index][0] if samples is not None else f"sample {index}"

    def read(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.dataset[index]
        hwc = np.ascontiguousarray(image.numpy().transpose(1, 2, 0))
        if hwc.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image, got {hwc.dtype} {hwc.shape}")
        h, w = hwc.shape[:2]
        if max(h, w) > 65535:
            raise ValueError(f"{w}x{h} px exceeds FFCV's 65535 px limit; use --max-resolution")
        scale = min(1.0, (self.spec.max_resolution or max(h, w)) / max(h, w))
        raw = int(h * scale) * int(w * scale) * 3
        if self.spec.write_mode == "raw" and raw > PAGE_SIZE:  # smart and jpg store such images as JPEG
            raise ValueError(f"{w}x{h} px is {raw} raw bytes, more than a {PAGE_SIZE}-byte FFCV page; "
                             "use --max-resolution or --write-mode smart")
        return hwc, int(label)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return self.read(index)
        except Exception:
            if self.flags is None:
                raise
            self.flags[index] = 1
            return np.zeros((1, 1, 3), np.uint8), -1


# ---------------------------------------------------------------------------- writing one shard
def progress_mode_of(spec: ConvertSpec) -> str | None:
    """``off`` for ``--no-progress``; else ``None``, the console's default (bar on a terminal, lines elsewhere)."""
    return None if spec.progress else "off"



class _SharedBar:
    """Stands in for FFCV's per-writer tqdm inside a shard process: adds progress to a counter the parent shows."""

    def __init__(self, counter: Any, total: int | None = None, **_: Any):
        self.counter = counter

    def update(self, n: int = 1) -> None:
        with self.counter.get_lock():
            self.counter.value += n

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _writer_progress(bar: Any) -> Iterator[None]:
    """FFCV's writer builds its progress bar from the module-global ``tqdm``; route it to ours."""
    import ffcv.writer

    saved = ffcv.writer.tqdm
    ffcv.writer.tqdm = bar
    try:
        yield
    finally:
        ffcv.writer.tqdm = saved


def _fields(spec: ConvertSpec) -> dict[str, Any]:
    from ffcv.fields import IntField, RGBImageField

    image = RGBImageField(write_mode=spec.write_mode, max_resolution=spec.max_resolution,
                          jpeg_quality=spec.jpeg_quality, smart_threshold=SMART_THRESHOLD)
    return {IMAGE_FIELD: image, LABEL_FIELD: IntField()}


def _write_file(spec: ConvertSpec, source: _Source, indices: Sequence[int], path: str, workers: int) -> None:
    from ffcv.writer import DatasetWriter

    DatasetWriter(path, _fields(spec), page_size=PAGE_SIZE, num_workers=workers).from_indexed_dataset(
        source, indices=np.asarray(indices, dtype=np.int64), chunksize=spec.chunk_size)


def _check_written(path: str, expected: int) -> None:
    """Re-read header, fields and allocation table: a file that passes is safe to publish under its final name."""

    info = inspect_beton([path])
    if info.num_samples != expected:
        raise ConvertError(f"{path}: wrote {info.num_samples} samples, expected {expected}")


def _write_shard(spec: ConvertSpec, source: _Source, lo: int, hi: int, final: str, workers: int,
                 bar: Any) -> tuple[int, list[tuple[int, str, str]]]:
    """Write samples [lo, hi) to ``final`` via a temporary sibling; returns (samples written, skipped items)."""
    source.flags = flags = mp.Array("b", hi, lock=False)  # shared with FFCV's forked writer processes
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with _writer_progress(bar):
            _write_file(spec, source, range(lo, hi), tmp, workers)
            bad = [i for i in range(lo, hi) if flags[i]]
            skipped = [(i, source.describe(i), _reason(source, i)) for i in bad]
            if skipped and not spec.skip_corrupt:
                i, name, reason = skipped[0]
                more = f" ({len(skipped)} unreadable images in total)" if len(skipped) > 1 else ""
                raise ConvertError(f"{name} (index {i}): cannot read image: {reason}{more}; "
                                   "fix or remove it, or pass --skip-corrupt")
            if skipped:  # rewrite without them: FFCV files cannot drop a sample in place
                good = sorted(set(range(lo, hi)) - set(bad))
                _write_file(spec, source, good, tmp, workers)
        _check_written(tmp, hi - lo - len(skipped))
        os.replace(tmp, final)
        return hi - lo - len(skipped), skipped
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _reason(source: _Source, index: int) -> str:
    try:
        source.read(index)
    except Exception as e:  # noqa: BLE001 - reported, not handled
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return "read failed in the writer process"


def _shard_process(spec: ConvertSpec, source: _Source, index: int, lo: int, hi: int, final: str, workers: int,
                   counter: Any, results: Any) -> None:
    try:
        results.put((index, _write_shard(spec, source, lo, hi, final, workers, functools.partial(_SharedBar, counter))))
    except BaseException as e:  # the parent turns it into a one-line error
        results.put((index, e if isinstance(e, ConvertError) else ConvertError(f"shard {index}: {type(e).__name__}: {e}")))


# ---------------------------------------------------------------------------- the conversion
def convert(spec: ConvertSpec, upload: Callable[[list[str]], list[str]] | None = None) -> ConvertResult:
    """Write ``spec.dataset``/``spec.split`` to ``spec.out`` (or its shards); returns what was written.

    ``upload(local_files) -> uris`` publishes the files of a URI ``spec.out`` (written to a temporary directory).
    Progress (``spec.progress``) goes through :class:`~simclr_dist.console.Progress`: a bar on a terminal, a plain
    line every few seconds in a log or pipe, where FFCV's own tqdm would fill a log with carriage returns."""
    spec.validate()
    remote = "://" in spec.out
    if remote and upload is None:
        raise ConvertError(f"--out {spec.out}: a URI needs an uploader (python -m simclr_dist.data.convert has one)")
    t0 = time.perf_counter()
    info = dataset_info(spec.dataset)
    if spec.split not in info.splits and info.name != "imagefolder":
        raise ConvertError(f"--split: unknown split {spec.split!r} of {spec.dataset}; choose from {', '.join(info.splits)}")
    source = _Source(spec)
    total = len(source)
    if total < spec.shards:
        raise ConvertError(f"--shards {spec.shards}: the split has only {total} samples")
    local_dir = tempfile.mkdtemp(prefix="beton-") if remote else None
    local_out = os.path.join(local_dir, os.path.basename(spec.out)) if local_dir else os.path.abspath(spec.out)
    os.makedirs(os.path.dirname(local_out), exist_ok=True)
    finals = [shard_name(local_out, k, spec.shards) for k in range(spec.shards)]
    bounds = [(k * total // spec.shards, (k + 1) * total // spec.shards) for k in range(spec.shards)]
    workers = spec.num_workers or _usable_cpus()
    desc = f"{spec.dataset}/{spec.split} -> {os.path.basename(spec.out)}"
    try:
        if spec.shards == 1:
            bar = functools.partial(Progress, desc=desc, unit="img", mode=progress_mode_of(spec))
            outcomes = [_write_shard(spec, source, 0, total, finals[0], workers, bar)]
        else:
            outcomes = _write_parallel(spec, source, finals, bounds, max(1, workers // spec.shards), total, desc)
        files = finals
        if upload is not None and remote:
            files = upload(finals)
    finally:
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)
    skipped = [s for _, sk in outcomes for s in sk]
    return ConvertResult(files, sum(n for n, _ in outcomes), skipped, time.perf_counter() - t0)


def _write_parallel(spec: ConvertSpec, source: _Source, finals: list[str], bounds: list[tuple[int, int]],
                    workers: int, total: int, desc: str) -> list[tuple[int, list]]:
    """One forked process per shard (each with its own FFCV writer pool; the loaded source comes along without
    a copy); one progress display for all."""
    ctx = mp.get_context("fork")  # like FFCV's own writer pool: the imported modules come along, no re-import
    counter, results = ctx.Value("Q", 0), ctx.Queue()
    procs = [ctx.Process(target=_shard_process, args=(spec, source, k, lo, hi, finals[k], workers, counter, results))
             for k, (lo, hi) in enumerate(bounds)]
    for p in procs:
        p.start()
    outcomes: dict[int, Any] = {}
    try:
        with Progress(total, desc, unit="img", mode=progress_mode_of(spec)) as bar:
            while len(outcomes) < len(procs):
                with contextlib.suppress(Exception):
                    k, out = results.get(timeout=0.2)
                    outcomes[k] = out
                bar.update(counter.value - bar.n)
                dead = [k for k, p in enumerate(procs) if k not in outcomes and p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise ConvertError(f"shard {dead[0]} writer died (exit code {procs[dead[0]].exitcode})")
    finally:
        for p in procs:
            if p.is_alive() and len(outcomes) < len(procs):
                p.terminate()  # its temporary file stays behind: removed below
            p.join()
        for f in finals:
            for tmp in glob.glob(glob.escape(f) + ".tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
    errors = [o for o in outcomes.values() if isinstance(o, BaseException)]
    if errors:
        for f in finals:  # all-or-nothing: a partial set of shards must not look like a dataset
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
        raise errors[0]
    return [outcomes[k] for k in range(len(procs))]


# ---------------------------------------------------------------------------- embedded datasets
def cache_dir() -> Path:
    """Node-local cache of converted embedded datasets: $SIMCLR_DIST_CACHE, else ~/.cache/simclr_dist."""
    return Path(os.environ.get("SIMCLR_DIST_CACHE") or Path.home() / ".cache" / "simclr_dist")


def embedded_beton(dataset: str, split: str, image_size: int) -> str:
    """The .beton of an embedded dataset (digits) at the training size, converted on first use on this node.

    Why: the default digits run is faster end to end on the FFCV path (docs/ffcv.md), and an embedded
    dataset needs no download, so every node can convert it in about a second. Workers of one node share the
    file (a lock serialises the first conversion; the write itself is atomic).
    """
    import fcntl

    if not dataset_info(dataset).embedded:
        raise ConvertError(f"{dataset} is not embedded: convert it with python -m simclr_dist.data.convert")
    root = cache_dir() / "ffcv"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{dataset}-{split}-{image_size}px.beton"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            convert(ConvertSpec(dataset=dataset, split=split, out=str(path), image_size=image_size,
                                write_mode="raw", num_workers=1, progress=False))
    return str(path)
