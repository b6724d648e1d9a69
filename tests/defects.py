"""Broken copies of real IDX files, made at test time (nothing broken is committed).

Each defect names the stage that must stop the run and the words its one-line error carries.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


def write_dataset(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write ``{"train": (x, y), "t10k": (x, y)}`` as the four gzip IDX files."""
    from pipeline.data.idx import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in splits.items():
        write_idx(images, folder / f"{prefix}-images-idx3-ubyte.gz")
        write_idx(labels, folder / f"{prefix}-labels-idx1-ubyte.gz")
    return folder


def _rewrite(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes())), mtime=0))


def truncated_gzip(folder: Path) -> None:
    data = (folder / TRAIN_IMAGES).read_bytes()
    (folder / TRAIN_IMAGES).write_bytes(data[: len(data) // 2])


def wrong_magic(folder: Path) -> None:
    _rewrite(folder / TRAIN_IMAGES, lambda b: b"\x08\x08\x08\x03" + b[4:])


def wrong_dimensions(folder: Path) -> None:
    # The same payload declared as a 2-D (n, 784) array.
    def flatten(b: bytes) -> bytes:
        n, rows, cols = struct.unpack(">III", b[4:16])
        return struct.pack(">HBB", 0, 8, 2) + struct.pack(">II", n, rows * cols) + b[16:]

    _rewrite(folder / TRAIN_IMAGES, flatten)


def truncated_payload(folder: Path) -> None:
    _rewrite(folder / TRAIN_IMAGES, lambda b: b[: -784 * 3 - 17])


def count_mismatch(folder: Path) -> None:
    # Ten labels fewer than images; the header says so honestly.
    def drop(b: bytes) -> bytes:
        (n,) = struct.unpack(">I", b[4:8])
        return b[:4] + struct.pack(">I", n - 10) + b[8:-10]

    _rewrite(folder / TRAIN_LABELS, drop)


def label_out_of_range(folder: Path) -> None:
    _rewrite(folder / TRAIN_LABELS, lambda b: b[:8] + bytes([12]) + b[9:20] + bytes([200]) + b[21:])


def blank_images(folder: Path) -> None:
    # 5% of the training images all black: a broken export, not a distribution shift.
    def blank(b: bytes) -> bytes:
        pixels = np.frombuffer(b, dtype=np.uint8, offset=16).reshape(-1, 784).copy()
        pixels[::20] = 0
        return b[:16] + pixels.tobytes()

    _rewrite(folder / TRAIN_IMAGES, blank)


def _rewrite_images(folder: Path, change: Callable[[np.ndarray], np.ndarray], name: str = TRAIN_IMAGES) -> None:
    """Apply ``change`` to the uint8 images ``(n, 28, 28)`` of one file and write it back."""
    from pipeline.data.idx import read_idx, write_idx

    write_idx(change(read_idx(folder / name).copy()), folder / name)


def _rewrite_split(folder: Path, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    from pipeline.data.idx import read_split

    images, labels = read_split(folder / TRAIN_IMAGES, folder / TRAIN_LABELS)
    write_dataset(folder, {"train": change(images.copy(), labels.copy())})


def float_payload(folder: Path) -> None:
    _rewrite_images(folder, lambda x: x.astype(np.float32) / 255.0)


def wrong_image_size(folder: Path) -> None:
    _rewrite_images(folder, lambda x: np.pad(x, ((0, 0), (2, 2), (2, 2))))  # 32x32, like CIFAR or padded MNIST


def saturated_images(folder: Path) -> None:
    def saturate(x: np.ndarray) -> np.ndarray:
        x[::20] = 255
        return x

    _rewrite_images(folder, saturate)


def inverted_images(folder: Path) -> None:
    _rewrite_images(folder, lambda x: 255 - x)


def constant_images(folder: Path) -> None:
    def flat(x: np.ndarray) -> np.ndarray:
        x[::20] = 128
        return x

    _rewrite_images(folder, flat)


def class_removed(folder: Path) -> None:
    _rewrite_split(folder, lambda x, y: (x[y != 7], y[y != 7]))


def one_class_dominates(folder: Path) -> None:
    # Class 0 becomes 95% of the training split.
    def skew(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zeros, others = np.flatnonzero(y == 0), np.flatnonzero(y != 0)
        keep = np.concatenate([np.resize(zeros, 19 * len(zeros)), others[: len(zeros)]])
        return x[keep], y[keep]

    _rewrite_split(folder, skew)


def duplicated_rows(folder: Path) -> None:
    _rewrite_split(folder, lambda x, y: (np.concatenate([x, x[:200]]), np.concatenate([y, y[:200]])))


def leak_test_into_train(folder: Path) -> None:
    from pipeline.data.idx import read_split

    test_x, test_y = read_split(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    _rewrite_split(folder, lambda x, y: (np.concatenate([x, test_x[:100]]), np.concatenate([y, test_y[:100]])))


def near_duplicate_leak(folder: Path) -> None:
    """Test images copied into train with +-8 grey levels of noise: exact hashes miss them."""
    from pipeline.data.idx import read_split

    test_x, test_y = read_split(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    noise = np.random.default_rng(0).integers(-8, 9, test_x[:100].shape)
    copies = np.clip(test_x[:100].astype(int) + noise, 0, 255).astype(np.uint8)
    _rewrite_split(folder, lambda x, y: (np.concatenate([x, copies]), np.concatenate([y, test_y[:100]])))


def near_duplicated_rows(folder: Path) -> None:
    """200 training images exported again with +-8 grey levels of noise: exact hashes miss them."""

    def add_copies(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        noise = np.random.default_rng(1).integers(-8, 9, x[:200].shape)
        copies = np.clip(x[:200].astype(int) + noise, 0, 255).astype(np.uint8)
        return np.concatenate([x, copies]), np.concatenate([y, y[:200]])

    _rewrite_split(folder, add_copies)


@dataclass(frozen=True)
class Defect:
    name: str
    apply: Callable[[Path], None]
    stage: str
    """The stage (and Airflow task) that must stop the run."""
    words: tuple[str, ...]
    """Words the one-line error must contain."""

    @property
    def breaks_the_file(self) -> bool:
        """Caught by reading the file (gzip, IDX layout), before any suite runs."""
        return not any(w.startswith("raw_") for w in self.words)


DEFECTS = [
    Defect("truncated_gzip", truncated_gzip, "validate", (TRAIN_IMAGES, "complete gzip stream", "truncated")),
    Defect("wrong_magic", wrong_magic, "validate", (TRAIN_IMAGES, "magic", "not an IDX magic")),
    Defect("wrong_dimensions", wrong_dimensions, "validate", (TRAIN_IMAGES, "3 dimension(s)", "found 2")),
    Defect("truncated_payload", truncated_payload, "validate", (TRAIN_IMAGES, "payload bytes")),
    Defect("count_mismatch", count_mismatch, "validate", (TRAIN_LABELS, "labels", "one per image")),
    Defect("label_out_of_range", label_out_of_range, "validate", (TRAIN_LABELS, "labels in 0..9", "[12, 200]")),
    Defect("blank_images", blank_images, "validate", ("raw_profile", "pixel_max", TRAIN_IMAGES)),
    Defect("float_payload", float_payload, "validate", (TRAIN_IMAGES, "uint8 payload", "float32")),
    Defect("wrong_image_size", wrong_image_size, "validate", ("raw_profile", "height in [28, 28]", TRAIN_IMAGES)),
    Defect("saturated_images", saturated_images, "validate", ("raw_profile", "pixel_std", TRAIN_IMAGES)),
    Defect("inverted_images", inverted_images, "validate", ("raw_profile", "nonzero_fraction", TRAIN_IMAGES)),
    Defect("constant_images", constant_images, "validate", ("raw_profile", "pixel_std", TRAIN_IMAGES)),
    Defect("class_removed", class_removed, "validate", ("raw_dataset", "n_classes", "split train")),
    Defect("one_class_dominates", one_class_dominates, "validate", ("raw_dataset", "class_fraction", "split train")),
    Defect("duplicated_rows", duplicated_rows, "validate", ("raw_dataset", "duplicate_fraction", "split train")),
    Defect("test_copied_into_train", leak_test_into_train, "validate", ("raw_dataset", "overlap_fraction")),
    Defect("near_duplicate_leak", near_duplicate_leak, "validate", ("raw_dataset", "near_overlap_fraction")),
    Defect("near_duplicated_rows", near_duplicated_rows, "validate", ("raw_dataset", "near_duplicate_fraction")),
]


def broken_copy(source: Path, dest: Path, defect: Defect) -> Path:
    """A copy of ``source`` at ``dest`` with ``defect``; a ``dest`` named ``fashion-mnist`` is checked by
    the committed Fashion-MNIST suites (``expectations/fashion-mnist/``), which pin its size and background."""
    shutil.copytree(source, dest)
    defect.apply(dest)
    return dest


def gzip_bomb(path: Path, declared_images: int = 10**9, zeros: int = 1 << 30) -> Path:
    """An IDX ``.gz`` of about a megabyte whose header declares ``declared_images`` 28x28 images
    and whose deflate stream expands to ``zeros`` zero bytes after the header."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    with path.open("wb") as out:
        out.write(compressor.compress(struct.pack(">HBBIII", 0, 8, 3, declared_images, 28, 28)))
        for _ in range(zeros >> 20):
            out.write(compressor.compress(block))
        out.write(compressor.flush())
    return path


def dataset_with(source: Path, dest: Path, name: str, make: Callable[[Path], object]) -> Path:
    """A copy of the dataset at ``source`` whose file ``name`` is made by ``make(path)``."""
    shutil.copytree(source, dest)
    (dest / name).unlink()
    make(dest / name)
    return dest
