"""Tests of ovseg.core.image_io.load_image (bad and odd inputs) and ovseg.core.concepts.parse_concepts."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.core.concepts import MAX_WORD_LENGTH, parse_concepts
from ovseg.core.errors import ConceptError, ImageError, OvsegError
from ovseg.core.image_io import DEFAULT_MAX_PIXELS, MIN_SIDE, load_image
from helpers import ROOT

CAT = ROOT / "assets" / "examples" / "cat.jpg"


def _check_rgb(arr, h, w):
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]


# ---------------------------------------------------------------- files that must be refused


def test_error_types():
    assert issubclass(ImageError, OvsegError) and issubclass(ImageError, ValueError)
    assert issubclass(ConceptError, OvsegError) and issubclass(ConceptError, ValueError)


def test_truncated_jpeg(tmp_path):
    data = CAT.read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_jpeg_with_garbled_middle(tmp_path):
    data = bytearray(CAT.read_bytes())
    n = len(data)
    rng = np.random.default_rng(0)
    data[n // 4 : 3 * n // 4] = rng.integers(0, 256, 3 * n // 4 - n // 4, dtype=np.uint8).tobytes()
    path = tmp_path / "garbled.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image file PIL can read") as info:
        load_image(str(path))
    assert str(path) in str(info.value)


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "cat.jpg"
    with pytest.raises(ImageError, match="no such file") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_folder(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_unsupported_input_type():
    with pytest.raises(ImageError, match="expected an image path, a PIL image or a numpy array, got list"):
        load_image([[0, 0], [0, 0]])


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 12000x9000 (108 MP) 1-bit PNG: ~13 KB on disk, never decoded by the tests."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (12000, 9000)).save(path)
    return path


def test_huge_image_is_refused_before_decoding(huge_png, monkeypatch):
    monkeypatch.delenv("OVSEG_MAX_PIXELS", raising=False)
    assert 12000 * 9000 > DEFAULT_MAX_PIXELS
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as info:
        load_image(huge_png)
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    assert "12000x9000" in message
    assert "108.0 MP" in message and "50 MP" in message
    assert "OVSEG_MAX_PIXELS" in message
    assert elapsed < 0.5, f"refusing took {elapsed:.2f} s: the image was decoded"


def test_pixel_limit_from_environment_and_argument(huge_png, monkeypatch, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 50), (1, 2, 3)).save(small)
    monkeypatch.setenv("OVSEG_MAX_PIXELS", "4000")
    with pytest.raises(ImageError, match=r"100x50 \(0\.0 MP\).*OVSEG_MAX_PIXELS"):
        load_image(small)
    _check_rgb(load_image(small, max_pixels=5000), 50, 100)  # the argument wins over the environment
    monkeypatch.setenv("OVSEG_MAX_PIXELS", "lots")
    with pytest.raises(ImageError, match="OVSEG_MAX_PIXELS must be a whole number"):
        load_image(small)
    monkeypatch.setenv("OVSEG_MAX_PIXELS", "5000")
    _check_rgb(load_image(small), 50, 100)


def test_very_huge_image_message_names_the_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("OVSEG_MAX_PIXELS", raising=False)
    path = tmp_path / "very_huge.png"
    Image.new("1", (15000, 12000)).save(path)  # 180 MP
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "MP" in str(info.value) and "OVSEG_MAX_PIXELS" in str(info.value)


def test_one_pixel_image_is_refused(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(ImageError, match=f"1x1; each side must be at least {MIN_SIDE} pixels"):
        load_image(path)
    with pytest.raises(ImageError, match="1x1"):
        load_image(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageError, match="1x1"):
        load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageError, match="100x7"):
        load_image(np.zeros((7, 100), np.uint8))
    _check_rgb(load_image(np.zeros((MIN_SIDE, MIN_SIDE), np.uint8)), MIN_SIDE, MIN_SIDE)


def test_lazy_pil_image_of_a_truncated_file_gives_image_error(tmp_path):
    data = CAT.read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:
        with pytest.raises(ImageError):
            load_image(im)


# ---------------------------------------------------------------- odd but valid files


def test_real_jpeg():
    arr = load_image(CAT)
    _check_rgb(arr, 300, 451)
    assert 50 < arr.mean() < 200


def test_grayscale_l(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (20, 10), 77).save(path)
    arr = load_image(path)
    _check_rgb(arr, 10, 20)
    assert (arr == 77).all()


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black
    rgba[0, 1] = (0, 0, 0, 128)  # half transparent black: mid grey
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    arr = load_image(path)
    _check_rgb(arr, 10, 12)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[5, 5].tolist() == [255, 0, 0]
    assert np.abs(arr[0, 1].astype(int) - 127).max() <= 1


def test_palette_p(tmp_path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(1, (0, 0, 5, 10))
    path = tmp_path / "palette.png"
    im.save(path)
    arr = load_image(path)
    _check_rgb(arr, 10, 10)
    assert arr[0, 0].tolist() == [0, 255, 0]
    assert arr[0, 9].tolist() == [0, 0, 0]


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(1, (0, 0, 5, 10))
    path = tmp_path / "palette_t.png"
    im.save(path, transparency=0)
    arr = load_image(path)
    assert arr[0, 0].tolist() == [0, 255, 0]
    assert arr[0, 9].tolist() == [255, 255, 255]


def test_16_bit_grayscale_png(tmp_path):
    a = np.zeros((20, 30), np.uint16)
    a[:, :10] = 65535
    a[:, 10:20] = 32768
    path = tmp_path / "gray16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    arr = load_image(path)
    _check_rgb(arr, 20, 30)
    assert (arr[:, :10] == 255).all()
    assert (np.abs(arr[:, 10:20].astype(int) - 128) <= 1).all()
    assert (arr[:, 20:] == 0).all()


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    arr = load_image(path)
    _check_rgb(arr, 16, 16)
    assert arr[8, 8, 0] > 200 and arr[8, 8, 1] < 50 and arr[8, 8, 2] < 50  # red


def test_exif_rotated_jpeg_swaps_height_and_width(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 0, 0))
    im.paste((0, 0, 200), (0, 0, 10, 20))  # left quarter blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    arr = load_image(path)
    _check_rgb(arr, 40, 20)
    # rotated 90 degrees clockwise for display: the left quarter is now the top quarter
    assert arr[:8].mean(axis=(0, 1))[2] > 150
    assert arr[-8:].mean(axis=(0, 1))[0] > 150


def test_pil_image_input():
    im = Image.new("LA", (9, 9), (50, 0))  # grey, fully transparent
    arr = load_image(im)
    _check_rgb(arr, 9, 9)
    assert (arr == 255).all()


# ---------------------------------------------------------------- numpy arrays


def test_uint8_arrays():
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    arr = load_image(gray)
    _check_rgb(arr, 8, 10)
    assert (arr[..., 0] == gray).all() and (arr[..., 2] == gray).all()
    arr1 = load_image(gray[..., None])
    assert (arr1 == arr).all()
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    assert (load_image(rgb) == rgb).all()
    # non-contiguous input comes back contiguous
    _check_rgb(load_image(rgb[:, ::-1]), 8, 10)


def test_uint8_rgba_array_alpha_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 255
    arr = load_image(rgba)
    _check_rgb(arr, 8, 8)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [10, 20, 30]


def test_uint16_array():
    a = np.zeros((8, 9), np.uint16)
    a[0, 0], a[0, 1] = 65535, 32768
    arr = load_image(a)
    _check_rgb(arr, 8, 9)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert abs(int(arr[0, 1, 0]) - 128) <= 1
    assert arr[5, 5].tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_array_in_unit_interval(dtype):
    a = np.zeros((8, 9, 3), dtype)
    a[0, 0] = 1.0
    a[0, 1] = 0.5
    arr = load_image(a)
    _check_rgb(arr, 8, 9)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [128, 128, 128]
    assert arr[1, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_float_array_outside_unit_interval_is_refused(bad):
    a = np.full((8, 8), 0.5, np.float32)
    a[3, 3] = bad
    with pytest.raises(ImageError, match=r"float array must hold values in \[0, 1\]"):
        load_image(a)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_array_with_nan_is_refused(bad):
    a = np.full((8, 8, 3), 0.5, np.float32)
    a[3, 3, 1] = bad
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_image(a)


@pytest.mark.parametrize(
    "arr, message",
    [
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
        (np.zeros(64, np.uint8), r"shape \(64,\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(2, 8, 8, 3\)"),
        (np.zeros((8, 8), np.int32), "unsupported array dtype int32"),
        (np.zeros((8, 8), np.complex64), "unsupported array dtype complex64"),
    ],
)
def test_unusable_arrays_are_refused(arr, message):
    with pytest.raises(ImageError, match=message):
        load_image(arr)


# ---------------------------------------------------------------- parse_concepts


def test_parse_concepts_positives_and_negatives():
    assert parse_concepts("dog, frisbee, -person") == (["dog", "frisbee"], ["person"])
    assert parse_concepts("  Dog ,dog") == (["dog"], [])
    assert parse_concepts("dog; cat\nbird") == (["dog", "cat", "bird"], [])
    assert parse_concepts("Teddy   Bear, - Person") == (["teddy bear"], ["person"])
    assert parse_concepts(["Dog", " cat ", "-car", "-car"]) == (["dog", "cat"], ["car"])
    # a word both wanted and excluded is wanted
    assert parse_concepts("dog, -dog") == (["dog"], [])


@pytest.mark.parametrize("text", ["", " , , ", "-person", "-person, -car", [], ";\n;"])
def test_parse_concepts_without_positive_word(text):
    with pytest.raises(ConceptError, match="no word to look for"):
        parse_concepts(text)


@pytest.mark.parametrize("text", ["???", "dog, ???", "-!!"])
def test_parse_concepts_rejects_non_words(text):
    with pytest.raises(ConceptError, match="is not a word"):
        parse_concepts(text)


def test_parse_concepts_rejects_overlong_words_and_bad_types():
    assert parse_concepts("a" * MAX_WORD_LENGTH) == (["a" * MAX_WORD_LENGTH], [])
    with pytest.raises(ConceptError, match=f"longer than {MAX_WORD_LENGTH}"):
        parse_concepts("a" * (MAX_WORD_LENGTH + 1))
    with pytest.raises(ConceptError, match="got int"):
        parse_concepts(42)
