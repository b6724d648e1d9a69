"""Decoding real images (Fashion-MNIST, scikit-learn's digits) encoded as PNG, JPEG, WebP and BMP,
and each kind of bad image file a dataset can hold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BadImage, ImagePolicy, _convert, decode, decode_all, probe
from pipeline.errors import BadImageError, ConfigError


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grayscale PNG whose IHDR declares ``width`` x ``height`` but whose
    IDAT holds one row: ~100 bytes that would expand to width * height bytes if decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def truncated_png(pixels: np.ndarray) -> bytes:
    data = encode(pixels)
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    return data[: at + 4 + length // 2]


def truncated_jpeg(pixels: np.ndarray) -> bytes:
    data = encode(pixels, "JPEG", quality=95)
    scan = data.index(b"\xff\xda")  # start of scan: the cut falls in the compressed pixels
    return data[: (scan + len(data)) // 2]


@pytest.fixture(scope="module")
def fashion(small_splits) -> np.ndarray:
    """300 real Fashion-MNIST test images, uint8 (300, 28, 28)."""
    return small_splits["t10k"][0][:300]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """scikit-learn's 8x8 digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    return (load_digits().images[:100] * 255 / 16).round().astype(np.uint8)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_round_trip_real_images_exactly(fashion, fmt, options):
    items = [(f"{i}.{fmt.lower()}", encode(a, fmt, **options)) for i, a in enumerate(fashion)]
    # WebP is always RGB, so the data alone would make it colour: grayscale is asked for
    images, good, bad, used = decode_all(items, ImagePolicy(channels=1) if fmt == "WEBP" else ImagePolicy())
    assert used == (1, 28, 28) and bad == [] and good == list(range(len(fashion)))
    assert images.dtype == np.uint8 and np.array_equal(images, fashion)


@pytest.mark.parametrize("fmt, options, most", [("JPEG", {"quality": 95}, 2.0), ("WEBP", {"quality": 90}, 3.0)])
def test_lossy_formats_decode_close_to_the_original(fashion, fmt, options, most):
    items = [(f"{i}.{fmt.lower()}", encode(a, fmt, **options)) for i, a in enumerate(fashion)]
    # WebP is always RGB: grayscale is asked for, else the data would decide on colour
    images, good, bad, used = decode_all(items, ImagePolicy(channels=1))
    assert used == (1, 28, 28) and bad == [] and images.shape == fashion.shape
    error = np.abs(images.astype(int) - fashion).mean()
    assert 0 < error < most, f"{fmt}: mean absolute error {error:.2f}"


