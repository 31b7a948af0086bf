"""A study's finished classifier runs as a folder a repository can hold, so the study continues on another machine.

A classifier run is cached by name in the study's run store (``OUT/runs/NAME/results.json``: its scores, history,
predictions and the config that identifies the experiment); a rerun reads it back instead of training. That store
also holds the runs' checkpoints and lives on one machine. This module copies only the results files, gzipped
(``NAME.json.gz``, about 15-60 kB each), into a cache folder and back, so a study that spans sessions on fresh
machines (``--runs-cache docs/results/fashion-mnist-cpu/runs``, committed) resumes where it stopped.

Neither direction overwrites: a run already in the store is kept as it is (a rerun's own results win), an entry
already in the cache is kept. Whether a cached run still belongs to the study is decided where every cached run is
read back (:func:`simclr_dist.run.jobs.classify_job.cached_result` compares its experiment key), so an entry of
another recipe is ignored there, never trained over."""

from __future__ import annotations

import gzip
import json

from simclr_dist import storage
from simclr_dist.run.jobs.classify_job import RESULTS_FILE

SUFFIX = ".json.gz"


def finished(runs_uri: str) -> list[str]:
    """Names of the runs in a run store that finished (their results file is written last, atomically)."""
    return [n for n in storage.list_names(runs_uri) if storage.exists(storage.join(runs_uri, n, RESULTS_FILE))]


def pack(runs_uri: str, cache_uri: str) -> int:
    """Add every finished run of the store that the cache lacks; returns how many were added."""
    have = set(storage.list_names(cache_uri))
    added = 0
    for name in finished(runs_uri):
        if name + SUFFIX in have:
            continue
        saved = storage.read_json(storage.join(runs_uri, name, RESULTS_FILE))
        text = json.dumps(saved, sort_keys=True, separators=(",", ":")).encode()
        storage.write_bytes(storage.join(cache_uri, name + SUFFIX), gzip.compress(text, mtime=0))
        added += 1
    return added


def unpack(cache_uri: str, runs_uri: str) -> int:
    """Copy every cached run the store lacks into it (results only: it is read back, never resumed); returns how
    many were copied. A cache that does not exist yet copies nothing."""
    copied = 0
    for entry in storage.list_names(cache_uri):
        if not entry.endswith(SUFFIX):
            continue
        target = storage.join(runs_uri, entry[: -len(SUFFIX)], RESULTS_FILE)
        if storage.exists(target):
            continue
        try:
            saved = json.loads(gzip.decompress(storage.read_bytes(storage.join(cache_uri, entry))))
        except (OSError, EOFError, ValueError) as e:
            raise storage.StorageError(f"{storage.join(cache_uri, entry)}: not a gzipped results file ({e})") from e
        storage.write_json(target, saved)
        copied += 1
    return copied
