"""Where the evaluation results of a run live, and the run's append-only index of them.

Why not inside the checkpoint directories: Ray deletes a checkpoint directory whole when ``--num-to-keep`` prunes
it, and with it every result written there, so the history of a watched run would vanish as training goes on.
The results live beside the checkpoints instead, where nothing prunes them::

    STORAGE/NAME/eval/<checkpoint>/<protocol>.json     one file per result (written atomically)
    STORAGE/NAME/eval/index.jsonl                      one JSON line per result, in the order evaluated

Appending on object stores: S3/GCS objects cannot be appended to, so :func:`append_index` reads the index and
writes it back whole in one atomic write (one PUT; on a filesystem a uniquely named temporary file, then a rename):
a reader sees the old or the new index, never a torn line. That is safe with one writer (the ``--watch``
evaluator); if two evaluators of one run ever raced, one line could be lost, and :func:`record` puts it back the
next time that checkpoint is looked at, because it appends every result of the checkpoint the index lacks (the
result files are the truth, the index their history).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from simclr_dist.console import emit
from simclr_dist import storage

EVAL_DIR = "eval"
INDEX_FILE = "index.jsonl"


def split_checkpoint_uri(checkpoint_uri: str) -> tuple[str, str]:
    """``STORAGE/NAME/checkpoint_x`` -> (``STORAGE/NAME``, ``checkpoint_x``): Ray keeps checkpoints in the run dir."""
    run_uri, _, name = checkpoint_uri.rstrip("/").rpartition("/")
    return run_uri, name


def results_dir(checkpoint_uri: str) -> str:
    """The directory of a checkpoint's result files: ``RUN/eval/<checkpoint>``."""
    run_uri, name = split_checkpoint_uri(checkpoint_uri)
    return storage.join(run_uri, EVAL_DIR, name)


def result_uri(run_uri: str, checkpoint_name: str, protocol: str) -> str:
    """``RUN/eval/<checkpoint>/<protocol>.json`` (``protocol`` is a result name such as ``knn``, ``finetune-0.1``)."""
    return storage.join(run_uri, EVAL_DIR, checkpoint_name, f"{protocol}.json")


def index_uri(run_uri: str) -> str:
    return storage.join(run_uri, EVAL_DIR, INDEX_FILE)


def read_index(run_uri: str, log=emit) -> list[dict[str, Any]]:
    """The run's index entries, oldest first ([] when nothing was evaluated yet). A line that does not parse (a
    hand edit) is skipped with a warning rather than hiding the rest of the history."""
    uri = index_uri(run_uri)
    if not storage.exists(uri):
        return []
    entries = []
    for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            log(f"[eval] {uri}: line {n} is not JSON; skipped")
    return entries


def append_index(run_uri: str, entries: list[dict[str, Any]]) -> None:
    """Append ``entries`` (one JSON line each) to the run's index in one atomic rewrite (see the module doc)."""
    if not entries:
        return
    uri = index_uri(run_uri)
    old = storage.read_bytes(uri) if storage.exists(uri) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    storage.write_bytes(uri, old + new)


def index_entry(checkpoint_name: str, protocol: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """What the index keeps of one result: enough for the history table; the result file has the rest."""
    return {"checkpoint": checkpoint_name, "protocol": protocol, "epoch": result.get("checkpoint_epoch"),
            "step": result.get("checkpoint_step"), "top1": result.get("top1"), "top5": result.get("top5"),
            "label_count": result.get("label_count"), "evaluated_at": result.get("evaluated_at"),
            "train_s": result.get("checkpoint_train_s"),
            "result": f"{EVAL_DIR}/{checkpoint_name}/{protocol}.json"}


def record(checkpoint_uri: str, results: Mapping[str, Mapping[str, Any]]) -> int:
    """Append to the run's index every result of this checkpoint (``{result name: result}``) it does not list
    yet; returns how many were appended. Idempotent, so a restarted watcher can call it for cached results."""
    run_uri, name = split_checkpoint_uri(checkpoint_uri)
    have = {(e.get("checkpoint"), e.get("protocol")) for e in read_index(run_uri)}
    new = [index_entry(name, p, r) for p, r in results.items() if (name, p) not in have]
    append_index(run_uri, new)
    return len(new)


def format_history(entries: list[dict[str, Any]]) -> str:
    """The run's evaluation history, one row per indexed result, in the order evaluated."""
    if not entries:
        return "no evaluation results recorded for this run yet"
    w = max(len("checkpoint"), *(len(str(e.get("checkpoint"))) for e in entries))
    header = f"{'checkpoint':<{w}} {'epoch':>5} {'step':>7} {'protocol':<14} {'labels':>7} {'top-1':>7} {'top-5':>7}"

    def num(v: Any, width: int, spec: str = "") -> str:
        return f"{format(v, spec) if isinstance(v, (int, float)) else '-':>{width}}"

    rows = [header, "-" * len(header)]
    for e in entries:
        rows.append(f"{str(e.get('checkpoint')):<{w}} {num(e.get('epoch'), 5)} {num(e.get('step'), 7)} "
                    f"{str(e.get('protocol')):<14} {num(e.get('label_count'), 7)} {num(e.get('top1'), 7, '.4f')} "
                    f"{num(e.get('top5'), 7, '.4f')}")
    return "\n".join(rows)
