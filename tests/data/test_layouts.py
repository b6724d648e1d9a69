"""Dataset layouts on real images: Fashion-MNIST test images as class folders (with and without
split folders), scikit-learn's digits as a CSV manifest, and both in .tar.gz and .zip archives;
each broken layout stops with one line naming the file and the problem."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import FASHION_MNIST_CLASSES
from pipeline.data.layouts import detect_layout, list_images, open_members, split_stratified
from pipeline.errors import DatasetLayoutError

# Folder names cannot hold "/": the class folders use the names with it replaced.
FOLDER_CLASSES = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fashion(small_splits) -> tuple[np.ndarray, np.ndarray]:
    images, labels = small_splits["t10k"]
    return images[:300], labels[:300]


def write_folders(root: Path, images: np.ndarray, labels: np.ndarray, split_folders: bool) -> Path:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        split = ("test" if index % 5 == 0 else "train") if split_folders else ""
        folder = root / split / FOLDER_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.png").write_bytes(png(image))
    return root


@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    (root / "images").mkdir()
    rows = ["path,label"]
    for index, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        name = f"images/{index:04d}.png"
        (root / name).write_bytes(png(image * 255 / 16))
        rows.append(f"{name},{target}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_class_folders_with_split_folders_give_every_image_its_class_and_split(tmp_path, fashion):
    images, labels = fashion
    root = write_folders(tmp_path, images, labels, split_folders=True)
    listing = list_images(open_members(root))
    assert listing.layout == "folders" and listing.classes == sorted(FOLDER_CLASSES)
    assert len(listing.names) == len(images)
    for name, label, split in zip(listing.names, listing.labels, listing.splits, strict=True):
        index = int(Path(name).stem)
        assert listing.classes[label] == FOLDER_CLASSES[labels[index]]
        assert split == ("test" if index % 5 == 0 else "train")
    assert sum(listing.counts()["test"].values()) == 60


def test_one_folder_of_class_folders_is_split_stratified_and_by_the_seed(tmp_path, fashion):
    images, labels = fashion
    listing = list_images(open_members(write_folders(tmp_path, images, labels, split_folders=False)), test_fraction=0.2)
    counts = listing.counts()
    for name in listing.classes:
        total = counts["train"][name] + counts["test"][name]
        assert counts["test"][name] == round(total * 0.2), name  # every class, in its share
    again = list_images(open_members(tmp_path), test_fraction=0.2)
    other = list_images(open_members(tmp_path), test_fraction=0.2, seed=1)
    assert (again.splits == listing.splits).all() and not (other.splits == listing.splits).all()


def test_a_manifest_of_scikit_learns_digits_lists_1797_images_of_classes_0_to_9(digits_manifest):
    listing = list_images(open_members(digits_manifest))
    assert listing.layout == "manifest" and listing.classes == [str(d) for d in range(10)]
    assert len(listing.names) == 1797 and set(listing.splits) == {"train", "test"}
    from sklearn.datasets import load_digits

    target = load_digits().target
    assert all(
        listing.classes[label] == str(target[int(name[7:11])])
        for name, label in zip(listing.names, listing.labels, strict=True)
    )


def test_numeric_class_names_sort_as_numbers():
    from pipeline.data.layouts import class_order

    assert class_order(["10", "9", "2"]) == ["2", "9", "10"] and class_order(["b", "a"]) == ["a", "b"]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_with_one_top_folder_reads_as_the_folder_does(tmp_path, digits_manifest, kind):
    archive = tmp_path / f"digits.{kind}"
    files = sorted(p for p in digits_manifest.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as out:
            for path in files:
                out.write(path, f"digits/{path.relative_to(digits_manifest)}")
    else:
        with tarfile.open(archive, "w:gz") as out:
            out.add(digits_manifest, "digits")
    with open_members(archive) as members:
        listing = list_images(members)
        first = members.read(listing.names[0])
        assert dict(members.read_many(listing.names[:3]))[listing.names[0]] == first
    direct = list_images(open_members(digits_manifest))
    assert listing.names == direct.names and (listing.labels == direct.labels).all()
    assert first == (digits_manifest / listing.names[0]).read_bytes()


def test_detection_names_what_it_found_when_nothing_is_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetLayoutError, match=r"expected a dataset layout: .* found 1 files, none of them in one"):
        list_images(open_members(tmp_path))
    assert (
        detect_layout(
            [
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            ],
            "x",
        )
        == "idx"
    )


def test_a_manifest_row_whose_file_is_missing_is_named(digits_manifest, tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\nimages/0000.png,0\n")
    with pytest.raises(
        DatasetLayoutError,
        match=r"labels.csv row 2: expected a file 'images/0000.png' beside the manifest, found no such file",
    ):
        list_images(open_members(tmp_path))


def test_an_image_without_a_label_is_named(tmp_path, fashion):
    (tmp_path / "a.png").write_bytes(png(fashion[0][0]))
    (tmp_path / "b.png").write_bytes(png(fashion[0][1]))
    (tmp_path / "labels.csv").write_text("path,label\na.png,shirt\n")
    with pytest.raises(
        DatasetLayoutError, match=r"b.png: expected a row in labels.csv for every image, found no label"
    ):
        list_images(open_members(tmp_path))


def test_an_empty_class_folder_is_named(tmp_path, fashion):
    images, labels = fashion
    write_folders(tmp_path, images[:40], labels[:40], split_folders=True)
    (tmp_path / "train" / "Unicorn").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"train/Unicorn: expected images .* found an empty class folder"):
        list_images(open_members(tmp_path))


def test_a_class_only_in_the_test_split_is_named(tmp_path, fashion):
    images, labels = fashion
    write_folders(tmp_path, images[:40], labels[:40], split_folders=True)
    (tmp_path / "test" / "Unicorn").mkdir()
    (tmp_path / "test" / "Unicorn" / "x.png").write_bytes(png(images[0]))
    with pytest.raises(
        DatasetLayoutError,
        match=r"test/Unicorn/x.png: expected training images of class 'Unicorn', as the test split holds it, found 1 test images and no training image",
    ):
        list_images(open_members(tmp_path))


def test_an_archive_member_that_leaves_the_archive_or_is_a_link_is_refused(tmp_path):
    for name, make in (
        ("escape.tar", lambda info: setattr(info, "name", "../../etc/passwd")),
        ("link.tar", lambda info: (setattr(info, "type", tarfile.SYMTYPE), setattr(info, "linkname", "/etc/passwd"))),
    ):
        path = tmp_path / name
        with tarfile.open(path, "w") as out:
            info = tarfile.TarInfo("train/a/x.png")
            make(info)
            out.addfile(info, io.BytesIO(b"") if info.isfile() else None)
        with pytest.raises(
            DatasetLayoutError, match=r"expected (a member name inside the archive's root|regular files only)"
        ):
            open_members(path)


def test_a_folder_does_not_follow_a_link_out_of_it(tmp_path, fashion):
    root = write_folders(tmp_path / "data", *(a[:20] for a in fashion), split_folders=False)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(fashion[0][0]))
    (root / FOLDER_CLASSES[0] / "link.png").symlink_to(secret)
    with pytest.raises(
        DatasetLayoutError, match="expected a file inside the dataset folder, found a link to one outside"
    ):
        list_images(open_members(root))


def test_the_stratified_split_keeps_one_of_any_class_with_two():
    labels = np.asarray([0] * 10 + [1] * 2 + [2])
    splits = split_stratified(labels, 0.2, seed=0)
    assert list(splits[:10]).count("test") == 2 and list(splits[10:12]).count("test") == 1 and splits[12] == "train"


def test_collected_problems_leave_out_what_they_concern(tmp_path, fashion):
    images, labels = fashion
    write_folders(tmp_path, images[:40], labels[:40], split_folders=True)
    (tmp_path / "train" / "Empty").mkdir()
    (tmp_path / "test" / "Unicorn").mkdir()
    (tmp_path / "test" / "Unicorn" / "x.png").write_bytes(png(images[0]))
    problems: list[dict[str, str]] = []
    listing = list_images(open_members(tmp_path), problems=problems)
    assert [p["path"] for p in problems] == ["train/Empty", "test/Unicorn/x.png"]
    assert "Unicorn" not in listing.classes and "Empty" not in listing.classes and len(listing.names) == 40
