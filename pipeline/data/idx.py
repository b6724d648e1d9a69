"""A strict, bounded reader for the IDX format of MNIST and Fashion-MNIST.

IDX layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the payload in C order. Files may be gzip-compressed (one member or several, as
``gzip.decompress`` reads them). Every deviation raises :class:`~pipeline.errors.IdxFormatError`
(or :class:`~pipeline.errors.CorruptFileError` for a broken gzip stream) naming the file, what
was expected and what was found.

Reading streams: the file is decompressed in pieces of at most :data:`CHUNK` bytes, the header
is read first, the size it declares is checked against the dataset size limit
(``PIPELINE_MAX_DATASET_BYTES``, :class:`~pipeline.config.SourceLimits`) *before* anything is
allocated, and the payload is decompressed straight into an array of exactly that size; a
stream that brings fewer or more bytes is refused. A 1 MB file that declares 10^9 images or
expands to gigabytes therefore costs neither the memory nor the time of expanding it.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import CorruptFileError, IdxFormatError, SourceLimitError

GZIP_MAGIC = b"\x1f\x8b"

#: Largest piece of decompressed content produced at once (and read from disk at once).
CHUNK = 1 << 20

#: After the payload, how many surplus bytes are counted for the message before giving up.
SURPLUS_COUNTED = 64 << 20

#: IDX type code -> numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Signatures of formats often found where an IDX file was expected, named in errors instead of
#: the bytes themselves.
SIGNATURES = (
    (GZIP_MAGIC, "gzip data (compressed twice?)"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x89PNG", "a PNG image"),
    (b"BZh", "bzip2 data"),
    (b"\xfd7zXZ", "xz data"),
    (b"\x28\xb5\x2f\xfd", "zstd data"),
    (b"%PDF", "a PDF document"),
)


def describe_magic(head: bytes) -> str:
    """What the first bytes of a file that is not IDX are, without echoing its content.

    The rule: the bytes are shown in hex only when the first two are the IDX zeros, since the
    other two are then the type code and the dimension count (format fields, not data).
    Otherwise the bytes are described: a known signature (gzip, ZIP, PNG...), text, or
    "bytes that are not an IDX magic". A file of secrets mistaken for a dataset file (a
    symlink to ``/etc/passwd``) leaks nothing through the message."""
    if head[:2] == b"\x00\x00":
        return f"magic 0x{head.hex()}"
    for signature, what in SIGNATURES:
        if head.startswith(signature):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"{len(head)} bytes of text, not an IDX magic"
    return f"{len(head)} bytes that are not an IDX magic"


class ContentStream:
    """Incremental decoder of a file's IDX content: gzip (every member) or raw bytes as they are.

    :meth:`feed` takes the file's bytes in any pieces and yields the content in pieces of at
    most :data:`CHUNK` bytes, so a small compressed block that expands enormously is never
    expanded at once; :meth:`finish` ends the stream. A broken or truncated gzip stream raises
    :class:`~pipeline.errors.CorruptFileError` naming ``name``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.compressed: bool | None = None
        self.file_bytes = 0
        self._pending = b""  # bytes held back until there are two to look at
        self._inflater: zlib._Decompress | None = None
        self._between = False

    def feed(self, block: bytes) -> Iterator[bytes]:
        self.file_bytes += len(block)
        if self.compressed is None:
            block, self._pending = self._pending + block, b""
            if len(block) < 2:
                self._pending = block
                return
            self.compressed = block.startswith(GZIP_MAGIC)
        if not self.compressed:
            for start in range(0, len(block), CHUNK):
                yield block[start : start + CHUNK]
            return
        yield from self._inflate(block)

    def _inflate(self, block: bytes) -> Iterator[bytes]:
        while True:
            if self._inflater is None:
                block, self._pending = self._pending + block, b""
                if self._between:  # as gzip.decompress: zero padding may follow a member
                    block = block.lstrip(b"\x00")
                if len(block) < 2:
                    self._pending = block
                    return
                if not block.startswith(GZIP_MAGIC):
                    raise CorruptFileError(self.name, "a complete gzip stream", "other data after a gzip member")
                self._inflater = zlib.decompressobj(31)
            try:
                out = self._inflater.decompress(block, CHUNK)
            except zlib.error as exc:
                raise CorruptFileError(self.name, "a complete gzip stream", f"a broken one ({exc})") from exc
            if out:
                yield out
            if self._inflater.eof:
                block, self._inflater, self._between = self._inflater.unused_data, None, True
                if not block:
                    return
                continue
            block = self._inflater.unconsumed_tail
            if not block and len(out) < CHUNK:
                return  # needs more input

    def finish(self) -> Iterator[bytes]:
        if self.compressed is None:  # fewer than two bytes in all: raw
            self.compressed = False
            if self._pending:
                yield self._pending
            return
        if self.compressed and (self._inflater is not None or self._pending):
            raise CorruptFileError(self.name, "a complete gzip stream", f"one truncated after {self.file_bytes} bytes")


def _content(path: Path) -> Iterator[bytes]:
    stream = ContentStream(str(path))
    with Path(path).open("rb") as fh:
        while block := fh.read(CHUNK):
            yield from stream.feed(block)
    yield from stream.finish()


