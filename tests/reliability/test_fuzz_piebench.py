"""Property-based fuzzing of the PIE-Bench loader and its RLE decoder: every input loads or raises ValueError."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from helpers import fuzz
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from PIL import Image
from test_piebench import official_decode

from diffinv.bench import PieBench, decode_mask, encode_mask

from .common import bomb_png

FUZZ = fuzz(60, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Integers around every boundary: small, pixel counts, int64 and beyond.
INTS = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63)]),
)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5) | INTS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(rle=st.one_of(st.lists(INTS, max_size=8), ANY_JSON), height=st.integers(1, 12), width=st.integers(1, 12))
def test_decode_mask_decodes_as_the_official_decoder_or_refuses(rle, height, width):
    try:
        mask = decode_mask(rle, height, width)
    except ValueError:
        valid = isinstance(rle, list) and all(type(v) is int and v >= 0 for v in rle) and len(rle) % 2 == 0
        assert not valid or max(rle[0::2], default=-1) >= height * width  # refused only what is malformed
        return
    assert mask.shape == (height, width) and mask.dtype == bool
    assert np.array_equal(mask, official_decode(rle, height, width).astype(bool))


@FUZZ
@given(
    bits=st.lists(st.booleans(), min_size=1, max_size=120),
    width=st.integers(1, 12),
)
def test_encode_then_decode_is_the_identity(bits, width):
    height = max(1, len(bits) // width)
    mask = np.resize(np.array(bits, dtype=bool), (height, width))
    assert np.array_equal(decode_mask(encode_mask(mask), height, width, border=False), mask)


VALID = {
    "image_path": "0_random/a.jpg",
    "original_prompt": "a [cat] on a mat",
    "editing_prompt": "a [dog] on a mat",
    "editing_instruction": "make it a dog",
    "editing_type_id": "1",
    "blended_word": "cat dog",
    "mask": [10, 5, 30, 2],
}
FIELD_VALUES = {
    "image_path": st.sampled_from(["0_random/a.jpg", "missing.jpg", "", "0_random", "../mapping_file.json"]) | ANY_JSON,
    "original_prompt": st.text(max_size=20) | ANY_JSON,
    "editing_prompt": st.text(max_size=20) | ANY_JSON,
    "editing_instruction": st.text(max_size=10) | ANY_JSON,
    "editing_type_id": st.sampled_from(["0", "9", "10", "-1", "x", "1.5", " 3", 3, 7.0]) | ANY_JSON,
    "blended_word": st.text(max_size=10) | ANY_JSON,
    "mask": st.lists(INTS, max_size=6) | ANY_JSON,
}


@st.composite
def records(draw):
    record = dict(VALID)
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True)):
        if draw(st.booleans()):
            record[name] = draw(FIELD_VALUES[name])
        else:
            del record[name]
    return record


@st.composite
def mappings(draw):
    kind = draw(st.sampled_from(["records", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "json":
        return json.dumps(draw(ANY_JSON)).encode()
    items = draw(st.lists(records(), min_size=0, max_size=3))
    keys = draw(st.lists(st.text(min_size=0, max_size=6), min_size=len(items), max_size=len(items), unique=True))
    return json.dumps(dict(zip(keys, items))).encode()


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


JPEG, PNG = _encoded("JPEG"), _encoded("PNG")


def _corrupt(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        out[at % len(out)] = value
    return bytes(out)


IMAGE_BYTES = st.one_of(
    st.sampled_from([JPEG, PNG, JPEG[: len(JPEG) // 2], b"", b"not an image", bomb_png()]),
    st.builds(_corrupt, st.sampled_from([JPEG, PNG]), st.lists(st.tuples(st.integers(0, 999), st.integers(0, 255)))),
    st.binary(max_size=30),
)


def _dataset(mapping: bytes, image: bytes) -> Path:
    root = Path(tempfile.mkdtemp(prefix="pie-fuzz-"))
    (root / "annotation_images" / "0_random").mkdir(parents=True)
    (root / "annotation_images" / "0_random" / "a.jpg").write_bytes(image)
    (root / "mapping_file.json").write_bytes(mapping)
    return root


def _valid_mapping(mapping: bytes) -> bool:
    """Whether ``mapping`` is a JSON object of untouched :data:`VALID` records (the loader must accept it)."""
    try:
        items = json.loads(mapping)
    except ValueError:
        return False
    return isinstance(items, dict) and bool(items) and all(record == VALID for record in items.values())


def _check_loaded(mask: np.ndarray, rgb: Image.Image, image: bytes) -> None:
    """A loaded record: an RGB image and a boolean mask of the image's own size (a corrupted header may
    still be a valid image of another size); the untouched files are the 8x6 image they were saved as."""
    assert mask.dtype == bool and rgb.mode == "RGB" and mask.shape == (rgb.height, rgb.width)
    assert image not in (JPEG, PNG) or rgb.size == (8, 6)


@FUZZ
@given(
    mapping=mappings(),
    image=IMAGE_BYTES,
    types=st.none() | st.lists(INTS | st.text(max_size=2), max_size=3),
)
def test_loader_loads_or_raises_value_error(mapping, image, types):
    root = _dataset(mapping, image)
    valid_types = types is None or all(type(t) is int and 0 <= t <= 9 for t in types)
    try:
        try:
            data = PieBench(root, types=types)
        except ValueError as err:
            assert str(err)  # says what is wrong
            assert not (_valid_mapping(mapping) and valid_types), err  # refused only what is malformed
            return
        for record in data:
            assert record.image_path.is_file() and 0 <= record.edit_type <= 9
            assert "[" not in record.source_prompt and "]" not in record.target_prompt
            try:
                mask, rgb = record.mask(), record.image()
            except ValueError as err:
                assert f"record {record.id}" in str(err)
                assert image not in (JPEG, PNG) or list(record.rle) != VALID["mask"], err  # valid files load
            else:
                _check_loaded(mask, rgb, image)
    finally:
        shutil.rmtree(root)


@FUZZ
@given(image=IMAGE_BYTES, rle=st.lists(st.integers(0, 60), max_size=6).filter(lambda r: len(r) % 2 == 0))
def test_record_images_load_or_raise_naming_the_record(image, rle):
    root = _dataset(json.dumps({"r1": {**VALID, "mask": rle}}).encode(), image)
    try:
        record = PieBench(root)[0]
        try:
            mask, rgb = record.mask(), record.image()
        except ValueError as err:
            assert "record r1" in str(err)
            in_range = max(rle[0::2], default=0) < 6 * 8
            assert image not in (JPEG, PNG) or (not in_range and "outside a 6x8 mask" in str(err)), err
        else:
            _check_loaded(mask, rgb, image)
    finally:
        shutil.rmtree(root)
