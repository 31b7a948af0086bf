"""A study's finished classifier runs as a folder a repository can hold, so the study continues on another machine.

A classifier run is cached by name in the study's run store (``OUT/runs/NAME/results.json``: its scores, history,
predictions and the config that identifies the experiment); a rerun reads it back instead of training. That store
also holds the runs' checkpoints and lives on one machine. This module copies only the results files, gzipped
(``NAME.json.gz``, about 15-60 kB each), into a cache folder and back, so a study that spans sessions on fresh
machines (``--runs-cache docs/results/fashion-mnist-cpu/runs``, committed) resumes where it stopped.

A run already in the store is kept as it is (a rerun's own results win). An entry already in the cache is kept
unless the store holds a finished run of that name under another experiment key (the run retrained under a new
recipe): then the store's run replaces it, so the cache follows the study. A run the store is retraining (its config
file already names the new key while its results file still holds the old one) is not finished: it replaces
nothing. Whether a cached run still belongs to the study is decided where every cached run is read back
(:func:`simclr_dist.run.jobs.classify_job.cached_result` compares its experiment key), so an entry of another recipe
is ignored there, never trained over. A replicate's probes and baselines are stored the same way
(``probes-rN-KEY/results.json``, no config: their name is their identity, so an entry of that name is never replaced)."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

from simclr_dist import storage
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.run.jobs.classify_job import RESULTS_FILE, RUN_CONFIG_FILE

SUFFIX = ".json.gz"
# Every invocation of a study that uses this cache: its start, wall seconds so far, runs finished, complete or not.
# A study spans sessions on fresh machines, and the cache is what they share: its total wall time is the sum.
INVOCATIONS = "invocations.json"


def finished(runs_uri: str) -> list[str]:
    """Names of the runs in a run store that finished (their results file is written last, atomically)."""
    return [n for n in storage.list_names(runs_uri) if storage.exists(storage.join(runs_uri, n, RESULTS_FILE))]


def experiment_key(config: dict[str, Any] | None) -> dict[str, Any]:
    """The experiment key of a run's saved config, as :func:`cached_result` compares it."""
    return SupervisedConfig.from_dict(config or {}).experiment_key()


def read_entry(uri: str) -> dict[str, Any]:
    """A cache entry's results, or a one-line :class:`StorageError` naming it."""
    try:
        return json.loads(gzip.decompress(storage.read_bytes(uri)))
    except (OSError, EOFError, ValueError, zlib.error) as e:  # zlib.error: a valid header over a damaged body
        raise storage.StorageError(f"{uri}: not a gzipped results file ({e})") from e


def retraining(runs_uri: str, name: str, saved: dict[str, Any]) -> bool:
    """Whether the store is retraining the run under another key: its config file (written when a run starts)
    names a different experiment than its results file (written when it finishes)."""
    cfg_uri = storage.join(runs_uri, name, RUN_CONFIG_FILE)
    return storage.exists(cfg_uri) and experiment_key(storage.read_json(cfg_uri)) != experiment_key(
        saved.get("config"))


def pack(runs_uri: str, cache_uri: str) -> int:
    """Add every finished run of the store that the cache lacks, and replace every entry whose experiment key the
    store's finished run of that name no longer has (a damaged entry too); returns how many were written."""
    have = set(storage.list_names(cache_uri))
    added = 0
    for name in finished(runs_uri):
        saved = storage.read_json(storage.join(runs_uri, name, RESULTS_FILE))
        entry = storage.join(cache_uri, name + SUFFIX)
        if name + SUFFIX in have:
            try:
                same = experiment_key(read_entry(entry).get("config")) == experiment_key(saved.get("config"))
            except storage.StorageError:
                same = False  # a damaged entry: the store's finished run replaces it
            if same or retraining(runs_uri, name, saved):
                continue
        text = json.dumps(saved, sort_keys=True, separators=(",", ":")).encode()
        storage.write_bytes(entry, gzip.compress(text, mtime=0))
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
        storage.write_json(target, read_entry(storage.join(cache_uri, entry)))
        copied += 1
    return copied


def record_invocation(cache_uri: str, started_at: str, elapsed_s: float, records: int, complete: bool, *,
                      invocation: str | None = None) -> list[dict]:
    """Write this invocation's line (``invocation`` names it, else ``started_at``; rewritten at each update) into
    the cache's invocation log and return the whole log, oldest first. A damaged log is refused in one line, never
    replaced."""
    uri = storage.join(cache_uri, INVOCATIONS)
    log = storage.read_json(uri) if storage.exists(uri) else []
    if not isinstance(log, list) or not all(isinstance(x, dict) and "started_at" in x for x in log):
        raise storage.StorageError(f"{uri}: not an invocation log (a JSON list of objects with started_at)")
    key = invocation or started_at
    line = {"started_at": started_at, "elapsed_s": round(float(elapsed_s), 1), "records": int(records),
            "complete": bool(complete)} | ({"invocation": invocation} if invocation else {})
    log = sorted([x for x in log if x.get("invocation", x["started_at"]) != key] + [line],
                 key=lambda x: x["started_at"])
    storage.write_json(uri, log)
    return log
