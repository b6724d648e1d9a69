"""A strict reader for the IDX format of MNIST and Fashion-MNIST.

IDX layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the payload in C order. Files may be gzip-compressed. Every deviation raises
:class:`~pipeline.errors.IdxFormatError` (or :class:`~pipeline.errors.CorruptFileError` for a
broken gzip stream) naming the file, what was expected and what was found.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import CorruptFileError, IdxFormatError

GZIP_MAGIC = b"\x1f\x8b"

#: IDX type code -> numpy dtype (big-endian where it matters).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """The file's IDX bytes, gunzipped if it is gzip-compressed."""
    raw = Path(path).read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise CorruptFileError(str(path), "a complete gzip stream", f"one truncated after {len(raw)} bytes") from exc
    except (OSError, zlib.error) as exc:
        raise CorruptFileError(str(path), "a complete gzip stream", f"a broken one ({exc})") from exc


def parse_idx(data: bytes, name: str, *, ndim: int | None = None, dtype: np.dtype | None = None) -> np.ndarray:
    """Parse IDX bytes into an array; ``ndim`` and ``dtype``, when given, are required."""
    if len(data) < 4:
        raise IdxFormatError(name, "an IDX header of at least 4 bytes", f"{len(data)} bytes")
    zero, type_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_DTYPES:
        raise IdxFormatError(
            name, "magic 0x0000 + a type code in {08,09,0B,0C,0D,0E}", f"magic 0x{data[:4].hex()}"
        )
    if ndim is not None and dims != ndim:
        raise IdxFormatError(name, f"{ndim} dimension(s)", f"{dims}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxFormatError(name, f"a {header}-byte header", f"{len(data)} bytes")
    shape = struct.unpack(f">{dims}I", data[4:header])
    file_dtype = IDX_DTYPES[type_code]
    if dtype is not None and file_dtype != dtype:
        raise IdxFormatError(name, f"{np.dtype(dtype).name} payload", f"{file_dtype.name} payload")
    expected = int(np.prod(shape, dtype=np.int64)) * file_dtype.itemsize
    found = len(data) - header
    if found != expected:
        raise IdxFormatError(name, f"{expected} payload bytes for shape {shape}", f"{found}")
    return np.frombuffer(data, dtype=file_dtype, offset=header).reshape(shape)


def read_idx(path: Path, *, ndim: int | None = None, dtype: np.dtype | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) from disk."""
    return parse_idx(read_bytes(path), str(path), ndim=ndim, dtype=dtype)


def read_split(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one split: uint8 images ``(n, rows, cols)`` and uint8 labels ``(n,)`` in range."""
    images = read_idx(images_path, ndim=3, dtype=np.dtype(np.uint8))
    labels = read_idx(labels_path, ndim=1, dtype=np.dtype(np.uint8))
    if len(images) != len(labels):
        raise IdxFormatError(
            str(labels_path), f"{len(images)} labels (one per image in {Path(images_path).name})", f"{len(labels)}"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        bad = np.unique(labels[labels >= num_classes])[:5].tolist()
        raise IdxFormatError(str(labels_path), f"labels in 0..{num_classes - 1}", f"label values {bad}")
    return images, labels


def write_idx(array: np.ndarray, path: Path, *, compress: bool = True) -> None:
    """Write an array as IDX (used to cut small real subsets for tests and benchmarks)."""
    codes = {v.str.lstrip("<>|="): k for k, v in IDX_DTYPES.items()}
    kind = np.dtype(array.dtype).newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = codes[kind.str.lstrip("<>|=")]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=kind).tobytes()
    Path(path).write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