class _Pieces:
    """Exact reads over an iterator of byte pieces."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.held = b""

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end); for the header, so ``n`` is small."""
        while len(self.held) < n and (piece := next(self.pieces, None)) is not None:
            self.held += piece
        out, self.held = self.held[:n], self.held[n:]
        return out

    def read_into(self, view: memoryview) -> int:
        """Fill ``view``; return how many bytes there were for it."""
        filled = min(len(self.held), len(view))
        view[:filled] = self.held[:filled]
        self.held = self.held[filled:]
        while filled < len(view) and (piece := next(self.pieces, None)) is not None:
            take = min(len(piece), len(view) - filled)
            view[filled : filled + take] = piece[:take]
            filled += take
            self.held = piece[take:]
        return filled

    def count_rest(self, most: int) -> int:
        """How many bytes remain, counting no further than ``most`` (then ``most + 1``)."""
        count = len(self.held)
        while count <= most and (piece := next(self.pieces, None)) is not None:
            count += len(piece)
        return min(count, most + 1)


def _type_and_dims(head: bytes, name: str, ndim: int | None) -> tuple[int, int]:
    if len(head) < 4:
        raise IdxFormatError(name, "an IDX header of at least 4 bytes", f"{len(head)} bytes")
    zero, type_code, dims = struct.unpack(">HBB", head[:4])
    if zero != 0 or type_code not in IDX_DTYPES:
        raise IdxFormatError(name, "magic 0x0000 + a type code in {08,09,0B,0C,0D,0E}", describe_magic(head[:4]))
    if ndim is not None and dims != ndim:
        raise IdxFormatError(name, f"{ndim} dimension(s)", f"{dims}")
    return type_code, dims


def _layout(
    head: bytes, name: str, type_code: int, dims: int, dtype: np.dtype | None, max_bytes: int | None
) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and payload size declared by a complete header, checked against the limit."""
    header = 4 + 4 * dims
    if len(head) < header:
        raise IdxFormatError(name, f"a {header}-byte header", f"{len(head)} bytes")
    shape = struct.unpack(f">{dims}I", head[4:header])
    file_dtype = IDX_DTYPES[type_code]
    if dtype is not None and file_dtype != dtype:
        raise IdxFormatError(name, f"{np.dtype(dtype).name} payload", f"{file_dtype.name} payload")
    expected = math.prod(shape) * file_dtype.itemsize
    # numpy refuses a shape whose dimensions, zeros left out, multiply beyond 63 bits, even with a
    # zero among them (an empty array): such a header is refused here, in one line.
    if math.prod(d for d in shape if d) * file_dtype.itemsize >= 2**63:
        raise IdxFormatError(name, "dimensions whose product fits in 63 bits", f"shape {shape}")
    if max_bytes is not None and header + expected > max_bytes:
        raise SourceLimitError(
            name,
            f"at most {max_bytes} bytes of content (PIPELINE_MAX_DATASET_BYTES)",
            f"a header declaring {expected} payload bytes for shape {shape}",
        )
    return shape, file_dtype, expected


def parse_idx(
    data: bytes, name: str, *, ndim: int | None = None, dtype: np.dtype | None = None, max_bytes: int | None = None
) -> np.ndarray:
    """Parse IDX bytes already in memory; ``ndim`` and ``dtype``, when given, are required.

    The reference decoding that :func:`read_idx` (which streams from disk) agrees with."""
    type_code, dims = _type_and_dims(data[:4], name, ndim)
    shape, file_dtype, expected = _layout(data[: 4 + 4 * dims], name, type_code, dims, dtype, max_bytes)
    found = len(data) - (4 + 4 * dims)
    if found != expected:
        raise IdxFormatError(name, f"{expected} payload bytes for shape {shape}", f"{found}")
    return np.frombuffer(data, dtype=file_dtype, offset=4 + 4 * dims).reshape(shape)


def read_idx(
    path: Path, *, ndim: int | None = None, dtype: np.dtype | None = None, max_bytes: int | None = None
) -> np.ndarray:
    """Read an IDX file (gzip or raw) from disk, streaming, into an array of the declared size.

    ``max_bytes`` bounds the content (header and payload); default the
    ``PIPELINE_MAX_DATASET_BYTES`` setting."""
    if max_bytes is None:
        from pipeline.config import SourceLimits

        max_bytes = SourceLimits.from_env().max_dataset_bytes
    name = str(path)
    pieces = _Pieces(_content(path))
    head = pieces.read(4)
    type_code, dims = _type_and_dims(head, name, ndim)
    head += pieces.read(4 * dims)
    shape, file_dtype, expected = _layout(head, name, type_code, dims, dtype, max_bytes)
    array = np.empty(shape, dtype=file_dtype)
    found = pieces.read_into(memoryview(array.reshape(-1).view(np.uint8).data))
    if found < expected:
        raise IdxFormatError(name, f"{expected} payload bytes for shape {shape}", f"{found}")
    surplus = pieces.count_rest(SURPLUS_COUNTED)
    if surplus:
        shown = f"more than {expected + SURPLUS_COUNTED}" if surplus > SURPLUS_COUNTED else f"{expected + surplus}"
        raise IdxFormatError(name, f"{expected} payload bytes for shape {shape}", shown)
    return array


def read_split(
    images_path: Path, labels_path: Path, num_classes: int = 10, max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one split: uint8 images ``(n, rows, cols)`` and uint8 labels ``(n,)`` in range.

    ``max_bytes`` bounds both files' content together (default ``PIPELINE_MAX_DATASET_BYTES``)."""
    if max_bytes is None:
        from pipeline.config import SourceLimits

        max_bytes = SourceLimits.from_env().max_dataset_bytes
    images = read_idx(images_path, ndim=3, dtype=np.dtype(np.uint8), max_bytes=max_bytes)
    labels = read_idx(labels_path, ndim=1, dtype=np.dtype(np.uint8), max_bytes=max(1, max_bytes - 16 - images.nbytes))
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
    import gzip

    codes = {v.str.lstrip("<>|="): k for k, v in IDX_DTYPES.items()}
    kind = np.dtype(array.dtype).newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = codes[kind.str.lstrip("<>|=")]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=kind).tobytes()
    Path(path).write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
