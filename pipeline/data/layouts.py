"""Dataset layouts: which images a dataset holds, with which label, in which split.

A dataset's files are read through a :class:`Members` store, never extracted to disk: a folder,
a ``.tar``/``.tar.gz``/``.tgz`` or a ``.zip`` archive. :func:`detect_layout` recognises, from
the names alone (a ``format`` setting overrides it):

* ``idx``: the four IDX files (MNIST, Fashion-MNIST, KMNIST and the like; read by
  :mod:`pipeline.data.idx`, not here);
* ``folders``: torchvision's ``ImageFolder`` convention, ``train/<class>/<image>`` and
  ``test/<class>/<image>``; or one folder of class folders, ``<class>/<image>``, split by a
  seeded, stratified share (:func:`split_stratified`);
* ``manifest``: ``labels.csv`` (or one ``.parquet`` file) with columns ``path`` and ``label``
  and optionally ``split`` (``train`` or ``test``; rows without one are split as above),
  paths relative to the manifest.

An archive whose members all sit under one top folder (``fashion/train/...``) is read as if that
folder were the root. :func:`list_images` returns a :class:`Listing` or raises
:class:`~pipeline.errors.DatasetLayoutError` naming the file and the problem: a manifest row
whose file is missing, an image no manifest row names, an empty class folder, a class that
appears only in the test split, an archive member that is a link or leaves the archive's root.
Class names are sorted (as ``ImageFolder`` sorts them; numerically when every name is an
integer), so a class's id does not depend on the order files were listed in.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from pipeline.config.settings import ARCHIVE_SUFFIXES, IDX_FILES, MANIFEST_NAMES
from pipeline.errors import DatasetLayoutError

Layout = Literal["idx", "folders", "manifest"]
LAYOUTS: tuple[str, ...] = ("idx", "folders", "manifest")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
SPLIT_NAMES = ("train", "test")


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


class Members:
    """A dataset's files by relative POSIX name, read into memory one at a time."""

    where: str
    """The folder or archive, as messages name it."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def folders(self) -> set[str]:
        """Every folder, empty ones included (an archive's directory entries)."""
        return {str(parent) for name in self.names() for parent in PurePosixPath(name).parents if str(parent) != "."}

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def read_many(self, names: Iterable[str]) -> Iterable[tuple[str, bytes]]:
        """``(name, bytes)`` for each of ``names``, in that order."""
        for name in names:
            yield name, self.read(name)

    def close(self) -> None:
        pass

    def __enter__(self) -> Members:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_name(where: str, name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise DatasetLayoutError(f"{where}!{name}", "a member name inside the archive's root", "a path that leaves it")
    return str(path)


class FolderMembers(Members):
    """The regular files under a folder (symbolic links are not followed out of it)."""

    def __init__(self, root: Path) -> None:
        self.root, self.where = root, str(root)
        self._real = root.resolve()

    def names(self) -> list[str]:
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(self.root).parts):
                if not path.resolve().is_relative_to(self._real):
                    raise DatasetLayoutError(str(path), "a file inside the dataset folder", "a link to one outside")
                found.append(path.relative_to(self.root).as_posix())
        return sorted(found)

    def folders(self) -> set[str]:
        return {
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_dir() and not any(part.startswith(".") for part in path.relative_to(self.root).parts)
        }

    def read(self, name: str) -> bytes:
        return (self.root / _safe_name(self.where, name)).read_bytes()


class TarMembers(Members):
    """The regular members of a tar archive (plain or gzip), read without extraction."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        self._tar = tarfile.open(path)  # noqa: SIM115 - closed by close()
        self._members: dict[str, tarfile.TarInfo] = {}
        self._folders: set[str] = set()
        for info in self._tar.getmembers():
            if info.isdir():
                self._folders.add(_safe_name(self.where, info.name))
                continue
            name = _safe_name(self.where, info.name)
            if not info.isfile():
                raise DatasetLayoutError(f"{self.where}!{info.name}", "regular files only", "a link or device")
            if not PurePosixPath(name).name.startswith("."):
                self._members[name] = info

    def names(self) -> list[str]:
        return sorted(self._members)

    def folders(self) -> set[str]:
        return super().folders() | self._folders

    def read(self, name: str) -> bytes:
        handle = self._tar.extractfile(self._members[name])
        assert handle is not None  # a regular file, checked above
        return handle.read()

    def read_many(self, names: Iterable[str]) -> Iterable[tuple[str, bytes]]:
        # In archive order: a compressed tar reads forwards only; seeking back re-decompresses.
        wanted = list(names)
        order = sorted(wanted, key=lambda n: self._members[n].offset_data)
        data = {name: self.read(name) for name in order}
        for name in wanted:
            yield name, data.pop(name)

    def close(self) -> None:
        self._tar.close()


class ZipMembers(Members):
    """The regular members of a zip archive, read without extraction."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        self._zip = zipfile.ZipFile(path)
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._folders: set[str] = set()
        for info in self._zip.infolist():
            if info.is_dir():
                self._folders.add(_safe_name(self.where, info.filename.rstrip("/")))
                continue
            name = _safe_name(self.where, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symbolic link stored by Unix zip
                raise DatasetLayoutError(f"{self.where}!{info.filename}", "regular files only", "a symbolic link")
            if not PurePosixPath(name).name.startswith(".") and not name.startswith("__MACOSX/"):
                self._members[name] = info

    def names(self) -> list[str]:
        return sorted(self._members)

    def folders(self) -> set[str]:
        return super().folders() | self._folders

    def read(self, name: str) -> bytes:
        return self._zip.read(self._members[name])

    def close(self) -> None:
        self._zip.close()


class _Rooted(Members):
    """``inner`` seen from one of its folders."""

    def __init__(self, inner: Members, prefix: str) -> None:
        self.inner, self.prefix, self.where = inner, prefix, f"{inner.where}!{prefix}"

    def names(self) -> list[str]:
        return [n[len(self.prefix) :] for n in self.inner.names() if n.startswith(self.prefix)]

    def folders(self) -> set[str]:
        return {
            f[len(self.prefix) :] for f in self.inner.folders() if f.startswith(self.prefix) and f != self.prefix[:-1]
        }

    def read(self, name: str) -> bytes:
        return self.inner.read(self.prefix + name)

    def read_many(self, names: Iterable[str]) -> Iterable[tuple[str, bytes]]:
        for name, data in self.inner.read_many(self.prefix + n for n in names):
            yield name[len(self.prefix) :], data

    def close(self) -> None:
        self.inner.close()


def open_members(path: Path) -> Members:
    """The files of a folder or an archive; an archive's single top folder becomes its root."""
    if path.is_dir():
        members: Members = FolderMembers(path)
    elif path.name.lower().endswith(".zip"):
        members = ZipMembers(path)
    elif is_archive(path.name):
        try:
            members = TarMembers(path)
        except tarfile.TarError as exc:
            raise DatasetLayoutError(str(path), "a readable tar archive", f"{type(exc).__name__}: {exc}") from None
    else:
        raise DatasetLayoutError(str(path), "a folder or a .tar, .tar.gz, .tgz or .zip archive", "another file")
    if not isinstance(members, FolderMembers):
        names = members.names()
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) == 1 and all("/" in n for n in names):  # one class is no classification task
            return _Rooted(members, f"{tops.pop()}/")
    return members


def detect_layout(names: list[str], where: str, quiet: bool = False) -> Layout | None:
    """The layout the file ``names`` are in; ``quiet``: None when none is recognised, else raise."""
    top = {n for n in names if "/" not in n}
    if set(IDX_FILES.values()) <= top:
        return "idx"
    if any(n in top for n in MANIFEST_NAMES) or any(n.endswith(".parquet") for n in top):
        return "manifest"
    if any(is_image(n) and n.count("/") in (1, 2) for n in names):
        return "folders"
    if quiet:
        return None
    raise DatasetLayoutError(
        where,
        f"a dataset layout: the four IDX files, class folders (train/<class>/<image> or <class>/<image>), "
        f"or a manifest ({' or '.join(MANIFEST_NAMES)})",
        f"{len(names)} files, none of them in one (for example {', '.join(names[:3]) or 'none'})",
    )


@dataclass(frozen=True)
class Listing:
    """The images of a dataset: ``names[i]`` has class ``classes[labels[i]]`` in ``splits[i]``."""

    layout: Layout
    classes: list[str]
    names: list[str]
    labels: np.ndarray
    """int64 class ids."""
    splits: np.ndarray
    """``"train"`` or ``"test"`` per image."""

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class name: images}}``."""
        return {
            split: {c: int(((self.splits == split) & (self.labels == i)).sum()) for i, c in enumerate(self.classes)}
            for split in SPLIT_NAMES
        }


def class_order(names: Iterable[str]) -> list[str]:
    """Class names sorted as ``ImageFolder`` sorts them; numerically when all are integers."""
    unique = sorted(set(names))
    if unique and all(n.lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=int)
    return unique


def split_stratified(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """``"train"``/``"test"`` per item, ``test_fraction`` of every class (at least one image of
    any class with two or more) in test, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), "train", dtype=object)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) >= 2:
            splits[members[: max(1, round(len(members) * test_fraction))]] = "test"
    return splits


