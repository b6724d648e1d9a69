"""Decode a dataset's image files (PNG, JPEG, WebP, BMP) into the uint8 arrays training uses.

Bytes in, arrays out: the layout readers read the files and hand their bytes here; this module
never opens a file. Grayscale images come out as ``(n, height, width)``, colour ones as
``(n, height, width, 3)``, in the order given.

Conversion, the same for every image of a dataset (:class:`ImagePolicy`):

- **Orientation.** An EXIF (or XMP) orientation tag is applied first (``ImageOps.exif_transpose``),
  so an image stored on its side is decoded upright, and the size checked is the upright one.
- **Grayscale** (``channels=1``): Pillow's ``L`` conversion, the ITU-R 601-2 luma
  ``L = 0.299 R + 0.587 G + 0.114 B`` (a gray RGB image, R = G = B, keeps its values exactly);
  palette and 1-bit images through their palette or 0/255. 16-bit images (``I;16``, ``I``) are
  scaled to 8 bits, ``round(v / 257)``, where Pillow alone would clip everything above 255 to white.
- **Colour** (``channels=3``): Pillow's ``RGB`` conversion (gray replicated, palettes looked up,
  CMYK JPEGs converted).
- **Alpha** (an alpha band, or a PNG ``tRNS`` transparency): composited on black, so a fully
  transparent pixel is 0, the background of MNIST-style data. Dropping alpha instead would expose
  whatever colour the transparent pixels happen to store.
- **Size.** Under ``mixed_sizes="reject"`` an image of another size than the dataset's is a bad
  image; under ``"resize"`` it is resized to that size with Pillow's ``Resampling.BILINEAR``
  (after conversion, so alpha is already composited).

Decompression bombs: the pixel count the header declares is checked against ``max_pixels``
before any pixel is decoded, so a 100-byte PNG declaring 20000x20000 costs nothing. Worker
processes also set Pillow's ``Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` and turn its
``DecompressionBombWarning`` into an error, so Pillow's own check agrees; an inline decode leaves
the calling process's Pillow settings as they are, and the header check alone decides.

A bad image (zero bytes, not one of the four formats, an unreadable header, truncated or corrupt
data, a mode that cannot be converted, too many pixels, a refused size) raises
:class:`~pipeline.errors.BadImageError` from :func:`decode`, and is returned as a
:class:`BadImage` by :func:`decode_all`: its path and one line saying what was expected and what
was found. No Pillow exception escapes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import BadImageError, ConfigError

MixedSizes = Literal["resize", "reject"]

#: The formats read; Pillow is asked for no other, so no other parser sees the dataset's bytes.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")

#: Default bound on the pixels an image header may declare.
MAX_PIXELS = 4096 * 4096

#: Images per task sent to a worker process: large enough that pickling and scheduling cost
#: little per image, small enough to keep both workers busy to the end.
CHUNK = 512

#: Below this many images a process pool costs more to start than it saves.
INLINE_BELOW = 2000

#: Worker processes start from a fresh interpreter: callers (an Airflow task, a server) may run
#: threads, and a fork copies their locks in whatever state they are.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"

EXPECTED_FILE = "a PNG, JPEG, WebP or BMP image"

#: What Pillow raises on bad data (UnidentifiedImageError is an OSError; truncated data is an
#: OSError; broken PNG chunks a SyntaxError; bad headers struct.error, ValueError or EOFError).
PILLOW_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

#: ``Image.info`` keys that can carry an orientation in the four formats. Reading EXIF costs more
#: than decoding a 28x28 PNG, so images with none of them skip ``exif_transpose``.
ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")

#: Orientation tag values that swap width and height (transpose, rotations by 90 degrees).
SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
GRAY_MODES = {"1", "L", "LA", "La", "I", "F"} | WIDE_GRAY_MODES

#: Signatures of the four formats (a file starting with one has an unreadable header, not an
#: unknown format) and of formats often found where an image was expected.
OWN_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"))
OTHER_SIGNATURES = ((b"GIF8", "a GIF image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"))


def _check_target(
    channels: int | None, size: tuple[int, int] | None, mixed_sizes: str, max_pixels: int, where: str
) -> None:
    """Refuse settings out of range; None (left to the data) passes."""
    if channels not in (None, 1, 3):
        raise ConfigError(f"{where} channels", "1 (grayscale) or 3 (RGB)", repr(channels))
    if size is not None and (len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size)):
        raise ConfigError(f"{where} size", "(height, width), two positive integers", repr(size))
    if mixed_sizes not in get_args(MixedSizes):
        raise ConfigError(f"{where} mixed_sizes", " or ".join(get_args(MixedSizes)), repr(mixed_sizes))
    if max_pixels < 1:
        raise ConfigError(f"{where} max_pixels", "a positive pixel count", repr(max_pixels))


@dataclass(frozen=True)
class ImagePolicy:
    """How every image of one dataset is turned into the same array shape."""

    channels: int | None = None
    """1 (grayscale) or 3 (RGB); None: 3 if any image is colour (by the mode its header declares;
    a palette counts as colour unless every entry is gray, and WebP is always RGB), else 1."""
    size: tuple[int, int] | None = None
    """(height, width); None: the most common upright size among the images (ties: the largest
    area, then the greater height)."""
    mixed_sizes: MixedSizes = "reject"
    """"resize": images of another size are resized to ``size`` (bilinear); "reject": they are
    bad images."""
    max_pixels: int = MAX_PIXELS
    """A header declaring more pixels than this is refused before decoding."""

    def __post_init__(self) -> None:
        _check_target(self.channels, self.size, self.mixed_sizes, self.max_pixels, "ImagePolicy")


@dataclass(frozen=True)
class Probe:
    """What an image's header says, read without decoding pixels: the stored size (before any
    EXIF orientation), the Pillow mode (``L``, ``RGB``, ``P``, ``RGBA``, ``I;16``, ``CMYK``...)
    and the format (``PNG``, ``JPEG``, ``WEBP``, ``BMP``)."""

    width: int
    height: int
    mode: str
    format: str


@dataclass(frozen=True)
class BadImage:
    """An image :func:`decode_all` could not use: its name as the dataset lists it, and one line
    saying what was expected and what was found."""

    path: str
    problem: str


def probe(path: str, data: bytes, max_pixels: int = MAX_PIXELS) -> Probe:
    """Read one image's header: its size, mode and format, without decoding pixels.

    Raises :class:`~pipeline.errors.BadImageError` naming ``path`` for zero bytes, a format
    other than the four, an unreadable header, or more than ``max_pixels`` pixels."""
    return _header(path, data, max_pixels)[0]


def decode(
    path: str,
    data: bytes,
    channels: int,
    size: tuple[int, int],
    mixed_sizes: MixedSizes = "reject",
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode one image to uint8 ``(height, width)`` (``channels=1``) or ``(height, width, 3)``,
    converted, oriented and sized as the module describes; ``size`` is (height, width).

    Raises :class:`~pipeline.errors.BadImageError` naming ``path`` for any bad image."""
    _check_target(channels, size, mixed_sizes, max_pixels, "decode")
    return np.array(_decode_image(path, data, channels, size, mixed_sizes, max_pixels))


