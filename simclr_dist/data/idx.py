"""Reader of the IDX format (MNIST, Fashion-MNIST): one array per file, plain or gzip-compressed.

Why our own reader rather than torchvision's: torchvision's ``FashionMNIST`` wants its own directory layout and
md5 sums, and on a bad file it says only "Dataset not found or corrupted". Datasets installed by a system package
(Debian ``dataset-fashion-mnist``) or copied by hand arrive as four loose files; each check here fails with one line
that names the file and what is wrong with it (missing, truncated, not IDX, wrong shape).

Format: a 4-byte magic ``0x00 0x00 <type code> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data,
big-endian, C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# IDX type code -> numpy dtype (big-endian where it matters)
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


class IDXError(ValueError):
    """A file is not a complete IDX array of the expected kind; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise IDXError(f"{path}: no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut-off or damaged download
        raise IDXError(f"{path}: truncated or corrupt gzip file ({e})") from None
    except OSError as e:
        raise IDXError(f"{path}: cannot read ({e.strerror or e})") from None


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """The array stored in ``path`` (``.gz`` is decompressed), in native byte order.

    ``ndim`` (3 for images, 1 for labels) rejects a file of the wrong kind, e.g. the labels passed as images.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: truncated: {len(data)} bytes, not even an IDX header")
    zero, code, dims = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_TYPES or dims == 0:
        raise IDXError(f"{path}: not an IDX file (magic number 0x{data[:4].hex()}, expected 0x0000TTNN with type "
                       f"TT in {', '.join(f'{t:02x}' for t in IDX_TYPES)})")
    if ndim is not None and dims != ndim:
        raise IDXError(f"{path}: holds a {dims}-d array, expected {ndim}-d (is it the right file?)")
    head = 4 + 4 * dims
    if len(data) < head:
        raise IDXError(f"{path}: truncated inside the header ({len(data)} of {head} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=dims, offset=4))
    dtype = IDX_TYPES[code]
    expected = head + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(f"{path}: {what}: {len(data)} bytes, the header {list(shape)} of {dtype.name} needs {expected}")
    array = np.frombuffer(data, dtype, offset=head).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else array