class Problems:
    """Where a layout problem goes: raised at once (the default policy), or, with ``collect``,
    kept (``{"path", "problem"}``) while the offending entry is left out."""

    def __init__(self, where: str, collect: bool) -> None:
        self.where, self.collect = where, collect
        self.found: list[dict[str, str]] = []

    def __call__(self, name: str, expected: str, found: str) -> None:
        if not self.collect:
            raise DatasetLayoutError(f"{self.where}/{name}", expected, found)
        self.found.append({"path": name, "problem": f"expected {expected}, found {found}"})


def list_images(
    members: Members,
    layout: Layout | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    problems: list[dict[str, str]] | None = None,
) -> Listing:
    """The labelled images of ``members`` in ``layout`` (detected when None). A layout problem
    (a manifest row without its file, an image without a label, an empty class folder, a class
    only in the test split) raises :class:`~pipeline.errors.DatasetLayoutError`; given a
    ``problems`` list, each is appended to it instead and what it concerns is left out."""
    names = members.names()
    layout = layout or detect_layout(names, members.where)
    assert layout is not None  # detect_layout raises rather than return None unless quiet
    if layout == "idx":
        raise DatasetLayoutError(members.where, "images to list", "the IDX layout (read by pipeline.data.idx)")
    report = Problems(members.where, problems is not None)
    if layout == "folders":
        images, labels, splits = _folders(members, names, report)
    else:
        images, labels, splits = _manifest(members, names, report)
    split_of = np.asarray(splits, dtype=object)
    if not (split_of == "test").any():  # a train/ folder alone, or a split column without test rows
        split_of[:] = ""
    trained = {label for label, split in zip(labels, split_of, strict=True) if split != "test"}
    keep = []
    for index, (name, label, split) in enumerate(zip(images, labels, split_of, strict=True)):
        if split == "test" and label not in trained:
            count = sum(1 for lb, sp in zip(labels, split_of, strict=True) if lb == label and sp == "test")
            report(
                name,
                f"training images of class {label!r}, as the test split holds it",
                f"{count} test images and no training image",
            )
        else:
            keep.append(index)
    images, labels, split_of = [images[i] for i in keep], [labels[i] for i in keep], split_of[keep]
    classes = class_order(labels)
    ids = np.asarray(_ids(classes, labels), np.int64)
    unsplit = split_of == ""
    if unsplit.any():
        split_of[unsplit] = split_stratified(ids[unsplit], test_fraction, seed)
    if not images:
        raise DatasetLayoutError(members.where, "at least one labelled image", "none")
    if problems is not None:
        problems.extend(report.found)
    return Listing(layout, classes, images, ids, split_of)