def decode_all(
    items: Sequence[tuple[str, bytes]], policy: ImagePolicy = ImagePolicy(), workers: int | None = None
) -> tuple[np.ndarray, list[int], list[BadImage], tuple[int, int, int]]:
    """Decode every ``(path, bytes)`` of a dataset with one policy, in parallel.

    Returns the good images stacked in input order, their indices into ``items``, the bad ones in
    input order, and the ``(channels, height, width)`` used. Where the policy leaves channels or
    size open, every header is probed first to settle them (unreadable ones are left out of that
    choice; they are reported when decoded). With no readable image and no size given, the size
    is (0, 0).

    ``workers`` processes decode chunks of :data:`CHUNK` images, each returned as one uint8
    array; default: the CPUs this process may use. With one worker, or fewer than
    :data:`INLINE_BELOW` images, everything is decoded in this process."""
    if workers is not None and workers < 1:
        raise ConfigError("decode_all workers", "at least 1", str(workers))
    chunks = [list(items[start : start + CHUNK]) for start in range(0, len(items), CHUNK)]
    count = min(workers or _available_cpus(), len(chunks))
    with _chunk_runner(count if len(items) >= INLINE_BELOW else 1, policy.max_pixels) as run:
        channels, size = policy.channels, policy.size
        if channels is None or size is None:
            headers = [
                found for part in run(partial(_probe_chunk, max_pixels=policy.max_pixels), chunks) for found in part
            ]
            channels, size = _settle(policy, headers)
        decode_chunk = partial(
            _decode_chunk, channels=channels, size=size, mixed_sizes=policy.mixed_sizes, max_pixels=policy.max_pixels
        )
        shape = (size[0], size[1]) if channels == 1 else (size[0], size[1], 3)
        images = np.empty((len(items), *shape), np.uint8)
        good: list[int] = []
        bad: list[BadImage] = []
        for start, (array, good_here, bad_here) in zip(
            range(0, len(items), CHUNK), run(decode_chunk, chunks), strict=True
        ):
            images[len(good) : len(good) + len(array)] = array
            good.extend(start + i for i in good_here)
            bad.extend(BadImage(items[start + i][0], problem) for i, problem in bad_here)
    return images[: len(good)], good, bad, (channels, size[0], size[1])