def test_colour_images_round_trip_and_convert_to_grayscale_by_luma(fashion):
    colour = np.stack([fashion, 255 - fashion, fashion // 2], axis=-1)
    gray_as_rgb = np.repeat(fashion[..., None], 3, axis=-1)
    images, _, bad, used = decode_all([(f"{i}.png", encode(a)) for i, a in enumerate(colour)])
    assert used == (3, 28, 28) and bad == [] and np.array_equal(images, colour)

    luma = decode("c.png", encode(colour[0]), channels=1, size=(28, 28))
    r, g, b = (colour[0][..., band].astype(float) for band in range(3))
    assert np.abs(luma - (0.299 * r + 0.587 * g + 0.114 * b)).max() <= 1
    # a gray image stored as RGB (R = G = B) comes back exactly
    items = [(f"{i}.png", encode(a)) for i, a in enumerate(gray_as_rgb)]
    assert np.array_equal(decode_all(items, ImagePolicy(channels=1))[0], fashion)


def test_grayscale_images_decode_to_rgb_by_replicating(fashion):
    items = [(f"{i}.png", encode(a)) for i, a in enumerate(fashion[:50])]
    images, _, _, used = decode_all(items, ImagePolicy(channels=3))
    assert used == (3, 28, 28)
    assert all(np.array_equal(images[..., band], fashion[:50]) for band in range(3))


def test_modes_convert_as_documented(fashion):
    image = fashion[0]
    # palette with a gray palette: counted as grayscale, exact
    gray_palette = encode(Image.fromarray(image).convert("P"))
    assert probe("p.png", gray_palette).mode == "P"
    _, _, _, used = decode_all([("p.png", gray_palette)])
    assert used == (1, 28, 28)
    assert np.array_equal(decode("p.png", gray_palette, 1, (28, 28)), image)
    # 16-bit grayscale scaled to 8 bits, not clipped to white
    wide = encode(image.astype(np.uint16) * 257)
    assert probe("w.png", wide).mode == "I;16"
    assert np.array_equal(decode("w.png", wide, 1, (28, 28)), image)
    # 1-bit: 0 or 255
    bilevel = decode("b.png", encode(Image.fromarray(image).convert("1", dither=Image.Dither.NONE)), 1, (28, 28))
    assert set(np.unique(bilevel)) <= {0, 255} and np.array_equal(bilevel == 255, image >= 128)
    # alpha composited on black: a transparent pixel is 0, an opaque one keeps its value
    alpha = np.where(image > 100, 255, 0).astype(np.uint8)
    white_la = np.stack([np.full_like(image, 255), alpha], axis=-1)
    assert np.array_equal(decode("la.png", encode(white_la), 1, (28, 28)), alpha)
    rgba = np.dstack([np.repeat(image[..., None], 3, axis=-1), alpha])
    assert np.array_equal(
        decode("a.webp", encode(rgba, "WEBP", lossless=True), 3, (28, 28))[..., 0], np.where(alpha, image, 0)
    )
    # a tRNS colour key is transparency too
    key = int(np.bincount(image[image > 0]).argmax())
    keyed = decode("k.png", encode(image, transparency=key), 1, (28, 28))
    assert np.array_equal(keyed, np.where(image == key, 0, image)) and (image == key).sum() > 1
    # CMYK JPEG to RGB
    cmyk = encode(Image.fromarray(np.repeat(image[..., None], 3, axis=-1)).convert("CMYK"), "JPEG", quality=95)
    assert probe("c.jpg", cmyk).mode == "CMYK"
    assert np.abs(decode("c.jpg", cmyk, 3, (28, 28)).astype(int) - image[..., None]).mean() < 4


def test_an_unconvertible_mode_is_a_bad_image_naming_the_mode():
    # No PNG, JPEG, WebP or BMP file opens in a mode Pillow cannot convert (LAB and La are the
    # ones it cannot turn into L), so the conversion step is given such an image directly.
    with pytest.raises(BadImageError) as info:
        _convert("lab.png", Image.new("LAB", (4, 4)), "L")
    assert str(info.value).startswith("lab.png: expected a mode convertible to L, found mode LAB")


@pytest.fixture(scope="module")
def bad_files(fashion, digits) -> dict[str, tuple[bytes, list[str]]]:
    """Each kind of bad file, with the words its one-line problem must contain."""
    return {
        "empty.png": (b"", ["expected a PNG, JPEG, WebP or BMP image", "found 0 bytes"]),
        "noise.png": (np.random.default_rng(0).bytes(300), ["found 300 bytes in no known image format"]),
        "anim.gif": (encode(fashion[0], "GIF"), ["found a GIF image"]),
        "cut.png": (truncated_png(fashion[1]), ["expected complete PNG data", "truncated"]),
        "cut.jpg": (truncated_jpeg(fashion[2]), ["expected complete JPEG data", "truncated"]),
        "bomb.png": (png_declaring(20000, 20000), ["expected at most 16777216 pixels", "400000000 pixels"]),
        "digit.png": (encode(digits[0]), ["expected 28x28 pixels (height x width)", "found 8x8"]),
    }


@pytest.mark.parametrize("name", ["empty.png", "noise.png", "anim.gif", "cut.png", "cut.jpg", "bomb.png", "digit.png"])
def test_each_bad_file_is_reported_by_path_in_one_line(fashion, bad_files, name):
    data, words = bad_files[name]
    with pytest.raises(BadImageError) as info:
        decode(name, data, channels=1, size=(28, 28))
    message = str(info.value)
    assert message.startswith(f"{name}: expected ") and "\n" not in message
    assert all(word in message for word in words), message

    items = [("0.png", encode(fashion[0])), (name, data), ("2.png", encode(fashion[2]))]
    images, good, bad, used = decode_all(items, ImagePolicy(size=(28, 28)))
    assert good == [0, 2] and np.array_equal(images, fashion[[0, 2]]) and used == (1, 28, 28)
    assert bad == [BadImage(name, message.removeprefix(f"{name}: "))]


def test_a_bomb_is_refused_from_its_header_alone(fashion):
    with pytest.raises(BadImageError, match="400000000 pixels"):
        probe("bomb.png", png_declaring(20000, 20000))
    # under Pillow's own limit, the policy's still refuses before decoding: 5000x5000 > 4096x4096
    with pytest.raises(BadImageError, match="25000000 pixels"):
        probe("big.png", png_declaring(5000, 5000))
    _, _, bad, _ = decode_all([("0.png", encode(fashion[0]))], ImagePolicy(max_pixels=700))
    assert bad == [
        BadImage(
            "0.png",
            "expected at most 700 pixels, found a header declaring 784 pixels (a decompression bomb?), refused before decoding",
        )
    ]


def test_size_is_the_most_common_and_others_are_rejected_or_resized(fashion, digits):
    items = [(f"d{i}.png", encode(a)) for i, a in enumerate(digits[:30])]
    items += [(f"f{i}.png", encode(a)) for i, a in enumerate(fashion[:20])]
    images, good, bad, used = decode_all(items)
    assert used == (1, 8, 8) and good == list(range(30)) and np.array_equal(images, digits[:30])
    assert [b.path for b in bad] == [f"f{i}.png" for i in range(20)]
    assert bad[0].problem == "expected 8x8 pixels (height x width) as the dataset, found 28x28"

    images, good, bad, used = decode_all(items, ImagePolicy(size=(28, 28), mixed_sizes="resize"))
    assert used == (1, 28, 28) and bad == [] and len(good) == 50
    expected = np.asarray(Image.fromarray(digits[0]).resize((28, 28), Image.Resampling.BILINEAR))
    assert np.array_equal(images[0], expected) and np.array_equal(images[30:], fashion[:20])

    # a tie in counts goes to the larger area
    tie = items[:20] + items[30:]
    assert decode_all(tie, ImagePolicy(mixed_sizes="resize"))[3] == (1, 28, 28)


def test_channels_are_three_when_any_image_is_colour(fashion):
    items = [(f"{i}.png", encode(a)) for i, a in enumerate(fashion[:20])]
    items.append(("colour.png", encode(np.stack([fashion[20], fashion[20] // 2, 255 - fashion[20]], axis=-1))))
    images, _, bad, used = decode_all(items)
    assert used == (3, 28, 28) and bad == [] and images.shape == (21, 28, 28, 3)
    assert np.array_equal(images[:20, ..., 1], fashion[:20]) and np.array_equal(images[20, ..., 2], 255 - fashion[20])
    assert decode_all(items[:20])[3] == (1, 28, 28)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_honoured_before_the_size_check(fashion, fmt):
    upright = np.ascontiguousarray(fashion[3][:, 4:24])  # 28 high, 20 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored image is to be turned 90 degrees clockwise for display
    stored = encode(np.rot90(upright), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    assert (probe("side", stored).height, probe("side", stored).width) == (20, 28)
    images, _, bad, used = decode_all([("side", stored), ("plain", encode(upright, fmt))])
    assert bad == [] and used == (1, 28, 20)
    if fmt == "PNG":
        assert np.array_equal(images[0], upright)
    else:
        assert np.abs(images[0].astype(int) - upright).mean() < 4
        assert np.abs(images[0].astype(int) - np.rot90(upright, 2)).mean() > 20


def test_two_workers_give_exactly_what_one_gives(small_splits, bad_files):
    real = np.concatenate([small_splits["train"][0], small_splits["t10k"][0]])
    items = [(f"{i}.png", encode(a)) for i, a in enumerate(real)]
    # bad files at the ends and inside chunks; the digit is of another size
    for at, name in [(0, "empty.png"), (700, "cut.png"), (1500, "bomb.png"), (2000, "digit.png"), (2503, "noise.png")]:
        items.insert(at, (name, bad_files[name][0]))
    assert len(items) > 2000
    one = decode_all(items, workers=1)
    two = decode_all(items, workers=2)
    assert np.array_equal(one[0], two[0]) and one[1:] == two[1:]
    images, good, bad, used = two
    assert used == (1, 28, 28) and np.array_equal(images, real)
    assert [items[i][0] for i in good] == [f"{i}.png" for i in range(len(real))]
    assert [b.path for b in bad] == ["empty.png", "cut.png", "bomb.png", "digit.png", "noise.png"]


def test_settings_out_of_range_are_refused():
    with pytest.raises(ConfigError, match="ImagePolicy channels: expected 1 .grayscale. or 3 .RGB., found 2"):
        ImagePolicy(channels=2)
    with pytest.raises(ConfigError, match="ImagePolicy mixed_sizes: expected resize or reject, found 'crop'"):
        ImagePolicy(mixed_sizes="crop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="decode_all workers: expected at least 1, found 0"):
        decode_all([], workers=0)