def _ids(classes: list[str], labels: list[str]) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in labels]


def _folders(members: Members, names: list[str], report: Problems) -> tuple[list[str], list[str], list[str]]:
    split_folders = {n.split("/", 1)[0] for n in names if n.count("/") == 2} & set(SPLIT_NAMES)
    images, labels, splits = [], [], []
    folders: set[str] = set()
    for name in names:
        parts = name.split("/")
        if split_folders and len(parts) == 3 and parts[0] in SPLIT_NAMES:
            split, label = parts[0], parts[1]
        elif not split_folders and len(parts) == 2:
            split, label = "", parts[0]
        else:
            continue  # a README, a licence, a checksum file beside the images
        folders.add("/".join(parts[:-1]))
        if is_image(name):
            images.append(name)
            labels.append(label)
            splits.append(split)
    if split_folders and "train" not in split_folders:
        raise DatasetLayoutError(f"{members.where}/train", "a folder of class folders", "none (only test/)")
    holding = {"/".join(n.split("/")[:-1]) for n in images}
    depth = 1 if split_folders else 0  # slashes in a class folder's name
    class_folders = {
        f for f in members.folders() if f.count("/") == depth and (not split_folders or f.split("/")[0] in SPLIT_NAMES)
    }
    for folder in sorted(class_folders - holding):
        report(folder, f"images ({', '.join(sorted(IMAGE_SUFFIXES))})", "an empty class folder")
    return images, labels, splits


