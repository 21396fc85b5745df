"""The image loader on hostile files, every Pillow mode and arbitrary arrays: an RGB image or ValueError."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import fuzz
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from diffinv.images import load_image

from .common import bomb_png

FUZZ = fuzz(60)
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La"]
MODES += ["I;16", "I;16B", "I;16L"]
NO_RGB_CONVERSION = {"La"}  # Pillow has no La -> L/RGB conversion
SIZES = st.none() | st.tuples(st.integers(1, 24), st.integers(1, 24))
RESIZE = st.sampled_from(["crop", "pad", "stretch"])


def _check(img: Image.Image, size) -> None:
    assert img.mode == "RGB"
    if size is not None:
        assert img.size == (size[1], size[0])
    assert np.asarray(img).dtype == np.uint8


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 9, h: int = 7) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _animated() -> bytes:
    frames = [Image.new("RGB", (6, 5), (40 * i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


GOOD_FILES = {
    "png": _encode(_photo(), "PNG"),
    "jpeg": _encode(_photo(), "JPEG"),
    "png16": _encode(Image.fromarray(np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000), "PNG"),
    "cmyk": _encode(Image.new("CMYK", (9, 7), (10, 200, 30, 5)), "JPEG"),
    "palette": _encode(_photo().convert("P"), "PNG"),
    "palette_alpha": _encode(_photo().convert("P"), "PNG", transparency=3),
    "rgba": _encode(Image.new("RGBA", (9, 7), (1, 2, 3, 100)), "PNG"),
    "one_pixel": _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
    "animated": _animated(),
    "tiff_float": _encode(Image.fromarray(np.linspace(0, 1, 63, dtype=np.float32).reshape(7, 9)), "TIFF"),
    "bmp": _encode(_photo(), "BMP"),
    "webp": _encode(_photo(), "WEBP"),
}
BAD_FILES = {
    "empty": b"",
    "text": b"hello, I am not an image",
    "truncated_png": GOOD_FILES["png"][: len(GOOD_FILES["png"]) // 2],
    "truncated_jpeg": GOOD_FILES["jpeg"][:200],
    "bomb": bomb_png(),
}


def _write(data: bytes, suffix: str = ".img") -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with open(fd, "wb") as f:
        f.write(data)
    return Path(name)


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_every_kind_of_photo_loads_as_rgb(name):
    path = _write(GOOD_FILES[name])
    try:
        _check(load_image(path), None)
        _check(load_image(path, (16, 12), "pad"), (16, 12))
    finally:
        path.unlink()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_files_are_value_errors_naming_the_path(name):
    path = _write(BAD_FILES[name])
    try:
        with pytest.raises(ValueError, match=f"cannot read image {path}"):
            load_image(path, (8, 8))
    finally:
        path.unlink()


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)


def _corrupt(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@FUZZ
@given(
    data=st.builds(
        _corrupt,
        st.sampled_from(sorted(GOOD_FILES.values())),
        st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
        st.none() | st.integers(0, 400),
    )
    | st.binary(max_size=64),
    size=SIZES,
    resize=RESIZE,
)
def test_corrupted_files_load_or_raise_value_error(data, size, resize):
    path = _write(data)
    try:
        img = load_image(path, size, resize)
    except ValueError as err:
        assert str(path) in str(err)
        assert data not in GOOD_FILES.values(), err  # an intact file (no flip, or flips that changed nothing) loads
    else:
        _check(img, size)
    finally:
        path.unlink()


@FUZZ
@given(mode=st.sampled_from(MODES), w=st.integers(1, 12), h=st.integers(1, 12), size=SIZES, resize=RESIZE)
def test_pil_images_of_every_mode(mode, w, h, size, resize):
    img = Image.new(mode, (w, h))
    try:
        out = load_image(img, size, resize)
    except ValueError:
        assert mode in NO_RGB_CONVERSION  # refused only a mode Pillow cannot convert
        return
    _check(out, size)


@FUZZ
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int32, np.bool_, np.int8]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    ),
    size=SIZES,
    resize=RESIZE,
)
def test_arrays_load_or_raise_value_error(arr, size, resize):
    try:
        out = load_image(arr, size, resize)
    except ValueError:
        ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))
        ok_dtype = arr.dtype in (np.uint8, np.uint16) or (arr.dtype.kind == "f" and np.isfinite(arr).all())
        assert not (ok_shape and ok_dtype and min(arr.shape[:2], default=0) >= 1)  # refused only bad input
        return
    _check(out, size)
    assert out.size == (arr.shape[1], arr.shape[0]) or size is not None


@FUZZ
@given(value=st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)))
def test_other_inputs_are_value_errors(value):
    with pytest.raises(ValueError):
        load_image(value if not isinstance(value, str) else Path(tempfile.gettempdir()) / f"missing-{value}.png")