# --- one image -------------------------------------------------------------------------------


def _header(path: str, data: bytes, max_pixels: int) -> tuple[Probe, tuple[int, int], bool]:
    """The probe, the upright (height, width) and whether the declared mode is colour."""
    image = _open(path, data, max_pixels)
    width, height = image.size
    upright = (height, width)
    if any(key in image.info for key in ORIENTATION_KEYS):
        try:
            if image.getexif().get(0x0112) in SWAPPING_ORIENTATIONS:
                upright = (width, height)
        except PILLOW_ERRORS as error:
            raise BadImageError(path, "readable EXIF metadata", _one_line(error)) from None
    return Probe(width, height, image.mode, str(image.format)), upright, _is_colour(image)


def _open(path: str, data: bytes, max_pixels: int) -> Image.Image:
    """Open the header (Pillow reads no pixels yet) and refuse a decompression bomb."""
    if not data:
        raise BadImageError(path, EXPECTED_FILE, "0 bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, f"at most {max_pixels} pixels", _bomb(str(error))) from None
    except PILLOW_ERRORS as error:
        own = _own_format(data)
        if own is None:
            raise BadImageError(path, EXPECTED_FILE, _describe_unknown(data)) from None
        raise BadImageError(path, f"a readable {own} header", _one_line(error)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(path, f"at most {max_pixels} pixels", _bomb(f"({width * height} pixels)"))
    return image


def _decode_image(
    path: str, data: bytes, channels: int, size: tuple[int, int], mixed_sizes: MixedSizes, max_pixels: int
) -> Image.Image:
    """One image as a Pillow image in mode ``L`` or ``RGB`` of ``size`` (height, width)."""
    image = _open(path, data, max_pixels)
    try:
        image.load()
        if any(key in image.info for key in ORIENTATION_KEYS):
            image = ImageOps.exif_transpose(image)
    except PILLOW_ERRORS as error:
        raise BadImageError(
            path, f"complete {image.format} data", f"truncated or corrupt data ({_one_line(error)})"
        ) from None
    if (image.height, image.width) != size and mixed_sizes == "reject":
        raise BadImageError(
            path, f"{size[0]}x{size[1]} pixels (height x width) as the dataset", f"{image.height}x{image.width}"
        )
    image = _convert(path, image, "L" if channels == 1 else "RGB")
    if (image.height, image.width) != size:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return image


def _convert(path: str, image: Image.Image, target: str) -> Image.Image:
    """``image`` in mode ``target``: 16 bits scaled to 8, alpha composited on black."""
    try:
        if image.mode in WIDE_GRAY_MODES:
            image = _eight_bit_gray(image)
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            composite = Image.new(target, image.size, 0)
            composite.paste(rgba.convert(target), mask=rgba.getchannel("A"))
            return composite
        return image if image.mode == target else image.convert(target)
    except ValueError as error:  # Pillow has no conversion from this mode (LAB, La...)
        raise BadImageError(
            path, f"a mode convertible to {target}", f"mode {image.mode} ({_one_line(error)})"
        ) from None


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grayscale image scaled to ``L``, ``round(v / 257)``; a
    transparency key becomes an alpha band, compared at full depth (``LA``)."""
    wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    gray = ((wide + 128) // 257).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(wide == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1))
    return Image.fromarray(gray)


def _is_colour(image: Image.Image) -> bool:
    """Whether the mode the header declares is colour; a palette is colour unless all gray."""
    if image.mode in GRAY_MODES:
        return False
    if image.mode not in ("P", "PA") or image.palette is None:
        return True
    order = image.palette.rawmode or image.palette.mode
    if not {"R", "G", "B"} <= set(order) or set(order) - set("RGBAX"):
        return True
    entries = np.frombuffer(bytes(image.palette.palette), np.uint8)
    entries = entries[: len(entries) // len(order) * len(order)].reshape(-1, len(order))
    red, green, blue = (entries[:, order.index(band)] for band in "RGB")
    return not (np.array_equal(red, green) and np.array_equal(green, blue))


def _own_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for signature, name in OWN_SIGNATURES if data.startswith(signature)), None)


def _describe_unknown(data: bytes) -> str:
    """What bytes in none of the four formats are, without echoing them."""
    known = next((what for signature, what in OTHER_SIGNATURES if data.startswith(signature)), None)
    if known:
        return f"{known} ({len(data)} bytes)"
    try:
        text = data[:256].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"{len(data)} bytes of text"
    return f"{len(data)} bytes in no known image format"


def _bomb(message: str) -> str:
    """One wording for a refused pixel count, whether Pillow's check or ours caught it (Pillow's
    message is "Image size (N pixels) exceeds limit of M pixels, ...")."""
    declared = re.search(r"\((\d+) pixels\)", message)
    amount = f"{declared[1]} pixels" if declared else _one_line(message)
    return f"a header declaring {amount} (a decompression bomb?), refused before decoding"


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# --- many images -----------------------------------------------------------------------------


def _settle(policy: ImagePolicy, headers: list[tuple[tuple[int, int], bool] | None]) -> tuple[int, tuple[int, int]]:
    """The policy's channels and size, filled in from the probed headers where left open."""
    readable = [found for found in headers if found is not None]
    channels = policy.channels or (3 if any(colour for _, colour in readable) else 1)
    if policy.size is not None:
        return channels, policy.size
    sizes = Counter(upright for upright, _ in readable)
    if not sizes:
        return channels, (0, 0)
    return channels, max(sizes, key=lambda hw: (sizes[hw], hw[0] * hw[1], hw[0]))


def _probe_chunk(chunk: list[tuple[str, bytes]], max_pixels: int) -> list[tuple[tuple[int, int], bool] | None]:
    """Per image: its upright (height, width) and whether it is colour, or None if unreadable."""
    found: list[tuple[tuple[int, int], bool] | None] = []
    for path, data in chunk:
        try:
            _, upright, colour = _header(path, data, max_pixels)
        except BadImageError:
            found.append(None)
        else:
            found.append((upright, colour))
    return found


def _decode_chunk(
    chunk: list[tuple[str, bytes]], channels: int, size: tuple[int, int], mixed_sizes: MixedSizes, max_pixels: int
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """The good images of a chunk as one uint8 array, their indices in the chunk, and the bad
    ones' indices and problems."""
    shape = (size[0], size[1]) if channels == 1 else (size[0], size[1], 3)
    out = np.empty((len(chunk), *shape), np.uint8)
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, (path, data) in enumerate(chunk):
        try:
            image = _decode_image(path, data, channels, size, mixed_sizes, max_pixels)
            # tobytes() straight into the slot, without np.asarray's array-interface detour
            out[len(good)] = np.frombuffer(image.tobytes(), np.uint8).reshape(shape)
        except BadImageError as error:
            bad.append((i, f"expected {error.expected}, found {error.found}"))
        else:
            good.append(i)
    return out[: len(good)], good, bad


@contextmanager
def _chunk_runner(
    workers: int, max_pixels: int
) -> Iterator[Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]]:
    """``run(function, chunks)``: the results in order, from ``workers`` processes or inline."""
    if workers == 1:
        yield map
        return
    context = multiprocessing.get_context(START_METHOD)
    with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(max_pixels,)) as pool:
        yield pool.map


def _start_worker(max_pixels: int) -> None:
    """In a worker process (ours alone): Pillow's own bomb check at our limit, its warning an error."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