def read_manifest(name: str, data: bytes, where: str) -> Any:
    """The manifest ``name`` (CSV read as text, or Parquet) as a table with columns ``path`` and
    ``label`` (and optionally ``split``); anything else is a one-line error naming ``where``."""
    import pandas as pd

    try:
        table = (
            pd.read_parquet(io.BytesIO(data))
            if name.endswith(".parquet")
            else pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        )
    except Exception as exc:  # noqa: BLE001 - pandas and pyarrow raise many kinds on a bad file
        raise DatasetLayoutError(where, "a CSV or Parquet table", f"{type(exc).__name__}: {str(exc)[:120]}") from None
    if {"path", "label"} - set(table.columns):
        raise DatasetLayoutError(where, "columns path, label (and optionally split)", f"columns {list(table.columns)}")
    return table


def _manifest(members: Members, names: list[str], report: Problems) -> tuple[list[str], list[str], list[str]]:
    top = [n for n in names if "/" not in n]
    manifest = next((n for n in MANIFEST_NAMES if n in top), None) or next(n for n in top if n.endswith(".parquet"))
    where = f"{members.where}/{manifest}"
    table = read_manifest(manifest, members.read(manifest), where)
    paths = [str(p) for p in table["path"]]
    labels = [str(v) for v in table["label"]]
    splits = [str(v) for v in table["split"]] if "split" in table.columns else [""] * len(paths)
    repeated = [p for p, n in Counter(paths).items() if n > 1]
    if repeated:  # which row holds the label? no policy can tell: always refused
        raise DatasetLayoutError(where, "each file on one row", f"{repeated[0]!r} on {Counter(paths)[repeated[0]]}")
    present = set(names)
    kept: tuple[list[str], list[str], list[str]] = ([], [], [])
    for row, (path, label, split) in enumerate(zip(paths, labels, splits, strict=True), start=2):
        if path not in present:
            report(f"{manifest} row {row}", f"a file {path!r} beside the manifest", "no such file")
        elif not label:
            report(f"{manifest} row {row}", f"a label for {path!r}", "an empty label")
        elif split not in ("", *SPLIT_NAMES):
            report(f"{manifest} row {row}", "split train or test (or empty)", repr(split))
        else:
            for column, value in zip(kept, (path, label, split), strict=True):
                column.append(value)
    unlabelled = sorted(n for n in names if is_image(n) and n not in set(paths))
    for name in unlabelled:
        report(name, f"a row in {manifest} for every image", "no label")
    return kept
