"""``results.json`` on disk: the study's summary with its bulky integer arrays packed, and read back unpacked.

Why pack: a committed study holds every final model's test predictions (10,000 per record on Fashion-MNIST, a few
hundred records) and every label subset's indices (60,000 per replicate at 100%): as JSON lists that is tens of MB
in the repository; as zlib-compressed little-endian integers in base64 it is a few MB, still one self-describing
JSON file that any language reads (``{"packed": "int32-zlib-base64", "length": N, "data": "..."}``). Every reader
goes through :func:`unpack`, so tables, report and plots see plain lists whichever way a file was written (files
of format 2, unpacked, read unchanged).
"""

from __future__ import annotations

import base64
import copy
import zlib
from typing import Any

import numpy as np

from simclr_dist import storage

PACKING = "int32-zlib-base64"


def pack_ints(values) -> dict[str, Any]:
    arr = np.asarray(values, dtype="<i4")
    return {"packed": PACKING, "length": int(arr.size), "data": base64.b64encode(zlib.compress(arr.tobytes(), 9)).decode()}


def unpack_ints(value: Any) -> list[int]:
    if not (isinstance(value, dict) and "packed" in value):
        return value
    if value["packed"] != PACKING:
        raise ValueError(f"results.json: unknown packing {value['packed']!r} (this version reads {PACKING})")
    arr = np.frombuffer(zlib.decompress(base64.b64decode(value["data"])), dtype="<i4")
    if arr.size != value["length"]:
        raise ValueError(f"results.json: a packed array holds {arr.size} values, its header says {value['length']}")
    return arr.tolist()


def pack(summary: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``summary`` with every record's ``predictions`` and every subset's indices packed."""
    out = copy.copy(summary)
    out["records"] = [{**r, "predictions": pack_ints(r["predictions"])} if isinstance(r.get("predictions"), list)
                      else r for r in summary.get("records", [])]
    if "subsets" in summary:
        out["subsets"] = {k: pack_ints(v) if isinstance(v, list) else v for k, v in summary["subsets"].items()}
    return out


def unpack(summary: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack` (a plain file comes back as it is)."""
    out = copy.copy(summary)
    out["records"] = [{**r, "predictions": unpack_ints(r["predictions"])} if "predictions" in r else r
                      for r in summary.get("records", [])]
    if "subsets" in summary:
        out["subsets"] = {k: unpack_ints(v) for k, v in summary["subsets"].items()}
    return out


def write_results(uri: str, summary: dict[str, Any]) -> None:
    storage.write_json(uri, pack(summary))


def read_results(uri: str) -> dict[str, Any]:
    """A results.json (path or URI), unpacked; one-line errors for what is not one."""
    try:
        summary = storage.read_json(uri)
    except (OSError, ValueError) as e:
        raise ValueError(f"{uri}: cannot read an experiments results.json ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("records"), list):
        raise ValueError(f"{uri}: not an experiments results.json (no 'records' list)")
    return unpack(summary)
